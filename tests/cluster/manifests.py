"""Shared data and fixtures of the deployment-file tests: instance shapes, the parsed manifests, the Dockerfile.


Files: ray_cluster.yaml (Ray 2.60 cluster launcher, validated against Ray's own ray-schema.json),
cluster/kuberay-rayjob.yaml (a ServiceAccount + a KubeRay RayJob, validated against the hand-written
cluster/schemas/rayjob-v1.7.0.schema.json), Dockerfile / .dockerignore (checked statically: no Docker
engine here). Deployability facts are asserted from the files themselves: pod requests below node
allocatable, sized /dev/shm, GPU tolerations, EFA + NCCL on trainers, matching idle timeouts, S3
storage, no credentials, one image and one Ray version everywhere.

Set SLOTMEM_KUBERAY_CRD=/path/to/ray.io_rayjobs.yaml (KubeRay v1.7.0, not part of this repository) to
also check the hand-written schema and the manifest against the real CRD.
"""

from __future__ import annotations

import json
import math
import re
import shlex

import pytest
import yaml

from cluster.shape import NODE_TYPE_SHARE, ROLLOUT_NODE, TRAINER_NODE, ClusterShape
from slotmem.config import load_config

# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------

# EC2 instance types the manifests are sized for. vCPU, memory (GiB), GPUs and EFA interfaces from
# the AWS EC2 instance-type pages (aws.amazon.com/ec2/instance-types/m5/, /g6e/, /p4/); max_pods
# from amazon-eks-ami's eni-max-pods.txt (m5.2xlarge 58, p4d/p4de.24xlarge 737; 737 is used as an
# upper bound for g6e.12xlarge, whose own value was not looked up). Written down from those
# sources, not verifiable offline. efa_interfaces None = not relied on.
INSTANCE_SHAPES = {
    "m5.2xlarge": {"vcpu": 8, "memory_gib": 32, "gpus": 0, "efa_interfaces": None, "max_pods": 58},
    "g6e.12xlarge": {"vcpu": 48, "memory_gib": 384, "gpus": 4, "efa_interfaces": None, "max_pods": 737},
    "p4de.24xlarge": {"vcpu": 96, "memory_gib": 1152, "gpus": 8, "efa_interfaces": 4, "max_pods": 737},
}
# What a node's allocatable loses besides kubelet's own reservation: the kernel reports less memory
# than the nominal size (MemTotal), and DaemonSets (aws-node, kube-proxy, NVIDIA and EFA device
# plugins, CSI, monitoring) request CPU and memory on every node. Conservative round numbers.
MEMTOTAL_FRACTION = 0.95
DAEMONSET_CPU = 1.0
DAEMONSET_MEMORY_GIB = 2.0
EVICTION_HARD_GIB = 100 / 1024  # kubelet's memory.available<100Mi

GIB = 1024**3
FORBIDDEN_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN",
                 "AWS_PROFILE", "AWS_SHARED_CREDENTIALS_FILE")
ACCESS_KEY_ID = re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b")
# NCCL over EFA on the trainer nodes (AWS-specific); None = any value.
TRAINER_ENV = {"FI_PROVIDER": "efa", "FI_EFA_USE_DEVICE_RDMA": "1", "NCCL_SOCKET_IFNAME": None,
               "NCCL_DEBUG": "WARN"}
DLAMI_NAME = "Deep Learning Base OSS Nvidia Driver GPU AMI (Ubuntu 22.04)"


def allocatable(instance_type: str) -> tuple[float, float]:
    """(CPU cores, GiB) left for our pods on an EKS node of this type.

    kube-reserved as the EKS AMIs compute it: CPU 6 % of the first core, 1 % of the second, 0.5 % of
    the next two, 0.25 % of the rest; memory 255 MiB + 11 MiB per schedulable pod; plus the
    eviction threshold and the DaemonSet budget above.
    """
    shape = INSTANCE_SHAPES[instance_type]
    n = shape["vcpu"]
    reserved_cpu = 0.06 + 0.01 * min(max(n - 1, 0), 1) + 0.005 * min(max(n - 2, 0), 2) + 0.0025 * max(n - 4, 0)
    reserved_gib = (255 + 11 * shape["max_pods"]) / 1024 + EVICTION_HARD_GIB
    return (n - reserved_cpu - DAEMONSET_CPU,
            shape["memory_gib"] * MEMTOTAL_FRACTION - reserved_gib - DAEMONSET_MEMORY_GIB)


_BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
_DECIMAL = {"n": 1e-9, "u": 1e-6, "m": 1e-3, "": 1, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18}


def quantity(q) -> float:
    """A Kubernetes quantity ('44', '500m', '320Gi', 8) as a float (cores, bytes, counts)."""
    m = re.fullmatch(r"([+-]?[0-9.]+)([KMGTPE]i|[numkMGTPE]?)", str(q))
    assert m, f"not a quantity: {q!r}"
    number, suffix = float(m.group(1)), m.group(2)
    return number * (_BINARY[suffix] if suffix in _BINARY else _DECIMAL[suffix])


# ----------------------------------------------------------------------------------------------
# Fixtures
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wan_shape(repo_root) -> ClusterShape:
    cfg = load_config(f"{repo_root}/configs/wan2.1-1.3b.yaml")
    return ClusterShape.from_config(cfg.cluster, cfg.trainer)


@pytest.fixture(scope="module")
def launcher(repo_root) -> dict:
    with open(f"{repo_root}/ray_cluster.yaml") as f:
        return yaml.safe_load(f)


@pytest.fixture(scope="module")
def k8s_docs(repo_root) -> list[dict]:
    with open(f"{repo_root}/cluster/kuberay-rayjob.yaml") as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


@pytest.fixture(scope="module")
def rayjob(k8s_docs) -> dict:
    jobs = [d for d in k8s_docs if d.get("kind") == "RayJob"]
    assert len(jobs) == 1
    return jobs[0]


@pytest.fixture(scope="module")
def rayjob_schema(repo_root) -> dict:
    with open(f"{repo_root}/cluster/schemas/rayjob-v1.7.0.schema.json") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def dockerfile(repo_root) -> dict:
    """The Dockerfile as instructions (continuations joined, comments dropped) plus its comment text."""
    with open(f"{repo_root}/Dockerfile") as f:
        text = f.read()
    instructions, comments, current = [], [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            comments.append(stripped[1:].strip())
            continue
        if not stripped and not current:
            continue
        current += " " + stripped.rstrip("\\").strip() if current else stripped.rstrip("\\").strip()
        if not stripped.endswith("\\"):
            op, _, args = current.partition(" ")
            instructions.append((op.upper(), args.strip()))
            current = ""
    assert not current, "Dockerfile ends inside a continued line"
    return {"instructions": instructions, "comments": comments, "text": text}


def _pods(rayjob: dict) -> dict[str, dict]:
    """Group name ('head', 'rollout', 'trainer') -> group spec."""
    cluster = rayjob["spec"]["rayClusterSpec"]
    return {"head": cluster["headGroupSpec"], **{g["groupName"]: g for g in cluster["workerGroupSpecs"]}}


def _ray_container(group: dict) -> dict:
    return group["template"]["spec"]["containers"][0]  # KubeRay starts Ray in the first container


def _env(container: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def _docker_env(options: list[str]) -> dict[str, str]:
    """`--env K=V` / `-e K=V` entries of docker run options."""
    tokens = shlex.split(" ".join(options))
    out = {}
    for i, tok in enumerate(tokens):
        if tok in ("--env", "-e") and i + 1 < len(tokens):
            k, _, v = tokens[i + 1].partition("=")
            out[k] = v
        elif tok.startswith("--env="):
            k, _, v = tok[len("--env="):].partition("=")
            out[k] = v
    return out


def _sets(tokens: list[str]) -> dict[str, str]:
    """`--set section.field=value` overrides of a slotmem command line."""
    return dict(tokens[i + 1].split("=", 1) for i, t in enumerate(tokens) if t == "--set")


def _launcher_submit_command(repo_root) -> list[str]:
    """The `slotmem submit ...` command documented in ray_cluster.yaml's header comment."""
    with open(f"{repo_root}/ray_cluster.yaml") as f:
        lines = [ln.lstrip("#").strip() for ln in f if ln.startswith("#") and "slotmem submit --" in ln]
    assert len(lines) == 1, f"expected one documented `slotmem submit` command, found {lines}"
    tokens = shlex.split(lines[0])
    i = tokens.index("slotmem")
    assert tokens[i + 1] == "submit"
    return tokens[i:]


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
