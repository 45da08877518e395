"""One training step on a window of a committed trajectory (DESIGN §5; anchors-video §3).

A rollout row holds the clean latents of a whole self-rollout [F, C, h, w] and its prompts' text
embeddings. A training step picks a chunk-aligned window of ``trainer.window_frames`` frames
(21 = 7 chunks) and

  1. prefill (no grad): replays the clean frames before the window through the generator exactly as
     the rollout committed them (memory read -> clean re-run -> memory write per chunk, prompt switch
     with recache at its chunk), which rebuilds the KV cache and the memory bank;
  2. self-roll: generates the window chunk by chunk from fresh noise, continuing that cache and bank
     (a switch inside the window recaches from the clean prefix plus the generated frames); each chunk
     keeps gradient at one exit step of the few-step sampler (Self-Forcing), drawn on rank 0 and
     broadcast so every rank runs the same graph depth;
  3. scores the generated window [B, W, C, h, w] with the teacher and the critic, both bidirectional,
     under the prompt active at the window's last frame (LongLive: after a switch the new prompt
     supervises the whole window).

Generator step: L = L_DMD + lambda_slot * L_slot (eq. 6), the slot losses coming from the memory
writes of the window's chunks. Critic step: flow-matching loss on a no-grad rollout of a window.

Data-parallel ranks must run the same sequence of module calls: ZeRO-3 gathers each module's
parameters with a collective at its call. So the window start and the exit steps are drawn on rank 0
and broadcast (every rank rolls out the same layout of its own trajectory), and the rank-dependent
work (the prefill, and a prompt switch that only some ranks' trajectories have) runs inside
``RankSync.local``, where ZeRO-3 engines hold their full parameters and issue no collectives; all
ranks enter it together. Every other call is identical across ranks. Nothing here touches
torch.distributed: ``RankSync`` carries the collectives (single-process no-ops by default).

Shapes: P prompts, Lt text tokens, D text_dim, F trajectory frames, W window frames, C latent
channels, h x w latent grid. One trajectory per rank and step (B = 1).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field, replace
from typing import Any, Callable, ContextManager

import torch
from torch import Tensor

from memory import contrastive_loss, reconstruction_loss
from model import CausalWanModel, FlowMatchScheduler
from rollout.components import Generator
from rollout.streaming import Prompts, StreamState, chunk_switch_starts, prompt_index_at
from slotmem.config import ModelConfig, TrainerConfig
from slotmem.errors import InputError
from trainer.losses import critic_flow_loss, dmd_loss, generator_objective, sample_dmd_timestep
from trainer.models import predict_x0

Broadcast = Callable[[Tensor], Tensor]


def _same(t: Tensor) -> Tensor:
    return t


@dataclass
class RankSync:
    """The collectives that keep a window's control flow identical on every data-parallel rank."""

    broadcast: Broadcast = _same
    """Rank 0's tensor on every rank."""
    reduce_max: Callable[[Tensor], Tensor] = _same
    """Elementwise maximum over ranks."""
    local: Callable[[], ContextManager] = field(default=contextlib.nullcontext)
    """Context with the generator's full parameters on this rank and no collectives (entered by all ranks)."""


# ----------------------------------------------------------------------------------------------
# windows of committed trajectories
# ----------------------------------------------------------------------------------------------


@dataclass
class TrajectoryWindow:
    """A window of one committed trajectory plus everything needed to rebuild its context."""

    latents: Tensor  # [F, C, h, w] clean latents of the whole trajectory
    text_embeddings: Tensor  # [P, Lt, D] zero-padded text-encoder outputs
    switch_starts: list[int]  # chunk start where prompt i+1 takes over (len P-1)
    start: int  # first frame of the window (a chunk start)
    num_frames: int  # W
    policy_version: int
    trajectory_id: str = ""

    @property
    def end(self) -> int:
        return self.start + self.num_frames

    @property
    def final_prompt_index(self) -> int:
        """The prompt active at the window's last frame: the one that supervises it."""
        return prompt_index_at(self.end - 1, self.switch_starts)


