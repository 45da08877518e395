"""The continuous pipeline on a real multi-node Ray cluster, losing a rollout node mid-run (issue 13).

Four `ray start` processes on 127.0.0.1: a head that runs no work (num_cpus=0), two rollout nodes
(``rollout_node: 1``, one CPU: one actor each) and a trainer node (``trainer_node: 1``); actors and workers are
pinned to their node type (cluster.pin_node_types). Storage is S3 (the session's moto server, credentials from the mounted shared-credentials
file every node inherits, nothing in a runtime_env); tracking is an `mlflow server` process with proxied artifacts.
The driver is a separate `slotmem pipeline` process joined to the head. Once Stage I trains, the raylet of
rollout node 1 is SIGKILLed: its actor's trajectories move to the other node, no committed round is touched, the
loop finishes, and the MLflow server holds one run tree.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid

import pytest
from mlflow.tracking import MlflowClient

from cluster.storage import resolve_storage
from rollout.shards import committed_rounds, read_manifest, round_files
from slotmem.config import load_config
from tests.servers import MlflowServer, RayProcessCluster

pytestmark = pytest.mark.timeout(1500)

# 24-frame trajectories, two per round; 2 + 5 + 5 iterations. Every row is trained on once (max_row_reuse=1) and the
# fleet pauses while 2 fresh rows wait, so at the kill (Stage I starting) at most ~6 unused rows exist while Stages
# I and II still need 12 (one per critic update, one per generator update): the loop cannot finish on the rows
# committed before the kill, and the rounds after it must come from the surviving node. With rows reused up to 8
# times the stages could finish on old rows alone (one CI run did: 4 rounds before the kill, 4 after).
SHORT = [
    "rollout.num_frames=24", "rollout.switch_frames=[6,9,12,15,18]", "rollout.switch_choices=[12]",
    "rollout.trajectories_per_round=2", "rollout.stall_timeout_s=60", "trainer.stage0_steps=2",
    "trainer.stage1_steps=5", "trainer.stage2_steps=5", "trainer.checkpoint_every=5", "trainer.ema_start_step=0",
    "trainer.publish_every=1", "pipeline.max_policy_lag=2", "pipeline.rows_ahead=2", "pipeline.max_row_reuse=1",
    "cluster.pin_node_types=true", "cluster.num_rollout_actors=2", "cluster.cpus_per_actor=1",
    "cluster.num_trainer_workers=1", "cluster.cpus_per_worker=1", "cluster.resource_wait_s=60",
]


@pytest.fixture
def cluster(tmp_path):
    # system metrics on (the suite turns them off elsewhere), sampled often enough for a short run
    env = {**os.environ, "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING": "true", "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "2"}
    nodes = RayProcessCluster(tmp_path, env)
    try:
        nodes.start_head(num_cpus=0)
        nodes.wait_for_nodes(1)
        for count, (name, cpus, resource) in enumerate(
                [("rollout1", 1, "rollout_node"), ("rollout2", 1, "rollout_node"), ("trainer", 3, "trainer_node")], 2):
            nodes.add_node(name, num_cpus=cpus, resources={resource: 1})
            nodes.wait_for_nodes(count)  # one at a time: concurrent raylet starts overload a small machine
        yield nodes
    finally:
        nodes.stop()


@pytest.fixture
def mlflow_server(tmp_path):
    server = MlflowServer(tmp_path / "mlflow").start()
    yield server
    server.stop()


def test_pipeline_survives_a_lost_rollout_node_on_s3_with_an_mlflow_server(cluster, mlflow_server, s3_server,
                                                                            tmp_path, repo_root):
    experiment = f"mn-{uuid.uuid4().hex[:6]}"
    overrides = [*SHORT, f"cluster.address={cluster.address}", f"storage.root=s3://{s3_server['bucket']}/mn",
                 f"storage.s3_endpoint={s3_server['endpoint']}", f"storage.experiment={experiment}",
                 f"tracking.tracking_uri={mlflow_server.uri}"]
    args = [sys.executable, "-m", "slotmem.cli", "pipeline", "--config", f"{repo_root}/configs/tiny-random.yaml"]
    for o in overrides:
        args += ["--set", o]
    log_path = tmp_path / "driver.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(args, cwd=repo_root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**cluster.env, "PYTHONPATH": repo_root})
    try:
        end = time.monotonic() + 900
        while "[train stage1] starting" not in log_path.read_text():
            assert proc.poll() is None and time.monotonic() < end, log_path.read_text()[-4000:]
            time.sleep(1.0)
        cfg = load_config(f"{repo_root}/configs/tiny-random.yaml", overrides)
        storage = resolve_storage(cfg.storage)
        before = {k: read_manifest(storage, k) for k in committed_rounds(storage)}
        cluster.kill_raylet("rollout1")  # the node is gone, as on a machine failure
        proc.wait(timeout=1200)
    finally:
        if proc.poll() is None:
            proc.kill()
    out = log_path.read_text()
    assert proc.returncode == 0, out[-5000:]
    # every progress line once (no duplicated worker output; Ray's own report of the lost raylet comes on top)
    assert [line.split(":")[0] for line in out.splitlines() if line.startswith("[pipeline] stage")] == [
        "[pipeline] stage 0", "[pipeline] stage 1", "[pipeline] stage 2"]

    # committed data is untouched and readable; rounds went on after the loss
    after = committed_rounds(storage)
    assert list(before) == after[:len(before)] and len(after) > len(before)
    for k, manifest in before.items():
        assert read_manifest(storage, k) == manifest
    for k in after:
        assert len(round_files(storage, k)) == len(read_manifest(storage, k)["files"])  # every shard sha256-verified
    assert "lost" in out and "requeued on the" in out, out[-4000:]  # the lost node's trajectories ran again
    sample = f"{storage.path('samples')}/sample.mp4"
    assert storage.fs.get_file_info(sample).size > 0  # published under storage.root on S3

    # one run tree on the tracking server, every run finished, artifacts through the server
    client = MlflowClient(mlflow_server.uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id}
    assert set(children) == {f"{experiment}-{s}" for s in ("stage0", "stage1", "stage2", "rollout", "sample")}
    assert all(r.info.status == "FINISHED" for r in runs), [(r.info.run_name, r.info.status) for r in runs]
    assert children[f"{experiment}-rollout"].data.metrics["rollout/rounds"] == len(after)
    sample_run = children[f"{experiment}-sample"].info.run_id
    assert any(a.path.endswith(".mp4") for a in client.list_artifacts(sample_run, "sample"))
    nodes = {k.split("/")[1] for r in runs for k in r.data.metrics if k.startswith("system/")}
    assert sum(n.startswith("rollout-") for n in nodes) >= 2 and any(n.startswith("trainer-") for n in nodes), nodes
