"""SlotMemory as the pipeline drives it: record interval, exact K/V reads, budget, prompt switches,
gradients (slot losses, frozen grouper, retrieval gate) and argument checks."""

import pytest
import torch

from memory import FrameBankMemory, NoMemory, SlotMemory, build_memory
from slotmem.config import ConfigError, MemoryConfig
from slotmem.errors import InputError

Y, B, DIM, H, D, TEXT, TPF, FPB = 2, 2, 16, 2, 4, 6, 4, 3
L = TPF * FPB


def slot_memory(**overrides) -> SlotMemory:
    fields = dict(slot_dim=8, num_slots_per_chunk=3, tokens_per_slot=2, bank_size=2, record_interval=3,
                  retrieve_top_k=4)
    fields.update(overrides)
    mem = build_memory(MemoryConfig(**fields), num_layers=Y, dim=DIM, num_heads=H, head_dim=D, text_dim=TEXT,
                       tokens_per_frame=TPF, num_frame_per_block=FPB)
    mem.reset(B)
    return mem


def write_chunk(mem, make_states, c: int, g: torch.Generator, dtype=torch.float32):
    states = make_states(num_layers=Y, batch=B, tokens=L, dim=DIM, heads=H, head_dim=D, generator=g, dtype=dtype)
    mem.write(states, chunk_index=c, start_frame=FPB * c, num_frames=FPB)
    return states


def test_build_memory_picks_the_kind_and_exposes_trainable_parameters():
    kinds = {"slot": SlotMemory, "frame_bank": FrameBankMemory, "none": NoMemory}
    for kind, cls in kinds.items():
        mem = build_memory(MemoryConfig(kind=kind, tokens_per_slot=2), num_layers=Y, dim=DIM, num_heads=H,
                           head_dim=D, text_dim=TEXT, tokens_per_frame=TPF, num_frame_per_block=FPB)
        assert type(mem) is cls and mem.kind == kind
    keys = set(slot_memory().state_dict())
    assert {"writer.adapters.0.1.weight", "writer.adapters.1.1.weight", "text_proj.1.weight",
            "writer.grouper.initializer.slots", "writer.grouper.slot_attention.gru.weight_ih"} <= keys
    assert not any("bank" in k for k in keys)  # runtime state is not checkpointed


def test_items_enter_the_bank_every_record_interval_chunks(make_states):
    mem = slot_memory()
    g = torch.Generator().manual_seed(0)
    mem.set_prompt(torch.randn(B, TEXT, generator=g), 0)
    sizes = []
    for c in range(7):
        write_chunk(mem, make_states, c, g)
        sizes.append(mem.bank.size)
    assert sizes == [3, 3, 3, 6, 6, 6, 6]  # budget 2 blocks x 3 slots; chunks 0, 3, 6 recorded
    assert set(mem.bank.items("chunk").flatten().tolist()) <= {0, 3, 6}


def test_read_returns_bit_identical_copies_of_written_tokens(make_states):
    mem = slot_memory(record_interval=1)
    g = torch.Generator().manual_seed(1)
    mem.set_prompt(torch.randn(B, TEXT, generator=g), 0)
    assert mem.read() is None  # empty bank: the backbone runs exactly as without memory
    written = {c: write_chunk(mem, make_states, c, g, dtype=torch.bfloat16) for c in range(3)}
    for grad in (False, True):  # with grad, values pass through the straight-through gate
        with torch.set_grad_enabled(grad):
            memory_kv = mem.read()
        assert len(memory_kv) == Y
        retrieval = mem.bank.retrieve(mem._query(), 4)
        chunk = mem.bank.gather("chunk", retrieval.position)  # (Y, B, k)
        token = mem.bank.gather("token_index", retrieval.position)  # (Y, B, k, R)
        for y, (k, v) in enumerate(memory_kv):
            assert k.shape == (B, 4 * 2, H, D) and k.dtype == torch.bfloat16
            for b in range(B):
                src_k = torch.cat([written[int(c)][y].k[b, token[y, b, i]] for i, c in enumerate(chunk[y, b])])
                src_v = torch.cat([written[int(c)][y].v[b, token[y, b, i]] for i, c in enumerate(chunk[y, b])])
                assert torch.equal(k[b], src_k) and torch.equal(v[b].detach(), src_v)


