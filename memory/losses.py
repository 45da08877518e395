"""Slot regularisation (SlotMemory §3.5, eqs. 7-10).

L_slot = L_con + 1[stage 2] * alpha * L_rec                                           (eq. 7)
L_con: InfoNCE between the l2-normalised slots of consecutive chunks, the N = B*S slots of chunk
       c-1 as anchors and those of chunk c as candidates, positives on the diagonal (eq. 8).
L_rec: every token is reconstructed by its hard top-1 slot (straight-through, so the gradient
       reaches the soft assignment), masked to confident tokens max_s A > threshold (eq. 9), scored
       by 1 - cos against the stop-gradient adapted features (eq. 10).

Every function accepts optional leading dimensions (the layers): the loss is computed per leading
index exactly as the paper writes it and then averaged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from memory.writer import SlotGrouping

# epsilon of eq. 10; the paper does not give its value.
REC_EPS = 1e-6


def contrastive_loss(prev_slots: torch.Tensor, slots: torch.Tensor, temperature: float) -> torch.Tensor:
    """Eq. 8. prev_slots U^{c-1}, slots U^c: (..., B, S, d) -> scalar."""
    prev = F.normalize(prev_slots, dim=-1).flatten(-3, -2)  # (..., N, d), N = B*S
    cur = F.normalize(slots, dim=-1).flatten(-3, -2)  # (..., N, d)
    logits = prev @ cur.transpose(-1, -2) / temperature  # (..., N, N): sim(u_i^{c-1}, u_j^c) / tau
    N = logits.shape[-1]
    target = torch.arange(N, device=logits.device).expand(logits.shape[:-1])  # (..., N)
    return F.cross_entropy(logits.reshape(-1, N), target.reshape(-1))


def reconstruction_loss(adapted: torch.Tensor, slots: torch.Tensor, assign: torch.Tensor, *,
                        confidence: float, eps: float = REC_EPS) -> torch.Tensor:
    """Eqs. 9-10. adapted X~ (..., B, L, d), slots U (..., B, S, d), assign A (..., B, S, L) -> scalar."""
    S = assign.shape[-2]
    hard = F.one_hot(assign.argmax(dim=-2), S).transpose(-1, -2).to(assign.dtype)  # (..., B, S, L)
    st = hard + (assign - assign.detach())  # forward: hard one-hot exactly; backward: d/dA
    recon = torch.einsum("...sl,...sd->...ld", st, slots)  # x^ (..., B, L, d)
    mask = (assign.detach().amax(dim=-2) > confidence).to(adapted.dtype)  # v (..., B, L), eq. 9
    err = 1.0 - F.cosine_similarity(recon, adapted.detach(), dim=-1)  # (..., B, L)
    per_group = (mask * err).sum(dim=(-2, -1)) / (mask.sum(dim=(-2, -1)) + eps)  # (...,)
    return per_group.mean()


@dataclass
class _Term:
    prev_slots: torch.Tensor | None  # (Y, B, S, d) U^{c-1}, None for the first chunk after a reset
    grouping: SlotGrouping


class SlotLossAccumulator:
    """Collects the slot-attention passes run with autograd and turns them into L_slot on demand."""

    def __init__(self, *, temperature: float, rec_weight: float, rec_confidence: float):
        self.temperature = temperature
        self.rec_weight = rec_weight
        self.rec_confidence = rec_confidence
        self.terms: list[_Term] = []

    def __len__(self) -> int:
        return len(self.terms)

    def add(self, prev_slots: torch.Tensor | None, grouping: SlotGrouping) -> None:
        self.terms.append(_Term(prev_slots, grouping))

    def clear(self) -> None:
        self.terms = []

    def compute(self, stage: int) -> torch.Tensor:
        """Eq. 7 averaged over the collected passes (L_con over those with a predecessor); clears them."""
        terms, self.terms = self.terms, []
        if not terms:
            return torch.zeros(())
        con = [contrastive_loss(t.prev_slots, t.grouping.slots, self.temperature)
               for t in terms if t.prev_slots is not None]
        loss = torch.stack(con).mean() if con else terms[0].grouping.slots.new_zeros(())
        if stage == 2:
            rec = [reconstruction_loss(t.grouping.adapted, t.grouping.slots, t.grouping.assign,
                                       confidence=self.rec_confidence) for t in terms]
            loss = loss + self.rec_weight * torch.stack(rec).mean()
        return loss
