"""The loss of one update on one window: Stage 0 slot warm-up, the generator's eq. 6, the critic's flow loss.

    warmup_loss     Stage 0: replay the window's clean frames through the frozen backbone; the slot modules'
                    writes give L_con + w * L_feat (memory/losses.py); no teacher, no critic.
    generator_loss  Stages I/II: self-roll the window with gradient, L = L_DMD + lambda_slot * L_slot (eq. 6), DMD
                    with the teacher at CFG against the negative prompt and the critic at CFG 0.
    critic_loss     Stages I/II: a no-grad self-roll of the window, flow-matching loss of the critic on it.

Each returns the loss for the backward pass and float stats for logging (losses, DMD gradient size, slot health:
mean off-diagonal slot cosine and the share of tokens passing eq. 9's mask).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace
from typing import Callable

import torch
from torch import Tensor

from model import CausalWanModel, FlowMatchScheduler
from rollout.components import Generator
from slotmem.config import ModelConfig, TrainerConfig
from trainer.losses import critic_flow_loss, dmd_loss, generator_objective, sample_dmd_timestep
from trainer.models import predict_x0
from trainer.window import FirstFrame, RankSync, TrajectoryWindow, rollout_window, scored_clip


@dataclass
class Scorers:
    """Teacher and critic with their text for one window: x0 predictors (x_t, t) -> x0."""

    teacher_cond: Callable[[Tensor, Tensor], Tensor]
    teacher_uncond: Callable[[Tensor, Tensor], Tensor]
    critic: Callable[[Tensor, Tensor], Tensor]


def make_scorers(teacher: CausalWanModel, critic: CausalWanModel, scheduler: FlowMatchScheduler,
                 prompt_embedding: Tensor, negative_embedding: Tensor) -> Scorers:
    """prompt_embedding / negative_embedding [Lt, D]; each model gets its own TextContext."""

    def bind(model: CausalWanModel, emb: Tensor):
        text = model.encode_text(emb[None].to(device=model.device, dtype=model.dtype))  # [1, Lt, D]
        return lambda x_t, t: predict_x0(model, scheduler, x_t, t, text)

    return Scorers(teacher_cond=bind(teacher, prompt_embedding), teacher_uncond=bind(teacher, negative_embedding),
                   critic=bind(critic, prompt_embedding))


def _slot_stats(slot) -> dict[str, float]:
    return {**slot.parts, **{f"slot_{k}": v for k, v in slot.health.items()}}


def _timesteps(x: Tensor, model_cfg: ModelConfig, trainer_cfg: TrainerConfig, rng: torch.Generator) -> Tensor:
    return sample_dmd_timestep(x.shape[0], rng, shift=model_cfg.timestep_shift, num_frames=x.shape[1],
                               min_t=trainer_cfg.min_timestep, max_t=trainer_cfg.max_timestep,
                               num_train_timesteps=model_cfg.num_train_timesteps).to(x.device)


def warmup_loss(window: TrajectoryWindow, *, generator: Generator, scheduler: FlowMatchScheduler,
                model_cfg: ModelConfig, trainer_cfg: TrainerConfig, noise_rng: torch.Generator,
                sync: RankSync | None = None) -> tuple[Tensor, dict[str, float]]:
    """Stage 0: the slot modules on the frozen backbone's clean re-run features of the window's chunks.

    The slot chain restarts at the window: its first chunk's slots come from the learned initialiser, as
    SlotContrast trains on clips. An untrained grouper chained through a long prefill converges to one slot
    repeated (the GRU pulls every slot to the same update under a uniform assignment: off-diagonal cosine 1.000
    at frame 60 of the demo's rows, where the token features' cosine is 0.04), and at that symmetric point L_con
    and the reconstruction have no gradient that tells the slots apart; from the initialiser's distinct slots
    they do. The cache and the bank the prefill built are kept."""
    rollout_window(generator, scheduler, model_cfg, window, exit_steps=None, noise_generator=noise_rng, sync=sync,
                   restart_slots=True)
    slot = generator.memory.slot_loss(0, feature_weight=trainer_cfg.stage0_rec_weight)
    return slot.total, {"slot": float(slot.total.detach()), **_slot_stats(slot)}


def generator_loss(window: TrajectoryWindow, *, generator: Generator, teacher: CausalWanModel,
                   critic: CausalWanModel, scheduler: FlowMatchScheduler, model_cfg: ModelConfig,
                   trainer_cfg: TrainerConfig, negative_embedding: Tensor, stage: int, exit_steps: list[int],
                   first_frame: FirstFrame, generator_rng: torch.Generator, noise_rng: torch.Generator,
                   sync: RankSync | None = None) -> tuple[Tensor, dict[str, float]]:
    """Eq. 6 on a self-rolled window: DMD (teacher CFG vs critic) on its new frames + lambda_slot * L_slot."""
    new = rollout_window(generator, scheduler, model_cfg, window, exit_steps=exit_steps, noise_generator=noise_rng,
                         sync=sync)  # [1, N, C, h, w], grad at the exit steps
    slot = generator.memory.slot_loss(stage)
    x = scored_clip(window, new, first_frame)  # [1, W, C, h, w]
    scorers = make_scorers(teacher, critic, scheduler, window.text_embeddings[window.final_prompt_index],
                           negative_embedding)
    t = _timesteps(x, model_cfg, trainer_cfg, generator_rng)
    noise = torch.randn(x.shape, generator=noise_rng, device=x.device, dtype=x.dtype)
    dmd, stats = dmd_loss(x, teacher_cond=scorers.teacher_cond, teacher_uncond=scorers.teacher_uncond,
                          critic=scorers.critic, scheduler=scheduler, guidance_scale=trainer_cfg.guidance_scale,
                          t=t, noise=noise, frames=window.loss_frames(x.device))
    loss = generator_objective(dmd, slot.total.to(dmd.device, dmd.dtype), trainer_cfg.lambda_slot)
    return loss, {"dmd": float(dmd.detach()), "slot": float(slot.total.detach()), **_slot_stats(slot), **stats}


def critic_loss(window: TrajectoryWindow, *, generator: Generator, critic: CausalWanModel,
                scheduler: FlowMatchScheduler, model_cfg: ModelConfig, trainer_cfg: TrainerConfig,
                exit_steps: list[int], first_frame: FirstFrame, generator_rng: torch.Generator,
                noise_rng: torch.Generator, sync: RankSync | None = None) -> tuple[Tensor, dict[str, float]]:
    """Flow-matching loss of the critic on a no-grad self-roll of the window (critic CFG 0).

    The whole rollout runs in one ``sync.local`` block: without gradient it needs no collectives.
    """
    sync = sync or RankSync()
    with sync.local(), torch.no_grad():
        new = rollout_window(generator, scheduler, model_cfg, window, exit_steps=exit_steps,
                             noise_generator=noise_rng, sync=replace(sync, local=contextlib.nullcontext))
        generator.memory.slot_loss(1)  # nothing was collected without grad; keeps the accumulator empty
        x = scored_clip(window, new, first_frame)
    text = critic.encode_text(window.text_embeddings[window.final_prompt_index][None].to(
        device=critic.device, dtype=critic.dtype))
    t = _timesteps(x, model_cfg, trainer_cfg, generator_rng)
    noise = torch.randn(x.shape, generator=noise_rng, device=x.device, dtype=x.dtype)
    return critic_flow_loss(x, critic=lambda x_t, tt: predict_x0(critic, scheduler, x_t, tt, text),
                            scheduler=scheduler, t=t, noise=noise, frames=window.loss_frames(x.device))
