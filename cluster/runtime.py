"""Connecting the driver to Ray: an embedded local cluster or a running one (DESIGN §6)."""

from __future__ import annotations

import os

from slotmem.config import ClusterConfig

# Environment every Ray worker process of ours gets: offline model loading, CPU DeepSpeed without
# JIT builds where no GPU exists, quiet Ray Data progress bars in job logs.
WORKER_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def repo_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def connect(cluster_cfg: ClusterConfig):
    """ray.init for ``cluster.address``: 'local' starts an embedded cluster, anything else joins one.

    Returns the ray module. Calling it when Ray is already initialised (tests, a job driver started by
    ``ray job submit``) reuses the existing connection.
    """
    import ray

    if ray.is_initialized():
        return ray
    env = {**WORKER_ENV, "PYTHONPATH": os.pathsep.join(filter(None, [repo_root(), os.environ.get("PYTHONPATH")]))}
    if cluster_cfg.gpus_per_worker == 0 and cluster_cfg.gpus_per_actor == 0:
        env["DS_ACCELERATOR"] = "cpu"
        env.setdefault("OMP_NUM_THREADS", "1")
    if cluster_cfg.address == "local" and not os.environ.get("RAY_ADDRESS"):
        # More logical CPUs than cores, so Ray Data read tasks can be scheduled next to Train workers
        # (cpu-stack-notes: with every CPU taken by workers the dataset read deadlocks).
        ray.init(num_cpus=cluster_cfg.local_num_cpus, include_dashboard=False, runtime_env={"env_vars": env},
                 log_to_driver=True)
    elif os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"):
        # A driver started by `ray job submit` / `slotmem submit`: the job's runtime_env already applies.
        ray.init(address=None if cluster_cfg.address == "local" else cluster_cfg.address, log_to_driver=True)
    else:
        address = None if cluster_cfg.address == "local" else cluster_cfg.address
        ray.init(address=address, runtime_env={"env_vars": env}, log_to_driver=True)
    return ray
