"""ClusterShape from the presets, resource arithmetic and the error naming every factor (no Ray)."""

from __future__ import annotations

import re

import pytest

from cluster.shape import NODE_TYPE_SHARE, ROLLOUT_NODE, TRAINER_NODE, ClusterShape
from slotmem.config import ClusterConfig, TrainerConfig, load_config
from slotmem.errors import InputError


def _shape(**kw) -> ClusterShape:
    base = dict(num_rollout_actors=2, gpus_per_actor=1.0, cpus_per_actor=4.0, num_trainer_workers=8,
                gpus_per_worker=1.0, cpus_per_worker=8.0, zero_stage=2)
    return ClusterShape(**{**base, **kw})


def test_tiny_preset_resolves_to_cpu_gloo(repo_root):
    cfg = load_config(f"{repo_root}/configs/tiny-random.yaml")
    shape = ClusterShape.from_config(cfg.cluster, cfg.trainer)
    assert (shape.num_rollout_actors, shape.num_trainer_workers, shape.zero_stage) == (
        cfg.cluster.num_rollout_actors, cfg.cluster.num_trainer_workers, cfg.trainer.zero_stage)
    assert not shape.use_gpu and not shape.rollout_use_gpu and shape.backend == "gloo"
    assert shape.actor_resources() == {"CPU": cfg.cluster.cpus_per_actor}  # no GPU key at all on CPU
    assert shape.worker_resources() == {"CPU": cfg.cluster.cpus_per_worker}
    # fits the embedded local cluster the tiny preset starts
    shape.check({"CPU": float(cfg.cluster.local_num_cpus)})


def test_wan_preset_is_gpu_nccl_and_pinned(repo_root):
    cfg = load_config(f"{repo_root}/configs/wan2.1-1.3b.yaml")
    shape = ClusterShape.from_config(cfg.cluster, cfg.trainer)
    assert shape.use_gpu and shape.backend == "nccl" and shape.pin_node_types
    assert shape.actor_resources() == {"CPU": 4.0, "GPU": 1.0, ROLLOUT_NODE: NODE_TYPE_SHARE}
    assert shape.worker_resources() == {"CPU": 8.0, "GPU": 1.0, TRAINER_NODE: NODE_TYPE_SHARE}
    assert shape.needs() == {"CPU": 4 * 4 + 8 * 8.0, "GPU": 12.0, ROLLOUT_NODE: 4 * NODE_TYPE_SHARE,
                             TRAINER_NODE: 8 * NODE_TYPE_SHARE}


def test_needs_concurrent_and_sequential():
    shape = _shape(num_rollout_actors=3, gpus_per_actor=0.5, cpus_per_actor=2, num_trainer_workers=4,
                   gpus_per_worker=1, cpus_per_worker=1)
    assert shape.needs(concurrent=True) == {"CPU": 3 * 2 + 4 * 1.0, "GPU": 3 * 0.5 + 4 * 1.0}
    assert shape.needs(concurrent=False) == {"CPU": max(3 * 2, 4 * 1.0), "GPU": max(3 * 0.5, 4 * 1.0)}


def test_check_error_spells_out_every_factor():
    shape = _shape()
    with pytest.raises(InputError) as err:
        shape.check({"CPU": 64.0, "GPU": 8.0})
    msg = str(err.value)
    assert "needs 2 actors × 1 GPU + 8 workers × 1 GPU = 10 GPU, cluster has 8 GPU" in msg
    assert "needs 2 actors × 4 CPU + 8 workers × 8 CPU = 72 CPU, cluster has 64 CPU" in msg
    # one at a time: max(2, 8) GPUs fit in 8, CPUs max(8, 64) fit in 64
    shape.check({"CPU": 64.0, "GPU": 8.0}, concurrent=False)
    with pytest.raises(InputError, match=re.escape("needs max(2 actors × 1 GPU, 8 workers × 1 GPU) = 8 GPU, "
                                                   "cluster has 4 GPU")):
        shape.check({"CPU": 64.0, "GPU": 4.0}, concurrent=False)
    shape.check({"CPU": 72.0, "GPU": 10.0})  # exactly enough


def test_pinned_shape_needs_the_node_type_resources():
    shape = _shape(pin_node_types=True)
    with pytest.raises(InputError, match=f"{ROLLOUT_NODE!r}.*pin_node_types") as err:
        shape.check({"CPU": 100.0, "GPU": 16.0, TRAINER_NODE: 1.0})
    assert TRAINER_NODE not in str(err.value).split("custom resource", 1)[1].split(";")[0]
    shape.check({"CPU": 100.0, "GPU": 16.0, TRAINER_NODE: 1.0, ROLLOUT_NODE: 2.0})


def test_invalid_shapes_are_rejected():
    with pytest.raises(InputError, match="rollout actor must ask for some CPU or GPU"):
        _shape(cpus_per_actor=0, gpus_per_actor=0)
    with pytest.raises(InputError, match="trainer worker asks for 1.5 GPUs"):
        _shape(gpus_per_worker=1.5)
    shape = ClusterShape.from_config(ClusterConfig(cpus_per_actor=0.0, gpus_per_actor=0.25), TrainerConfig(zero_stage=3))
    assert shape.actor_resources() == {"GPU": 0.25} and shape.zero_stage == 3
