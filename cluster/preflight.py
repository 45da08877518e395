"""Checks a job runs before it starts anything, each failing with one line that names the field to change.

    storage     the root is writable (a missing bucket, denied access or a read-only directory is reported
                before any actor or worker starts), and a local root is refused on a cluster of more than one
                node unless storage.shared_filesystem says every node mounts it (otherwise actors on other nodes
                write shards the head never sees);
    tracking    a sqlite store lives on one node's disk: on more than one node the workers would each open their
                own, so a cluster needs a tracking server (tracking.tracking_uri=http://...);
    resources   the cluster shape (cluster/shape.py) fits the cluster's resources; when it does not yet, the
                autoscaler is asked for the missing bundles and the job waits up to cluster.resource_wait_s for
                them, then withdraws its request, so nothing stays requested after it.
"""

from __future__ import annotations

import time

from cluster.shape import ClusterShape
from cluster.storage import Storage
from slotmem.config import Config
from slotmem.errors import ConfigError, InputError

POLL_S = 5.0


def alive_nodes() -> list[dict]:
    import ray

    return [n for n in ray.nodes() if n.get("Alive")]


def check_multi_node(cfg: Config, storage: Storage, tracking_uri: str | None) -> None:
    nodes = len(alive_nodes())
    if nodes <= 1 or cfg.storage.shared_filesystem:
        return
    if storage.is_local:
        raise ConfigError(f"storage.root {cfg.storage.root!r} is a local directory, but the cluster has {nodes} nodes: "
                          "actors and workers on the other nodes could not see it. Use an s3:// root, or set "
                          "storage.shared_filesystem=true if every node mounts it at the same path")
    if tracking_uri and tracking_uri.startswith(("sqlite:", "file:")):
        raise ConfigError(f"tracking URI {tracking_uri.split('?')[0]!r} is a file on one node, but the cluster has "
                          f"{nodes} nodes: every trainer would open its own store. Run an MLflow server and set "
                          "tracking.tracking_uri=http://HOST:5000 (or $MLFLOW_TRACKING_URI)")


def wait_for_resources(shape: ClusterShape, *, concurrent: bool, timeout_s: float, log=print) -> None:
    """shape.check against the cluster, asking the autoscaler for the difference and waiting up to timeout_s."""
    import ray

    deadline = time.monotonic() + timeout_s
    requested = False
    try:
        while True:
            try:
                shape.check(ray.cluster_resources(), concurrent=concurrent)
                return
            except InputError as e:
                if time.monotonic() >= deadline:
                    raise InputError(f"{e} (waited {timeout_s:g} s for the autoscaler: cluster.resource_wait_s)") from None
                if not requested:
                    from ray.autoscaler.sdk import request_resources

                    request_resources(bundles=shape.bundles(concurrent=concurrent))
                    requested = True
                    log(f"[cluster] waiting up to {timeout_s:g} s for the autoscaler: {e}")
                time.sleep(min(POLL_S, max(0.0, deadline - time.monotonic())))
    finally:
        if requested:
            from ray.autoscaler.sdk import request_resources

            request_resources(bundles=[])  # no resource request outlives the check


def preflight(cfg: Config, storage: Storage, *, job: str, tracking_uri: str | None = None, log=print) -> None:
    """Every check of a job ('pipeline', 'rollout' or 'train') on a connected Ray cluster."""
    storage.check_writable()
    check_multi_node(cfg, storage, tracking_uri)
    shape = ClusterShape.from_config(cfg.cluster, cfg.trainer)
    if job == "rollout":
        shape = shape.only("rollout")
    elif job == "train":
        shape = shape.only("train")
    wait_for_resources(shape, concurrent=job == "pipeline" and cfg.pipeline.mode == "continuous",
                       timeout_s=cfg.cluster.resource_wait_s, log=log)