def sample_window_start(num_frames: int, window_frames: int, chunk: int, generator: torch.Generator,
                        sync: RankSync | None = None) -> int:
    """Uniform chunk-aligned start in [0, num_frames - window_frames], the same on every rank.

    Every rank draws (so all random streams advance alike); rank 0's draw is broadcast, within the
    shortest trajectory of all ranks.
    """
    sync = sync or RankSync()
    shortest = -int(sync.reduce_max(torch.tensor([-num_frames]))[0])
    if window_frames > shortest:
        raise InputError(f"trainer.window_frames ({window_frames}) is longer than a trajectory ({shortest} "
                         f"latent frames); roll out at least rollout.num_frames >= {window_frames}")
    num_starts = (shortest - window_frames) // chunk + 1
    start = torch.randint(num_starts, (1,), generator=generator) * chunk
    return int(sync.broadcast(start)[0])


def window_from_row(row: dict[str, Any], *, window_frames: int, chunk: int, generator: torch.Generator,
                    sync: RankSync | None = None, index: int = 0) -> TrajectoryWindow:
    """A window of batch element `index` of a ``rollout.shards.batch_to_torch`` batch (start drawn by rank 0)."""
    latents = row["latents"][index]  # [F, C, h, w]
    start = sample_window_start(latents.shape[0], window_frames, chunk, generator, sync)
    return TrajectoryWindow(latents=latents, text_embeddings=row["text_embeddings"][index],
                            switch_starts=chunk_switch_starts(list(row["switch_frames"][index]), chunk),
                            start=start, num_frames=window_frames,
                            policy_version=int(row["policy_version"][index]),
                            trajectory_id=str(row["trajectory_id"][index]) if "trajectory_id" in row else "")


def prompts_from_embeddings(embeddings: Tensor) -> Prompts:
    """Prompts from stored embeddings [P, Lt, D]; the pooled vector is the mean over real tokens.

    Shards keep only the zero-padded encoder output, so the token mask is recovered as the positions
    that are not all zero (a real token's hidden state is never exactly zero).
    """
    mask = embeddings.abs().amax(dim=-1) > 0  # [P, Lt]
    weights = mask.to(embeddings.dtype).unsqueeze(-1)  # [P, Lt, 1]
    pooled = (embeddings * weights).sum(1) / weights.sum(1).clamp(min=1)  # [P, D]
    return Prompts(texts=[""] * embeddings.shape[0], embeddings=embeddings, pooled=pooled)


def draw_exit_steps(num_chunks: int, num_steps: int, generator: torch.Generator,
                    broadcast: Broadcast | None = None) -> list[int]:
    """One exit step per chunk in [0, num_steps); every rank draws, then rank 0's draw is broadcast.

    Every rank draws (not only rank 0) so that all ranks consume their random streams alike.
    `broadcast(t)` returns rank 0's tensor on every rank (in-place dist.broadcast in the job).
    """
    steps = torch.randint(num_steps, (num_chunks,), generator=generator)
    if broadcast is not None:
        steps = broadcast(steps)
    return [int(s) for s in steps]


# ----------------------------------------------------------------------------------------------
# rebuilding the context and self-rolling the window
# ----------------------------------------------------------------------------------------------


def new_state(generator: Generator, scheduler: FlowMatchScheduler, model_cfg: ModelConfig,
              window: TrajectoryWindow) -> StreamState:
    """A fresh stream (empty cache, reset memory, first prompt) for the window's trajectory."""
    device = next(generator.backbone.parameters()).device
    dtype = generator.backbone.dtype
    prompts = prompts_from_embeddings(window.text_embeddings.to(device=device, dtype=dtype))
    with torch.no_grad():
        return StreamState(generator.backbone, generator.memory, scheduler, model_cfg, prompts, batch_size=1)


