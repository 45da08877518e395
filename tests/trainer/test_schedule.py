"""Generator/critic alternation (1 : 5, Self-Forcing) and the EMA start, counted in generator updates."""

from __future__ import annotations

from slotmem.config import TrainerConfig
from trainer.schedule import (
    ema_active,
    generator_update_index,
    is_generator_step,
    num_generator_updates,
    plan_step,
    train_steps_for,
)


def test_one_generator_update_per_five_critic_updates():
    cfg = TrainerConfig(critic_updates_per_generator=5)
    gen_steps = [s for s in range(20) if is_generator_step(s, cfg)]
    assert gen_steps == [0, 5, 10, 15]
    assert num_generator_updates(20, cfg) == 4
    assert [num_generator_updates(n, cfg) for n in (0, 1, 5, 6, 21)] == [0, 1, 1, 2, 5]
    plans = [plan_step(s, cfg) for s in range(20)]
    assert sum(p.models.count("critic") for p in plans) == 20  # every step updates the critic
    assert sum(p.models.count("generator") for p in plans) == 4
    assert plans[0].models == ("generator", "critic") and plans[1].models == ("critic",)


def test_stage_length_in_generator_updates():
    cfg = TrainerConfig(critic_updates_per_generator=5, stage1_steps=2000)
    steps = train_steps_for(cfg.stage1_steps, cfg)
    assert steps == 10_000 and num_generator_updates(steps, cfg) == 2000
    assert [generator_update_index(s, cfg) for s in (0, 4, 5, 9, 10)] == [0, 1, 1, 2, 2]


def test_ema_starts_at_generator_update_ema_start_step():
    cfg = TrainerConfig(critic_updates_per_generator=5, ema_start_step=2)
    ema_steps = [s for s in range(30) if plan_step(s, cfg).update_ema]
    # generator updates happen at steps 0, 5, 10, ...; the third one (index 2) is the first with EMA
    assert ema_steps == [10, 15, 20, 25]
    assert not ema_active(1, cfg) and ema_active(2, cfg)
    assert [plan_step(s, cfg).generator_update for s in (10, 15)] == [2, 3]
    cfg = TrainerConfig(critic_updates_per_generator=1, ema_start_step=200)  # ratio 1: steps = updates
    assert [s for s in range(198, 203) if plan_step(s, cfg).update_ema] == [200, 201, 202]
