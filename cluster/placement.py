"""Where processes go: the one module that creates placement groups and trainer resource specs.

Rollout actors get one single-bundle placement group each, all reserved before any actor starts, so a fleet
either has all its actors or fails up front with the shape and the cluster's resources, instead of running with
half of them. One group per actor, not one group of N bundles, because a group whose node is lost goes to
RESCHEDULING until that bundle fits again, and Ray schedules pending placement groups in order: a half-lost
rollout group would block every placement group behind it — the trainer's next stage included. With one group per
actor, retiring an actor of a lost node removes its group and nothing waits for it (``RolloutPlacement.release``).
Each group's bundle is placed by Ray's default policy (pack a node up to half its resources, then spread); with
``cluster.pin_node_types`` each bundle also holds a share of the ``rollout_node`` resource, so actors land on
rollout nodes only (cluster/shape.py).

Trainer workers are placed by Ray Train itself from ``scaling_config(shape)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cluster.shape import ClusterShape
from slotmem.errors import InputError


@dataclass
class RolloutPlacement:
    """Ready placement groups, one single-bundle group per rollout actor."""

    pgs: list[PlacementGroup]
    shape: ClusterShape
    released: set[int] = field(default_factory=set)

    def strategy(self, index: int) -> PlacementGroupSchedulingStrategy:
        """Scheduling strategy putting actor `index` into its own group."""
        if not 0 <= index < self.shape.num_rollout_actors:
            raise InputError(f"rollout actor index {index} outside [0, {self.shape.num_rollout_actors})")
        return PlacementGroupSchedulingStrategy(placement_group=self.pgs[index], placement_group_bundle_index=0)

    def actor_options(self, index: int) -> dict[str, Any]:
        """Everything for ``ActorClass.options(**...)``: the bundle's resources and strategy."""
        res = self.shape.actor_resources()
        custom = {k: v for k, v in res.items() if k not in ("CPU", "GPU")}
        opts: dict[str, Any] = {"num_cpus": res.get("CPU", 0), "num_gpus": res.get("GPU", 0),
                                "scheduling_strategy": self.strategy(index)}
        if custom:
            opts["resources"] = custom
        return opts

    def release(self, index: int) -> None:
        """Free actor `index`'s group (its actor is retired: a lost node's bundle must not wait to be replaced)."""
        if index not in self.released:
            self.released.add(index)
            remove_placement_group(self.pgs[index])

    def remove(self) -> None:
        """Free every group not released yet (each is removed once)."""
        for index in range(len(self.pgs)):
            self.release(index)


def rollout_placement_group(shape: ClusterShape, timeout_s: float = 120.0) -> RolloutPlacement:
    """Reserve one group per rollout actor; wait until all are placed (InputError on timeout, nothing left)."""
    bundle = shape.actor_resources()
    pgs = [placement_group([bundle]) for _ in range(shape.num_rollout_actors)]
    ready, _ = ray.wait([pg.ready() for pg in pgs], num_returns=len(pgs), timeout=timeout_s)
    if len(ready) < len(pgs):
        for pg in pgs:
            remove_placement_group(pg)  # a pending group would grab resources as soon as they free up
        raise InputError(f"could not place {shape.num_rollout_actors} rollout actor(s) × {bundle} within "
                         f"{timeout_s:g} s ({len(ready)} placed); cluster resources: "
                         f"{_fmt_resources(ray.cluster_resources())}, available: "
                         f"{_fmt_resources(ray.available_resources())}")
    return RolloutPlacement(pgs=pgs, shape=shape)


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
