"""ray_cluster.yaml and the KubeRay RayJob agree with Ray's schema and with the wan2.1-1.3b shape."""

from __future__ import annotations

import json
import math
import os
import re

import jsonschema
import pytest
import yaml

from cluster.shape import NODE_TYPE_SHARE, ROLLOUT_NODE, TRAINER_NODE, ClusterShape
from slotmem.config import load_config


@pytest.fixture(scope="module")
def wan_shape(repo_root) -> ClusterShape:
    cfg = load_config(f"{repo_root}/configs/wan2.1-1.3b.yaml")
    return ClusterShape.from_config(cfg.cluster, cfg.trainer)


@pytest.fixture(scope="module")
def launcher(repo_root) -> dict:
    with open(f"{repo_root}/ray_cluster.yaml") as f:
        return yaml.safe_load(f)


@pytest.fixture(scope="module")
def rayjob(repo_root) -> dict:
    with open(f"{repo_root}/cluster/kuberay-rayjob.yaml") as f:
        return yaml.safe_load(f)


def _fits(node: dict[str, float], per_process: dict[str, float]) -> int:
    """How many processes with `per_process` resources one node with `node` resources holds."""
    return min(math.floor(node.get(k, 0.0) / v + 1e-9) for k, v in per_process.items())


def _check_groups(shape: ClusterShape, rollout: dict, trainer: dict, head: dict, min_nodes: dict, max_nodes: dict):
    """Node resources per group -> the shape's actors/workers fit at the minimum size, on their own group."""
    assert head.get("CPU", 0) == 0 and head.get("GPU", 0) == 0, "the head must offer no CPU/GPU for work"
    assert rollout[ROLLOUT_NODE] >= NODE_TYPE_SHARE and TRAINER_NODE not in rollout
    assert trainer[TRAINER_NODE] >= NODE_TYPE_SHARE and ROLLOUT_NODE not in trainer
    # pinned actors fit only on rollout nodes, pinned workers only on trainer nodes
    assert _fits(trainer, shape.actor_resources()) == 0 and _fits(rollout, shape.worker_resources()) == 0
    assert _fits(rollout, shape.actor_resources()) * min_nodes["rollout"] >= shape.num_rollout_actors
    assert _fits(trainer, shape.worker_resources()) * min_nodes["trainer"] >= shape.num_trainer_workers
    assert max_nodes["rollout"] >= min_nodes["rollout"] and max_nodes["trainer"] >= min_nodes["trainer"]
    # the whole cluster at its minimum size passes the shape's own check (rollout and training at once)
    total: dict[str, float] = {}
    for res, n in ((head, 1), (rollout, min_nodes["rollout"]), (trainer, min_nodes["trainer"])):
        for k, v in res.items():
            total[k] = total.get(k, 0.0) + v * n
    shape.check(total, concurrent=True)


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


def test_launcher_installs_the_project_with_pinned_torch(launcher):
    setup = " ".join(launcher["setup_commands"])
    assert re.search(r"torch==\d+\.\d+\.\d+", setup) and "-e" in setup and "slotmem" in setup
    assert "~/slotmem" in launcher["file_mounts"] and launcher["file_mounts"]["~/slotmem"] == "."
    assert any("--dashboard-host=0.0.0.0" in c for c in launcher["head_start_ray_commands"])


def test_every_launcher_key_is_commented(repo_root):
    """Each mapping key line of ray_cluster.yaml is preceded by a comment line (or has one inline)."""
    with open(f"{repo_root}/ray_cluster.yaml") as f:
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


# ----------------------------------------------------------------------------------------------
# KubeRay RayJob
# ----------------------------------------------------------------------------------------------


def _pod_resources(group: dict) -> dict[str, float]:
    """Ray resources of one pod: CPU/GPU from the container limits, custom ones from rayStartParams."""
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    params = group.get("rayStartParams", {})
    res = {"CPU": float(params.get("num-cpus", limits.get("cpu", 0))),
           "GPU": float(limits.get("nvidia.com/gpu", 0))}
    if "resources" in params:  # KubeRay passes it verbatim to `ray start --resources=...`: a quoted JSON string
        res.update(json.loads(json.loads(params["resources"])))
    return res


def test_rayjob_runs_the_pipeline_and_cleans_up(rayjob):
    assert rayjob["apiVersion"] == "ray.io/v1" and rayjob["kind"] == "RayJob"
    spec = rayjob["spec"]
    assert spec["entrypoint"] == "slotmem pipeline --config configs/wan2.1-1.3b.yaml"
    assert spec["shutdownAfterJobFinishes"] is True
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert set(runtime_env) <= {"working_dir", "excludes", "env_vars", "py_modules", "pip", "config"}
    import ray

    assert spec["rayClusterSpec"]["rayVersion"] == ray.__version__


def test_rayjob_groups_match_the_wan_shape(rayjob, wan_shape):
    cluster = rayjob["spec"]["rayClusterSpec"]
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    assert set(groups) == {"rollout", "trainer"}
    _check_groups(wan_shape, rollout=_pod_resources(groups["rollout"]), trainer=_pod_resources(groups["trainer"]),
                  head=_pod_resources(cluster["headGroupSpec"]),
                  min_nodes={k: g["minReplicas"] for k, g in groups.items()},
                  max_nodes={k: g["maxReplicas"] for k, g in groups.items()})
    for g in groups.values():
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
