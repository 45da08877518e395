"""SlotMemory as the pipeline uses it, and the factory for every memory kind (DESIGN §3).

`build_memory(memory_cfg, ...)` returns a StreamingMemory (interface in memory/base.py):
  'slot'       SlotMemory below: slot-conditioned writing, budgeted bank, prompt-aware retrieval;
  'frame_bank' MemFlow-style whole-frame bank (memory/baselines.py);
  'none'       no long-term memory, LongLive's sink + local window only (memory/baselines.py).

SlotMemory per chunk:
  read():  score all items against (P_l(active prompt), slots of the latest chunk) and return the top-k
           items' K/V per layer (None while the bank is empty).
  write(): run phi_l and the temporally initialised slot attention on the clean re-run of *every* chunk,
           so the slot state (the temporal initialisation and the current visual state of r_vis) follows
           the video; on every record_interval-th chunk (chunk_index % record_interval == 0, MemFlow's
           bank clock) the S new items per layer enter the bank and the lowest-scoring items are evicted.
  With autograd enabled the slot-attention passes are kept for L_slot (slot_loss); the K/V copies are
  always detached. The slot state carries gradient across the chunks of a training window and is cut
  (detached) whenever slot_loss() is called.

Learned parts: phi_l and the grouper (trained by L_slot), P_l, one text projection per layer (trained through the
straight-through gate on retrieved values, see SlotBank.retrieve), and the feature decoder of the Stage 0 warm-up
(memory/losses.py), which only Stage 0 uses.

Bank bookkeeping: a write is scored against the previous chunk's slots U^{c-1} (the visual state before the new
items existed; scoring them against their own slots would give every new item r_vis = 1), and a read skips items
whose frames the call already attends through the KV cache (the sink and recent window) or computes itself.

Shapes: Y layers, B batch, L tokens of the chunk, S slots, d slot_dim.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from memory.bank import SlotBank, SlotQuery
from memory.base import KV, ChunkInfo, LayerStateLike, StreamingMemory, normal_tensors
from memory.baselines import FrameBankMemory, NoMemory
from memory.inspector import save_assignment_png
from memory.losses import SlotLoss, SlotLossAccumulator
from memory.writer import SlotWriter, make_items
from slotmem.config import MemoryConfig
from slotmem.errors import InputError


class SlotMemory(StreamingMemory):
    """Object-centric KV memory (SlotMemory §3.3-3.5)."""

    kind = "slot"

    def __init__(self, memory_cfg: MemoryConfig, *, num_layers: int, dim: int, num_heads: int, head_dim: int,
                 text_dim: int, tokens_per_frame: int, num_frame_per_block: int):
        super().__init__(memory_cfg, num_layers=num_layers, dim=dim, num_heads=num_heads, head_dim=head_dim,
                         text_dim=text_dim, tokens_per_frame=tokens_per_frame, num_frame_per_block=num_frame_per_block)
        self.writer = SlotWriter(num_layers=num_layers, dim=dim, slot_dim=memory_cfg.slot_dim,
                                 num_slots=memory_cfg.num_slots_per_chunk, num_iters=memory_cfg.slot_iters)
        self.text_proj = nn.ModuleList(nn.Linear(text_dim, memory_cfg.slot_dim) for _ in range(num_layers))
        self.decoder = FeatureDecoder(memory_cfg.slot_dim, memory_cfg.decoder_hidden)
        self.bank = SlotBank(capacity=memory_cfg.budget)
        self.losses = SlotLossAccumulator(temperature=memory_cfg.con_temperature, rec_weight=memory_cfg.rec_weight,
                                          rec_confidence=memory_cfg.rec_confidence)
        self.inspect_layer = 0  # which layer the inspector describes (batch element 0)
        self._slots: torch.Tensor | None = None  # (Y, B, S, d) U of the latest chunk
        self._restart_chain = False  # the next write starts its slots from the learned initialiser
        self._last_assign: torch.Tensor | None = None  # (S, L) of inspect_layer, batch element 0
        self._num_commits = 0
        self.init_weights()

    def init_weights(self):
        for proj in self.text_proj:
            nn.init.xavier_uniform_(proj.weight)
            nn.init.zeros_(proj.bias)

    # ------------------------------------------------------------------------------------------
    # interface
    # ------------------------------------------------------------------------------------------

    def freeze_slot_grouper(self, flag: bool) -> None:
        self.writer.grouper.requires_grad_(not flag)

    def restart_slot_chain(self) -> None:
        self._restart_chain = True

    def _state_tensors(self) -> list[str]:
        return [*super()._state_tensors(), "_slots", "_last_assign"]

    def _leave_inference_mode(self) -> None:
        super()._leave_inference_mode()
        if not torch.is_inference_mode_enabled():
            self.bank.fields = normal_tensors(self.bank.fields)

    def _reset_state(self) -> None:
        self.bank.reset()
        self.losses.clear()
        self._slots = None
        self._restart_chain = False
        self._last_assign = None
        self._num_commits = 0

    def _on_prompt(self) -> None:
        if self.bank.size:
            self.inspector.add({"event": "prompt", "chunk": self.next_chunk, "prompt_index": self.prompt_index,
                                "items": self._item_records(self.next_chunk)})

    def _read(self, exclude_frames) -> list[KV] | None:
        if self.bank.size == 0:
            return None
        eligible = self.bank.outside(exclude_frames) if exclude_frames else None
        retrieval = self.bank.retrieve(self._query(), self.cfg.retrieve_top_k, eligible)
        if retrieval is None:
            self._last_retrieved = []
            return None
        ids = self.bank.gather("item_id", retrieval.position)  # (Y, B, k)
        self._last_retrieved = ids[self.inspect_layer, 0].tolist()
        return list(zip(retrieval.keys.unbind(0), retrieval.values.unbind(0)))

    def _write(self, states: list[LayerStateLike], info: ChunkInfo) -> None:
        before = self._slots  # U^{c-1}: what new items are scored against, also when the chain restarts
        prev = None if self._restart_chain else before
        self._restart_chain = False
        grouping = self.writer([s.x for s in states], prev)
        if grouping.slots.requires_grad:
            self.losses.add(prev, grouping)
        self._slots = grouping.slots
        self._last_assign = grouping.assign[self.inspect_layer, 0].detach()
        added: list[int] = []
        evicted: list[int] = []
        if info.recorded:
            items = make_items(grouping, [s.k for s in states], [s.v for s in states], self.cfg.tokens_per_slot)
            # scored against U^{c-1}, the visual state the new items are compared with (not their own slots)
            eviction = self.bank.add(items, self._meta(info, items.u),
                                     self._query(grouping.slots if before is None else before))
            first_id = self._num_commits * self.cfg.num_slots_per_chunk
            added = [first_id + s for s, ok in enumerate(eviction.added[self.inspect_layer, 0].tolist()) if ok]
            evicted = [i for i in eviction.evicted_id[self.inspect_layer, 0].tolist() if i >= 0]
            self._num_commits += 1
        self.inspector.add({"event": "write", "chunk": info.chunk_index, "prompt_index": info.prompt_index,
                            "recorded": info.recorded, "retrieved": self._last_retrieved, "added": added,
                            "evicted": evicted, "items": self._item_records(info.chunk_index)})

    def _slot_loss(self, stage: int, feature_weight: float) -> SlotLoss:
        loss = self.losses.compute(stage, decoder=self.decoder, feature_weight=feature_weight)
        if self._slots is not None:
            self._slots = self._slots.detach()  # truncate backprop through time at the loss boundary
        return loss

    def inspect(self) -> dict:
        return {"kind": self.kind, "chunk": self.last_chunk, "prompt_index": self.prompt_index,
                "size": self.bank.size, "capacity": self.bank.capacity,
                "memory_tokens_per_read": min(self.bank.size, self.cfg.retrieve_top_k) * self.cfg.tokens_per_slot,
                "retrieved": list(self._last_retrieved), "items": self._item_records(self.next_chunk)}

    def save_assignment_png(self, path: str | Path, *, height: int, width: int, scale: int = 8) -> Path:
        """Picture of the latest chunk's slot assignment (inspect_layer, batch element 0) on its (h, w) token grid."""
        if self._last_assign is None:
            raise InputError("memory.save_assignment_png: nothing written since reset()")
        if height * width != self.tokens_per_frame:
            raise InputError(f"memory.save_assignment_png: height*width must equal tokens_per_frame "
                             f"({self.tokens_per_frame}), got {height}x{width}")
        num_frames = self._last_assign.shape[-1] // self.tokens_per_frame
        return save_assignment_png(self._last_assign, path, num_frames=num_frames, height=height, width=width,
                                   scale=scale)

    # ------------------------------------------------------------------------------------------
    # helpers
    # ------------------------------------------------------------------------------------------

    def _query(self, recent_slots: torch.Tensor | None = None) -> SlotQuery:
        """P_l(pooled text of the active prompt) and the visual state (default: the slots of the latest chunk)."""
        text = torch.stack([proj(self.pooled_text.to(proj.weight.dtype)) for proj in self.text_proj])  # (Y, B, d)
        recent = self._slots if recent_slots is None else recent_slots
        return SlotQuery(text=text, recent_slots=recent.detach(), text_weight=self.cfg.text_weight)

    def _meta(self, info: ChunkInfo, u: torch.Tensor) -> dict[str, torch.Tensor]:
        """eta of the S new items, broadcast to (Y, B, S)."""
        Y, B, S = u.shape[:3]
        slot = torch.arange(S, device=u.device).expand(Y, B, S)

        def const(value: int) -> torch.Tensor:
            return torch.full((Y, B, S), value, dtype=torch.long, device=u.device)

        return {"item_id": slot + self._num_commits * S, "chunk": const(info.chunk_index),
                "frame_start": const(info.start_frame), "frame_end": const(info.start_frame + info.num_frames),
                "prompt": const(info.prompt_index), "slot": slot.clone()}

    @torch.no_grad()
    def _item_records(self, reference_chunk: int) -> list[dict]:
        """The bank of inspect_layer, batch element 0, scored under the active prompt and visual state."""
        if self.bank.size == 0:
            return []
        l = self.inspect_layer
        rel = self.bank.scores(self._query())
        cols = {name: self.bank.items(name)[l, 0].tolist()
                for name in ("item_id", "chunk", "frame_start", "frame_end", "prompt", "slot")}
        score, r_text, r_vis = (t[l, 0].tolist() for t in (rel.score, rel.text, rel.visual))
        return [{"id": cols["item_id"][i], "chunk": cols["chunk"][i], "age": reference_chunk - cols["chunk"][i],
                 "frames": [cols["frame_start"][i], cols["frame_end"][i]], "prompt": cols["prompt"][i],
                 "slot": cols["slot"][i], "score": score[i], "r_text": r_text[i], "r_vis": r_vis[i]}
                for i in range(self.bank.size)]


class FeatureDecoder(nn.Module):
    """Stage 0's decoder from a slot back to the adapted-feature space (memory/losses.py feature_loss)."""

    def __init__(self, slot_dim: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(slot_dim), nn.Linear(slot_dim, hidden), nn.GELU(),
                                 nn.Linear(hidden, slot_dim))

    def forward(self, slots: torch.Tensor) -> torch.Tensor:
        return self.net(slots)  # (..., S, d) -> (..., S, d)


MEMORY_KINDS: dict[str, type[StreamingMemory]] = {"slot": SlotMemory, "frame_bank": FrameBankMemory, "none": NoMemory}


def build_memory(memory_cfg: MemoryConfig, *, num_layers: int, dim: int, num_heads: int, head_dim: int,
                 text_dim: int, tokens_per_frame: int, num_frame_per_block: int) -> StreamingMemory:
    """The memory of kind memory_cfg.kind for a backbone of the given sizes; call reset(B) before use."""
    cls = MEMORY_KINDS[memory_cfg.kind]
    return cls(memory_cfg, num_layers=num_layers, dim=dim, num_heads=num_heads, head_dim=head_dim,
               text_dim=text_dim, tokens_per_frame=tokens_per_frame, num_frame_per_block=num_frame_per_block)
