"""Training windows of committed trajectories: sampling, context rebuild, self-roll (DESIGN §5; anchors-video §3).

A rollout row holds the clean latents of a whole self-rollout [F, C, h, w] and its prompts' text embeddings. A
step takes a chunk-aligned window and

  1. prefill (no grad): replays the clean frames before the window through the generator exactly as the rollout
     committed them (memory read -> clean re-run -> memory write per chunk, prompt switch with recache at its
     chunk), which rebuilds the KV cache and the memory bank;
  2. self-roll: generates the window's new frames chunk by chunk from fresh noise, continuing that cache and bank
     (a switch inside the window recaches from the clean prefix plus the generated frames); each chunk keeps
     gradient at one exit step of the few-step sampler (Self-Forcing), the same for every chunk unless
     ``trainer.same_exit_step`` is false, drawn on rank 0 and broadcast so every rank runs the same graph depth;
     or, in Stage 0, replays the window's own clean frames (the slot modules learn from the frozen backbone's
     features of the committed trajectory);
  3. hands the scored clip of ``trainer.window_frames`` frames to the losses. A window at the start of a video is
     all new frames. A window in the middle (LongLive's streaming long tuning, ``model/streaming_training.py``)
     generates window_frames - chunk new frames after one chunk of the trajectory's own frames; that context
     chunk's first latent is re-encoded as an image latent (decode it alone, re-encode its pixel frame), so the
     teacher and critic, which only ever saw clips that start at a first frame, score it as one, and the loss
     covers the new frames only (LongLive's gradient_mask).

Data-parallel ranks must run the same sequence of module calls: ZeRO-3 gathers each module's parameters with a
collective at its call. So the window start and the exit steps are drawn on rank 0 and broadcast (every rank rolls
out the same layout of its own trajectory), and the rank-dependent work (the prefill, and a prompt switch that
only some ranks' trajectories have) runs inside ``RankSync.local``, where ZeRO-3 engines hold their full parameters
and issue no collectives; all ranks enter it together. Every other call is identical across ranks. Nothing here
touches torch.distributed: ``RankSync`` carries the collectives (single-process no-ops by default).

Shapes: P prompts, Lt text tokens, D text_dim, F trajectory frames, W scored frames, N new frames, C latent
channels, h x w latent grid. One trajectory per rank and step (B = 1).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager

import torch
from torch import Tensor

from model import FlowMatchScheduler
from rollout.components import Generator
from rollout.streaming import Prompts, StreamState, chunk_switch_starts, prompt_index_at
from slotmem.config import ModelConfig
from slotmem.errors import InputError

Broadcast = Callable[[Tensor], Tensor]
FirstFrame = Callable[[Tensor], Tensor]  # latent [B, 1, C, h, w] -> the same frame re-encoded as an image latent


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
    start: int  # first generated frame (a chunk start)
    num_frames: int  # W, the frames the losses score
    context: int  # frames of the trajectory before `start` that open the scored clip (0 or one chunk)
    policy_version: int
    trajectory_id: str = ""

    @property
    def num_new(self) -> int:
        return self.num_frames - self.context

    @property
    def end(self) -> int:
        return self.start + self.num_new

    @property
    def final_prompt_index(self) -> int:
        """The prompt active at the window's last frame: the one that supervises it (LongLive)."""
        return prompt_index_at(self.end - 1, self.switch_starts)

    def loss_frames(self, device: torch.device | str = "cpu") -> Tensor | None:
        """[1, W] bool: the new frames (None when the whole clip is new)."""
        if not self.context:
            return None
        frames = torch.zeros(1, self.num_frames, dtype=torch.bool, device=device)
        frames[:, self.context:] = True
        return frames


def window_starts(num_frames: int, window_frames: int, chunk: int) -> list[int]:
    """Chunk starts a window may generate from: 0 (all window_frames new), or s >= chunk with one chunk of
    context before it and window_frames - chunk new frames that fit in the trajectory."""
    if window_frames > num_frames:
        return []
    return [0] + list(range(chunk, num_frames - (window_frames - chunk) + 1, chunk))


def sample_window_start(num_frames: int, window_frames: int, chunk: int, generator: torch.Generator,
                        sync: RankSync | None = None) -> int:
    """A uniform choice among ``window_starts``, the same on every rank.

    Every rank draws (so all random streams advance alike); rank 0's draw is broadcast, within the
    shortest trajectory of all ranks.
    """
    sync = sync or RankSync()
    shortest = -int(sync.reduce_max(torch.tensor([-num_frames]))[0])
    starts = window_starts(shortest, window_frames, chunk)
    if not starts:
        raise InputError(f"trainer.window_frames ({window_frames}) is longer than a trajectory ({shortest} "
                         f"latent frames); roll out at least rollout.num_frames >= {window_frames}")
    index = torch.randint(len(starts), (1,), generator=generator)
    return starts[int(sync.broadcast(index)[0])]


