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
    return loss + mem.slot_loss(stage)


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
    stage1, = [mem.slot_loss(1)]
    assert stage1.requires_grad and stage1.item() > 0
    stage1.backward()
    assert mem.slot_loss(1).item() == 0.0  # nothing written since the last call
    for c in range(3, 5):  # the slot state from before the backward no longer carries a graph
        write_chunk(mem, make_states, c, g)
    mem.slot_loss(2).backward()
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
        losses[stage] = mem.slot_loss(stage)
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
        (mem.slot_loss(2) + sum(v.float().sum() for _, v in memory_kv)).backward()
        assert mem.text_proj[0].weight.grad is not None
