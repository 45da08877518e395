"""The streaming and training control flow of bench/flops.py, bench/memory_accounting.py and bench/gpu_bench.py.

On the meta device nothing computes: tensors are shapes only, so the 1.3B generator and the 14B teacher cost
neither memory nor arithmetic, and bench/meta_count.py counts what runs. The control flow is the real one,
rollout/streaming.py's StreamState (memory read -> 4 denoising steps -> clean re-run with commit -> memory write;
the prompt-switch recache). On meta the memory is a stand-in: memory/ calls .tolist() for its inspector and evicts
with data-dependent indexing, which meta tensors cannot run, so ``MetaSlotMemory`` and ``MetaFrameBank`` do the same
reads and writes through the real writer (phi + slot attention), make_items, SlotBank and relevance functions and
keep in Python which chunks the bank holds. The same functions run on a GPU with the real memory
(bench/gpu_bench.py): every tensor they make goes to the model's device.

The training step (``generator_update``, ``critic_update``) follows trainer/window.py's prefill -> roll -> scored
clip and trainer/losses.py's scores with its own short loop over StreamState, so that it does not depend on the
trainer's internal signatures; the context chunk's first-frame VAE re-encode is not modelled, and the DMD loss is
a surrogate with the same backward graph (the gradient reaches the window's new frames only).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections import Counter
from types import SimpleNamespace

import torch

from memory.bank import META_FIELDS, SlotBank, SlotQuery, relevance
from memory.baselines import text_relevance
from memory.writer import SlotGrouping, make_items
from meta_count import Meter
from model.wan import CausalWanModel
from rollout.components import Generator
from rollout.streaming import Prompts, StreamState, chunk_switch_starts
from slotmem.config import replace

META = torch.device("meta")

# ----------------------------------------------------------------------------------------------
# models
# ----------------------------------------------------------------------------------------------


def teacher_config(cfg):
    """Wan2.1-T2V-14B in the backbone's text/latent/patch/schedule: the config's teacher section where it has one
    (slotmem.config.TeacherConfig), else the anchors' sizes (anchors-video §2.1: 40 layers, dim 5120, 40 heads,
    ffn 13824)."""
    teacher = getattr(cfg, "teacher", None)
    if teacher is not None and hasattr(teacher, "model_config"):
        return teacher.model_config(cfg.model)
    return dataclasses.replace(cfg.model, name="wan2.1-t2v-14b", num_layers=40, dim=5120, num_heads=40, ffn_dim=13824)


def meta_backbone(model_cfg, dtype=torch.bfloat16) -> CausalWanModel:
    with torch.device(META):
        return CausalWanModel(model_cfg).to(dtype)


def meta_generator(model_cfg, memory_cfg, kind: str, dtype=torch.bfloat16) -> Generator:
    """rollout.components.Generator (backbone + memory of `kind`) on meta, as the trainer and actors build it."""
    with torch.device(META):
        return Generator(model_cfg, replace(memory_cfg, kind=kind)).to(dtype)


def stand_in_memory(generator: Generator, memory_cfg, model_cfg, meter: Meter):
    """The meta stand-in for generator.memory (see the module docstring)."""
    kind = generator.memory.kind
    if kind == "slot":
        return MetaSlotMemory(generator.memory, memory_cfg, meter)
    if kind == "frame_bank":
        return MetaFrameBank(memory_cfg, model_cfg.tokens_per_frame, meter)
    return MetaNoMemory()


def random_prompts(model_cfg, dtype, device, count: int = 2) -> Prompts:
    """Stand-in text-encoder outputs (shape is what matters; random rather than zeros on a real device)."""
    emb = torch.randn(count, model_cfg.text_len, model_cfg.text_dim, device=device, dtype=dtype)
    return Prompts(texts=[""] * count, embeddings=emb, pooled=emb.mean(dim=1))


# ----------------------------------------------------------------------------------------------
# memory stand-ins
# ----------------------------------------------------------------------------------------------


class MetaNoMemory:
    """'none': LongLive's sink + local window, nothing read or written."""

    kind = "none"

    def reset(self, batch_size: int) -> None:
        pass

    def set_prompt(self, pooled_text, prompt_index, text_keys=None) -> None:
        pass

    def read(self, exclude_frames=()):
        return None

    def write(self, states, **info) -> None:
        pass

    def slot_loss(self):
        return None

    def state_tensors(self) -> list[torch.Tensor]:
        return []


