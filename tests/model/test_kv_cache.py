"""KV cache: sink + rolling window bookkeeping, commit-only writes, recache after drop_local."""

from pathlib import Path

import pytest
import torch
import yaml

from model.kv_cache import LayerKVCache
from model.wan import CausalWanModel
from slotmem.config import build_section
from slotmem.errors import InputError

REPO = Path(__file__).resolve().parents[2]
T = 2  # tokens per frame in the synthetic tests


def tiny_cfg(**changes):
    data = yaml.safe_load((REPO / "configs/tiny-random.yaml").read_text())["model"]
    data.update(changes)
    return build_section("model", data)


def make_cache(sink=3, local=12, nfb=3, batch=1):
    return LayerKVCache(batch_size=batch, num_heads=1, head_dim=2, tokens_per_frame=T, sink_size=sink,
                        local_attn_size=local, num_frame_per_block=nfb)


def frame_kv(start, n, batch=1):
    """K filled with the frame index, V with minus it: [B, n*T, 1, 2]."""
    ids = torch.arange(start, start + n, dtype=torch.float32).repeat_interleave(T)
    k = ids[None, :, None, None].expand(batch, -1, 1, 2).clone()
    return k, -k


def frames_of(k):
    """Frame indices present in a K tensor built by frame_kv."""
    return k[0, ::T, 0, 0].long().tolist()


def expected_window(start, num_frames, sink, local):
    """Frames a chunk [start, start+num_frames) attends besides itself (the block-causal mask rule)."""
    end = start + num_frames
    return [j for j in range(start) if j < sink or j >= end - (local - sink)]


@pytest.mark.parametrize("sink,local", [(3, 12), (0, 9), (6, 12), (3, 6)])
def test_window_is_sink_plus_most_recent_frames(sink, local):
    cache = make_cache(sink=sink, local=local)
    for start in range(0, 30, 3):
        sink_k, sink_v, local_k, local_v = cache.window(3)
        assert frames_of(sink_k) + frames_of(local_k) == expected_window(start, 3, sink, local)
        assert torch.equal(sink_v, -sink_k) and torch.equal(local_v, -local_k)
        cache.commit(*frame_kv(start, 3), start_frame=start)
        assert cache.end_frame == start + 3
    # the buffer never holds more than it needs: sink + (local - sink - one chunk)
    assert len(cache.committed_frames()) == min(30, local - 3)


def test_sink_is_never_evicted_and_read_is_a_bit_identical_copy():
    cache = make_cache()
    first_k, first_v = frame_kv(0, 3)
    first_k = first_k + torch.randn_like(first_k) * 1e-3  # arbitrary bits, not just integers
    cache.commit(first_k, first_v, start_frame=0)
    for start in range(3, 60, 3):
        cache.commit(*frame_kv(start, 3), start_frame=start)
    k, v = cache.read(0, 3)
    assert torch.equal(k, first_k) and torch.equal(v, first_v)
    k, v = cache.read(54, 60)
    assert frames_of(k) == list(range(54, 60)) and torch.equal(v, -k)
    k.zero_()  # a copy: the cache is untouched
    assert frames_of(cache.read(54, 60)[0]) == list(range(54, 60))
    with pytest.raises(InputError, match="not all in the cache"):
        cache.read(50, 56)  # frames 50, 51 were evicted


def test_commit_order_is_enforced():
    cache = make_cache()
    cache.commit(*frame_kv(0, 3), start_frame=0)
    cache.commit(*frame_kv(3, 3), start_frame=3)
    with pytest.raises(InputError, match="overlap the committed frames"):
        cache.commit(*frame_kv(3, 3), start_frame=3)
    with pytest.raises(InputError, match="must continue"):
        cache.commit(*frame_kv(9, 3), start_frame=9)
    with pytest.raises(InputError, match="at most"):
        cache.check_call(6, 10, commit=False)
    with pytest.raises(InputError, match="commit expects K/V"):
        cache.commit(torch.zeros(1, 5, 1, 2), torch.zeros(1, 5, 1, 2), start_frame=6)
    assert cache.committed_frames() == list(range(6))  # failed commits changed nothing


