"""The static shape of a job: how many rollout actors and trainer workers, and what each needs.

``ClusterShape`` is built from ``cluster`` and ``trainer`` config and knows nothing of Ray, so it
can be checked against any ``ray.cluster_resources()``-style dict before anything is scheduled.
``cluster/placement.py`` turns it into placement groups and a Ray Train ScalingConfig.

Node pinning (``cluster.pin_node_types``): the nodes of ``ray_cluster.yaml`` and the KubeRay
RayJob advertise a custom resource, ``rollout_node: 1`` or ``trainer_node: 1``. A pinned rollout
actor asks for ``NODE_TYPE_SHARE`` of ``rollout_node`` (a trainer worker the same of
``trainer_node``), which is small enough for every actor of a node to fit and makes the
autoscaler start the right node type.
"""

from __future__ import annotations

from dataclasses import dataclass

from slotmem.config import ClusterConfig, TrainerConfig
from slotmem.errors import InputError

ROLLOUT_NODE = "rollout_node"
TRAINER_NODE = "trainer_node"
NODE_TYPE_SHARE = 0.001
"""Amount of rollout_node / trainer_node one actor or worker asks for (1000 per node at most)."""


def _fmt(x: float) -> str:
    return f"{x:g}"


@dataclass(frozen=True)
class ClusterShape:
    """Rollout actors and trainer workers with their per-process resources."""

    num_rollout_actors: int
    gpus_per_actor: float
    cpus_per_actor: float
    num_trainer_workers: int
    gpus_per_worker: float
    cpus_per_worker: float
    zero_stage: int
    pin_node_types: bool = False

    def __post_init__(self):
        for role, cpus, gpus in (("rollout actor", self.cpus_per_actor, self.gpus_per_actor),
                                 ("trainer worker", self.cpus_per_worker, self.gpus_per_worker)):
            if cpus <= 0 and gpus <= 0:
                raise InputError(f"cluster: a {role} must ask for some CPU or GPU (both are 0)")
            if gpus > 1 and gpus != int(gpus):
                raise InputError(f"cluster: a {role} asks for {_fmt(gpus)} GPUs; more than one GPU must be whole")

    @classmethod
    def from_config(cls, cluster_cfg: ClusterConfig, trainer_cfg: TrainerConfig) -> "ClusterShape":
        return cls(num_rollout_actors=cluster_cfg.num_rollout_actors, gpus_per_actor=cluster_cfg.gpus_per_actor,
                   cpus_per_actor=cluster_cfg.cpus_per_actor, num_trainer_workers=cluster_cfg.num_trainer_workers,
                   gpus_per_worker=cluster_cfg.gpus_per_worker, cpus_per_worker=cluster_cfg.cpus_per_worker,
                   zero_stage=trainer_cfg.zero_stage, pin_node_types=cluster_cfg.pin_node_types)

    # -- derived ------------------------------------------------------------------------------

    @property
    def rollout_use_gpu(self) -> bool:
        return self.gpus_per_actor > 0

    @property
    def use_gpu(self) -> bool:
        """Trainer workers run on GPUs (NCCL) or on CPUs (gloo, the tiny preset)."""
        return self.gpus_per_worker > 0

    @property
    def backend(self) -> str:
        """torch.distributed backend of the trainer workers."""
        return "nccl" if self.use_gpu else "gloo"

    def actor_resources(self) -> dict[str, float]:
        """Resources of one rollout actor (= one placement-group bundle); zero entries left out."""
        return _resources(self.cpus_per_actor, self.gpus_per_actor, ROLLOUT_NODE if self.pin_node_types else None)

    def worker_resources(self) -> dict[str, float]:
        """Resources of one trainer worker (Ray Train resources_per_worker)."""
        return _resources(self.cpus_per_worker, self.gpus_per_worker, TRAINER_NODE if self.pin_node_types else None)

    def needs(self, concurrent: bool = True) -> dict[str, float]:
        """Total resources: rollout + training at once (concurrent), or the larger of the two."""
        rollout = {k: v * self.num_rollout_actors for k, v in self.actor_resources().items()}
        train = {k: v * self.num_trainer_workers for k, v in self.worker_resources().items()}
        keys = sorted(set(rollout) | set(train))
        combine = (lambda a, b: a + b) if concurrent else max
        return {k: combine(rollout.get(k, 0.0), train.get(k, 0.0)) for k in keys}

    def only(self, role: str) -> "ClusterShape":
        """The shape of one role alone ('rollout' or 'train'), for jobs that run only that part."""
        import dataclasses

        return dataclasses.replace(self, num_trainer_workers=0) if role == "rollout" else dataclasses.replace(
            self, num_rollout_actors=0)

    def bundles(self, concurrent: bool = True) -> list[dict[str, float]]:
        """One resource bundle per process (what the autoscaler is asked for)."""
        actors = [self.actor_resources()] * self.num_rollout_actors
        workers = [self.worker_resources()] * self.num_trainer_workers
        if concurrent:
            return actors + workers
        return actors if len(actors) >= len(workers) else workers

    def describe(self) -> str:
        return (f"{self.num_rollout_actors} rollout actor(s) × ({_fmt(self.gpus_per_actor)} GPU, "
                f"{_fmt(self.cpus_per_actor)} CPU); {self.num_trainer_workers} trainer worker(s) × "
                f"({_fmt(self.gpus_per_worker)} GPU, {_fmt(self.cpus_per_worker)} CPU), ZeRO-{self.zero_stage}, "
                f"{self.backend}")

    # -- checking against a cluster -------------------------------------------------------------

    def check(self, resources: dict[str, float], concurrent: bool = True) -> None:
        """Raise InputError unless `resources` (as from ray.cluster_resources()) fit this shape.

        The message spells out every factor, e.g. "needs 2 actors × 1 GPU + 8 workers × 1 GPU =
        10 GPU, cluster has 8 GPU". `concurrent=False` checks rollout and training one at a time.
        """
        problems = []
        for res, per_actor, per_worker in (("GPU", self.gpus_per_actor, self.gpus_per_worker),
                                           ("CPU", self.cpus_per_actor, self.cpus_per_worker)):
            need = self.needs(concurrent).get(res, 0.0)
            have = float(resources.get(res, 0.0))
            if need > have + 1e-9:
                a = f"{self.num_rollout_actors} actors × {_fmt(per_actor)} {res}"
                w = f"{self.num_trainer_workers} workers × {_fmt(per_worker)} {res}"
                how = f"{a} + {w}" if concurrent else f"max({a}, {w})"
                problems.append(f"needs {how} = {_fmt(need)} {res}, cluster has {_fmt(have)} {res}")
        if self.pin_node_types:
            for res, role in ((ROLLOUT_NODE, "rollout actors"), (TRAINER_NODE, "trainer workers")):
                if float(resources.get(res, 0.0)) <= 0:
                    problems.append(f"{role} are pinned to nodes with the custom resource {res!r} "
                                    f"(cluster.pin_node_types=true) but no node has it; start nodes from "
                                    f"ray_cluster.yaml or set cluster.pin_node_types=false")
        if problems:
            raise InputError(f"cluster too small for {self.describe()}: " + "; ".join(problems))


def _resources(cpus: float, gpus: float, node_type: str | None) -> dict[str, float]:
    res = {}
    if cpus > 0:
        res["CPU"] = float(cpus)
    if gpus > 0:
        res["GPU"] = float(gpus)
    if node_type:
        res[node_type] = NODE_TYPE_SHARE
    return res
