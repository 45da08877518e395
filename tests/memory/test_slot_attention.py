"""Slot Attention: competitive assignments, the update rule, permutation equivariance, temporal init."""

import torch

from memory.slot_attention import ATTN_EPS, SlotAttention, SlotDynamics, TemporalSlotGrouper


def test_assignments_are_a_softmax_over_slots():
    torch.manual_seed(0)
    sa = SlotAttention(slot_dim=8, num_iters=3)
    slots, attn = sa(torch.randn(2, 20, 8), torch.randn(2, 5, 8))
    assert slots.shape == (2, 5, 8) and attn.shape == (2, 5, 20)
    assert (attn >= 0).all()
    torch.testing.assert_close(attn.sum(dim=1), torch.ones(2, 20))


def test_one_iteration_matches_a_hand_written_reference():
    """Locatello et al.: softmax over slots, weighted mean of values, GRU update, MLP residual."""
    torch.manual_seed(1)
    d, S, L = 6, 3, 10
    sa = SlotAttention(slot_dim=d, num_iters=1)
    inputs, init = torch.randn(1, L, d), torch.randn(1, S, d)
    slots, attn = sa(inputs, init)

    x = torch.nn.functional.layer_norm(inputs[0], (d,), sa.norm_inputs.weight, sa.norm_inputs.bias)
    k, v = x @ sa.to_k.weight.T, x @ sa.to_v.weight.T
    q = torch.nn.functional.layer_norm(init[0], (d,), sa.norm_slots.weight, sa.norm_slots.bias) @ sa.to_q.weight.T
    logits = q @ k.T / d ** 0.5  # (S, L)
    ref_attn = torch.empty(S, L)
    for t in range(L):  # every token's weights are a softmax over the slots
        e = torch.exp(logits[:, t] - logits[:, t].max())
        ref_attn[:, t] = e / e.sum()
    torch.testing.assert_close(attn[0], ref_attn)

    w_ir, w_iz, w_in = sa.gru.weight_ih.chunk(3)
    w_hr, w_hz, w_hn = sa.gru.weight_hh.chunk(3)
    b_ir, b_iz, b_in = sa.gru.bias_ih.chunk(3)
    b_hr, b_hz, b_hn = sa.gru.bias_hh.chunk(3)
    for s in range(S):
        w = ref_attn[s] + ATTN_EPS
        upd = (w[:, None] * v).sum(0) / w.sum()
        h = init[0, s]
        r = torch.sigmoid(w_ir @ upd + b_ir + w_hr @ h + b_hr)
        z = torch.sigmoid(w_iz @ upd + b_iz + w_hz @ h + b_hz)
        n = torch.tanh(w_in @ upd + b_in + r * (w_hn @ h + b_hn))
        h = (1 - z) * n + z * h
        h = h + sa.mlp(sa.norm_mlp(h))
        torch.testing.assert_close(slots[0, s], h)


def test_permuting_initial_slots_permutes_outputs():
    torch.manual_seed(2)
    sa = SlotAttention(slot_dim=8, num_iters=3)
    inputs, init = torch.randn(2, 16, 8), torch.randn(2, 5, 8)
    perm = torch.tensor([3, 0, 4, 1, 2])
    slots, attn = sa(inputs, init)
    slots_p, attn_p = sa(inputs, init[:, perm])
    torch.testing.assert_close(slots_p, slots[:, perm])
    torch.testing.assert_close(attn_p, attn[:, perm])


def test_dynamics_predictor_is_permutation_equivariant_and_starts_as_identity():
    torch.manual_seed(3)
    dyn = SlotDynamics(8)
    prev = torch.randn(2, 5, 8)
    torch.testing.assert_close(dyn(prev), prev)  # zero-initialised output projections
    for p in dyn.parameters():  # a trained predictor is no longer the identity but stays equivariant
        p.data.normal_(0, 0.3)
    perm = torch.tensor([4, 2, 0, 1, 3])
    out = dyn(prev)
    assert not torch.allclose(out, prev)
    torch.testing.assert_close(dyn(prev[:, perm]), out[:, perm])


def test_grouper_uses_learned_init_first_then_the_previous_slots():
    torch.manual_seed(4)
    g = TemporalSlotGrouper(num_slots=4, slot_dim=8, num_iters=2)
    torch.testing.assert_close(g.initial_slots(3, None), g.initializer.slots.expand(3, -1, -1))
    prev = torch.randn(3, 4, 8)
    torch.testing.assert_close(g.initial_slots(3, prev), g.dynamics(prev))
    inputs = torch.randn(3, 12, 8)
    slots, attn = g(inputs, prev)
    ref_slots, ref_attn = g.slot_attention(inputs, g.dynamics(prev))
    torch.testing.assert_close(slots, ref_slots)
    torch.testing.assert_close(attn, ref_attn)
