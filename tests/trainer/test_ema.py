"""EMA of the generator: start step, decay against a hand-rolled reference, checkpoints, ZeRO-3."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from slotmem.config import TrainerConfig
from trainer.deepspeed_setup import ds_config, ensure_single_process_group, gather_full_state_dict, make_engine
from trainer.ema import EMA, iter_gathered, unwrap


def _perturb(model: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g))


def test_ema_matches_hand_rolled_reference():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    ema = EMA(decay=0.9, start_step=3)
    reference: dict[str, torch.Tensor] | None = None
    for step in range(8):
        _perturb(model, seed=step)
        did = ema.update(model, step)
        weights = {n: p.detach().clone() for n, p in model.named_parameters()}
        if step < 3:
            assert not did and not ema.initialized
            continue
        assert did
        if reference is None:
            reference = weights  # copy at the start step
        else:
            reference = {n: 0.9 * reference[n] + 0.1 * weights[n] for n in weights}
        for n in weights:
            torch.testing.assert_close(ema.shadow[n], reference[n])
    # The shadow lags the weights: it is not the last weights any more.
    assert not torch.allclose(ema.shadow["0.weight"], model[0].weight)


def test_ema_from_config_and_checkpoint_round_trip():
    cfg = TrainerConfig(ema_weight=0.99, ema_start_step=0)
    model = nn.Linear(5, 5)
    ema = EMA.from_config(cfg)
    assert (ema.decay, ema.start_step) == (0.99, 0)
    with pytest.raises(RuntimeError, match="before the first update"):
        ema.copy_to(model)
    ema.update(model, 0)
    _perturb(model, 1)
    ema.update(model, 1)

    restored = EMA(decay=0.5, start_step=7)
    restored.load_state_dict(ema.state_dict())
    assert (restored.decay, restored.start_step) == (0.99, 0)
    _perturb(model, 2)
    ema.update(model, 2)
    restored.update(model, 2)  # a resumed EMA keeps decaying rather than re-copying
    for n in ema.shadow:
        torch.testing.assert_close(restored.shadow[n], ema.shadow[n])

    target = nn.Linear(5, 5)
    ema.copy_to(target)
    torch.testing.assert_close(target.weight, ema.shadow["weight"])
    assert ema.shadow["weight"].dtype == torch.float32 and ema.shadow["weight"].device.type == "cpu"


def test_ema_on_zero3_engine_gathers_partitioned_params():
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 4))
    reference = {n: p.detach().clone() for n, p in module.named_parameters()}
    ensure_single_process_group("gloo")
    cfg = ds_config(TrainerConfig(), zero_stage=3, use_bf16=False, train_batch_size=4,
                    param_persistence_threshold=0)
    engine = make_engine(module, param_groups=[{"params": list(module.parameters()), "lr": 1e-2, "weight_decay": 0.0}],
                         betas=(0.0, 0.999), ds_config=cfg)
    assert all(hasattr(p, "ds_id") for p in engine.module.parameters())  # ZeRO-3 partitioned
    ema = EMA(decay=0.5, start_step=0)
    ema.update(engine, 0)  # the engine is unwrapped: names have no 'module.' prefix
    for n, v in reference.items():
        torch.testing.assert_close(ema.shadow[n], v)

    x = torch.randn(4, 6)
    loss = engine(x).square().mean()
    engine.backward(loss)
    engine.step()
    ema.update(engine, 1)
    trained = gather_full_state_dict(engine)
    for n, v in reference.items():
        torch.testing.assert_close(ema.shadow[n], 0.5 * v + 0.5 * trained[n])

    ema.copy_to(engine)  # the module's (compute) weights; the optimizer's fp32 masters stay the trained ones
    after = {n: p.detach().clone() for group in iter_gathered(list(unwrap(engine).named_parameters())) for n, p in group}
    for n in reference:
        torch.testing.assert_close(after[n], ema.shadow[n])
        torch.testing.assert_close(gather_full_state_dict(engine)[n], trained[n])
