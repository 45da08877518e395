"""Session-wide fixtures: one Ray cluster, one moto S3 server, quiet and offline environment.

Ray is started lazily, once, by the first test that asks for ``ray_cluster`` (num_cpus=4 logical CPUs
on 2 cores so Ray Data read tasks can run next to Train workers; no dashboard).
"""

from __future__ import annotations

import os

import pytest

from tests.servers import free_port

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")  # tiny tensors: extra threads only add sync cost on 2 cores

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _mount_test_credentials() -> None:
    """Dummy S3 credentials as a *mounted secret* (a shared-credentials file in the environment of every process
    the suite starts, Ray nodes included), never in a runtime_env: the code under test finds them the way a real
    node does, through the AWS SDK's default chain. The instance-metadata lookup is off (no network here)."""
    import tempfile

    directory = tempfile.mkdtemp(prefix="slotmem-test-aws-")
    with open(os.path.join(directory, "credentials"), "w") as f:
        f.write("[default]\naws_access_key_id = testing\naws_secret_access_key = testing\n")
    with open(os.path.join(directory, "config"), "w") as f:
        f.write("[default]\nregion = us-east-1\n")
    os.environ.setdefault("AWS_SHARED_CREDENTIALS_FILE", os.path.join(directory, "credentials"))
    os.environ.setdefault("AWS_CONFIG_FILE", os.path.join(directory, "config"))
    os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")


_mount_test_credentials()


@pytest.fixture(scope="session")
def repo_root() -> str:
    return REPO


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=True,
                 runtime_env={"env_vars": {"PYTHONPATH": REPO, "DS_ACCELERATOR": "cpu",
                                           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 endpoint (moto server) on 127.0.0.1 with dummy credentials and a bucket."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port())
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = {"AWS_DEFAULT_REGION": "us-east-1"}  # credentials: the mounted file (_mount_test_credentials)
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import boto3

    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="slotmem-test")
    yield {"endpoint": endpoint, "bucket": "slotmem-test", **env}
    server.stop()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def mlflow_uri(tmp_path):
    return f"sqlite:///{tmp_path}/mlflow.db"
