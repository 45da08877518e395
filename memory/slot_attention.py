"""Temporally initialised Slot Attention (SlotMemory §3.3, eq. 2).

Slot Attention (Locatello et al. 2020): slots compete for tokens through a softmax over the *slot*
axis, are refined by a GRU-style update and an MLP residual for a few iterations, and return the
soft assignment A (B, S, L) that sums to 1 over slots for every token. Temporal initialisation
(Manasyan et al. 2025, SlotContrast): the first chunk starts from learned slot embeddings, every later
chunk from the previous chunk's slots passed through a small dynamics predictor (one pre-norm
transformer layer over the slots, without positional encoding, so it is permutation-equivariant).

The three modules together form the *slot grouper* that ``freeze_slot_grouper`` freezes (Appendix A.1);
the per-layer adapters phi_l and the text projection live elsewhere and stay trainable.

Shapes: B batch (layers x batch when the caller stacks layers), L tokens, S slots, d slot_dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Locatello et al. 2020: MLP hidden = 2 x slot size (128 for 64-d slots), epsilon of the weighted mean.
MLP_RATIO = 2
ATTN_EPS = 1e-8
# SlotContrast predictor: one transformer layer with 4 heads and a 4x feed-forward.
DYNAMICS_HEADS = 4
DYNAMICS_FFN_RATIO = 4


class SlotAttention(nn.Module):
    """Iterative competitive attention from slots (queries) to tokens (keys/values)."""

    def __init__(self, slot_dim: int, num_iters: int):
        super().__init__()
        self.slot_dim = slot_dim
        self.num_iters = num_iters
        self.norm_inputs = nn.LayerNorm(slot_dim)
        self.norm_slots = nn.LayerNorm(slot_dim)
        self.norm_mlp = nn.LayerNorm(slot_dim)
        self.to_q = nn.Linear(slot_dim, slot_dim, bias=False)
        self.to_k = nn.Linear(slot_dim, slot_dim, bias=False)
        self.to_v = nn.Linear(slot_dim, slot_dim, bias=False)
        self.gru = nn.GRUCell(slot_dim, slot_dim)
        self.mlp = nn.Sequential(
            nn.Linear(slot_dim, MLP_RATIO * slot_dim), nn.ReLU(), nn.Linear(MLP_RATIO * slot_dim, slot_dim)
        )
        self.init_weights()

    def init_weights(self):
        # Xavier projections as in Locatello et al.; the GRU keeps PyTorch's uniform init.
        for lin in (self.to_q, self.to_k, self.to_v, self.mlp[0], self.mlp[2]):
            nn.init.xavier_uniform_(lin.weight)
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)
        self.gru.reset_parameters()

    def forward(self, inputs: torch.Tensor, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """inputs (B, L, d) adapted tokens, slots (B, S, d) initial slots -> (slots (B, S, d), A (B, S, L)).

        A is the softmax over slots of the last iteration, so A.sum(1) == 1 for every token.
        """
        B, S, d = slots.shape
        inputs = self.norm_inputs(inputs)
        k = self.to_k(inputs)  # (B, L, d)
        v = self.to_v(inputs)  # (B, L, d)
        scale = d ** -0.5
        attn = None
        for _ in range(self.num_iters):
            prev = slots
            q = self.to_q(self.norm_slots(slots)) * scale  # (B, S, d)
            logits = torch.einsum("bsd,bld->bsl", q, k)  # (B, S, L)
            attn = logits.softmax(dim=1)  # competition: slots share each token
            # Weighted mean over the tokens each slot won (epsilon keeps empty slots finite).
            weights = attn + ATTN_EPS
            weights = weights / weights.sum(dim=-1, keepdim=True)  # (B, S, L)
            updates = torch.einsum("bsl,bld->bsd", weights, v)  # (B, S, d)
            slots = self.gru(updates.reshape(B * S, d), prev.reshape(B * S, d)).reshape(B, S, d)
            slots = slots + self.mlp(self.norm_mlp(slots))
        return slots, attn


class SlotInitializer(nn.Module):
    """Learned slot embeddings for the first chunk after a reset."""

    def __init__(self, num_slots: int, slot_dim: int):
        super().__init__()
        self.slots = nn.Parameter(torch.empty(num_slots, slot_dim))
        self.init_weights()

    def init_weights(self):
        # Distinct random embeddings break the symmetry between slots (identical slots stay identical).
        nn.init.normal_(self.slots, std=self.slots.shape[-1] ** -0.5)

    def forward(self, batch_size: int) -> torch.Tensor:
        return self.slots.unsqueeze(0).expand(batch_size, -1, -1)  # (B, S, d)


class SlotDynamics(nn.Module):
    """Predicts the next chunk's initial slots from the previous chunk's slots (pre-norm transformer layer).

    The self-attention is written with plain Linear layers rather than ``nn.MultiheadAttention``, which reads its
    weights functionally: under DeepSpeed ZeRO-3 that forces it to be a "leaf" module, whose gradients are then
    reduced once per call, i.e. once per chunk of a window, which ZeRO-3 refuses.
    """

    def __init__(self, slot_dim: int):
        super().__init__()
        self.num_heads = next(h for h in (DYNAMICS_HEADS, 2, 1) if slot_dim % h == 0)
        self.norm_attn = nn.LayerNorm(slot_dim)
        self.qkv = nn.Linear(slot_dim, 3 * slot_dim)
        self.out = nn.Linear(slot_dim, slot_dim)
        self.norm_ffn = nn.LayerNorm(slot_dim)
        self.ffn = nn.Sequential(
            nn.Linear(slot_dim, DYNAMICS_FFN_RATIO * slot_dim), nn.GELU(),
            nn.Linear(DYNAMICS_FFN_RATIO * slot_dim, slot_dim),
        )
        self.init_weights()

    def init_weights(self):
        nn.init.xavier_uniform_(self.qkv.weight)
        nn.init.zeros_(self.qkv.bias)
        # Zeroed output projections: an untrained predictor is the identity, so slot identities carry
        # over from chunk to chunk from the first step of training.
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        nn.init.xavier_uniform_(self.ffn[0].weight)
        nn.init.zeros_(self.ffn[0].bias)
        nn.init.zeros_(self.ffn[2].weight)
        nn.init.zeros_(self.ffn[2].bias)

    def forward(self, slots: torch.Tensor) -> torch.Tensor:
        B, S, d = slots.shape
        q, k, v = self.qkv(self.norm_attn(slots)).view(B, S, 3, self.num_heads, d // self.num_heads).unbind(2)
        attn = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))  # (B, h, S, d/h)
        slots = slots + self.out(attn.transpose(1, 2).reshape(B, S, d))  # (B, S, d)
        return slots + self.ffn(self.norm_ffn(slots))


class TemporalSlotGrouper(nn.Module):
    """Eq. 2: (U^c, A^c) = SlotAttn(X~^c; U^{c-1}) with learned init when there is no U^{c-1}."""

    def __init__(self, *, num_slots: int, slot_dim: int, num_iters: int):
        super().__init__()
        self.initializer = SlotInitializer(num_slots, slot_dim)
        self.dynamics = SlotDynamics(slot_dim)
        self.slot_attention = SlotAttention(slot_dim, num_iters)

    def initial_slots(self, batch_size: int, prev_slots: torch.Tensor | None) -> torch.Tensor:
        if prev_slots is None:
            return self.initializer(batch_size)
        return self.dynamics(prev_slots)

    def forward(self, inputs: torch.Tensor, prev_slots: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """inputs (B, L, d), prev_slots (B, S, d) or None -> (slots (B, S, d), A (B, S, L))."""
        init = self.initial_slots(inputs.shape[0], prev_slots)
        return self.slot_attention(inputs, init.to(inputs.dtype))


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every row of a (..., N, d) with every row of b (..., M, d) -> (..., N, M)."""
    return F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).transpose(-1, -2)
