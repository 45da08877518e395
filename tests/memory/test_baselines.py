"""Baselines: 'none' never retrieves; 'frame_bank' keeps the most text-relevant frames (MemFlow NAM, SMA)."""

import math

import pytest
import torch

from memory import build_memory
from memory.baselines import text_relevance
from slotmem.config import MemoryConfig
from slotmem.errors import InputError
from tests.memory.conftest import State

B, H, D, T, FRAMES = 1, 2, 4, 2, 2  # one batch element, 2 heads, 2 tokens per frame, 2 frames per chunk


def frame_bank(**overrides):
    cfg = MemoryConfig(kind="frame_bank", tokens_per_slot=1, frame_bank_frames=3, record_interval=1, **overrides)
    mem = build_memory(cfg, num_layers=1, dim=8, num_heads=H, head_dim=D, text_dim=5, tokens_per_frame=T,
                       num_frame_per_block=FRAMES)
    mem.reset(B)
    return mem


def chunk(first_frame_keys: torch.Tensor, seed: int) -> list[State]:
    """A chunk whose first latent frame has keys first_frame_keys (T, H, D); the second frame is noise."""
    g = torch.Generator().manual_seed(seed)
    k = torch.cat([first_frame_keys, 50 * torch.randn(T, H, D, generator=g)])[None]  # (1, 2T, H, D)
    return [State(x=torch.randn(1, FRAMES * T, 8, generator=g), k=k, v=torch.randn(1, FRAMES * T, H, D, generator=g))]


def text_keys(mean_key: torch.Tensor) -> list[torch.Tensor]:
    """Three text tokens (per head) whose mean is mean_key (H, D)."""
    off = torch.randn(H, D)
    return [torch.stack([mean_key + off, mean_key - off, mean_key])[None]]  # (1, 3, H, D)


def e0() -> torch.Tensor:
    return torch.eye(D)[0].expand(T, H, D)


def test_text_relevance_matches_the_memflow_formula():
    torch.manual_seed(0)
    q = torch.randn(2, 5, H, D)  # (B, Lt, H, D)
    k = torch.randn(2, 3, T, H, D)  # (B, F, T, H, D)
    rel = text_relevance(q.mean(dim=1)[None], k[None])[0].mean(dim=-1)  # (B, F)
    for b in range(2):
        for f in range(3):
            logits = [torch.dot(q[b, j, h], k[b, f, t, h]) / math.sqrt(D)
                      for j in range(5) for h in range(H) for t in range(T)]
            torch.testing.assert_close(rel[b, f], torch.stack(logits).mean())


def test_frame_bank_keeps_the_most_text_relevant_frames_and_the_newest():
    mem = frame_bank()
    mem.set_prompt(torch.randn(B, 5), 0, text_keys(torch.eye(D)[0].expand(H, D)))
    scale = [3.0, -1.0, 1.0, 2.0, 0.5]  # relevance of chunk c's first frame under the prompt
    written = {}
    for c, s in enumerate(scale):
        assert (mem.read() is None) == (c == 0)
        states = chunk(s * e0(), seed=c)
        written[c] = states[0]
        mem.write(states, chunk_index=c, start_frame=FRAMES * c, num_frames=FRAMES)
    memory_kv = mem.read()
    # Bank of 3: {0,1,2} -> chunk 3 keeps the 2 best old (0, 2) -> chunk 4 keeps (0, 3).
    assert [item["chunk"] for item in mem.inspect()["items"]] == [0, 3, 4]
    k, v = memory_kv[0]
    assert k.shape == (B, 3 * T, H, D)
    assert torch.equal(k, torch.cat([written[c].k[:, :T] for c in (0, 3, 4)], dim=1))
    assert torch.equal(v, torch.cat([written[c].v[:, :T] for c in (0, 3, 4)], dim=1))

    # A prompt switch before the next read decides which history survives the next compression.
    mem.set_prompt(torch.randn(B, 5), 1, text_keys(-torch.eye(D)[0].expand(H, D)))
    mem.write(chunk(0.1 * e0(), seed=5), chunk_index=5, start_frame=10, num_frames=FRAMES)
    mem.read()
    assert [item["chunk"] for item in mem.inspect()["items"]] == [3, 4, 5]
    # Each chunk's record lists what its read evicted: chunk 5's read admitted chunk 4 and dropped chunk 2.
    assert mem.inspector.records[-1]["chunk"] == 5 and mem.inspector.records[-1]["evicted"] == [2]
    mem.write(chunk(0.1 * e0(), seed=6), chunk_index=6, start_frame=12, num_frames=FRAMES)
    assert mem.inspector.records[-1]["evicted"] == [0]


def test_sparse_memory_activation_keeps_the_most_relevant_frames_per_head():
    mem = frame_bank(sma=True)
    q = torch.zeros(H, D)
    q[0, 0], q[1, 1] = 1.0, 1.0  # head 0 looks for e0, head 1 for e1
    mem.set_prompt(torch.randn(B, 5), 0, text_keys(q))
    frames = []
    for c, (a, b) in enumerate([(3.0, 0.0), (0.0, 3.0), (1.0, 1.0)]):
        key = torch.zeros(T, H, D)
        key[:, 0, 0], key[:, 1, 1] = a, b
        states = chunk(key, seed=c)
        frames.append(states[0].k[0, :T])
        mem.read()
        mem.write(states, chunk_index=c, start_frame=FRAMES * c, num_frames=FRAMES)
    k, _ = mem.read()[0]
    assert k.shape == (B, 2 * T, H, D)  # ceil(3 / 2) frames per head
    assert torch.equal(k[0, :, 0], torch.cat([frames[0], frames[2]])[:, 0])  # head 0: frames 0 and 2
    assert torch.equal(k[0, :, 1], torch.cat([frames[1], frames[2]])[:, 1])  # head 1: frames 1 and 2


def test_frame_bank_needs_text_keys():
    mem = frame_bank()
    with pytest.raises(InputError, match="text_keys"):
        mem.set_prompt(torch.randn(B, 5), 0)


def test_no_memory_never_returns_memory():
    cfg = MemoryConfig(kind="none", tokens_per_slot=1)
    mem = build_memory(cfg, num_layers=1, dim=8, num_heads=H, head_dim=D, text_dim=5, tokens_per_frame=T,
                       num_frame_per_block=FRAMES)
    mem.reset(B)
    mem.set_prompt(torch.randn(B, 5), 0)
    for c in range(4):
        assert mem.read() is None
        mem.write(chunk(e0(), seed=c), chunk_index=c, start_frame=FRAMES * c, num_frames=FRAMES)
    assert mem.read() is None
    assert mem.inspect()["memory_tokens_per_read"] == 0
    assert mem.slot_loss(2).total.item() == 0.0
    assert list(mem.state_dict()) == []