class MetaSlotMemory:
    """SlotMemory's reads and writes (memory/streaming.py) with its real writer, text projections and SlotBank.

    Python keeps the frame span of each block of S items; at budget the oldest block makes room, where SlotMemory
    evicts the lowest-scoring items: that decides which items survive, not how many, and a read at budget has more
    eligible items than top_k, so shapes, FLOPs and bytes are those of the real memory.
    """

    kind = "slot"

    def __init__(self, memory, memory_cfg, meter: Meter):
        self.writer, self.text_proj, self.cfg, self.meter = memory.writer, memory.text_proj, memory_cfg, meter

    def reset(self, batch_size: int) -> None:
        self.bank = SlotBank(capacity=self.cfg.budget)
        self.blocks: list[tuple[int, int]] = []  # frame span of each S-item block, oldest first
        self.slots = None
        self.pooled = None
        self.groupings = []  # graphs of the writes under autograd, for the slot-loss backward

    def set_prompt(self, pooled_text, prompt_index, text_keys=None) -> None:
        self.pooled = pooled_text

    def _query(self, recent) -> SlotQuery:
        text = torch.stack([proj(self.pooled.to(proj.weight.dtype)) for proj in self.text_proj])  # (Y, B, d)
        return SlotQuery(text=text, recent_slots=recent.detach(), text_weight=self.cfg.text_weight)

    def read(self, exclude_frames=()):
        S = self.cfg.num_slots_per_chunk
        eligible = S * sum(all(b <= lo or a >= hi for lo, hi in exclude_frames) for a, b in self.blocks)
        k = min(self.cfg.retrieve_top_k, eligible)
        if k == 0:
            return None
        with self.meter.phase("memory_read"):
            retrieval = self.bank.retrieve(self._query(self.slots), k)
        return list(zip(retrieval.keys.unbind(0), retrieval.values.unbind(0)))

    def write(self, states, *, chunk_index: int, start_frame: int, num_frames: int) -> None:
        with self.meter.phase("memory_write"):
            prev = self.slots
            grouping = self._group([s.x for s in states], prev)
            if grouping.slots.requires_grad:
                self.groupings.append(grouping)
            if chunk_index % self.cfg.record_interval == 0:
                self._add(grouping, states, prev, (start_frame, start_frame + num_frames))
            self.slots = grouping.slots

    def _group(self, features, prev) -> SlotGrouping:
        """The writer's phi + slot attention; without grad a repeated shape is replayed (it is ~100 meta ops)."""
        if torch.is_grad_enabled():
            return self.writer(features, prev)
        Y, (B, L, _), S, d = len(features), features[0].shape, self.cfg.num_slots_per_chunk, self.cfg.slot_dim
        dtype, device = features[0].dtype, features[0].device

        def fake():
            return SlotGrouping(adapted=torch.empty(Y, B, L, d, dtype=dtype, device=device),
                                slots=torch.empty(Y, B, S, d, dtype=dtype, device=device),
                                assign=torch.empty(Y, B, S, L, dtype=dtype, device=device))

        return self.meter.replay(("writer", Y, B, L, prev is None), lambda: self.writer(features, prev), fake)

    def _add(self, grouping, states, prev, frames: tuple[int, int]) -> None:
        items = make_items(grouping, [s.k for s in states], [s.v for s in states], self.cfg.tokens_per_slot)
        query = self._query(grouping.slots if prev is None else prev)  # U^{c-1}, as SlotMemory scores a write
        Y, B, S = items.u.shape[:3]
        if self.bank.size + S <= self.bank.capacity:
            meta = {name: torch.zeros(Y, B, S, dtype=torch.long, device=items.u.device) for name in META_FIELDS}
            self.bank.add(items, meta, query)
        else:
            with torch.no_grad():  # the eviction's scoring of old + new items (SlotBank._add_with_eviction)
                score = relevance(torch.cat([self.bank.items("u"), items.u], dim=2), query).score
                score.topk(self.bank.capacity, dim=-1)
            self.blocks.pop(0)
        self.blocks.append(frames)

    def slot_loss(self):
        """A stand-in for L_slot with the same graph inputs (slots, assignment, adapted features)."""
        if not self.groupings:
            return None
        loss = sum(g.slots.float().mean() + g.assign.float().mean() + g.adapted.float().mean() for g in self.groupings)
        self.groupings = []
        return loss

    def state_tensors(self) -> list[torch.Tensor]:
        return [*self.bank.fields.values(), *([] if self.slots is None else [self.slots])]


