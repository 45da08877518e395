"""Slot bank: fused relevance (eq. 4), budgeted eviction and top-k retrieval, checked by hand."""

import random

import torch
import torch.nn.functional as F

from memory.bank import SlotBank, SlotQuery
from memory.writer import SlotItems

R, H, D = 2, 1, 3


def items_with_ids(u: torch.Tensor, ids: torch.Tensor) -> tuple[SlotItems, dict]:
    """Items whose K is filled with their id (so content can be traced) and V with -id."""
    Y, B, S = ids.shape
    k = ids[..., None, None, None].float().expand(Y, B, S, R, H, D).clone()
    items = SlotItems(k=k, v=-k, u=u, token_index=torch.zeros(Y, B, S, R, dtype=torch.long))
    meta = {"item_id": ids, "chunk": ids.clone(), "frame_start": ids.clone(), "frame_end": ids + 1,
            "prompt": torch.zeros_like(ids), "slot": torch.zeros_like(ids)}
    return items, meta


def reference_score(u: torch.Tensor, text: torch.Tensor, recent: torch.Tensor, gamma: float) -> float:
    r_text = F.cosine_similarity(u, text, dim=0)
    r_vis = max(F.cosine_similarity(u, s, dim=0) for s in recent)
    return float(gamma * r_text + (1 - gamma) * r_vis)


def e(i: int, d: int = 3) -> torch.Tensor:
    return torch.eye(d)[i]


def test_eviction_removes_exactly_the_lowest_scores():
    bank = SlotBank(capacity=4)
    query = SlotQuery(text=e(0).view(1, 1, 3), recent_slots=e(1).view(1, 1, 1, 3), text_weight=0.7)
    old_u = torch.stack([e(0), e(1), e(2), -e(0)]).view(1, 1, 4, 3)  # scores 0.7, 0.3, 0.0, -0.7
    bank.add(*items_with_ids(old_u[:, :, :2], torch.tensor([[[0, 1]]])), query)
    bank.add(*items_with_ids(old_u[:, :, 2:], torch.tensor([[[2, 3]]])), query)
    assert bank.size == 4
    new_u = torch.stack([(e(0) + e(1)) / 2 ** 0.5, -e(1)]).view(1, 1, 2, 3)  # scores 0.707, -0.3
    eviction = bank.add(*items_with_ids(new_u, torch.tensor([[[4, 5]]])), query)
    assert bank.size == 4
    assert sorted(bank.items("item_id")[0, 0].tolist()) == [0, 1, 2, 4]
    assert sorted(i for i in eviction.evicted_id[0, 0].tolist() if i >= 0) == [3, 5]
    assert eviction.added[0, 0].tolist() == [True, False]
    # The new item took the evicted item's position; the others did not move, and K/V moved with the ids.
    assert bank.items("item_id")[0, 0].tolist() == [0, 1, 2, 4]
    for pos, item in enumerate(bank.items("item_id")[0, 0].tolist()):
        assert torch.equal(bank.items("k")[0, 0, pos], torch.full((R, H, D), float(item)))
        assert torch.equal(bank.items("v")[0, 0, pos], torch.full((R, H, D), -float(item)))


def test_budget_holds_and_the_best_items_survive_over_100_writes():
    rng = random.Random(0)
    torch.manual_seed(0)
    Y, B, S, d, cap, gamma = 2, 3, 4, 5, 12, 0.7
    bank = SlotBank(capacity=cap)
    kept: dict[tuple[int, int], dict[int, torch.Tensor]] = {(y, b): {} for y in range(Y) for b in range(B)}
    for w in range(100):
        u = torch.randn(Y, B, S, d)
        ids = (torch.arange(S) + w * S).expand(Y, B, S).clone()
        query = SlotQuery(text=torch.randn(Y, B, d), recent_slots=torch.randn(Y, B, rng.randint(1, 3), d),
                          text_weight=gamma)
        bank.add(*items_with_ids(u, ids), query)
        assert bank.size <= cap
        for y in range(Y):
            for b in range(B):
                pool = dict(kept[(y, b)])
                pool.update({int(ids[y, b, s]): u[y, b, s] for s in range(S)})
                scores = {i: reference_score(v, query.text[y, b], query.recent_slots[y, b], gamma)
                          for i, v in pool.items()}
                best = sorted(scores, key=lambda i: -scores[i])[:cap]
                kept[(y, b)] = {i: pool[i] for i in best}
                stored = bank.items("item_id")[y, b].tolist()
                assert sorted(stored) == sorted(best)
                for pos, item in enumerate(stored):
                    assert torch.equal(bank.items("u")[y, b, pos], kept[(y, b)][item])
                    assert torch.equal(bank.items("k")[y, b, pos, 0, 0], torch.full((D,), float(item)))
    assert bank.size == cap