def prefill(state: StreamState, window: TrajectoryWindow) -> None:
    """Commit the clean frames before the window as the rollout did (no grad): cache + bank."""
    chunk = state.model_cfg.num_frame_per_block
    device, dtype = state.model.device, state.model.dtype
    clean = window.latents[None, : window.start].to(device=device, dtype=dtype)  # [1, start, C, h, w]
    with torch.no_grad():
        for s in range(0, window.start, chunk):
            if s in window.switch_starts:
                state.switch_prompt(window.switch_starts.index(s) + 1, clean[:, :s])
            memory_kv = state.memory.read()
            state.commit(clean[:, s : s + chunk], memory_kv=memory_kv)


def self_roll(state: StreamState, window: TrajectoryWindow, *, exit_steps: list[int],
              noise_generator: torch.Generator, sync: RankSync | None = None) -> Tensor:
    """Generate the window after ``prefill``; returns x [1, W, C, h, w].

    Under autograd each chunk's x0 carries gradient from its exit step (and the memory writes keep
    their slot-attention graphs for L_slot); under no_grad this is the critic's sample. A chunk where
    any rank switches prompts is entered in ``sync.local`` by every rank.
    """
    sync = sync or RankSync()
    cfg = state.model_cfg
    chunk = cfg.num_frame_per_block
    num_chunks = window.num_frames // chunk
    if len(exit_steps) != num_chunks:
        raise InputError(f"need one exit step per chunk ({num_chunks}), got {len(exit_steps)}")
    starts = list(range(window.start, window.end, chunk))
    mine = torch.tensor([float(s in window.switch_starts) for s in starts])
    anyone = sync.reduce_max(mine.clone())  # [num_chunks] 1 where some rank switches
    device, dtype = state.model.device, state.model.dtype
    history = window.latents[None, : window.start].to(device=device, dtype=dtype)  # clean frames so far
    shape = (1, chunk, cfg.in_channels, cfg.latent_height, cfg.latent_width)
    out = []
    for c, s in enumerate(starts):
        if anyone[c] > 0:
            with sync.local(), torch.no_grad():
                if mine[c] > 0:
                    state.switch_prompt(window.switch_starts.index(s) + 1, history)
            state.text.reset()  # drop text projections cached with the gathered weights, on every rank alike
        memory_kv = state.memory.read()
        noise = torch.randn(shape, generator=noise_generator, device=device, dtype=dtype)
        x0 = state.denoise(noise, memory_kv=memory_kv, exit_step=exit_steps[c], generator=noise_generator)
        state.commit(x0, memory_kv=memory_kv)
        out.append(x0)
        history = torch.cat([history, x0.detach()], dim=1)
    return torch.cat(out, dim=1)


def rollout_window(generator: Generator, scheduler: FlowMatchScheduler, model_cfg: ModelConfig,
                   window: TrajectoryWindow, *, exit_steps: list[int], noise_generator: torch.Generator,
                   sync: RankSync | None = None) -> Tensor:
    """prefill (in ``sync.local``) + self_roll under the caller's grad mode; x [1, W, C, h, w]."""
    sync = sync or RankSync()
    with sync.local():
        state = new_state(generator, scheduler, model_cfg, window)
        prefill(state, window)
    state.text.reset()
    return self_roll(state, window, exit_steps=exit_steps, noise_generator=noise_generator, sync=sync)


# ----------------------------------------------------------------------------------------------
# losses of a step
# ----------------------------------------------------------------------------------------------


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


def slot_loss_parts(memory, stage: int) -> tuple[Tensor, dict[str, float]]:
    """L_slot for the backward pass plus its parts L_con and L_rec for logging.

    The parts are recomputed without grad from the memory's collected slot-attention passes (eq. 8, 10)
    before ``slot_loss`` consumes them; memories without slots report zeros.
    """
    parts = {"slot_con": 0.0, "slot_rec": 0.0}
    acc = getattr(memory, "losses", None)
    terms = list(getattr(acc, "terms", []))
    if terms:
        with torch.no_grad():
            con = [contrastive_loss(t.prev_slots, t.grouping.slots, acc.temperature)
                   for t in terms if t.prev_slots is not None]
            rec = [reconstruction_loss(t.grouping.adapted, t.grouping.slots, t.grouping.assign,
                                       confidence=acc.rec_confidence) for t in terms]
            parts["slot_con"] = float(torch.stack(con).mean()) if con else 0.0
            parts["slot_rec"] = float(torch.stack(rec).mean())
    return memory.slot_loss(stage), parts


