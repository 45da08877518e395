"""Baseline memories behind the SlotMemory interface, for the Fig. 4 ablation.

'none' (NoMemory): no long-term memory; the backbone attends to its sink + local window only (LongLive).

'frame_bank' (FrameBankMemory): MemFlow's Narrative Adaptive Memory (anchors-video.md §4). The bank
holds up to n = frame_bank_frames whole latent frames of post-RoPE K/V: on every recorded chunk the
*first* latent frame of the clean re-run is copied as the chunk's prototype. When the bank is full,
the old frames are scored by text relevance

    rel(f) = mean over text tokens j, heads h and frame tokens t of  q_text[j, h] . K_f[t, h] / sqrt(D)

with q_text the active prompt's per-layer text keys, the (n-1) best old frames are kept and the new
prototype appended. As in MemFlow the compression of a new prototype happens at the next read, so a
prompt set in between (a switch) already decides which history survives; the inspector lists the
prototype as added at its write and the frames it displaced under the next chunk.

Sparse Memory Activation (`sma`), simplified: MemFlow ranks the sink and bank frames per head by the
dot product of the chunk's mean query with each frame's mean key and keeps the top half. A read here
happens before the chunk's queries exist and the sink belongs to the backbone, so per head we rank the
bank frames by the per-head text relevance above and keep the ceil(n_frames / 2) best ones.

Shapes: Y layers, B batch, F bank frames, T tokens per frame, H heads, D head dim.
"""

from __future__ import annotations

import math

import torch

from memory.base import KV, ChunkInfo, LayerStateLike, StreamingMemory
from slotmem.errors import InputError


class NoMemory(StreamingMemory):
    """LongLive: sink + local window, nothing retrieved."""

    kind = "none"

    def _read(self, exclude_frames) -> list[KV] | None:
        return None

    def _write(self, states: list[LayerStateLike], info: ChunkInfo) -> None:
        self.inspector.add({"event": "write", "chunk": info.chunk_index, "prompt_index": info.prompt_index,
                            "recorded": False, "retrieved": [], "added": [], "evicted": [], "items": []})

    def inspect(self) -> dict:
        return {"kind": self.kind, "chunk": self.last_chunk, "prompt_index": self.prompt_index, "size": 0,
                "capacity": 0, "memory_tokens_per_read": 0, "retrieved": [], "items": []}


def text_relevance(text_query: torch.Tensor, frame_keys: torch.Tensor) -> torch.Tensor:
    """Per-head relevance (Y, B, F, H) of frames with keys (Y, B, F, T, H, D).

    text_query (Y, B, H, D) is the mean of the text keys over text tokens: the mean over text and frame
    tokens of q.K factorises into (mean q).(mean K), so the text keys are averaged once per prompt.
    """
    D = frame_keys.shape[-1]
    k_mean = frame_keys.float().mean(dim=3)  # (Y, B, F, H, D)
    return torch.einsum("ybhd,ybfhd->ybfh", text_query.float(), k_mean) / math.sqrt(D)