def test_text_weight_lets_a_prompt_switch_flip_retrieval():
    """Item A = e0, item B = e1, the current visual state looks like B."""
    bank = SlotBank(capacity=2)
    recent = e(1).view(1, 1, 1, 3)

    def query(text: torch.Tensor, gamma: float) -> SlotQuery:
        return SlotQuery(text=text.view(1, 1, 3), recent_slots=recent, text_weight=gamma)

    bank.add(*items_with_ids(torch.stack([e(0), e(1)]).view(1, 1, 2, 3), torch.tensor([[[0, 1]]])), query(e(0), 0.7))

    def top1(q: SlotQuery) -> int:
        return int(bank.gather("item_id", bank.retrieve(q, 1).position)[0, 0, 0])

    assert top1(query(e(0), 0.7)) == 0  # prompt names A: 0.7*1 + 0.3*0 = 0.7 > 0.3
    assert top1(query(e(2), 0.7)) == 1  # prompt names neither: 0 < 0.3*1
    assert top1(query(e(0), 0.2)) == 1  # weak text weight: the visual state wins even when A is named
    assert bank.size == 2  # scoring never removes items


def test_retrieve_returns_the_top_k_items_exactly_and_in_order():
    torch.manual_seed(1)
    Y, B, S, d = 2, 2, 3, 4
    bank = SlotBank(capacity=6)
    for w in range(2):
        u = torch.randn(Y, B, S, d)
        ids = (torch.arange(S) + w * S).expand(Y, B, S).clone()
        bank.add(*items_with_ids(u, ids), SlotQuery(torch.randn(Y, B, d), torch.randn(Y, B, 2, d), 0.7))
    query = SlotQuery(torch.randn(Y, B, d), torch.randn(Y, B, 2, d), 0.7)
    out = bank.retrieve(query, 4)
    assert out.keys.shape == (Y, B, 4 * R, H, D)
    scores = bank.scores(query).score
    for y in range(Y):
        for b in range(B):
            order = scores[y, b].argsort(descending=True)[:4].tolist()
            assert out.position[y, b].tolist() == order
            expected = torch.cat([bank.items("k")[y, b, p] for p in order])  # (4*R, H, D)
            assert torch.equal(out.keys[y, b], expected)
            assert torch.equal(out.values[y, b], -expected)
    assert bank.retrieve(query, 100).position.shape[-1] == 6  # never more than what is stored


def test_retrieval_gate_keeps_values_bit_identical_and_passes_gradient_to_the_text():
    torch.manual_seed(2)
    bank = SlotBank(capacity=4)
    u = torch.randn(1, 1, 4, 3)
    items, meta = items_with_ids(u, torch.arange(4).view(1, 1, 4))
    items.v = torch.randn(1, 1, 4, R, H, D).to(torch.bfloat16)
    items.k = items.k.to(torch.bfloat16)
    bank.add(items, meta, SlotQuery(torch.randn(1, 1, 3), torch.randn(1, 1, 1, 3), 0.7))
    text = torch.randn(1, 1, 3, requires_grad=True)
    query = SlotQuery(text, torch.randn(1, 1, 2, 3), 0.7)
    with torch.no_grad():
        plain = bank.retrieve(query, 2).values
    gated = bank.retrieve(query, 2)
    assert gated.values.requires_grad and gated.values.dtype == torch.bfloat16
    assert torch.equal(gated.values.detach(), plain)
    gated.values.float().sum().backward()
    assert text.grad is not None and text.grad.abs().sum() > 0
