"""bench/memory_accounting.py and bench/meta_count.py LiveBytes: byte accounting against hand arithmetic."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))

import memory_accounting as ma  # noqa: E402
from meta_count import LiveBytes  # noqa: E402
from meta_stream import meta_backbone  # noqa: E402
from slotmem.config import build_section  # noqa: E402


def test_live_bytes_counts_allocations_and_frees_but_not_views():
    mib = 1 << 20
    weight = torch.empty(256, 1024, device="meta", requires_grad=True)  # made outside the tracker: not counted
    tracker = LiveBytes()
    with tracker:
        x = torch.empty(512, 1024, device="meta")  # 2 MiB
        y = x @ weight.t()  # the transpose is a view of the weight; y is 0.5 MiB
        assert tracker.current == 2 * mib + mib // 2
        del x  # the graph keeps x for the weight's gradient
        assert tracker.current == 2 * mib + mib // 2
        del y  # the graph goes with y, and x with it
        assert tracker.current == 0
        with torch.no_grad():
            a = torch.empty(512, 1024, device="meta")
            b = a @ weight.t()
            del a  # nothing saved without grad
            assert tracker.current == mib // 2
            del b
    assert tracker.current == 0 and tracker.peak == 2 * mib + mib // 2


def test_zero_partitioning_matches_the_zero_paper_arithmetic():
    params = {"generator": 1000, "generator_trainable": 600, "critic": 800, "critic_trainable": 800,
              "teacher": 5000, "largest_teacher_block": 100}
    ranks = 8
    for zero in (1, 2, 3):
        got = ma.trainer_bytes(params, vae=10, zero=zero, ranks=ranks, activations=7)
        for name, total, train in (("generator", 1000, 600), ("critic", 800, 800)):
            assert got[f"{name} bf16 weights"] == 2 * total / (ranks if zero == 3 else 1)
            assert got[f"{name} bf16 grads"] == 2 * train / (ranks if zero >= 2 else 1)
            assert got[f"{name} fp32 master + AdamW"] == 12 * train / ranks
            assert got[f"{name} reduce bucket"] == 2 * train  # below DeepSpeed's 5e8-element bucket
        assert got["teacher bf16"] == 2 * 5000 / (ranks if zero == 3 else 1)
        assert got["vae fp32"] == 40 and got["activations + stream state"] == 7
        assert got["total"] == sum(v for k, v in got.items() if k != "total")
    assert ma.trainer_bytes(params, 10, 3, ranks, 7)["zero-3 gathered params"] == 2 * 2 * 100


def test_kv_cache_holds_the_sink_and_the_rolling_window_in_bf16():
    cfg = build_section("model", {"num_layers": 3, "dim": 64, "num_heads": 2, "ffn_dim": 96, "freq_dim": 32,
                                  "text_dim": 48, "text_len": 8, "latent_height": 8, "latent_width": 12})
    cache = meta_backbone(cfg).new_cache(1)
    got = ma.nbytes(t for layer in cache for t in (layer.sink_k, layer.sink_v, layer.local_k, layer.local_v))
    frames = cfg.sink_size + cfg.local_attn_size - cfg.sink_size - cfg.num_frame_per_block  # the own chunk is not stored
    assert got == cfg.num_layers * 2 * frames * cfg.tokens_per_frame * cfg.dim * 2

