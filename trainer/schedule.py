"""Which model updates at which training step (Self-Forcing's alternation) and when EMA runs.

A *training step* is one critic update. Every ``critic_updates_per_generator``-th step
(step % ratio == 0, starting at step 0) the generator is updated first, on its own batch, and then
the critic, so steps 0..N-1 hold ceil(N / ratio) generator updates (1 generator : 5 critic updates
in the paper's setting).

Counting: ``stage1_steps`` / ``stage2_steps`` and ``ema_start_step`` count **generator updates**
(the config documents them as generator steps, and Appendix A.1's "EMA from step 200" reads most
naturally against the 2000/1000 generator steps of the stages). Self-Forcing itself counts its
``ema_start_step`` in training steps; with ratio 5 our EMA therefore starts after 5x as many critic
updates. A stage of G generator updates is ``train_steps_for(G)`` = G * ratio training steps.
"""

from __future__ import annotations

from dataclasses import dataclass

from slotmem.config import TrainerConfig


def is_generator_step(step: int, trainer_cfg: TrainerConfig) -> bool:
    """The generator updates at training step `step` (0-based) besides the critic."""
    return step % trainer_cfg.critic_updates_per_generator == 0


def num_generator_updates(steps: int, trainer_cfg: TrainerConfig) -> int:
    """Generator updates among training steps 0..steps-1."""
    ratio = trainer_cfg.critic_updates_per_generator
    return -(-steps // ratio)


def generator_update_index(step: int, trainer_cfg: TrainerConfig) -> int:
    """Generator updates done before training step `step`; at a generator step, the 0-based index of its update."""
    return num_generator_updates(step, trainer_cfg)


def train_steps_for(generator_updates: int, trainer_cfg: TrainerConfig) -> int:
    """Training steps for a stage of `generator_updates` generator updates (whole 1 : ratio cycles)."""
    return generator_updates * trainer_cfg.critic_updates_per_generator


def ema_active(generator_update: int, trainer_cfg: TrainerConfig) -> bool:
    """EMA is updated after generator update `generator_update` (0-based) once it reaches ema_start_step."""
    return generator_update >= trainer_cfg.ema_start_step


@dataclass(frozen=True)
class StepPlan:
    """What one training step does."""

    step: int
    """Training step (= critic update index), 0-based."""
    train_generator: bool
    """The generator updates in this step (before the critic)."""
    generator_update: int
    """Index of this step's generator update, or of the next one when the generator does not update."""
    update_ema: bool
    """The generator EMA is updated after this step's generator update."""

    @property
    def models(self) -> tuple[str, ...]:
        """Models updated in order."""
        return ("generator", "critic") if self.train_generator else ("critic",)


def plan_step(step: int, trainer_cfg: TrainerConfig) -> StepPlan:
    train_generator = is_generator_step(step, trainer_cfg)
    index = generator_update_index(step, trainer_cfg)
    return StepPlan(step=step, train_generator=train_generator, generator_update=index,
                    update_ema=train_generator and ema_active(index, trainer_cfg))
