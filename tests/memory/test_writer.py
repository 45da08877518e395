"""Slot-conditioned writing: per-layer adapters, TopR selection, bit-identical K/V copies (eqs. 2-3)."""

import pytest
import torch

from memory.writer import SlotWriter, gather_tokens, make_items, top_tokens


def test_top_tokens_are_the_highest_assignment_weights():
    torch.manual_seed(0)
    assign = torch.randn(2, 3, 4, 30).softmax(dim=2)  # (Y, B, S, L)
    R = 5
    index = top_tokens(assign, R)
    assert index.shape == (2, 3, 4, R)
    for y in range(2):
        for b in range(3):
            for s in range(4):
                weights = assign[y, b, s].tolist()
                expected = sorted(range(30), key=lambda t: -weights[t])[:R]
                assert index[y, b, s].tolist() == expected


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_items_copy_the_selected_keys_and_values_exactly(make_states, dtype):
    g = torch.Generator().manual_seed(1)
    Y, B, L, dim, H, D, R = 2, 2, 24, 16, 2, 4, 3
    writer = SlotWriter(num_layers=Y, dim=dim, slot_dim=8, num_slots=4, num_iters=2)
    states = make_states(num_layers=Y, batch=B, tokens=L, dim=dim, heads=H, head_dim=D, generator=g, dtype=dtype)
    for s in states:  # cached K/V carrying gradient must still be stored detached
        s.k.requires_grad_(True)
    grouping = writer([s.x for s in states], None)
    items = make_items(grouping, [s.k for s in states], [s.v for s in states], R)
    assert items.k.shape == (Y, B, 4, R, H, D) and items.k.dtype == dtype and not items.k.requires_grad
    torch.testing.assert_close(items.u, grouping.slots.detach())
    for y in range(Y):
        for b in range(B):
            for s in range(4):
                for r in range(R):
                    t = int(items.token_index[y, b, s, r])
                    assert torch.equal(items.k[y, b, s, r], states[y].k[b, t].detach())
                    assert torch.equal(items.v[y, b, s, r], states[y].v[b, t])


def test_gather_tokens_is_a_pure_copy():
    k = torch.randn(2, 10, 3, 4).to(torch.bfloat16)
    index = torch.tensor([[[9, 0]], [[4, 4]]])  # (B=2, S=1, R=2)
    out = gather_tokens(k, index)
    assert torch.equal(out[0, 0, 0], k[0, 9]) and torch.equal(out[1, 0, 1], k[1, 4])


def test_each_layer_has_its_own_adapter_and_slots_come_from_the_shared_grouper():
    torch.manual_seed(2)
    Y, B, L, dim = 3, 2, 12, 16
    writer = SlotWriter(num_layers=Y, dim=dim, slot_dim=8, num_slots=4, num_iters=2)
    features = [torch.randn(B, L, dim) for _ in range(Y)]
    grouping = writer(features, None)
    for y in range(Y):
        torch.testing.assert_close(grouping.adapted[y], writer.adapters[y](features[y]))
        slots, assign = writer.grouper(grouping.adapted[y], None)
        torch.testing.assert_close(grouping.slots[y], slots)
        torch.testing.assert_close(grouping.assign[y], assign)
    # The next chunk starts from these slots through the dynamics predictor.
    nxt = writer(features, grouping.slots)
    ref_slots, _ = writer.grouper(grouping.adapted[1], grouping.slots[1])
    torch.testing.assert_close(nxt.slots[1], ref_slots)
