"""Generator/critic alternation (1 : 5, Self-Forcing), the EMA start, and how policy versions count, against
LongLive's loop (``TRAIN_GENERATOR = step % dfake_gen_update_ratio == 0``, stages in iterations)."""

from __future__ import annotations

from slotmem.config import TrainerConfig
from trainer.schedule import num_generator_updates, plan_step, stage_steps, stage_updates, version_at_start


def test_one_generator_update_per_five_critic_updates():
    cfg = TrainerConfig(critic_updates_per_generator=5)
    plans = [plan_step(1, s, cfg) for s in range(20)]
    assert [p.step for p in plans if p.train_generator] == [0, 5, 10, 15]
    assert sum(p.models.count("critic") for p in plans) == 20  # every iteration updates the critic
    assert plans[0].models == ("generator", "critic") and plans[1].models == ("critic",)
    assert [num_generator_updates(n, cfg) for n in (0, 1, 5, 6, 21)] == [0, 1, 1, 2, 5]


def test_stages_count_iterations_like_longlive():
    """The paper's Stage I 2000 + Stage II 1000 steps = LongLive's 3000 max_iters = 600 generator updates."""
    cfg = TrainerConfig(stage0_steps=500, stage1_steps=2000, stage2_steps=1000, critic_updates_per_generator=5)
    assert [stage_steps(s, cfg) for s in (0, 1, 2)] == [500, 2000, 1000]
    assert stage_updates(1, cfg) + stage_updates(2, cfg) == 600
    # every Stage 0 iteration updates the generator's slot modules: it counts as a policy update
    assert [version_at_start(s, cfg) for s in (0, 1, 2)] == [0, 500, 900]
    stage0 = [plan_step(0, s, cfg) for s in range(3)]
    assert [p.models for p in stage0] == [("generator",)] * 3 and [p.version for p in stage0] == [1, 2, 3]
    assert [plan_step(2, s, cfg).version for s in (0, 1, 5)] == [901, 901, 902]


def test_ema_starts_at_iteration_ema_start_step_and_publishing_follows_versions():
    cfg = TrainerConfig(critic_updates_per_generator=5, ema_start_step=10, publish_every=2, stage0_steps=3)
    ema_steps = [s for s in range(30) if plan_step(1, s, cfg).update_ema]
    assert ema_steps == [10, 15, 20, 25]  # generator iterations from iteration 10 on (Self-Forcing counting)
    published = [(s, plan_step(1, s, cfg).version) for s in range(30) if plan_step(1, s, cfg).publish]
    assert published == [(0, 4), (10, 6), (20, 8)]  # every 2nd policy version, counted across stages
    assert [s for s in range(3) if plan_step(0, s, cfg).publish] == [1]  # Stage 0: version 2


def test_stage0_rate_warms_up_holds_then_decays_to_its_final_ratio():
    import math

    import pytest
    import torch

    from trainer.models import apply_group_settings
    from trainer.schedule import stage0_lr_factor

    cfg = TrainerConfig(stage0_steps=100, stage0_warmup=0.1, stage0_decay=0.3, stage0_final_lr_ratio=0.1,
                        memory_lr=3e-3)
    f = [stage0_lr_factor(s, cfg) for s in range(100)]
    assert f[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])  # linear to the full rate at iteration 9
    assert f[10:70] == [1.0] * 60  # stable
    # cosine over the last 30 iterations, the final ratio at the last one, through the midpoint
    assert f[99] == pytest.approx(0.1) and f[84] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 15 / 30)))
    assert all(a > b for a, b in zip(f[69:], f[70:]))
    assert stage0_lr_factor(0, TrainerConfig(stage0_steps=2, stage0_warmup=0.0, stage0_decay=0.0)) == 1.0
    # the worker sets each named group's rate to its configured lr times the factor (weight decay untouched)
    p, q = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([{"params": [p], "lr": 1.0, "name": "memory"},
                             {"params": [q], "lr": 1.0, "name": "slot_grouper"}])
    apply_group_settings(opt, cfg, stage=0, lr_scale=f[90])
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([3e-3 * f[90]] * 2)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.0, 0.0]
