"""Streaming pipeline: determinism, prompt-switch handling, memory read/write order."""

import dataclasses

import pytest
import torch

from rollout.components import build_components
from rollout.streaming import StreamState, chunk_switch_starts, encode_prompts, generate, prompt_index_at
from slotmem.config import load_config


@pytest.fixture(scope="module")
def cfg(repo_root):
    return load_config(f"{repo_root}/configs/tiny-random.yaml", ["rollout.num_frames=48", "rollout.switch_frames=[12,24,36]",
                                                          "rollout.switch_choices=[21]"])


def _run(cfg, prompts, switch_frames, seed, num_frames=24, memory_kind=None):
    mem_cfg = cfg.memory if memory_kind is None else type(cfg.memory)(**{**cfg.memory.__dict__, "kind": memory_kind})
    comps = build_components(cfg.model, mem_cfg, device="cpu", seed=0)
    enc = encode_prompts(comps.text_encoder, prompts)
    gen = comps.generator
    return generate(gen.backbone, gen.memory, comps.scheduler, cfg.model, enc, num_frames=num_frames,
                    switch_frames=switch_frames, seed=seed), gen


def test_helpers():
    assert chunk_switch_starts([40, 80, 120], 3) == [42, 81, 120]
    assert [prompt_index_at(f, [12, 24]) for f in (0, 11, 12, 23, 24, 99)] == [0, 0, 1, 1, 2, 2]


def test_generation_is_deterministic_for_a_seed(cfg):
    a, _ = _run(cfg, ["a red fox in snow"], [], seed=3)
    b, _ = _run(cfg, ["a red fox in snow"], [], seed=3)
    c, _ = _run(cfg, ["a red fox in snow"], [], seed=4)
    assert a.latents.shape == (1, 24, cfg.model.in_channels, cfg.model.latent_height, cfg.model.latent_width)
    assert torch.equal(a.latents, b.latents)
    assert not torch.allclose(a.latents, c.latents)
    assert torch.isfinite(a.latents).all()


def test_switch_resets_text_recaches_and_rescores_exactly_at_switch_chunks(cfg):
    comps = build_components(cfg.model, cfg.memory, device="cpu", seed=0)
    gen = comps.generator
    calls = []
    enc_text, set_prompt = gen.backbone.encode_text, gen.memory.set_prompt
    gen.backbone.encode_text = lambda emb: (calls.append("text"), enc_text(emb))[1]
    gen.memory.set_prompt = lambda pooled, i, keys=None: (calls.append(("rescore", i)), set_prompt(pooled, i, keys))[1]
    prompts = encode_prompts(comps.text_encoder, ["a fox", "the fox jumps", "the fox sleeps"])
    res = generate(gen.backbone, gen.memory, comps.scheduler, cfg.model, prompts, num_frames=36,
                   switch_frames=[13, 24], seed=0)
    # switch at 13 acts at chunk start 15 (LongLive: first chunk starting at or after the switch)
    assert [(e.frame, e.prompt_index) for e in res.events] == [(15, 1), (24, 2)]
    # recache re-commits the clean frames of the local window that follow the sink
    assert [e.recached for e in res.events] == [(3, 15), (12, 24)]
    # initial prompt + one text reset and one bank re-score per switch, nothing else
    assert calls == ["text", ("rescore", 0), "text", ("rescore", 1), "text", ("rescore", 2)]


def test_switch_changes_only_frames_after_it(cfg):
    one, _ = _run(cfg, ["a fox", "a red car on a road"], [12], seed=1)
    same, _ = _run(cfg, ["a fox", "a fox"], [12], seed=1)
    assert torch.equal(one.latents[:, :12], same.latents[:, :12])
    assert not torch.allclose(one.latents[:, 12:], same.latents[:, 12:])


