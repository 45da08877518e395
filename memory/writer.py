"""Slot-conditioned KV memory writing (SlotMemory §3.3, eqs. 2-3).

Per layer l: adapt the token features of the clean re-run, X~_l = phi_l(X_l) (dim -> slot_dim), group
them with the temporally initialised Slot Attention (one grouper shared by all layers, as in eq. 2,
where only phi carries a layer index; the layers are stacked into its batch so one call serves them
all), then for every slot s take the R = tokens_per_slot tokens with the largest assignment,
I_s = TopR(A_s), and copy their original K and V (eq. 3). The copy is a pure gather of detached
tensors: no arithmetic touches the cached values, so memory tokens are bit-identical to the cache.

Shapes: Y layers, B batch, L tokens of the chunk, S slots, R tokens per slot, H heads, D head dim,
d slot_dim.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from memory.slot_attention import TemporalSlotGrouper


@dataclass
class SlotGrouping:
    """One slot-attention pass over all layers."""

    adapted: torch.Tensor  # (Y, B, L, d) X~ = phi(X)
    slots: torch.Tensor  # (Y, B, S, d) U^c
    assign: torch.Tensor  # (Y, B, S, L) A^c, sums to 1 over S


@dataclass
class SlotItems:
    """The S new memory items per layer and batch element of one write (eq. 3)."""

    k: torch.Tensor  # (Y, B, S, R, H, D) copies of the cached keys
    v: torch.Tensor  # (Y, B, S, R, H, D) copies of the cached values
    u: torch.Tensor  # (Y, B, S, d) slot embeddings, the retrieval keys
    token_index: torch.Tensor  # (Y, B, S, R) positions of the copied tokens inside the chunk


class SlotWriter(nn.Module):
    """phi_l adapters plus the shared temporal slot grouper."""

    def __init__(self, *, num_layers: int, dim: int, slot_dim: int, num_slots: int, num_iters: int):
        super().__init__()
        self.adapters = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, slot_dim)) for _ in range(num_layers)
        )
        self.grouper = TemporalSlotGrouper(num_slots=num_slots, slot_dim=slot_dim, num_iters=num_iters)
        self.init_weights()

    def init_weights(self):
        # The LayerNorm makes phi insensitive to the scale of each layer's residual stream; Xavier keeps the
        # adapted features at unit scale so the slot-attention logits start in a sensible range.
        for adapter in self.adapters:
            adapter[0].reset_parameters()
            nn.init.xavier_uniform_(adapter[1].weight)
            nn.init.zeros_(adapter[1].bias)

    def adapt(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """features: per layer (B, L, dim) -> X~ (Y, B, L, d)."""
        dtype = self.adapters[0][1].weight.dtype
        return torch.stack([phi(x.to(dtype)) for phi, x in zip(self.adapters, features)])

    def forward(self, features: Sequence[torch.Tensor], prev_slots: torch.Tensor | None) -> SlotGrouping:
        """features: per layer (B, L, dim); prev_slots (Y, B, S, d) of the previous chunk or None."""
        adapted = self.adapt(features)  # (Y, B, L, d)
        Y, B, L, d = adapted.shape
        prev = None if prev_slots is None else prev_slots.reshape(Y * B, -1, d)  # (Y*B, S, d)
        slots, assign = self.grouper(adapted.reshape(Y * B, L, d), prev)  # (Y*B, S, d), (Y*B, S, L)
        S = slots.shape[1]
        return SlotGrouping(adapted=adapted, slots=slots.reshape(Y, B, S, d), assign=assign.reshape(Y, B, S, L))


def top_tokens(assign: torch.Tensor, tokens_per_slot: int) -> torch.Tensor:
    """I_s = TopR(A_s): assign (..., S, L) -> token indices (..., S, R), largest weight first."""
    return assign.detach().topk(tokens_per_slot, dim=-1).indices


def gather_tokens(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Exact copy t[b, index[b, s, r]]: t (B, L, H, D), index (B, S, R) -> (B, S, R, H, D)."""
    batch = torch.arange(t.shape[0], device=t.device).view(-1, 1, 1)  # (B, 1, 1)
    return t.detach()[batch, index]  # advanced indexing copies the selected rows verbatim


def make_items(grouping: SlotGrouping, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor],
               tokens_per_slot: int) -> SlotItems:
    """Memory items m_{l,s} = (K^[I_s], V^[I_s], u_s) for every layer; keys/values per layer (B, L, H, D)."""
    index = top_tokens(grouping.assign, tokens_per_slot)  # (Y, B, S, R)
    k = torch.stack([gather_tokens(kl, il) for kl, il in zip(keys, index)])  # (Y, B, S, R, H, D)
    v = torch.stack([gather_tokens(vl, il) for vl, il in zip(values, index)])  # (Y, B, S, R, H, D)
    return SlotItems(k=k, v=v, u=grouping.slots.detach(), token_index=index)
