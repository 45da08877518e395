"""L_con (eq. 8) and L_rec (eqs. 9-10) against loop references, gradients included."""

import math

import pytest
import torch

from memory.losses import REC_EPS, SlotLossAccumulator, contrastive_loss, reconstruction_loss
from memory.writer import SlotGrouping


def reference_contrastive(prev: torch.Tensor, cur: torch.Tensor, tau: float) -> torch.Tensor:
    """Eq. 8 written out: anchors u_i^{c-1}, candidates u_j^c over all N = B*S slots."""
    B, S, _ = prev.shape
    a = [prev[b, s] / prev[b, s].norm() for b in range(B) for s in range(S)]
    c = [cur[b, s] / cur[b, s].norm() for b in range(B) for s in range(S)]
    N = len(a)
    total = 0.0
    for i in range(N):
        denom = sum(torch.exp(torch.dot(a[i], c[j]) / tau) for j in range(N))
        total = total + torch.log(torch.exp(torch.dot(a[i], c[i]) / tau) / denom)
    return -total / N


def test_contrastive_loss_matches_eq8_with_gradients():
    torch.manual_seed(0)
    prev = torch.randn(2, 3, 5, requires_grad=True)
    cur = torch.randn(2, 3, 5, requires_grad=True)
    loss = contrastive_loss(prev, cur, 0.1)
    ref = reference_contrastive(prev, cur, 0.1)
    torch.testing.assert_close(loss, ref)
    g = torch.autograd.grad(loss, (prev, cur))
    g_ref = torch.autograd.grad(ref, (prev, cur))
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b)


def test_contrastive_loss_averages_over_leading_layer_dimension():
    torch.manual_seed(1)
    prev, cur = torch.randn(3, 2, 4, 6), torch.randn(3, 2, 4, 6)
    per_layer = [reference_contrastive(prev[y], cur[y], 0.5) for y in range(3)]
    torch.testing.assert_close(contrastive_loss(prev, cur, 0.5), torch.stack(per_layer).mean())


def test_contrastive_loss_is_low_when_slots_keep_their_identity():
    torch.manual_seed(2)
    u = torch.randn(2, 4, 8)
    same = contrastive_loss(u, u + 0.01 * torch.randn_like(u), 0.1)
    shuffled = contrastive_loss(u, u[:, torch.tensor([1, 2, 3, 0])], 0.1)
    assert same < 0.05 < math.log(8) < shuffled


def test_reconstruction_loss_matches_eqs_9_10_with_straight_through_gradients():
    torch.manual_seed(3)
    B, S, L, d, conf = 2, 3, 7, 4, 0.5
    logits = (2.0 * torch.randn(B, S, L)).requires_grad_(True)
    slots = torch.randn(B, S, d, requires_grad=True)
    adapted = torch.randn(B, L, d, requires_grad=True)
    assign = logits.softmax(dim=1)
    loss = reconstruction_loss(adapted, slots, assign, confidence=conf)
    g_logits, g_slots, g_adapted = torch.autograd.grad(loss, (logits, slots, adapted), allow_unused=True,
                                                       retain_graph=True)
    assert g_adapted is None  # sg(x~): no gradient to the adapted features

    # Value: every confident token is reconstructed by its argmax slot.
    A = assign.detach()
    x_hat = torch.zeros(B, L, d)
    top = torch.zeros(B, L, dtype=torch.long)
    v = torch.zeros(B, L)
    for b in range(B):
        for t in range(L):
            top[b, t] = int(A[b, :, t].argmax())
            v[b, t] = float(A[b, :, t].max() > conf)
            x_hat[b, t] = slots.detach()[b, top[b, t]]
    assert 0 < v.sum() < B * L  # the mask matters in this case
    x_hat.requires_grad_(True)
    num = sum(v[b, t] * (1 - torch.dot(x_hat[b, t], adapted[b, t].detach())
                         / (x_hat[b, t].norm() * adapted[b, t].detach().norm())) for b in range(B) for t in range(L))
    ref = num / (v.sum() + REC_EPS)
    torch.testing.assert_close(loss, ref)

    # Gradients: straight-through makes d x^_t / d A_{s,t} = u_s and d x^_t / d u_s = 1[s = argmax].
    (g_xhat,) = torch.autograd.grad(ref, x_hat)
    g_assign = torch.zeros(B, S, L)
    g_slots_ref = torch.zeros(B, S, d)
    for b in range(B):
        for t in range(L):
            for s in range(S):
                g_assign[b, s, t] = torch.dot(g_xhat[b, t], slots.detach()[b, s])
            g_slots_ref[b, top[b, t]] += g_xhat[b, t]
    (g_logits_ref,) = torch.autograd.grad(assign, logits, grad_outputs=g_assign)
    torch.testing.assert_close(g_slots, g_slots_ref)
    torch.testing.assert_close(g_logits, g_logits_ref)


def test_reconstruction_loss_is_finite_when_no_token_is_confident():
    assign = torch.full((1, 4, 5), 0.25)  # max_s A = 0.25 < 0.5 everywhere
    loss = reconstruction_loss(torch.randn(1, 5, 3), torch.randn(1, 4, 3), assign, confidence=0.5)
    assert loss.item() == 0.0


def _grouping(seed: int) -> SlotGrouping:
    g = torch.Generator().manual_seed(seed)
    return SlotGrouping(adapted=torch.randn(2, 1, 6, 4, generator=g), slots=torch.randn(2, 1, 3, 4, generator=g),
                        assign=torch.randn(2, 1, 3, 6, generator=g).softmax(dim=2))


@pytest.mark.parametrize("stage", [1, 2])
def test_accumulator_combines_terms_per_eq7(stage):
    acc = SlotLossAccumulator(temperature=0.2, rec_weight=0.5, rec_confidence=0.4)
    first, second, third = _grouping(0), _grouping(1), _grouping(2)
    acc.add(None, first)
    acc.add(first.slots, second)
    acc.add(second.slots, third)
    con = (contrastive_loss(first.slots, second.slots, 0.2) + contrastive_loss(second.slots, third.slots, 0.2)) / 2
    rec = sum(reconstruction_loss(t.adapted, t.slots, t.assign, confidence=0.4) for t in (first, second, third)) / 3
    expected = con + (0.5 * rec if stage == 2 else 0.0)
    torch.testing.assert_close(acc.compute(stage).total, expected)
    assert len(acc) == 0 and acc.compute(stage).total.item() == 0.0
