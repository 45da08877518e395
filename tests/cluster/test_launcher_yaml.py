"""ray_cluster.yaml (Ray 2.60 cluster launcher): Ray's own schema, the wan2.1-1.3b shape, the image, a named AMI, EFA."""

from __future__ import annotations

import json
import os
import re

import jsonschema
import pytest

from tests.cluster.manifests import (  # noqa: F401 - fixtures are used by name
    DLAMI_NAME, FORBIDDEN_ENV, INSTANCE_SHAPES, TRAINER_ENV, _check_groups, _docker_env, launcher, rayjob, wan_shape)


# ----------------------------------------------------------------------------------------------
# ray_cluster.yaml
# ----------------------------------------------------------------------------------------------


def test_launcher_yaml_validates_against_rays_schema(launcher):
    import ray.autoscaler

    schema_path = os.path.join(os.path.dirname(ray.autoscaler.__file__), "ray-schema.json")
    with open(schema_path) as f:
        schema = json.load(f)
    jsonschema.validate(launcher, schema)  # additionalProperties: false -> unknown keys fail
    assert set(launcher) <= set(schema["properties"])

    # and the launcher's own loader (defaults filled in, then validated) accepts it
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(launcher))

    # the AWS bootstrap step for EFA interfaces (offline part): subnet + security group per interface,
    # none at node level
    from ray.autoscaler._private.aws.config import _configure_from_network_interfaces

    configured = _configure_from_network_interfaces(json.loads(json.dumps(launcher)))
    trainer = configured["available_node_types"]["trainer_gpu"]["node_config"]
    assert trainer["SubnetIds"] and trainer["SecurityGroupIds"]


def test_launcher_node_types_match_the_wan_shape(launcher, wan_shape):
    types = launcher["available_node_types"]
    assert set(types) == {"head", "rollout_gpu", "trainer_gpu"} and launcher["head_node_type"] == "head"
    _check_groups(wan_shape, rollout=types["rollout_gpu"]["resources"], trainer=types["trainer_gpu"]["resources"],
                  head=types["head"]["resources"],
                  min_nodes={"rollout": types["rollout_gpu"]["min_workers"],
                             "trainer": types["trainer_gpu"]["min_workers"]},
                  max_nodes={"rollout": types["rollout_gpu"]["max_workers"],
                             "trainer": types["trainer_gpu"]["max_workers"]})
    assert launcher["max_workers"] >= types["rollout_gpu"]["max_workers"] + types["trainer_gpu"]["max_workers"]


def test_launcher_runs_ray_in_the_project_image(launcher):
    docker = launcher["docker"]
    assert docker["image"] and docker["container_name"] and docker["pull_before_run"] is True
    setup = " ".join(launcher["setup_commands"])
    assert "pip install" not in setup, "the image is the environment: nothing is installed on the nodes"
    assert re.search(r"ray\.__version__ == '\d+\.\d+\.\d+'", setup), "setup must check the image's Ray version"
    assert launcher["file_mounts"] == {}, "code ships in the image and with each job's working_dir"
    assert any("--dashboard-host=0.0.0.0" in c for c in launcher["head_start_ray_commands"])
    # ECR login on the host uses the instance profile; no registry password anywhere
    init = " ".join(launcher["initialization_commands"])
    registry = docker["image"].split("/")[0]
    assert "aws ecr get-login-password" in init and "--password-stdin" in init and registry in init


def test_launcher_uses_a_named_cuda12_dlami(launcher, repo_root):
    types = launcher["available_node_types"]
    amis = {t["node_config"]["ImageId"] for t in types.values()}
    assert len(amis) == 1, f"one AMI for every node type, got {amis}"
    (ami,) = amis
    assert ami != "latest_dlami" and re.fullmatch(r"ami-[0-9a-f]{8,17}", ami), ami
    with open(f"{repo_root}/ray_cluster.yaml") as f:
        text = f.read()
    assert DLAMI_NAME in text and "aws ec2 describe-images" in text and "latest_dlami" in text
    assert "--owners amazon" in text


def test_launcher_instances_gpus_and_efa(launcher):
    types = launcher["available_node_types"]
    for name, t in types.items():
        itype = t["node_config"]["InstanceType"]
        assert itype in INSTANCE_SHAPES, f"{name}: {itype} has no shape in INSTANCE_SHAPES"
        shape = INSTANCE_SHAPES[itype]
        assert t["resources"].get("CPU", 0) <= shape["vcpu"]
        assert t["resources"].get("GPU", 0) == shape["gpus"], f"{name}: a GPU node's GPUs all go to Ray"
        options = t.get("docker", {}).get("worker_run_options", [])
        if shape["gpus"]:
            assert "--gpus all" in options, f"{name}: GPUs must be passed into the container"
    trainer = types["trainer_gpu"]
    shape = INSTANCE_SHAPES[trainer["node_config"]["InstanceType"]]
    nics = trainer["node_config"]["NetworkInterfaces"]
    assert len(nics) == shape["efa_interfaces"], "one EFA interface per network card"
    assert [n["NetworkCardIndex"] for n in nics] == list(range(len(nics)))
    assert all(n["InterfaceType"] == "efa" for n in nics)
    assert [n["DeviceIndex"] for n in nics] == [0] + [1] * (len(nics) - 1)
    assert trainer["node_config"]["Placement"]["GroupName"], "EFA wants a cluster placement group"
    options = trainer["docker"]["worker_run_options"]
    assert "--device=/dev/infiniband" in options and "--ulimit memlock=-1:-1" in options
    env = _docker_env(options)
    for k, v in TRAINER_ENV.items():
        assert k in env and (v is None or env[k] == v), f"trainer docker env {k}"


def test_launcher_credentials_come_from_instance_profiles(launcher):
    for name, t in launcher["available_node_types"].items():
        profile = t["node_config"].get("IamInstanceProfile", {})
        assert profile.get("Name") or profile.get("Arn"), f"{name}: no IAM instance profile for S3/ECR"
        assert t["node_config"]["MetadataOptions"]["HttpTokens"] == "required"
    env = _docker_env(launcher["docker"].get("run_options", []))
    for t in launcher["available_node_types"].values():
        env.update(_docker_env(t.get("docker", {}).get("worker_run_options", [])))
    assert not set(env) & set(FORBIDDEN_ENV)


@pytest.mark.parametrize("path", ["ray_cluster.yaml", "cluster/kuberay-rayjob.yaml"])
def test_every_manifest_key_is_commented(repo_root, path):
    """Each mapping key line is preceded by a comment line (or has one inline)."""
    with open(f"{repo_root}/{path}") as f:
        lines = f.read().splitlines()
    key_line = re.compile(r"^\s*(- )?[A-Za-z_~][\w./~-]*:")
    uncommented = []
    for i, line in enumerate(lines):
        if key_line.match(line) and "#" not in line:
            prev = lines[i - 1].strip() if i else ""
            # keys nested in a block whose parent is commented (EBS device mapping) count as explained
            if not prev.startswith("#") and not (prev.endswith(":") or prev.startswith("- ")):
                uncommented.append(line)
    assert uncommented == []
