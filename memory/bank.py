"""The slot memory bank: fused relevance, eviction and top-k retrieval (SlotMemory §3.4, eq. 4-5).

Every (layer, batch element) row holds at most `capacity` = N_budget items. All rows receive S new
items at the same writes and are trimmed back to the budget at once, so every row holds the same
number of items and the bank is a set of dense tensors (Y, B, N, ...) with one shared `size`: scoring,
eviction and retrieval are single batched tensor operations, never a loop over items.

Relevance of item i (eq. 4): r = gamma * r_text + (1 - gamma) * r_vis with
  r_text = cos(u_i, P_l(pooled text of the active prompt)),
  r_vis  = max_s cos(u_i, U_s), U the slots of the most recent chunk (the current visual state).
Eviction keeps the `capacity` highest-scoring of old + new items after each write; retrieval returns
the top-k items' K/V. A prompt switch only changes the query, never the stored items.

Shapes: Y layers, B batch, N items, S slots per write, R tokens per item, H heads, D head dim, d slot_dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from memory.writer import SlotItems

# Integer metadata eta stored per item next to the tensors of SlotItems.
META_FIELDS = ("item_id", "chunk", "frame_start", "frame_end", "prompt", "slot")


@dataclass
class SlotQuery:
    """What items are scored against: the active prompt and the current visual state."""

    text: torch.Tensor  # (Y, B, d) P_l(pooled text)
    recent_slots: torch.Tensor  # (Y, B, S, d) slots of the most recent chunk
    text_weight: float  # gamma (Table 6: 0.7)


@dataclass
class Relevance:
    score: torch.Tensor  # (Y, B, N) fused r
    text: torch.Tensor  # (Y, B, N) r_text
    visual: torch.Tensor  # (Y, B, N) r_vis


def relevance(u: torch.Tensor, query: SlotQuery) -> Relevance:
    """Eq. 4 for items with slot embeddings u (Y, B, N, d)."""
    u = F.normalize(u.to(query.text.dtype), dim=-1)
    r_text = torch.einsum("ybnd,ybd->ybn", u, F.normalize(query.text, dim=-1))  # (Y, B, N)
    recent = F.normalize(query.recent_slots.to(u.dtype), dim=-1)
    r_vis = torch.einsum("ybnd,ybsd->ybns", u, recent).amax(dim=-1)  # (Y, B, N)
    gamma = query.text_weight
    return Relevance(score=gamma * r_text + (1.0 - gamma) * r_vis, text=r_text, visual=r_vis)


@dataclass
class Retrieval:
    keys: torch.Tensor  # (Y, B, k*R, H, D)
    values: torch.Tensor  # (Y, B, k*R, H, D)
    position: torch.Tensor  # (Y, B, k) bank positions of the retrieved items, best first
    score: torch.Tensor  # (Y, B, k) their fused relevance (detached)


@dataclass
class Eviction:
    evicted_id: torch.Tensor  # (Y, B, S) ids of the items dropped by this write (old or new), -1 padded
    added: torch.Tensor  # (Y, B, S) bool: which of the new items entered the bank


class SlotBank:
    """Dense per-layer item storage with budgeted eviction. Runtime state, not module parameters."""

    def __init__(self, *, capacity: int):
        self.capacity = capacity
        self.fields: dict[str, torch.Tensor] = {}  # name -> (Y, B, capacity, ...)
        self.size = 0

    def reset(self) -> None:
        self.fields = {}
        self.size = 0

    def items(self, name: str) -> torch.Tensor:
        """The filled part of one field: (Y, B, size, ...)."""
        return self.fields[name][:, :, : self.size]

    def scores(self, query: SlotQuery) -> Relevance:
        return relevance(self.items("u"), query)

    # ------------------------------------------------------------------------------------------
    # write + evict
    # ------------------------------------------------------------------------------------------

    def add(self, new_items: SlotItems, meta: dict[str, torch.Tensor], query: SlotQuery) -> Eviction:
        """Insert S items per row (meta: name -> (Y, B, S) ints), then evict down to the budget."""
        new = {"k": new_items.k, "v": new_items.v, "u": new_items.u, "token_index": new_items.token_index, **meta}
        Y, B, S = new_items.u.shape[:3]
        if S > self.capacity:
            raise ValueError(f"a write of {S} items cannot fit a bank of {self.capacity}")
        if not self.fields:
            self.fields = {name: t.new_empty((Y, B, self.capacity, *t.shape[3:])) for name, t in new.items()}
        no_eviction = Eviction(evicted_id=new["item_id"].new_full((Y, B, S), -1),
                               added=torch.ones((Y, B, S), dtype=torch.bool, device=new_items.u.device))
        if self.size + S <= self.capacity:
            for name, t in new.items():
                self.fields[name][:, :, self.size: self.size + S] = t  # plain copy into free positions
            self.size += S
            return no_eviction
        return self._add_with_eviction(new, query)

    def _add_with_eviction(self, new: dict[str, torch.Tensor], query: SlotQuery) -> Eviction:
        Y, B, S = new["u"].shape[:3]
        n_old, cap = self.size, self.capacity
        with torch.no_grad():
            score = relevance(torch.cat([self.items("u"), new["u"]], dim=2), query).score  # (Y, B, n_old+S)
        keep = torch.zeros_like(score, dtype=torch.bool)
        keep.scatter_(-1, score.topk(cap, dim=-1).indices, True)  # the `cap` best of old + new
        free = torch.ones((Y, B, cap), dtype=torch.bool, device=keep.device)
        free[:, :, :n_old] = ~keep[:, :, :n_old]  # evicted old positions and never-used positions
        admitted = keep[:, :, n_old:]  # (Y, B, S) new items that made the cut
        # Pair the j-th free position with the j-th admitted new item of every row (their counts are equal:
        # cap - kept_old). Stable argsort on "not free"/"not admitted" lists those first, in order.
        dest = torch.argsort((~free).to(torch.uint8), dim=-1, stable=True)[:, :, :S]  # (Y, B, S)
        src = torch.argsort((~admitted).to(torch.uint8), dim=-1, stable=True)  # (Y, B, S)
        moves = torch.arange(S, device=keep.device) < admitted.sum(-1, keepdim=True)  # (Y, B, S)
        row = torch.arange(Y * B, device=keep.device).view(Y, B, 1)  # (Y, B, 1)
        flat_dest = (row * cap + dest)[moves]  # (n_moves,)
        flat_src = (row * S + src)[moves]  # (n_moves,)

        evicted_old = torch.where(~keep[:, :, :n_old], self.items("item_id"), -1)  # (Y, B, n_old)
        rejected_new = torch.where(~admitted, new["item_id"], -1)  # (Y, B, S)
        ids = torch.cat([evicted_old, rejected_new], dim=-1)
        evicted_id = ids.sort(dim=-1, descending=True).values[:, :, :S]  # at most S items leave per write

        for name, t in new.items():
            store = self.fields[name].view(Y * B * cap, *t.shape[3:])  # (Y*B*cap, ...)
            store.index_copy_(0, flat_dest, t.reshape(Y * B * S, *t.shape[3:])[flat_src])
        self.size = cap
        return Eviction(evicted_id=evicted_id, added=admitted)

    # ------------------------------------------------------------------------------------------
    # read
    # ------------------------------------------------------------------------------------------

    def retrieve(self, query: SlotQuery, top_k: int, eligible: torch.Tensor | None = None) -> Retrieval | None:
        """Top-k items per row by fused relevance; K/V flattened to (Y, B, k*R, H, D); None if nothing is eligible.

        eligible (Y, B, size) bool: items that may be read (the others, e.g. copies of tokens the call already
        attends, are skipped). Every row reads the same number of items, the smallest eligible count of any row
        capped at top_k, so the K/V stay one dense tensor.

        When the query carries gradient (training), the values are multiplied by a straight-through
        gate 1 + r - sg(r): exactly 1 in the forward pass (the values stay bit-identical) while the
        generator loss reaches r and through it the text projection P, which no slot loss touches.
        """
        rel = self.scores(query).score  # (Y, B, size)
        ranked = rel.detach()
        k = min(top_k, self.size)
        if eligible is not None:
            ranked = ranked.masked_fill(~eligible, float("-inf"))
            k = min(k, int(eligible.sum(-1).min()))
        if k == 0:
            return None
        best = ranked.topk(k, dim=-1).indices  # (Y, B, k), best first
        Y, B = best.shape[:2]
        ly = torch.arange(Y, device=best.device).view(Y, 1, 1)
        lb = torch.arange(B, device=best.device).view(1, B, 1)
        keys = self.fields["k"][ly, lb, best]  # (Y, B, k, R, H, D)
        values = self.fields["v"][ly, lb, best]  # (Y, B, k, R, H, D)
        picked = rel.gather(-1, best)  # (Y, B, k)
        if picked.requires_grad:
            gate = (1.0 + (picked - picked.detach())).to(values.dtype)  # 1 + 0 == 1 exactly; d gate / d r = 1
            values = values * gate[..., None, None, None]
        keys = keys.flatten(2, 3)  # (Y, B, k*R, H, D)
        values = values.flatten(2, 3)  # (Y, B, k*R, H, D)
        return Retrieval(keys=keys, values=values, position=best, score=picked.detach())

    def outside(self, spans) -> torch.Tensor:
        """(Y, B, size) bool: items whose frames overlap none of the [start, stop) spans."""
        start, stop = self.items("frame_start"), self.items("frame_end")
        keep = torch.ones_like(start, dtype=torch.bool)
        for a, b in spans:
            keep &= (stop <= a) | (start >= b)
        return keep

    def gather(self, name: str, position: torch.Tensor) -> torch.Tensor:
        """Field `name` at bank positions (Y, B, k) -> (Y, B, k, ...)."""
        Y, B = position.shape[:2]
        ly = torch.arange(Y, device=position.device).view(Y, 1, 1)
        lb = torch.arange(B, device=position.device).view(1, B, 1)
        return self.fields[name][ly, lb, position]
