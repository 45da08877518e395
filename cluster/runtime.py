"""Connecting the driver to Ray: an embedded local cluster or a running one (DESIGN §6)."""

from __future__ import annotations

import logging
import os

from slotmem.config import ClusterConfig
from slotmem.errors import InputError

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
    """ray.init for ``cluster.address``: 'local' starts an embedded cluster, anything else joins one ('auto': the
    cluster `ray start` started on this machine).

    Returns the ray module. Calling it when Ray is already initialised (tests, a job driver started by
    ``ray job submit``) reuses the existing connection. A cluster that is already running where 'local' would
    start one, and a token the cluster refuses, are one-line InputErrors.
    """
    import ray

    if ray.is_initialized():
        return ray
    use_token_auth_if_given()
    env = {**WORKER_ENV, "PYTHONPATH": os.pathsep.join(filter(None, [repo_root(), os.environ.get("PYTHONPATH")]))}
    if cluster_cfg.gpus_per_worker == 0 and cluster_cfg.gpus_per_actor == 0:
        env["DS_ACCELERATOR"] = "cpu"
        env.setdefault("OMP_NUM_THREADS", "1")
    try:
        if cluster_cfg.address == "local" and not os.environ.get("RAY_ADDRESS"):
            # More logical CPUs than cores, so Ray Data read tasks can be scheduled next to Train workers
            # (cpu-stack-notes: with every CPU taken by workers the dataset read deadlocks). Worker output goes
            # to the session's log files; the console shows our progress lines (log_to_driver=False).
            # Ray 2.60 turns token auth on for a local cluster and says so on every start: this cluster is the job's
            # own (started and stopped with this job, no dashboard), so the notice is noise on the console.
            notice = logging.getLogger("ray._private.authentication.authentication_token_setup")
            level = notice.level
            notice.setLevel(logging.ERROR)
            try:
                ray.init(num_cpus=cluster_cfg.local_num_cpus, include_dashboard=False, runtime_env={"env_vars": env},
                         log_to_driver=False, logging_level="WARNING")
            finally:
                notice.setLevel(level)
        elif os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"):
            # A driver started by `ray job submit` / `slotmem submit`: the job's runtime_env already applies.
            ray.init(address=None if cluster_cfg.address == "local" else cluster_cfg.address, log_to_driver=False,
                     logging_level="WARNING")
        else:
            address = None if cluster_cfg.address == "local" else cluster_cfg.address
            ray.init(address=address, runtime_env={"env_vars": env}, log_to_driver=False, logging_level="WARNING")
    except ValueError as e:
        if "existing cluster" not in str(e):
            raise
        raise InputError("a Ray cluster is already running on this machine (`ray start`), and cluster.address=local "
                         "would start another: run on it with --set cluster.address=auto, or stop it first") from None
    except ray.exceptions.AuthenticationError as e:
        raise InputError(auth_error_message(cluster_cfg.address, e)) from None
    from cluster.console import route_to_session_logs

    route_to_session_logs()
    return ray


def use_token_auth_if_given() -> None:
    """A token in $RAY_AUTH_TOKEN / $RAY_AUTH_TOKEN_PATH means token auth: Ray's clients also need
    RAY_AUTH_MODE=token to send it (Ray 2.60), so set it when the user did not choose a mode."""
    if (os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")) and "RAY_AUTH_MODE" not in os.environ:
        os.environ["RAY_AUTH_MODE"] = "token"


def auth_error_message(address: str, err: BaseException) -> str:
    """One line for a refused Ray token (never the token itself)."""
    reason = "refused the token" if "invalid" in str(err).lower() else "needs a token"
    return (f"the Ray cluster at {address} uses token authentication and {reason}: on the head node run "
            "`ray get-auth-token`, then `export RAY_AUTH_TOKEN=<token>` here (or save it to ~/.ray/auth_token and "
            "`export RAY_AUTH_MODE=token`)")
