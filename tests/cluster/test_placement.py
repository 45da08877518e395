"""Placement groups and the trainer ScalingConfig on the session Ray cluster (4 logical CPUs)."""

from __future__ import annotations

import pytest

from cluster.placement import rollout_placement_group, scaling_config, torch_config
from cluster.shape import TRAINER_NODE, ClusterShape
from slotmem.config import load_config
from slotmem.errors import InputError


def _tiny_shape(repo_root) -> ClusterShape:
    cfg = load_config(f"{repo_root}/configs/tiny-random.yaml")
    return ClusterShape.from_config(cfg.cluster, cfg.trainer)


def test_rollout_actors_land_in_their_own_groups_and_one_can_be_released(ray_cluster, repo_root):
    ray = ray_cluster
    from ray.util import placement_group_table

    shape = _tiny_shape(repo_root)
    placement = rollout_placement_group(shape, timeout_s=60)
    try:
        tables = [placement_group_table(pg) for pg in placement.pgs]
        assert len(tables) == shape.num_rollout_actors
        assert all(t["state"] == "CREATED" and list(t["bundles"].values()) == [shape.actor_resources()]
                   for t in tables)

        @ray.remote
        class Probe:
            def where(self):
                ctx = ray.get_runtime_context()
                return ctx.get_placement_group_id(), ctx.get_assigned_resources()

        actors = [Probe.options(**placement.actor_options(i)).remote() for i in range(shape.num_rollout_actors)]
        where = ray.get([a.where.remote() for a in actors], timeout=60)
        assert [pg_id for pg_id, _ in where] == [pg.id.hex() for pg in placement.pgs]  # actor i in group i
        assert all(assigned == {"CPU": shape.cpus_per_actor} for _, assigned in where)
        for a in actors:
            ray.kill(a)
        with pytest.raises(InputError, match="outside"):
            placement.strategy(shape.num_rollout_actors)
        placement.release(0)  # a retired actor's group goes on its own; the others stay
        assert placement_group_table(placement.pgs[0])["state"] == "REMOVED"
        assert placement_group_table(placement.pgs[1])["state"] == "CREATED"
        placement.release(0)  # a second release (the fleet's retire, then its shutdown) removes nothing twice
    finally:
        placement.remove()
    assert all(placement_group_table(pg)["state"] == "REMOVED" for pg in placement.pgs)
    assert placement.released == set(range(len(placement.pgs)))


def test_unplaceable_group_fails_fast_and_is_removed(ray_cluster, repo_root):
    ray = ray_cluster
    from ray.util import placement_group_table

    too_big = ClusterShape(num_rollout_actors=3, gpus_per_actor=0, cpus_per_actor=2.0, num_trainer_workers=1,
                           gpus_per_worker=0, cpus_per_worker=1.0, zero_stage=2)
    with pytest.raises(InputError, match=r"could not place 3 rollout actor\(s\).*\(2 placed\).*CPU: 4"):
        rollout_placement_group(too_big, timeout_s=2)
    # the pending group was removed, so the cluster's CPUs are all available again
    pending = [pg for pg in placement_group_table().values() if pg["state"] in ("PENDING", "RESCHEDULING")]
    assert pending == []
    import time

    end = time.monotonic() + 30  # removal is asynchronous: the bundles' CPUs come back shortly
    while ray.available_resources().get("CPU", 0) < 4 and time.monotonic() < end:
        time.sleep(0.2)
    assert ray.available_resources().get("CPU", 0) == 4


def test_scaling_config_matches_the_shape(repo_root):
    shape = _tiny_shape(repo_root)
    sc = scaling_config(shape)
    assert sc.num_workers == shape.num_trainer_workers
    assert sc.use_gpu is False and sc.placement_strategy == "PACK"
    assert sc.resources_per_worker == {"CPU": shape.cpus_per_worker}
    assert torch_config(shape).backend == "gloo"

    gpu = ClusterShape(num_rollout_actors=4, gpus_per_actor=1, cpus_per_actor=4, num_trainer_workers=8,
                       gpus_per_worker=1, cpus_per_worker=8, zero_stage=3, pin_node_types=True)
    sc = scaling_config(gpu)
    assert sc.use_gpu is True and sc.num_workers == 8
    assert sc.resources_per_worker == {"CPU": 8.0, "GPU": 1.0, TRAINER_NODE: 0.001}
    assert torch_config(gpu).backend == "nccl"