class MetaFrameBank:
    """FrameBankMemory (memory/baselines.py): the first latent frame of every recorded chunk, admitted at the next
    read, the (n-1) most text-relevant old frames kept when full; `sma` reads ceil(n/2) frames per head."""

    kind = "frame_bank"

    def __init__(self, memory_cfg, tokens_per_frame: int, meter: Meter):
        self.cfg, self.tokens_per_frame, self.meter = memory_cfg, tokens_per_frame, meter

    def reset(self, batch_size: int) -> None:
        self.k = self.v = self.pending = self.text_query = None

    def set_prompt(self, pooled_text, prompt_index, text_keys=None) -> None:
        self.text_query = torch.stack([tk.mean(dim=1) for tk in text_keys])  # (Y, B, H, D)

    @property
    def size(self) -> int:
        return 0 if self.k is None else self.k.shape[2]

    def _commit_pending(self) -> None:
        if self.pending is None:
            return
        (k, v), self.pending = self.pending, None
        if self.size < self.cfg.frame_bank_frames:
            self.k = k if self.k is None else torch.cat([self.k, k], dim=2)
            self.v = v if self.v is None else torch.cat([self.v, v], dim=2)
            return
        with torch.no_grad():  # score the old frames, keep n-1 of them (which ones changes no shape)
            text_relevance(self.text_query, self.k).mean(dim=-1).topk(self.size - 1, dim=-1)
        self.k, self.v = torch.cat([self.k[:, :, 1:], k], dim=2), torch.cat([self.v[:, :, 1:], v], dim=2)

    def read(self, exclude_frames=()):
        with self.meter.phase("memory_read"):
            self._commit_pending()
            if self.size == 0:
                return None
            frames = self.size
            if self.cfg.sma:
                text_relevance(self.text_query, self.k)  # per-head ranking of the bank frames
                frames = math.ceil(self.size / 2)
            Y, B, _, T, H, D = self.k.shape
            keys = self.k[:, :, :frames].reshape(Y, B, frames * T, H, D)
            values = self.v[:, :, :frames].reshape(Y, B, frames * T, H, D)
        return list(zip(keys.unbind(0), values.unbind(0)))

    def write(self, states, *, chunk_index: int, start_frame: int, num_frames: int) -> None:
        if chunk_index % self.cfg.record_interval:
            return
        T = self.tokens_per_frame
        with self.meter.phase("memory_write"):
            self.pending = (torch.stack([s.k.detach()[:, None, :T] for s in states]),
                            torch.stack([s.v.detach()[:, None, :T] for s in states]))

    def slot_loss(self):
        return None

    def state_tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.k, self.v, *(self.pending or ())) if t is not None]


# ----------------------------------------------------------------------------------------------
# control flow
# ----------------------------------------------------------------------------------------------


def read_memory(state: StreamState):
    """The chunk's memory read as the pipeline does it (StreamState.read_memory excludes cached frames)."""
    return state.read_memory() if hasattr(state, "read_memory") else state.memory.read()


def stream_video(model, memory, model_cfg, *, num_frames: int, switch_frames: list[int], meter: Meter,
                 tick=None) -> SimpleNamespace:
    """rollout.streaming.generate's loop, on the model's device (meta here; bench/gpu_bench.py runs it on a GPU).
    Returns the state, the output buffer, the FLOPs of the initial prompt (its text projections), one FLOP record
    per chunk (phases switch, memory_read, denoise, commit, commit/memory_write) and, with a tracker, per chunk the
    bytes alive at its start and its peak. tick() is called once the stream is set up and after every chunk."""
    phase = meter.phase
    take = meter.counter.take if meter.counter is not None else Counter
    chunk = model_cfg.num_frame_per_block
    switch_starts = chunk_switch_starts(switch_frames, chunk)
    grid = (model_cfg.in_channels, model_cfg.latent_height, model_cfg.latent_width)
    device = model.device
    out = torch.empty((1, num_frames, *grid), dtype=model.dtype, device=device)  # generate()'s latents buffer
    records, peaks = [], []
    with torch.no_grad():
        with phase("prompt"):
            state = StreamState(model, memory, model.scheduler, model_cfg,
                                random_prompts(model_cfg, model.dtype, device), batch_size=1)
        prompt = take()
        if tick is not None:
            tick()
        for start in range(0, num_frames, chunk):
            alive = meter.tracker.current if meter.tracker is not None else 0
            window = meter.tracker.window() if meter.tracker is not None else contextlib.nullcontext(SimpleNamespace())
            with window as bytes_record:
                if start in switch_starts:
                    with phase("switch"):
                        state.switch_prompt(switch_starts.index(start) + 1, out[:, :start])
                memory_kv = read_memory(state)
                with phase("denoise"):
                    noise = torch.randn((1, chunk, *grid), dtype=model.dtype, device=device)
                    x0 = state.denoise(noise, memory_kv=memory_kv)
                with phase("commit"):
                    state.commit(x0, memory_kv=memory_kv)
                out[:, start:start + chunk] = x0
                del memory_kv, x0
            if tick is not None:
                tick()
            records.append(take())
            peaks.append((alive, alive + getattr(bytes_record, "peak", 0)))
    return SimpleNamespace(state=state, out=out, prompt=prompt, records=records, peaks=peaks)


