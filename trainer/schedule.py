"""Which model updates at which iteration, when EMA runs, and how policy versions count.

An *iteration* (a training step) is one critic update; every ``critic_updates_per_generator``-th iteration
(step % ratio == 0, starting at step 0) the generator updates first, on its own window. This is Self-Forcing's and
LongLive's loop (``TRAIN_GENERATOR = step % dfake_gen_update_ratio == 0``), and stage lengths count iterations as
their ``max_iters`` does: the paper's Stage I 2000 + Stage II 1000 steps are LongLive's 3000 iterations, 600
generator updates. ``ema_start_step`` counts iterations too (Self-Forcing). A Stage 0 iteration is one update of
the slot modules (no critic).

Policy versions count updates of the published generator: every Stage 0 iteration and every generator update of
Stages I/II adds one, across stages, so ``trainer_version - row.policy_version`` is the staleness of a row in
generator updates (veRL / OpenRLHF bound staleness the same way). A version is published every
``publish_every`` updates and at the end of each stage.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from slotmem.config import TrainerConfig


def stage_steps(stage: int, trainer_cfg: TrainerConfig) -> int:
    return (trainer_cfg.stage0_steps, trainer_cfg.stage1_steps, trainer_cfg.stage2_steps)[stage]


def stage0_lr_factor(step: int, trainer_cfg: TrainerConfig) -> float:
    """Stage 0's learning-rate multiplier at iteration `step` (0-based): a linear warm-up over the first
    ``stage0_warmup`` share of the iterations, the full rate, then a cosine decay over the last ``stage0_decay``
    share to ``stage0_final_lr_ratio`` at the last iteration (warm-up, stable, decay). Slot Attention (Locatello
    et al. 2020) and DINOSAUR warm the grouper's rate up and decay it; the long stable part is ours: leaving the
    initial collapse needs the full rate for a while (a 10 % warm-up + cosine over the rest left the demo's
    grouper collapsed at cosine 0.69 where the constant rate reached 0.50), and at a constant rate to the end an
    InfoNCE-trained grouper that had left collapse fell back into it (the demo at 3e-3 did at iteration 65 of 100)."""
    total = trainer_cfg.stage0_steps
    warmup = round(trainer_cfg.stage0_warmup * total)
    decay = round(trainer_cfg.stage0_decay * total)
    if step < warmup:
        return (step + 1) / warmup
    start = total - decay
    if decay == 0 or step < start:
        return 1.0
    progress = min((step - start + 1) / decay, 1.0)  # 1 at the last iteration
    final = trainer_cfg.stage0_final_lr_ratio
    return final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * progress))


def is_generator_step(step: int, trainer_cfg: TrainerConfig) -> bool:
    """The generator updates at iteration `step` (0-based) besides the critic."""
    return step % trainer_cfg.critic_updates_per_generator == 0


def num_generator_updates(steps: int, trainer_cfg: TrainerConfig) -> int:
    """Generator updates among iterations 0..steps-1 of a DMD stage."""
    return -(-steps // trainer_cfg.critic_updates_per_generator)


def stage_updates(stage: int, trainer_cfg: TrainerConfig, steps: int | None = None) -> int:
    """Policy updates in the first `steps` iterations of `stage` (all of them by default)."""
    steps = stage_steps(stage, trainer_cfg) if steps is None else steps
    return steps if stage == 0 else num_generator_updates(steps, trainer_cfg)


def version_at_start(stage: int, trainer_cfg: TrainerConfig) -> int:
    """The policy version a stage starts from: the updates of every earlier stage."""
    return sum(stage_updates(s, trainer_cfg) for s in range(stage))


@dataclass(frozen=True)
class StepPlan:
    """What one iteration does."""

    step: int
    """Iteration of the stage, 0-based."""
    train_generator: bool
    """The generator (Stage 0: the slot modules) updates in this iteration."""
    train_critic: bool
    update_ema: bool
    """The generator EMA starts or is updated after this iteration's generator update (a shadow carried over from
    Stage I keeps being updated in Stage II whatever the step)."""
    version: int
    """Policy version after this iteration (updates of the generator so far, across stages)."""
    publish: bool
    """Publish the generator after this iteration (every publish_every updates)."""

    @property
    def models(self) -> tuple[str, ...]:
        """Models updated in order."""
        return tuple(m for m, on in (("generator", self.train_generator), ("critic", self.train_critic)) if on)


def plan_step(stage: int, step: int, trainer_cfg: TrainerConfig) -> StepPlan:
    base = version_at_start(stage, trainer_cfg)
    if stage == 0:
        train_generator, critic, ema = True, False, False
    else:
        train_generator, critic = is_generator_step(step, trainer_cfg), True
        ema = train_generator and step >= trainer_cfg.ema_start_step
    version = base + stage_updates(stage, trainer_cfg, step + 1)
    publish = train_generator and version % trainer_cfg.publish_every == 0
    return StepPlan(step=step, train_generator=train_generator, train_critic=critic, update_ema=ema,
                    version=version, publish=publish)