def window_from_row(row: dict[str, Any], *, window_frames: int, chunk: int, generator: torch.Generator,
                    sync: RankSync | None = None, index: int = 0) -> TrajectoryWindow:
    """A window of batch element `index` of a ``rollout.shards.batch_to_torch`` batch (start drawn by rank 0)."""
    latents = row["latents"][index]  # [F, C, h, w]
    start = sample_window_start(latents.shape[0], window_frames, chunk, generator, sync)
    return TrajectoryWindow(latents=latents, text_embeddings=row["text_embeddings"][index],
                            switch_starts=chunk_switch_starts(list(row["switch_frames"][index]), chunk),
                            start=start, num_frames=window_frames, context=chunk if start else 0,
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


def draw_exit_steps(num_chunks: int, num_steps: int, generator: torch.Generator, *, same: bool = True,
                    broadcast: Broadcast | None = None) -> list[int]:
    """Exit step per chunk in [0, num_steps): one for all chunks (Self-Forcing same_step_across_blocks) or one
    each; every rank draws, then rank 0's draw is broadcast.

    Every rank draws (not only rank 0) so that all ranks consume their random streams alike.
    """
    steps = torch.randint(num_steps, (1 if same else num_chunks,), generator=generator)
    if broadcast is not None:
        steps = broadcast(steps)
    return [int(s) for s in steps.expand(num_chunks)] if same else [int(s) for s in steps]


# ----------------------------------------------------------------------------------------------
# rebuilding the context and rolling the window
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
            state.commit(clean[:, s : s + chunk], memory_kv=state.read_memory())


def roll(state: StreamState, window: TrajectoryWindow, *, exit_steps: list[int] | None,
         noise_generator: torch.Generator, sync: RankSync | None = None) -> Tensor:
    """Continue the stream after ``prefill`` over the window's new frames; returns them, x [1, N, C, h, w].

    exit_steps given: self-roll from fresh noise; under autograd each chunk's x0 carries gradient from its exit
    step (and the memory writes keep their slot-attention graphs for L_slot); under no_grad this is the critic's
    sample. exit_steps None: replay the trajectory's own clean chunks (Stage 0: the memory writes, under the
    caller's grad mode, are what trains). A chunk where any rank switches prompts is entered in ``sync.local`` by
    every rank.
    """
    sync = sync or RankSync()
    cfg = state.model_cfg
    chunk = cfg.num_frame_per_block
    starts = list(range(window.start, window.end, chunk))
    if exit_steps is not None and len(exit_steps) != len(starts):
        raise InputError(f"need one exit step per chunk ({len(starts)}), got {len(exit_steps)}")
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
        memory_kv = state.read_memory()
        if exit_steps is None:
            x0 = window.latents[None, s : s + chunk].to(device=device, dtype=dtype)
        else:
            noise = torch.randn(shape, generator=noise_generator, device=device, dtype=dtype)
            x0 = state.denoise(noise, memory_kv=memory_kv, exit_step=exit_steps[c], generator=noise_generator)
        state.commit(x0, memory_kv=memory_kv)
        out.append(x0)
        history = torch.cat([history, x0.detach()], dim=1)
    return torch.cat(out, dim=1)


def rollout_window(generator: Generator, scheduler: FlowMatchScheduler, model_cfg: ModelConfig,
                   window: TrajectoryWindow, *, exit_steps: list[int] | None, noise_generator: torch.Generator,
                   sync: RankSync | None = None, restart_slots: bool = False) -> Tensor:
    """prefill (in ``sync.local``) + roll under the caller's grad mode; the new frames x [1, N, C, h, w].
    restart_slots: the window's first chunk starts its slots from the learned initialiser (Stage 0)."""
    sync = sync or RankSync()
    with sync.local():
        state = new_state(generator, scheduler, model_cfg, window)
        prefill(state, window)
    state.text.reset()
    if restart_slots:
        generator.memory.restart_slot_chain()
    return roll(state, window, exit_steps=exit_steps, noise_generator=noise_generator, sync=sync)


def scored_clip(window: TrajectoryWindow, new: Tensor, first_frame: FirstFrame) -> Tensor:
    """The clip the losses score, [1, W, C, h, w]: the context chunk (its first latent re-encoded as an image
    latent) followed by the new frames; the new frames alone for a window at the start of a video."""
    if not window.context:
        return new
    context = window.latents[None, window.start - window.context: window.start].to(new.device, new.dtype)
    with torch.no_grad():
        head = first_frame(context[:, :1]).to(new.device, new.dtype)  # [1, 1, C, h, w]
    return torch.cat([head, context[:, 1:], new], dim=1)