def roll_window(model, memory, model_cfg, *, start: int, window_frames: int, switch_start: int | None,
                exit_step: int, meter: Meter) -> tuple[torch.Tensor, torch.Tensor]:
    """trainer/window.py prefill + roll: the scored clip [1, W, C, h, w] and its new frames (grad under autograd).

    A window at frame 0 is all new; a later one is one context chunk of the trajectory + W - chunk new frames.
    """
    phase = meter.phase
    chunk = model_cfg.num_frame_per_block
    context = chunk if start else 0
    new = window_frames - context
    grid = (model_cfg.in_channels, model_cfg.latent_height, model_cfg.latent_width)
    dtype, device = model.dtype, model.device
    latents = torch.randn((1, start, *grid), dtype=dtype, device=device)  # the trajectory's clean frames
    switch_starts = [] if switch_start is None else [switch_start]
    with torch.no_grad(), phase("prefill"):
        state = StreamState(model, memory, model.scheduler, model_cfg, random_prompts(model_cfg, dtype, device),
                            batch_size=1)
        for s in range(0, start, chunk):
            if s in switch_starts:
                state.switch_prompt(1, latents[:, :s])
            state.commit(latents[:, s:s + chunk], memory_kv=read_memory(state))
    state.text.reset()
    history, out = latents, []
    with phase("roll"):
        for s in range(start, start + new, chunk):
            if s in switch_starts:
                with torch.no_grad(), phase("switch"):
                    state.switch_prompt(1, history)
                state.text.reset()
            memory_kv = read_memory(state)
            noise = torch.randn((1, chunk, *grid), dtype=dtype, device=device)
            x0 = state.denoise(noise, memory_kv=memory_kv, exit_step=exit_step)
            state.commit(x0, memory_kv=memory_kv)
            out.append(x0)
            history = torch.cat([history, x0.detach()], dim=1)
    new_frames = torch.cat(out, dim=1)
    clip = torch.cat([latents[:, start - context:], new_frames], dim=1) if context else new_frames
    return clip, new_frames


def _score(model, model_cfg, x_t, t):
    """trainer/models.py predict_x0's call: bidirectional over the clip from frame 0, with the model's own text."""
    text = model.encode_text(torch.randn(1, model_cfg.text_len, model_cfg.text_dim, dtype=model.dtype,
                                         device=model.device))
    return model(x_t, t, text, start_frame=0, causal=False)


def generator_update(model, memory, teacher, critic, model_cfg, *, start: int, window_frames: int,
                     switch_start: int | None, exit_step: int, meter: Meter) -> None:
    """One generator update (trainer/window.py generator_loss): roll with grad at the exit step, teacher cond +
    uncond and critic on the noised clip without grad, backward of DMD (new frames only) + L_slot."""
    clip, new = roll_window(model, memory, model_cfg, start=start, window_frames=window_frames,
                            switch_start=switch_start, exit_step=exit_step, meter=meter)
    phase = meter.phase
    t = torch.full((1, clip.shape[1]), 500.0, device=clip.device)
    with torch.no_grad():
        x_t = model.scheduler.add_noise(clip.detach(), torch.randn_like(clip), t)
        for name, scorer in (("teacher", teacher), ("teacher", teacher), ("critic", critic)):
            with phase(name):
                _score(scorer, model_cfg, x_t, t)
    with phase("backward"):
        loss = new.float().square().mean()  # DMD's gradient reaches the new frames only (LongLive gradient_mask)
        slot = memory.slot_loss()
        (loss if slot is None else loss + slot).backward()


def critic_update(model, memory, critic, model_cfg, *, start: int, window_frames: int, switch_start: int | None,
                  exit_step: int, meter: Meter) -> None:
    """One critic update (trainer/window.py critic_loss): a no-grad roll, the critic's flow loss on it, backward."""
    with torch.no_grad():
        clip, _ = roll_window(model, memory, model_cfg, start=start, window_frames=window_frames,
                              switch_start=switch_start, exit_step=exit_step, meter=meter)
    phase = meter.phase
    t = torch.full((1, clip.shape[1]), 500.0, device=clip.device)
    x_t = model.scheduler.add_noise(clip, torch.randn_like(clip), t)
    with phase("critic"):
        flow = _score(critic, model_cfg, x_t, t)
    with phase("backward"):
        flow.float().square().mean().backward()
