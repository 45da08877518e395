"""Streaming chunked generation with a KV cache, long-term memory and prompt switches (paper §3.1-3.4).

Per chunk of ``num_frame_per_block`` latent frames:

    memory read -> few-step denoise (4 warped steps) -> clean re-run at context_noise (commits the
    chunk's K/V to the cache) -> memory write (from the clean re-run's states only)

At a prompt switch (the first chunk whose start frame is >= the switch frame, as in LongLive) the
cross-attention cache is reset (new TextContext), the bank is re-scored with the new prompt (§3.4), and the
recent clean frames are re-committed under the new prompt (LongLive's KV recache, anchors-video §2.7):

    model.recache = single   one call over the recached frames, which attend to each other bidirectionally (and
                             to the kept sink), as LongLive / MemFlow's recache does;
    model.recache = causal   chunk by chunk, each chunk attending the frames re-committed before it;
    model.global_sink        true keeps the sink of the first prompt and recaches the last
                             local_attn_size - sink_size frames; false drops it and recaches the last local_attn_size
                             frames, the first sink_size of which become the new sink.

The recache reads the memory bank like every other call. Memory items whose frames the call already attends (the
sink, the recent window, its own frames) are not retrieved again. ``StreamState`` is shared by inference
(``generate``), rollout actors and the trainer's no-grad prefill + self-roll of a training window.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

import torch
from torch import Tensor

from model.schedule import sampler_timesteps
from slotmem.config import ModelConfig


@dataclass
class Prompts:
    """Encoded prompts of one video (shared by every sample of the batch)."""

    texts: list[str]
    embeddings: Tensor  # [P, Lt, text_dim], padded positions zeroed (Wan convention)
    pooled: Tensor  # [P, text_dim], masked mean over real tokens

    def __len__(self) -> int:
        return len(self.texts)


def encode_prompts(text_encoder, texts: list[str]) -> Prompts:
    emb, mask = text_encoder.encode(list(texts))
    return Prompts(texts=list(texts), embeddings=emb, pooled=text_encoder.pooled(emb, mask))


def prompt_index_at(frame: int, switch_frames: list[int]) -> int:
    """Index of the prompt active at latent ``frame`` (prompt i covers [switch[i-1], switch[i]))."""
    return sum(1 for s in switch_frames if frame >= s)


def chunk_switch_starts(switch_frames: list[int], chunk: int) -> list[int]:
    """Start frame of the first chunk at or after each switch frame (LongLive switch semantics)."""
    return [-(-s // chunk) * chunk for s in switch_frames]


@dataclass
class StreamEvent:
    kind: str  # "switch"
    frame: int
    prompt_index: int
    recached: tuple[int, int]


@dataclass
class StreamState:
    """Caches of one streaming video: KV cache, text context, memory, and the clean history."""

    model: torch.nn.Module
    memory: torch.nn.Module
    scheduler: object
    model_cfg: ModelConfig
    prompts: Prompts
    batch_size: int = 1
    events: list[StreamEvent] = field(default_factory=list)

    def __post_init__(self):
        self.cache = self.model.new_cache(self.batch_size)
        self.memory.reset(self.batch_size)
        self.prompt_index = -1
        self.text = None
        self.next_frame = 0  # first latent frame not yet committed
        self.chunk_index = 0
        self.steps = sampler_timesteps(self.model_cfg).tolist()  # warped {1000, 750, 500, 250}
        self._set_prompt(0)

    # -- prompts ------------------------------------------------------------------------------

    def _set_prompt(self, index: int) -> None:
        p = self.prompts
        emb = p.embeddings[index : index + 1].expand(self.batch_size, -1, -1)  # [B, Lt, text_dim]
        self.text = self.model.encode_text(emb.to(self._dtype))  # fresh cross-attn cache
        pooled = p.pooled[index : index + 1].expand(self.batch_size, -1)  # [B, text_dim]
        self.memory.set_prompt(pooled, index, self.model.text_keys(self.text))
        self.prompt_index = index

    def switch_prompt(self, index: int, history: Tensor) -> None:
        """Reset cross-attention, re-score memory, recache recent clean frames under the new prompt.

        history: [B, F_done, C, h, w] clean latents of every frame committed so far.
        """
        cfg = self.model_cfg
        self._set_prompt(index)
        start = self.next_frame
        if cfg.global_sink:
            for layer_cache in self.cache:
                layer_cache.drop_local()  # the sink (first prompt's frames) is kept
            sink_end = self.cache[0].sink_span[1]
            window = cfg.local_attn_size if cfg.recache == "causal" else cfg.local_attn_size - cfg.sink_size
            lo = max(sink_end, start - window)
        else:
            for layer_cache in self.cache:
                layer_cache.drop_all()  # the first recached frames become the sink
            lo = max(0, start - cfg.local_attn_size)
        if lo < start:
            spans = [(lo, start)] if cfg.recache == "single" else [
                (f, min(f + cfg.num_frame_per_block, start)) for f in range(lo, start, cfg.num_frame_per_block)]
            with torch.no_grad():
                for a, b in spans:
                    memory_kv = self.read_memory(a, b - a)
                    self._run_clean(history[:, a:b], a, write_memory=False, memory_kv=memory_kv)
        self.events.append(StreamEvent("switch", start, index, (lo, start)))

    def read_memory(self, start: int | None = None, num_frames: int | None = None):
        """memory.read() for a call over [start, start + num_frames) (default: the next chunk), without the items
        whose frames that call already attends (sink, recent window, its own frames)."""
        start = self.next_frame if start is None else start
        num_frames = self.model_cfg.num_frame_per_block if num_frames is None else num_frames
        seen = [*self.cache[0].visible_spans(num_frames), (start, start + num_frames)]
        return self.memory.read(exclude_frames=seen)

    # -- chunks -------------------------------------------------------------------------------

    @property
    def _dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def _timesteps(self, t: float, frames: int, device) -> Tensor:
        return torch.full((self.batch_size, frames), float(t), device=device)

    def denoise(self, noise: Tensor, *, memory_kv=None, exit_step: int | None = None,
                generator: torch.Generator | None = None) -> Tensor:
        """Few-step denoise of the chunk starting at ``next_frame``; returns x0 [B, f, C, h, w].

        With ``exit_step`` (training) the steps before it run without grad, the exit step runs with
        grad and its x0 is returned (Self-Forcing); otherwise all steps run and the last x0 is returned.
        """
        steps = self.steps
        last = len(steps) - 1 if exit_step is None else exit_step
        x = noise
        for i in range(last + 1):
            t = self._timesteps(steps[i], x.shape[1], x.device)
            with torch.set_grad_enabled(torch.is_grad_enabled() and i == last and exit_step is not None):
                flow = self.model(x, t, self.text, start_frame=self.next_frame, cache=self.cache,
                                  memory_kv=memory_kv)
                x0 = self.scheduler.flow_to_x0(x, flow, t)
            if i < last:
                eps = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
                x = self.scheduler.add_noise(x0.detach(), eps, self._timesteps(steps[i + 1], x.shape[1], x.device))
        return x0

    def _run_clean(self, x0: Tensor, start: int, *, write_memory: bool, memory_kv=None) -> None:
        """Clean re-run at context_noise: the only call that commits K/V (and feeds the memory)."""
        t_ctx = self.model_cfg.context_noise
        x_ctx = x0
        if t_ctx > 0:
            x_ctx = self.scheduler.add_noise(x0, torch.randn_like(x0), self._timesteps(t_ctx, x0.shape[1], x0.device))
        t = self._timesteps(t_ctx, x0.shape[1], x0.device)
        with torch.no_grad():  # no gradient flows across chunks through the cache (Self-Forcing)
            _, states = self.model(x_ctx, t, self.text, start_frame=start, cache=self.cache, commit=True,
                                   memory_kv=memory_kv, return_states=True)
        if write_memory:  # under the caller's grad mode: slot losses train the adapter and slot attention
            self.memory.write(states, chunk_index=self.chunk_index, start_frame=start, num_frames=x0.shape[1])

    def commit(self, x0: Tensor, *, memory_kv=None) -> None:
        """Commit a finished (clean) chunk: cache write + memory write; advances the stream."""
        self._run_clean(x0.detach(), self.next_frame, write_memory=True, memory_kv=memory_kv)
        self.next_frame += x0.shape[1]
        self.chunk_index += 1


# ----------------------------------------------------------------------------------------------
# full video generation
# ----------------------------------------------------------------------------------------------


@dataclass
class GenerationResult:
    latents: Tensor  # [B, F, C, h, w] clean latents
    switch_frames: list[int]
    events: list[StreamEvent]
    chunk_seconds: list[float]
    memory_records: list[dict]


def generate(model, memory, scheduler, model_cfg: ModelConfig, prompts: Prompts, *, num_frames: int,
             switch_frames: list[int], seed: int, batch_size: int = 1, device: str | torch.device = "cpu",
             progress: bool = False, inspect_memory: bool = True) -> GenerationResult:
    """Generate ``num_frames`` latent frames chunk by chunk; deterministic for a seed."""
    chunk = model_cfg.num_frame_per_block
    if num_frames % chunk:
        raise ValueError(f"num_frames ({num_frames}) must be a multiple of the chunk size ({chunk})")
    if len(switch_frames) != len(prompts) - 1:
        raise ValueError(f"{len(prompts)} prompts need {len(prompts) - 1} switch frames, got {len(switch_frames)}")
    switch_starts = chunk_switch_starts(switch_frames, chunk)
    gen = torch.Generator(device=device).manual_seed(seed)
    shape = (batch_size, chunk, model_cfg.in_channels, model_cfg.latent_height, model_cfg.latent_width)
    dtype = next(model.parameters()).dtype
    out = torch.empty((batch_size, num_frames, *shape[2:]), dtype=dtype, device=device)
    state = StreamState(model, memory, scheduler, model_cfg, prompts, batch_size=batch_size)
    chunk_seconds, records = [], []
    bar = _progress(num_frames // chunk, progress)
    with torch.no_grad():
        for start in range(0, num_frames, chunk):
            t0 = time.perf_counter()
            if start in switch_starts:
                state.switch_prompt(switch_starts.index(start) + 1, out[:, :start])
            memory_kv = state.read_memory()
            noise = torch.randn(shape, generator=gen, device=device, dtype=dtype)
            x0 = state.denoise(noise, memory_kv=memory_kv, generator=gen)
            state.commit(x0, memory_kv=memory_kv)
            out[:, start : start + chunk] = x0
            chunk_seconds.append(time.perf_counter() - t0)
            if inspect_memory:
                records.append({"chunk": start // chunk, "prompt_index": state.prompt_index, **memory.inspect()})
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    return GenerationResult(out, list(switch_frames), state.events, chunk_seconds, records)


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    # In job logs (no tty) a redraw per chunk would flood the log: update every 10 s there.
    return tqdm(total=total, desc="chunks", unit="chunk", mininterval=0.1 if sys.stderr.isatty() else 10.0)