class FrameBankMemory(StreamingMemory):
    """MemFlow NAM (+ optional simplified SMA): whole latent frames scored by text relevance."""

    kind = "frame_bank"

    def __init__(self, memory_cfg, **dims):
        super().__init__(memory_cfg, **dims)
        self.inspect_layer = 0
        self._reset_state()

    def _state_tensors(self) -> list[str]:
        return [*super()._state_tensors(), "fields", "_pending", "_text_query"]

    def _reset_state(self) -> None:
        self.fields: dict[str, torch.Tensor] = {}  # name -> (Y, B, n, ...): k, v (.., T, H, D); frame, chunk, item_id
        self.size = 0
        self._pending: dict[str, torch.Tensor] | None = None  # the newest prototype, (Y, B, 1, ...)
        self._text_query: torch.Tensor | None = None  # (Y, B, H, D)
        self._evicted: list[int] = []
        self._num_commits = 0

    def _on_prompt(self) -> None:
        if self.text_keys is None:
            raise InputError("memory.set_prompt: memory.kind 'frame_bank' scores frames by text relevance and "
                             "needs text_keys (per layer (B, Lt, H, D))")
        self._text_query = torch.stack([tk.mean(dim=1) for tk in self.text_keys])  # (Y, B, H, D)
        if self.size:
            self.inspector.add({"event": "prompt", "chunk": self.next_chunk, "prompt_index": self.prompt_index,
                                "items": self._item_records(self.next_chunk)})

    def _write(self, states: list[LayerStateLike], info: ChunkInfo) -> None:
        added = []
        if info.recorded:
            T = self.tokens_per_frame
            Y, B = len(states), states[0].k.shape[0]
            device = states[0].k.device

            def const(value: int) -> torch.Tensor:
                return torch.full((Y, B, 1), value, dtype=torch.long, device=device)

            # The chunk's first latent frame: tokens [0, T) of the re-run, copied verbatim.
            self._pending = {
                "k": torch.stack([s.k.detach()[:, None, :T] for s in states]),  # (Y, B, 1, T, H, D)
                "v": torch.stack([s.v.detach()[:, None, :T] for s in states]),  # (Y, B, 1, T, H, D)
                "frame": const(info.start_frame), "chunk": const(info.chunk_index), "item_id": const(self._num_commits),
            }
            added = [self._num_commits]
            self._num_commits += 1
        self.inspector.add({"event": "write", "chunk": info.chunk_index, "prompt_index": info.prompt_index,
                            "recorded": info.recorded, "retrieved": self._last_retrieved, "added": added,
                            "evicted": self._evicted, "items": self._item_records(info.chunk_index)})
        self._evicted = []

    def _read(self, exclude_frames) -> list[KV] | None:
        # MemFlow reads its bank whatever the local window holds (its bank frames may repeat cached ones);
        # exclude_frames is ignored to keep the baseline faithful.
        self._commit_pending()
        if self.size == 0:
            return None
        k_bank = self.fields["k"][:, :, : self.size]  # (Y, B, F, T, H, D)
        v_bank = self.fields["v"][:, :, : self.size]
        Y, B, F, T, H, D = k_bank.shape
        if not self.cfg.sma:
            self._last_retrieved = self.fields["item_id"][self.inspect_layer, 0, : self.size].tolist()
            keys = k_bank.reshape(Y, B, F * T, H, D)
            values = v_bank.reshape(Y, B, F * T, H, D)
        else:
            keys, values = self._sparse_activation(k_bank, v_bank)
        return list(zip(keys.unbind(0), values.unbind(0)))

    def inspect(self) -> dict:
        return {"kind": self.kind, "chunk": self.last_chunk, "prompt_index": self.prompt_index, "size": self.size,
                "capacity": self.cfg.frame_bank_frames,
                "memory_tokens_per_read": self._frames_per_read() * self.tokens_per_frame,
                "pending": self._pending is not None, "retrieved": list(self._last_retrieved),
                "items": self._item_records(self.next_chunk)}

    # ------------------------------------------------------------------------------------------
    # helpers
    # ------------------------------------------------------------------------------------------

    def _frames_per_read(self) -> int:
        return math.ceil(self.size / 2) if self.cfg.sma else self.size

    def _commit_pending(self) -> None:
        """Admit the newest prototype: append while there is room, else keep the (n-1) most relevant old frames."""
        new, self._pending = self._pending, None
        if new is None:
            return
        n = self.cfg.frame_bank_frames
        if not self.fields:
            Y, B = new["k"].shape[:2]
            self.fields = {name: t.new_empty((Y, B, n, *t.shape[3:])) for name, t in new.items()}
        if self.size < n:
            for name, t in new.items():
                self.fields[name][:, :, self.size: self.size + 1] = t
            self.size += 1
            return
        rel = text_relevance(self._text_query, self.fields["k"]).mean(dim=-1)  # (Y, B, n)
        kept = rel.topk(n - 1, dim=-1).indices.sort(dim=-1).values  # (Y, B, n-1), oldest first
        evicted = torch.ones_like(rel, dtype=torch.bool).scatter_(-1, kept, False)  # (Y, B, n)
        self._evicted = self.fields["item_id"][self.inspect_layer, 0][evicted[self.inspect_layer, 0]].tolist()
        Y, B = kept.shape[:2]
        ly = torch.arange(Y, device=kept.device).view(Y, 1, 1)
        lb = torch.arange(B, device=kept.device).view(1, B, 1)
        for name, t in new.items():
            self.fields[name] = torch.cat([self.fields[name][ly, lb, kept], t], dim=2)  # (Y, B, n, ...)

    def _sparse_activation(self, k_bank: torch.Tensor, v_bank: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per head, the ceil(F/2) frames most relevant to the prompt, oldest first -> (Y, B, m*T, H, D) each."""
        Y, B, F, T, H, D = k_bank.shape
        m = self._frames_per_read()
        rel = text_relevance(self._text_query, k_bank)  # (Y, B, F, H)
        best = rel.permute(0, 1, 3, 2).topk(m, dim=-1).indices.sort(dim=-1).values  # (Y, B, H, m)
        self._last_retrieved = sorted(set(
            self.fields["item_id"][self.inspect_layer, 0][best[self.inspect_layer, 0].flatten()].tolist()))
        ly = torch.arange(Y, device=best.device).view(Y, 1, 1, 1)
        lb = torch.arange(B, device=best.device).view(1, B, 1, 1)
        lh = torch.arange(H, device=best.device).view(1, 1, H, 1)

        def select(bank: torch.Tensor) -> torch.Tensor:
            per_head = bank.permute(0, 1, 4, 2, 3, 5)[ly, lb, lh, best]  # (Y, B, H, m, T, D)
            return per_head.permute(0, 1, 3, 4, 2, 5).reshape(Y, B, m * T, H, D)

        return select(k_bank), select(v_bank)

    @torch.no_grad()
    def _item_records(self, reference_chunk: int) -> list[dict]:
        if self.size == 0:
            return []
        l = self.inspect_layer
        score = text_relevance(self._text_query, self.fields["k"][:, :, : self.size]).mean(dim=-1)[l, 0].tolist()
        ids, chunks, frames = (self.fields[name][l, 0, : self.size].tolist() for name in ("item_id", "chunk", "frame"))
        return [{"id": ids[i], "chunk": chunks[i], "age": reference_chunk - chunks[i], "frame": frames[i],
                 "score": score[i]} for i in range(self.size)]