def generator_loss(window: TrajectoryWindow, *, generator: Generator, teacher: CausalWanModel,
                   critic: CausalWanModel, scheduler: FlowMatchScheduler, model_cfg: ModelConfig,
                   trainer_cfg: TrainerConfig, negative_embedding: Tensor, stage: int, exit_steps: list[int],
                   generator_rng: torch.Generator, noise_rng: torch.Generator,
                   sync: RankSync | None = None) -> tuple[Tensor, dict[str, float]]:
    """Eq. 6 on a self-rolled window: DMD (teacher CFG vs critic) + lambda_slot * L_slot."""
    x = rollout_window(generator, scheduler, model_cfg, window, exit_steps=exit_steps, noise_generator=noise_rng,
                       sync=sync)  # [1, W, C, h, w], grad at the exit steps
    slot, parts = slot_loss_parts(generator.memory, stage)
    scorers = make_scorers(teacher, critic, scheduler, window.text_embeddings[window.final_prompt_index],
                           negative_embedding)
    t = sample_dmd_timestep(x.shape[0], generator_rng, shift=model_cfg.timestep_shift, num_frames=x.shape[1],
                            min_t=trainer_cfg.min_timestep, max_t=trainer_cfg.max_timestep,
                            num_train_timesteps=model_cfg.num_train_timesteps).to(x.device)
    noise = torch.randn(x.shape, generator=noise_rng, device=x.device, dtype=x.dtype)
    dmd, stats = dmd_loss(x, teacher_cond=scorers.teacher_cond, teacher_uncond=scorers.teacher_uncond,
                          critic=scorers.critic, scheduler=scheduler, guidance_scale=trainer_cfg.guidance_scale,
                          t=t, noise=noise)
    loss = generator_objective(dmd, slot.to(dmd.device, dmd.dtype), trainer_cfg.lambda_slot)
    return loss, {"dmd": float(dmd.detach()), "slot": float(slot.detach()), **parts, **stats}


def critic_loss(window: TrajectoryWindow, *, generator: Generator, critic: CausalWanModel,
                scheduler: FlowMatchScheduler, model_cfg: ModelConfig, trainer_cfg: TrainerConfig,
                exit_steps: list[int], generator_rng: torch.Generator, noise_rng: torch.Generator,
                sync: RankSync | None = None) -> tuple[Tensor, dict[str, float]]:
    """Flow-matching loss of the critic on a no-grad self-roll of the window (critic CFG 0).

    The whole rollout runs in one ``sync.local`` block: without gradient it needs no collectives.
    """
    sync = sync or RankSync()
    with sync.local(), torch.no_grad():
        x = rollout_window(generator, scheduler, model_cfg, window, exit_steps=exit_steps, noise_generator=noise_rng,
                           sync=replace(sync, local=contextlib.nullcontext))
    text = critic.encode_text(window.text_embeddings[window.final_prompt_index][None].to(
        device=critic.device, dtype=critic.dtype))
    t = sample_dmd_timestep(x.shape[0], generator_rng, shift=model_cfg.timestep_shift, num_frames=x.shape[1],
                            min_t=trainer_cfg.min_timestep, max_t=trainer_cfg.max_timestep,
                            num_train_timesteps=model_cfg.num_train_timesteps).to(x.device)
    noise = torch.randn(x.shape, generator=noise_rng, device=x.device, dtype=x.dtype)
    loss, stats = critic_flow_loss(x, critic=lambda x_t, tt: predict_x0(critic, scheduler, x_t, tt, text),
                                   scheduler=scheduler, t=t, noise=noise)
    return loss, stats
