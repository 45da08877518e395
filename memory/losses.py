"""Slot regularisation (SlotMemory §3.5, eqs. 7-10) and the Stage 0 slot warm-up objective.

L_slot = L_con + 1[stage 2] * alpha * L_rec                                           (eq. 7)
L_con: InfoNCE between the l2-normalised slots of consecutive chunks, the N = B*S slots of chunk
       c-1 as anchors and those of chunk c as candidates, positives on the diagonal (eq. 8).
L_rec: every token is reconstructed by its hard top-1 slot (straight-through, so the gradient
       reaches the soft assignment), masked to confident tokens max_s A > threshold (eq. 9), scored
       by 1 - cos against the stop-gradient adapted features (eq. 10).

Stage 0 (our slot warm-up, before Stage I freezes the grouper; SlotContrast / DINOSAUR style):
L_0 = L_con + w * L_feat, where a small decoder maps every slot back to the adapted-feature space and each token
is reconstructed by the mixture of its slots' decodings weighted by the slot-attention assignment itself,
x^_t = sum_s A[s, t] dec(u_s), scored by 1 - cos against the stop-gradient, layer-normalised adapted feature. A
token is reconstructed well only when A routes it to slots that decode to it, so the objective sharpens A from
the uniform 1/S of an untrained grouper towards one slot per region; that is what lets eq. 9's confidence mask
(max_s A > 0.5) pass tokens when Stage II switches L_rec on. L_con keeps the slots distinct (its negatives are
the other slots) and stable across chunks.

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


def feature_loss(adapted: torch.Tensor, slots: torch.Tensor, assign: torch.Tensor,
                 decoder: torch.nn.Module) -> torch.Tensor:
    """Stage 0's L_feat (module docstring): adapted X~ (..., B, L, d), slots (..., B, S, d), A (..., B, S, L)."""
    decoded = decoder(slots)  # (..., B, S, d)
    recon = torch.einsum("...sl,...sd->...ld", assign, decoded)  # (..., B, L, d)
    target = F.layer_norm(adapted.detach(), adapted.shape[-1:])  # scale-free, so phi cannot shrink it away
    return (1.0 - F.cosine_similarity(recon, target, dim=-1)).mean()


@torch.no_grad()
def slot_health(slots: torch.Tensor, assign: torch.Tensor, confidence: float) -> dict[str, float]:
    """Collapse diagnostics of one grouping: slots (..., S, d), assign (..., S, L).

    cosine         mean off-diagonal cosine between the slots of a chunk (1 = collapsed, all slots alike);
    mask_coverage  share of tokens whose largest assignment passes eq. 9's confidence mask;
    norm           mean slot norm (grows without bound when slots drift through the dynamics predictor).
    """
    S = slots.shape[-2]
    cos = F.normalize(slots.float(), dim=-1) @ F.normalize(slots.float(), dim=-1).transpose(-1, -2)  # (..., S, S)
    off = (cos.sum((-1, -2)) - cos.diagonal(dim1=-2, dim2=-1).sum(-1)) / max(S * (S - 1), 1)
    return {"cosine": float(off.mean()), "mask_coverage": float((assign.amax(dim=-2) > confidence).float().mean()),
            "norm": float(slots.float().norm(dim=-1).mean())}


@dataclass
class SlotLoss:
    """The slot objective of one window for the backward pass, with its parts and health for logging."""

    total: torch.Tensor
    parts: dict[str, float]  # slot_con, slot_rec, slot_feat (those computed)
    health: dict[str, float]  # cosine, mask_coverage, norm (means over the window's groupings)


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

    def compute(self, stage: int, *, decoder: torch.nn.Module | None = None, feature_weight: float = 1.0) -> SlotLoss:
        """The objective of `stage` over the collected passes (L_con over those with a predecessor); clears them.

        stage 0: L_con + feature_weight * L_feat (needs the decoder); 1: L_con (eq. 7); 2: L_con + alpha L_rec.
        L_rec is reported in every stage (eq. 10 is cheap), so its bootstrap is visible before Stage II uses it.
        """
        terms, self.terms = self.terms, []
        if not terms:
            return SlotLoss(torch.zeros(()), {}, {})
        zero = terms[0].grouping.slots.new_zeros(())
        con = [contrastive_loss(t.prev_slots, t.grouping.slots, self.temperature)
               for t in terms if t.prev_slots is not None]
        con_loss = torch.stack(con).mean() if con else zero
        with torch.set_grad_enabled(torch.is_grad_enabled() and stage == 2):  # elsewhere only reported
            rec_loss = torch.stack([reconstruction_loss(t.grouping.adapted, t.grouping.slots, t.grouping.assign,
                                                        confidence=self.rec_confidence) for t in terms]).mean()
        loss, parts = con_loss, {"slot_con": float(con_loss.detach()), "slot_rec": float(rec_loss.detach())}
        if stage == 0:
            if decoder is None:
                raise ValueError("the Stage 0 objective needs the feature decoder")
            feat = torch.stack([feature_loss(t.grouping.adapted, t.grouping.slots, t.grouping.assign, decoder)
                                for t in terms]).mean()
            loss = loss + feature_weight * feat
            parts["slot_feat"] = float(feat.detach())
        elif stage == 2:
            loss = loss + self.rec_weight * rec_loss
        health = [slot_health(t.grouping.slots, t.grouping.assign, self.rec_confidence) for t in terms]
        return SlotLoss(loss, parts, {k: sum(h[k] for h in health) / len(health) for k in health[0]})