def test_drop_local_keeps_the_sink_and_allows_the_recache_gap():
    cache = make_cache()
    for start in range(0, 42, 3):
        cache.commit(*frame_kv(start, 3), start_frame=start)
    sink_before = cache.read(0, 3)
    cache.drop_local()
    assert cache.committed_frames() == [0, 1, 2]
    sink_k, _, local_k, _ = cache.window(3)
    assert frames_of(sink_k) == [0, 1, 2] and local_k.shape[1] == 0
    # prompt-switch recache: re-commit the recent clean frames 36..41 chunk by chunk
    cache.commit(*frame_kv(36, 3), start_frame=36)
    cache.commit(*frame_kv(39, 3), start_frame=39)
    assert cache.committed_frames() == [0, 1, 2, *range(36, 42)]
    sink_k, _, local_k, _ = cache.window(3)
    assert frames_of(sink_k) + frames_of(local_k) == expected_window(42, 3, 3, 12)
    assert all(torch.equal(a, b) for a, b in zip(sink_before, cache.read(0, 3)))
    cache.reset()
    assert cache.committed_frames() == [] and cache.end_frame == 0


# -- through the model -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return CausalWanModel(tiny_cfg()).eval()


def cache_snapshot(cache):
    return [(c.sink_k.clone(), c.sink_v.clone(), c.local_k.clone(), c.local_v.clone(),
             c.sink_frames, c.local_frames, c.end_frame) for c in cache]


def same_snapshot(a, b):
    return all(all(torch.equal(x, y) if torch.is_tensor(x) else x == y for x, y in zip(la, lb))
               for la, lb in zip(a, b))


@torch.no_grad()
def test_model_sink_survives_many_chunks_and_noisy_calls_never_write(model):
    cfg = model.cfg
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(1, 24, cfg.in_channels, cfg.latent_height, cfg.latent_width, generator=g)
    ctx = model.encode_text(torch.randn(1, cfg.text_len, cfg.text_dim, generator=g))
    cache = model.new_cache(1)
    sink = None
    for start in range(0, 24, 3):
        before = cache_snapshot(cache)
        noisy = latents[:, start:start + 3] + torch.randn(1, 3, *latents.shape[2:], generator=g)
        for t in (1000.0, 937.5, 833.3):
            model(noisy, t, ctx, start_frame=start, cache=cache)  # commit=False
        assert same_snapshot(before, cache_snapshot(cache))
        model(latents[:, start:start + 3], 0.0, ctx, start_frame=start, cache=cache, commit=True)
        if start == 0:
            sink = [c.read(0, 3) for c in cache]
    assert cache[0].committed_frames() == [0, 1, 2, *range(18, 24)]
    for layer, (k, v) in enumerate(sink):
        got_k, got_v = cache[layer].read(0, 3)
        assert torch.equal(got_k, k) and torch.equal(got_v, v)


@torch.no_grad()
def test_model_rejects_out_of_order_calls(model):
    cfg = model.cfg
    x = torch.randn(1, 3, cfg.in_channels, cfg.latent_height, cfg.latent_width)
    ctx = model.encode_text(torch.randn(1, cfg.text_len, cfg.text_dim))
    cache = model.new_cache(1)
    model(x, 0.0, ctx, start_frame=0, cache=cache, commit=True)
    with pytest.raises(InputError, match="overlap"):
        model(x, 0.0, ctx, start_frame=0, cache=cache)
    with pytest.raises(InputError, match="must continue"):
        model(x, 0.0, ctx, start_frame=6, cache=cache, commit=True)
    assert cache[0].end_frame == 3 and cache[-1].end_frame == 3


def test_gradient_of_a_noisy_step_survives_later_commits(model):
    """Self-Forcing rollout: a step with grad, then no-grad commits, then backward at the end."""
    cfg = model.cfg
    x = torch.randn(1, 6, cfg.in_channels, cfg.latent_height, cfg.latent_width)
    ctx = model.encode_text(torch.randn(1, cfg.text_len, cfg.text_dim))
    cache = model.new_cache(1)
    with torch.no_grad():
        model(x[:, :3], 0.0, ctx, start_frame=0, cache=cache, commit=True)
    loss = model(x[:, 3:], 800.0, ctx, start_frame=3, cache=cache).square().mean()
    with torch.no_grad():
        model(x[:, 3:], 0.0, ctx, start_frame=3, cache=cache, commit=True)
    loss.backward()
    assert model.blocks[0].self_attn.q.weight.grad.abs().sum() > 0
    assert not cache[0].sink_k.requires_grad and not cache[0].local_k.requires_grad
    model.zero_grad()