def test_budget_is_never_exceeded_over_100_writes(make_states):
    mem = slot_memory(record_interval=1, bank_size=3)
    g = torch.Generator().manual_seed(2)
    mem.set_prompt(torch.randn(B, TEXT, generator=g), 0)
    with torch.no_grad():
        for c in range(100):
            if c % 17 == 0:
                mem.set_prompt(torch.randn(B, TEXT, generator=g), c // 17)
            memory_kv = mem.read()
            if memory_kv is not None:
                assert memory_kv[0][0].shape[1] <= mem.cfg.retrieve_top_k * mem.cfg.tokens_per_slot
            write_chunk(mem, make_states, c, g)
            assert mem.bank.size <= mem.cfg.budget == 9
            ids = mem.bank.items("item_id")
            assert all(len(set(row.tolist())) == mem.bank.size for row in ids.reshape(-1, mem.bank.size))


def test_prompt_switch_rescores_without_losing_items(make_states):
    mem = slot_memory(record_interval=1, bank_size=4, retrieve_top_k=3)
    g = torch.Generator().manual_seed(3)
    mem.set_prompt(torch.randn(B, TEXT, generator=g), 0)
    with torch.no_grad():
        for c in range(4):
            write_chunk(mem, make_states, c, g)
        before = mem.bank.items("item_id").clone()
        orders = set()
        for p in range(1, 6):
            mem.set_prompt(torch.randn(B, TEXT, generator=g), p)
            assert torch.equal(mem.bank.items("item_id"), before)  # nothing evicted by a switch
            mem.read()
            orders.add(tuple(mem.inspect()["retrieved"]))
    assert len(orders) > 1  # different prompts retrieve different items
    prompts = [r for r in mem.inspector.records if r["event"] == "prompt"]
    assert len(prompts) == 5 and all(len(r["items"]) == 12 for r in prompts)


def _train_step(mem, make_states, g, stage):
    mem.reset(B)
    mem.set_prompt(torch.randn(B, TEXT, generator=g), 0)
    loss = 0.0
    weight = torch.randn(4 * 2, H, D, generator=g)
    for c in range(4):
        memory_kv = mem.read()
        if memory_kv is not None:  # stands in for the generator loss: reaches P through the retrieval gate
            loss = loss + sum((v.float() * weight[: v.shape[1]]).sum() for _, v in memory_kv)
        write_chunk(mem, make_states, c, g)
    return loss + mem.slot_loss(stage).total


def test_frozen_grouper_gets_no_gradient_while_adapters_and_projection_do(make_states):
    mem = slot_memory(record_interval=1)
    g = torch.Generator().manual_seed(4)
    mem.freeze_slot_grouper(True)
    _train_step(mem, make_states, g, stage=1).backward()
    assert all(p.grad is None for p in mem.writer.grouper.parameters())
    for module in (mem.writer.adapters, mem.text_proj):
        assert all(p.grad is not None for p in module.parameters())
        assert sum(p.grad.abs().sum() for p in module.parameters()) > 0

    mem.zero_grad(set_to_none=True)
    mem.freeze_slot_grouper(False)
    _train_step(mem, make_states, g, stage=2).backward()
    assert sum(p.grad.abs().sum() for p in mem.writer.grouper.slot_attention.parameters()) > 0
    assert mem.writer.grouper.initializer.slots.grad.abs().sum() > 0


def test_slot_loss_clears_and_cuts_the_graph_between_steps(make_states):
    mem = slot_memory(record_interval=1)
    g = torch.Generator().manual_seed(5)
    mem.set_prompt(torch.randn(B, TEXT, generator=g), 0)
    for c in range(3):
        write_chunk(mem, make_states, c, g)
    stage1 = mem.slot_loss(1).total
    assert stage1.requires_grad and stage1.item() > 0
    stage1.backward()
    assert mem.slot_loss(1).total.item() == 0.0  # nothing written since the last call
    for c in range(3, 5):  # the slot state from before the backward no longer carries a graph
        write_chunk(mem, make_states, c, g)
    mem.slot_loss(2).total.backward()
    with torch.no_grad():  # rollout: nothing kept for losses
        write_chunk(mem, make_states, 5, g)
    assert len(mem.losses) == 0


def test_stage_two_adds_the_weighted_reconstruction_term(make_states):
    losses = {}
    for stage in (1, 2):
        torch.manual_seed(0)
        mem = slot_memory(record_interval=1, rec_weight=0.5)
        g = torch.Generator().manual_seed(6)
        mem.set_prompt(torch.randn(B, TEXT, generator=g), 0)
        for c in range(3):
            write_chunk(mem, make_states, c, g)
        terms = list(mem.losses.terms)
        losses[stage] = mem.slot_loss(stage).total
    from memory.losses import reconstruction_loss
    rec = torch.stack([reconstruction_loss(t.grouping.adapted, t.grouping.slots, t.grouping.assign, confidence=0.5)
                       for t in terms]).mean()
    torch.testing.assert_close(losses[2] - losses[1], 0.5 * rec)


def test_argument_errors_name_what_is_wrong(make_states):
    g = torch.Generator().manual_seed(7)
    cfg = MemoryConfig(slot_dim=8, num_slots_per_chunk=3, tokens_per_slot=2, bank_size=2, retrieve_top_k=4)
    fresh = build_memory(cfg, num_layers=Y, dim=DIM, num_heads=H, head_dim=D, text_dim=TEXT, tokens_per_frame=TPF,
                         num_frame_per_block=FPB)
    with pytest.raises(InputError, match="reset"):
        fresh.read()
    mem = slot_memory()
    with pytest.raises(InputError, match="set_prompt"):
        write_chunk(mem, make_states, 0, g)
    with pytest.raises(InputError, match="pooled_text"):
        mem.set_prompt(torch.randn(B, TEXT + 1), 0)
    with pytest.raises(InputError, match="prompt_index"):
        mem.set_prompt(torch.randn(B, TEXT), -1)
    mem.set_prompt(torch.randn(B, TEXT), 0)
    write_chunk(mem, make_states, 0, g)
    with pytest.raises(InputError, match="chunk_index must increase"):
        write_chunk(mem, make_states, 0, g)
    states = make_states(num_layers=Y, batch=B, tokens=L, dim=DIM, heads=H, head_dim=D, generator=g)
    with pytest.raises(InputError, match="layers"):
        mem.write(states[:1], chunk_index=1, start_frame=3, num_frames=FPB)
    with pytest.raises(InputError, match=r"states\[0\]\.x"):
        mem.write(states, chunk_index=1, start_frame=3, num_frames=2)
    with pytest.raises(InputError, match="stage"):
        mem.slot_loss(3)
    with pytest.raises(InputError, match="batch_size"):
        mem.reset(0)
    with pytest.raises(ConfigError, match="tokens_per_slot"):
        build_memory(MemoryConfig(tokens_per_slot=64), num_layers=Y, dim=DIM, num_heads=H, head_dim=D,
                     text_dim=TEXT, tokens_per_frame=TPF, num_frame_per_block=FPB)


@pytest.mark.parametrize("kind", ["slot", "frame_bank"])
def test_state_built_under_inference_mode_is_usable_with_autograd(make_states, kind):
    """A prefill under torch.inference_mode followed by a training window on the same memory."""
    mem = slot_memory(kind=kind, record_interval=1)
    g = torch.Generator().manual_seed(8)
    with torch.inference_mode():
        mem.set_prompt(torch.randn(B, TEXT, generator=g), 0, [torch.randn(B, 3, H, D, generator=g) for _ in range(Y)])
        for c in range(3):
            mem.read()
            write_chunk(mem, make_states, c, g)
    for c in range(3, 5):
        memory_kv = mem.read()
        write_chunk(mem, make_states, c, g)
    assert memory_kv is not None
    if kind == "slot":
        (mem.slot_loss(2).total + sum(v.float().sum() for _, v in memory_kv)).backward()
        assert mem.text_proj[0].weight.grad is not None


# -- bank bookkeeping: what a write is scored against, what a read skips -------------------------------------


def test_new_items_are_scored_against_the_previous_chunks_slots_and_can_lose(make_states):
    """A write's eviction query is U^{c-1}: scored against their own slots every new item would have r_vis = 1 and
    always be admitted. With text relevance off (gamma 0), new items of a chunk unlike the previous one lose to
    old items of a chunk like it."""
    mem = slot_memory(record_interval=1, text_weight=0.0, bank_size=1, retrieve_top_k=3)
    g = torch.Generator().manual_seed(11)
    mem.set_prompt(torch.randn(B, TEXT, generator=g), 0)
    queries, evictions = [], []
    add = mem.bank.add

    def spy(items, meta, query):
        queries.append(query.recent_slots.clone())
        evictions.append(add(items, meta, query))
        return evictions[-1]

    mem.bank.add = spy
    base = make_states(num_layers=Y, batch=B, tokens=L, dim=DIM, heads=H, head_dim=D, generator=g)
    for c in range(6):
        # chunks alternate between one scene and its negative: a new item resembles the previous chunk's slots
        # only every other write
        scale = 1.0 if c % 2 == 0 else -1.0
        states = [type(s)(x=scale * s.x + 0.01 * torch.randn(s.x.shape, generator=g), k=s.k, v=s.v) for s in base]
        prev = mem._slots
        mem.write(states, chunk_index=c, start_frame=FPB * c, num_frames=FPB)
        if prev is not None:
            torch.testing.assert_close(queries[-1], prev.detach())  # U^{c-1}, not the new items' own slots
    assert any(not bool(e.added.all()) for e in evictions[1:])  # some new items did not make the cut


def test_read_skips_items_of_frames_the_call_already_attends(make_states):
    mem = slot_memory(record_interval=1, bank_size=3, retrieve_top_k=6)
    g = torch.Generator().manual_seed(12)
    mem.set_prompt(torch.randn(B, TEXT, generator=g), 0)
    for c in range(3):
        write_chunk(mem, make_states, c, g)
    everything = mem.read()
    assert everything[0][0].shape[1] == 6 * mem.cfg.tokens_per_slot
    # chunk 0 (frames 0-2) is the sink, chunk 2 (frames 6-8) the recent window: only chunk 1's items remain
    kv = mem.read(exclude_frames=[(0, 3), (6, 9)])
    assert kv[0][0].shape[1] == mem.cfg.num_slots_per_chunk * mem.cfg.tokens_per_slot
    chunks = mem.bank.gather("chunk", mem.bank.retrieve(mem._query(), 6, mem.bank.outside([(0, 3), (6, 9)])).position)
    assert set(chunks.flatten().tolist()) == {1}
    assert mem.read(exclude_frames=[(0, 9)]) is None  # nothing left to read


def test_slot_health_matches_a_direct_computation():
    from memory.losses import slot_health

    g = torch.Generator().manual_seed(13)
    slots = torch.randn(2, 3, 4, 8, generator=g)  # (Y, B, S, d)
    assign = torch.randn(2, 3, 4, 10, generator=g).softmax(dim=2)  # (Y, B, S, L)
    h = slot_health(slots, assign, 0.3)
    cos = torch.nn.functional.cosine_similarity(slots[..., :, None, :], slots[..., None, :, :], dim=-1)
    off = [cos[y, b, i, j] for y in range(2) for b in range(3) for i in range(4) for j in range(4) if i != j]
    assert h["cosine"] == pytest.approx(float(torch.stack(off).mean()), abs=1e-6)
    assert h["mask_coverage"] == pytest.approx(float((assign.max(dim=2).values > 0.3).float().mean()))


def test_stage0_warmup_separates_slots_and_makes_the_rec_mask_non_empty():
    """The learning test of the slot warm-up: tokens from a few well-separated feature clusters (entities), seven
    chunks per stream. Untrained, the slots are alike and no token passes eq. 9's mask; after L_con + L_feat training
    the slots are distinct (cosine < 0.5), L_con is below half of ln N and at least 30% of tokens pass the mask."""
    import math

    torch.manual_seed(0)
    mem = slot_memory(slot_dim=16, num_slots_per_chunk=4, tokens_per_slot=2, bank_size=2, retrieve_top_k=4,
                      decoder_hidden=32, slot_iters=3)
    protos = torch.randn(6, DIM, generator=torch.Generator().manual_seed(14)) * 2
    params = [p for n, p in mem.named_parameters() if n.startswith(("writer", "decoder"))]
    opt = torch.optim.AdamW(params, lr=3e-3, weight_decay=0.0)

    def stream(seed):
        g = torch.Generator().manual_seed(seed)
        cast = torch.randperm(6, generator=g)[:4]
        for c in range(7):
            labels = torch.randint(0, 4, (B, L), generator=g)
            x = protos[cast][labels] + 0.3 * torch.randn(B, L, DIM, generator=g)
            yield c, [type("S", (), {"x": x * (1 + 0.1 * y), "k": torch.randn(B, L, H, D, generator=g),
                                     "v": torch.randn(B, L, H, D, generator=g)})() for y in range(Y)]

    def run(seed, train):
        mem.reset(B)
        mem.set_prompt(torch.randn(B, TEXT), 0)
        with torch.set_grad_enabled(True):
            for c, states in stream(seed):
                mem.write(states, chunk_index=c, start_frame=FPB * c, num_frames=FPB)
            loss = mem.slot_loss(0)
        if train:
            opt.zero_grad()
            loss.total.backward()
            opt.step()
        return loss

    before = run(10_000, train=False)
    for step in range(150):
        run(step, train=True)
    after = run(10_001, train=False)
    ln_n = math.log(B * mem.cfg.num_slots_per_chunk)
    assert before.health["mask_coverage"] < 0.3 and before.health["cosine"] > 0.5  # the untrained grouper misses
    assert after.health["cosine"] < 0.5, after.health
    assert after.parts["slot_con"] < 0.5 * ln_n, after.parts
    assert after.health["mask_coverage"] >= 0.3, after.health


def test_a_restarted_slot_chain_starts_from_the_initialiser_and_keeps_the_bank():
    torch.manual_seed(0)
    mem = slot_memory(slot_dim=16, num_slots_per_chunk=4, tokens_per_slot=2, bank_size=2, retrieve_top_k=4,
                      decoder_hidden=32, slot_iters=3)
    g = torch.Generator().manual_seed(5)

    def states():
        return [type("S", (), {"x": torch.randn(B, L, DIM, generator=g), "k": torch.randn(B, L, H, D, generator=g),
                               "v": torch.randn(B, L, H, D, generator=g)})() for _ in range(Y)]

    mem.reset(B)
    mem.set_prompt(torch.randn(B, TEXT, generator=g), 0)
    with torch.no_grad():
        for c in range(4):
            mem.write(states(), chunk_index=c, start_frame=FPB * c, num_frames=FPB)
        bank = mem.bank.size
        mem.restart_slot_chain()
        chunk = states()
        expected = mem.writer([s.x for s in chunk], None).slots  # the learned initialiser, not U^{c-1}
        chained = mem.writer([s.x for s in chunk], mem._slots).slots
        mem.write(chunk, chunk_index=4, start_frame=FPB * 4, num_frames=FPB)
        assert torch.equal(mem._slots, expected) and not torch.allclose(expected, chained)
        assert mem.bank.size >= bank  # the bank is kept
        nxt = states()
        expected = mem.writer([s.x for s in nxt], mem._slots).slots  # and the chain goes on from there
        mem.write(nxt, chunk_index=5, start_frame=FPB * 5, num_frames=FPB)
        assert torch.equal(mem._slots, expected)