def test_memory_changes_output_only_once_items_left_the_cache(cfg):
    """Items are copies of cached tokens: while their frames are in the sink or the local window the read skips
    them, and the output is bit-identical to memory off; from the first chunk that reads an item it differs."""
    slot, gen = _run(cfg, ["a fox"], [], seed=2, num_frames=24, memory_kind="slot")
    off, _ = _run(cfg, ["a fox"], [], seed=2, num_frames=24, memory_kind="none")
    S = cfg.memory.num_slots_per_chunk
    # recorded chunks 0 and 3 wrote items; chunk 0 is the sink, chunk 3 (frames 9-11) stays in the window of
    # chunks 4 and 5 (the 6 most recent frames), so the first read that returns anything is chunk 6's
    assert [r["size"] for r in slot.memory_records] == [S, S, S, 2 * S, 2 * S, 2 * S, 3 * S, 3 * S]  # after writes
    writes = [r for r in gen.memory.inspector.records if r["event"] == "write"]
    first = next(r["chunk"] for r in writes if r["retrieved"])
    assert first == 6 and all(i // S == 1 for i in writes[first]["retrieved"])  # the items of chunk 3
    assert torch.equal(slot.latents[:, :18], off.latents[:, :18])
    assert not torch.allclose(slot.latents[:, 18:21], off.latents[:, 18:21])


def test_frame_bank_baseline_streams(cfg):
    res, _ = _run(cfg, ["a fox", "the fox jumps"], [12], seed=0, memory_kind="frame_bank")
    assert torch.isfinite(res.latents).all() and len(res.chunk_seconds) == 8


# -- the prompt-switch recache ------------------------------------------------------------------


def _stream_to(cfg, model_changes, frames: int, seed: int = 3):
    """A StreamState that has committed `frames` clean frames under prompt 0, plus those frames."""
    model_cfg = dataclasses.replace(cfg.model, **model_changes)
    comps = build_components(model_cfg, cfg.memory, device="cpu", seed=0)
    gen = comps.generator
    prompts = encode_prompts(comps.text_encoder, ["a fox in the snow", "a red car on a road"])
    state = StreamState(gen.backbone, gen.memory, comps.scheduler, model_cfg, prompts)
    g = torch.Generator().manual_seed(seed)
    history = torch.randn(1, frames, model_cfg.in_channels, model_cfg.latent_height, model_cfg.latent_width,
                          generator=g)
    with torch.no_grad():
        for s in range(0, frames, model_cfg.num_frame_per_block):
            state.commit(history[:, s:s + model_cfg.num_frame_per_block], memory_kv=state.read_memory())
    return state, history, gen


@pytest.mark.parametrize("global_sink", [False, True])
def test_single_recache_equals_one_bidirectional_pass_over_the_recached_frames(cfg, global_sink):
    """LongLive's recache: the recached frames attend to each other (and the kept sink) in one call.

    Reference: the model's bidirectional mode (causal=False, no cache) over the same frames with the same absolute
    RoPE phases, the kept sink's K/V and the retrieved memory items given as extra keys every query sees."""
    state, history, gen = _stream_to(cfg, {"recache": "single", "global_sink": global_sink}, frames=24)
    m = cfg.model
    sink_k, sink_v = [c.sink_k.clone() for c in state.cache], [c.sink_v.clone() for c in state.cache]
    state._set_prompt(1)
    lo = 24 - (m.local_attn_size - m.sink_size if global_sink else m.local_attn_size)
    # what the recache reads: the bank without the kept sink's and the recached frames' items
    memory_kv = gen.memory.read(exclude_frames=[(lo, 24)] + ([(0, 3)] if global_sink else []))
    assert memory_kv is not None  # chunk 0's items: retrievable once the sink is rebuilt, else chunk 3's
    extra = memory_kv
    if global_sink:
        extra = [(torch.cat([sk, mk], 1), torch.cat([sv, mv], 1)) for sk, sv, (mk, mv) in zip(sink_k, sink_v, memory_kv)]
    with torch.no_grad():
        _, ref = gen.backbone(history[:, lo:24], torch.zeros(1, 24 - lo), state.text, start_frame=lo, causal=False,
                              memory_kv=extra, return_states=True)
    state.switch_prompt(1, history)
    T = m.tokens_per_frame
    for cache, layer in zip(state.cache, ref):
        assert cache.committed_frames()[-6:] == list(range(18, 24))
        torch.testing.assert_close(cache.local_k[:, :6 * T], layer.k[:, -6 * T:], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(cache.local_v[:, :6 * T], layer.v[:, -6 * T:], rtol=1e-5, atol=1e-6)
        if global_sink:  # the first prompt's sink is kept
            assert cache.sink_span == (0, 3)
        else:  # rebuilt from the first recached frames
            assert cache.sink_span == (lo, lo + 3)
            torch.testing.assert_close(cache.sink_k, layer.k[:, :3 * T], rtol=1e-5, atol=1e-6)


def test_causal_recache_differs_from_single_and_keeps_chunk_by_chunk_commits(cfg):
    single, history, _ = _stream_to(cfg, {"recache": "single"}, frames=24)
    causal, _, _ = _stream_to(cfg, {"recache": "causal"}, frames=24)
    single.switch_prompt(1, history)
    causal.switch_prompt(1, history)
    assert single.cache[0].committed_frames() == causal.cache[0].committed_frames()
    assert not torch.allclose(single.cache[1].local_k, causal.cache[1].local_k)
    assert [e.recached for e in causal.events] == [(12, 24)]


def test_recache_reads_the_bank_and_skips_items_of_its_own_frames(cfg):
    state, history, gen = _stream_to(cfg, {"global_sink": True}, frames=36)
    seen = []
    read = gen.memory.read
    gen.memory.read = lambda exclude_frames=(): (seen.append(tuple(exclude_frames)), read(exclude_frames))[1]
    state.switch_prompt(1, history)
    # one read for the one recache call, excluding the kept sink and the recached frames themselves
    assert seen == [((0, 3), (27, 36))]
