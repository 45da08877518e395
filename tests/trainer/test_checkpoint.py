"""Trainer checkpoints: exact resume of engines, random streams and EMA; the Stage I -> II weight hand-off."""

from __future__ import annotations

import random

import pytest
import torch
from torch import nn

from cluster.storage import resolve_storage
from slotmem.config import StorageConfig, TrainerConfig
from slotmem.errors import InputError
from trainer.checkpoint import (TrainerState, capture_rng, load_checkpoint, read_stage_final, restore_rng,
                                save_checkpoint, write_stage_final)
from trainer.deepspeed_setup import ds_config, ensure_single_process_group, make_engine
from trainer.ema import EMA


@pytest.fixture(scope="module")
def world1():
    ensure_single_process_group("gloo")


def _mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 1))


def _engines(zero_stage: int, seed: int) -> dict:
    cfg = ds_config(TrainerConfig(), zero_stage=zero_stage, use_bf16=False, train_batch_size=1,
                    param_persistence_threshold=0)
    return {name: make_engine(m, param_groups=[{"params": list(m.parameters()), "lr": 1e-2, "weight_decay": 0.01}],
                              betas=(0.0, 0.999), ds_config=cfg)
            for i, name in enumerate(("generator", "critic")) for m in [_mlp(seed + i)]}


def _step(engines: dict, rngs: dict, ema: EMA, step: int) -> list[float]:
    """One update of both engines on data from the trainer's stream, plus draws from every global stream."""
    x = torch.randn(8, 6, generator=rngs["rng"])
    losses = []
    for engine in engines.values():
        loss = (engine(x) - x[:, :1]).pow(2).mean()
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    ema.update(engines["generator"], step)
    return losses + [torch.rand(()).item(), random.random()]


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_resume_continues_with_identical_next_step(world1, tmp_path, zero_stage):
    engines, rngs, ema = _engines(zero_stage, 0), {"rng": torch.Generator().manual_seed(0)}, EMA(decay=0.9,
                                                                                                  start_step=0)
    for step in range(2):
        _step(engines, rngs, ema, step)
    state = TrainerState(stage=1, world_size=1, step=2, replay={"ledger": {"k": 2}}, mlflow_run_id="run-1",
                         history=[{"step": 0, "critic": 1.0}, {"step": 1, "critic": 0.5}])
    save_checkpoint(tmp_path, engines=engines, state=state, rank=0, generators=rngs, ema=ema)
    expected = _step(engines, rngs, ema, 2)
    expected_shadow = {k: v.clone() for k, v in ema.shadow.items()}

    # a new process: other weights, other random states, empty EMA
    engines2, rngs2, ema2 = _engines(zero_stage, 7), {"rng": torch.Generator().manual_seed(9)}, EMA(decay=0.9,
                                                                                                      start_step=0)
    torch.manual_seed(1234)
    random.seed(1234)
    restored = load_checkpoint(tmp_path, engines=engines2, rank=0, world_size=1, generators=rngs2, ema=ema2)
    assert restored == state
    assert _step(engines2, rngs2, ema2, 2) == expected
    assert all(torch.equal(ema2.shadow[k], v) for k, v in expected_shadow.items())


def test_checkpoint_of_another_world_size_is_refused(world1, tmp_path):
    engines, rngs = _engines(2, 0), {"rng": torch.Generator().manual_seed(0)}
    save_checkpoint(tmp_path, engines=engines, state=TrainerState(stage=1, world_size=1, step=1), rank=0,
                    generators=rngs, ema=None)
    with pytest.raises(InputError, match="written by 1 workers, this job has 2"):
        load_checkpoint(tmp_path, engines=engines, rank=0, world_size=2, generators=rngs, ema=None)
    with pytest.raises(InputError, match="not a trainer checkpoint"):
        load_checkpoint(tmp_path / "generator", engines=engines, rank=0, world_size=1, generators=rngs, ema=None)


def test_rng_capture_and_restore_replays_every_stream():
    gens = {"a": torch.Generator().manual_seed(3), "b": torch.Generator().manual_seed(4)}
    state = capture_rng(gens)
    first = (torch.rand(4), random.random(), torch.rand(2, generator=gens["a"]), torch.rand(2, generator=gens["b"]))
    restore_rng(state, gens)
    again = (torch.rand(4), random.random(), torch.rand(2, generator=gens["a"]), torch.rand(2, generator=gens["b"]))
    assert torch.equal(first[0], again[0]) and first[1] == again[1]
    assert torch.equal(first[2], again[2]) and torch.equal(first[3], again[3])
    with pytest.raises(InputError, match="no random state"):
        restore_rng(state, {**gens, "c": torch.Generator()})


def test_trainer_state_json_round_trip():
    state = TrainerState(stage=2, world_size=4, step=17, replay={"ledger": {"round_0000/part-a0-00000.parquet": 3}}, mlflow_run_id=None,
                         history=[{"step": 16, "critic": 0.25, "dmd": 1e-3}])
    assert TrainerState.from_json(state.to_json()) == state


def test_stage_final_weights_round_trip(tmp_path):
    storage = resolve_storage(StorageConfig(root=str(tmp_path), experiment="exp"))
    with pytest.raises(InputError, match="stage 1 has not finished"):
        read_stage_final(storage, 1)
    gen = {"w": torch.randn(3, 2), "b": torch.zeros(2)}
    critic = {"w": torch.randn(2, 2)}
    path = write_stage_final(storage, 1, {"generator": gen, "critic": critic}, meta={"steps": 5})
    assert path.endswith("exp/checkpoints/final/stage1")
    back = read_stage_final(storage, 1)
    assert set(back) == {"generator", "critic"}
    assert all(torch.equal(back["generator"][k], v) for k, v in gen.items())
    assert torch.equal(back["critic"]["w"], critic["w"])
    with pytest.raises(InputError, match="unknown final weight sets"):
        write_stage_final(storage, 2, {"teacher": gen})
