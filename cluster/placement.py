"""Where processes go: the one module that creates placement groups and trainer resource specs.

Rollout actors get one placement-group bundle each, reserved all at once, so a round either has
all its actors or fails up front with the shape and the cluster's resources, instead of running
with half of them. Strategy PACK (the default): rollout actors never talk to each other, so
spreading buys nothing, while packing keeps whole nodes free for the trainer's PACK group (its
workers do all-reduce every step) and is still best-effort, so it schedules across nodes when one
node is not enough. STRICT_PACK would refuse a cluster of one-GPU nodes; SPREAD / STRICT_SPREAD
fragment GPUs. With ``cluster.pin_node_types`` each bundle also holds a share of the
``rollout_node`` resource, so the group lands on rollout nodes only (cluster/shape.py).

Trainer workers are placed by Ray Train itself from ``scaling_config(shape)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cluster.shape import ClusterShape
from slotmem.errors import InputError

ROLLOUT_STRATEGY = "PACK"


@dataclass
class RolloutPlacement:
    """A ready placement group with one bundle per rollout actor."""

    pg: PlacementGroup
    shape: ClusterShape

    def strategy(self, index: int) -> PlacementGroupSchedulingStrategy:
        """Scheduling strategy putting actor `index` into its own bundle."""
        if not 0 <= index < self.shape.num_rollout_actors:
            raise InputError(f"rollout actor index {index} outside [0, {self.shape.num_rollout_actors})")
        return PlacementGroupSchedulingStrategy(placement_group=self.pg, placement_group_bundle_index=index)

    def actor_options(self, index: int) -> dict[str, Any]:
        """Everything for ``ActorClass.options(**...)``: the bundle's resources and strategy."""
        res = self.shape.actor_resources()
        custom = {k: v for k, v in res.items() if k not in ("CPU", "GPU")}
        opts: dict[str, Any] = {"num_cpus": res.get("CPU", 0), "num_gpus": res.get("GPU", 0),
                                "scheduling_strategy": self.strategy(index)}
        if custom:
            opts["resources"] = custom
        return opts

    def remove(self) -> None:
        remove_placement_group(self.pg)


def rollout_placement_group(shape: ClusterShape, timeout_s: float = 120.0,
                            strategy: str = ROLLOUT_STRATEGY) -> RolloutPlacement:
    """Reserve one bundle per rollout actor; wait until all are placed (InputError on timeout)."""
    bundles = [shape.actor_resources() for _ in range(shape.num_rollout_actors)]
    pg = placement_group(bundles, strategy=strategy)
    ready, _ = ray.wait([pg.ready()], timeout=timeout_s)
    if not ready:
        remove_placement_group(pg)  # a pending group would grab resources as soon as they free up
        raise InputError(f"could not place {shape.num_rollout_actors} rollout actor(s) × {bundles[0]} "
                         f"({strategy}) within {timeout_s:g} s; cluster resources: "
                         f"{_fmt_resources(ray.cluster_resources())}, available: "
                         f"{_fmt_resources(ray.available_resources())}")
    return RolloutPlacement(pg=pg, shape=shape)


def scaling_config(shape: ClusterShape):
    """Ray Train ScalingConfig for the trainer workers (PACK: all-reduce wants them close)."""
    from ray.train import ScalingConfig

    return ScalingConfig(num_workers=shape.num_trainer_workers, use_gpu=shape.use_gpu,
                         resources_per_worker=shape.worker_resources(), placement_strategy="PACK")


def torch_config(shape: ClusterShape, timeout_s: int = 1800):
    """Ray Train TorchConfig: NCCL on GPUs, gloo on CPUs (the tiny preset)."""
    from ray.train.torch import TorchConfig

    return TorchConfig(backend=shape.backend, timeout_s=timeout_s)


def _fmt_resources(res: dict[str, float]) -> str:
    keep = {k: v for k, v in res.items() if not k.startswith(("node:", "memory", "object_store_memory"))}
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(keep.items())) + "}"
