"""bench/flops.py and bench/meta_stream.py: the meta-device FLOP counts against hand formulas.

The formulas are written out here from the architecture (model/wan.py), independently of the counter: a Linear
[N, i] -> [N, o] costs 2 N i o FLOPs, attention over Lq queries and Lk keys costs 4 Lq Lk (H D) (two matmuls).
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))

import flops  # noqa: E402
from meta_count import MemoForward, Meter, PhaseFlopCounter, flash_sdpa  # noqa: E402
from meta_stream import META, MetaNoMemory, meta_backbone, stream_video  # noqa: E402
from slotmem.config import build_section, load_config  # noqa: E402

DIM, HEADS, FFN, FREQ, TEXT_DIM, TEXT_LEN, LAYERS = 64, 2, 96, 32, 48, 8, 2
H, W, C = 8, 12, 16  # latent grid 8 x 12 -> 4 x 6 = 24 tokens per frame


def small_model_cfg(**changes):
    return build_section("model", {"name": "flops-test", "num_layers": LAYERS, "dim": DIM, "num_heads": HEADS,
                                   "ffn_dim": FFN, "freq_dim": FREQ, "text_dim": TEXT_DIM, "text_len": TEXT_LEN,
                                   "in_channels": C, "latent_height": H, "latent_width": W, **changes})


def hand_linear(tokens: int, frames: int) -> dict[str, int]:
    """Linear FLOPs of one forward over `tokens` image tokens of `frames` frames, by where they happen."""
    patch = 2 * tokens * DIM * C * 2 * 2  # Conv3d (1,2,2): each output token is a dot over C*1*2*2 inputs
    text = 2 * TEXT_LEN * (TEXT_DIM * DIM + DIM * DIM)  # text_embedding Linear-GELU-Linear
    time = 2 * frames * (FREQ * DIM + DIM * DIM + DIM * 6 * DIM)  # time_embedding + time_projection, per frame
    per_block = (2 * tokens * DIM * DIM * 4  # self q k v o
                 + 2 * tokens * DIM * DIM * 2  # cross q o
                 + 2 * TEXT_LEN * DIM * DIM * 2  # cross k v over the text
                 + 2 * tokens * DIM * FFN * 2)  # ffn
    head = 2 * tokens * DIM * C * 2 * 2
    return {"patch": patch, "text_in": 2 * TEXT_LEN * TEXT_DIM * DIM, "time_in": 2 * frames * FREQ * DIM,
            "total": patch + text + time + LAYERS * per_block + head}


def count_forward(model, x, text, **kw) -> Counter:
    counter = PhaseFlopCounter(TEXT_LEN)
    with flash_sdpa(), counter:
        model(x, 500.0, text, **kw)
    return counter.take()


def kinds(flops: Counter) -> dict[str, int]:
    out = Counter()
    for (_, mode, kind), n in flops.items():
        out[(mode, kind)] += n
    return out


@pytest.fixture(scope="module")
def model():
    return meta_backbone(small_model_cfg(), torch.float32)


def _inputs(model, frames: int):
    x = torch.empty(1, frames, C, H, W, device=META)
    return x, model.encode_text(torch.empty(1, TEXT_LEN, TEXT_DIM, device=META))


def test_bidirectional_forward_matches_hand_formula(model):
    frames = 3
    tokens = frames * (H // 2) * (W // 2)
    x, text = _inputs(model, frames)
    with torch.no_grad():
        got = kinds(count_forward(model, x, text, causal=False))
    assert got[("fwd", "linear")] == hand_linear(tokens, frames)["total"]
    assert got[("fwd", "self_attn")] == LAYERS * 4 * tokens * tokens * DIM
    assert got[("fwd", "cross_attn")] == LAYERS * 4 * tokens * TEXT_LEN * DIM
    assert got.get(("fwd", "other"), 0) == 0


def test_streaming_forward_attends_cache_memory_and_itself(model):
    """A cached chunk's queries attend sink + recent frames + memory keys + their own frames (model/kv_cache.py)."""
    cfg = model.cfg
    T = (H // 2) * (W // 2)
    cache = model.new_cache(1)
    chunk = cfg.num_frame_per_block
    k = torch.empty(1, chunk * T, HEADS, DIM // HEADS, device=META)
    for start in range(0, 12, chunk):  # 4 committed chunks: sink 3 + the 6 most recent of the other 9 frames
        for layer in cache:
            layer.commit(k, k, start)
    visible = cfg.local_attn_size - chunk  # sink + recent frames a chunk reads
    mem = 5
    memory_kv = [(torch.empty(1, mem, HEADS, DIM // HEADS, device=META),) * 2 for _ in range(LAYERS)]
    x, text = _inputs(model, chunk)
    with torch.no_grad():
        model.text_keys(text)  # the text K/V are cached per prompt (no grad), as StreamState does before chunk 0
        got = kinds(count_forward(model, x, text, start_frame=12, cache=cache, memory_kv=memory_kv))
    tokens = chunk * T
    text_once = hand_linear(tokens, chunk)
    assert got[("fwd", "self_attn")] == LAYERS * 4 * tokens * (visible * T + mem + tokens) * DIM
    assert got[("fwd", "linear")] == text_once["total"] - 2 * TEXT_LEN * (TEXT_DIM * DIM + DIM * DIM) \
        - LAYERS * 2 * TEXT_LEN * DIM * DIM * 2  # cached text projections are not recomputed


def test_backward_counts_weight_and_input_gradients_and_flash_recompute(model):
    frames = 3
    tokens = frames * (H // 2) * (W // 2)
    x, text = _inputs(model, frames)
    counter = PhaseFlopCounter(TEXT_LEN)
    with flash_sdpa(), counter:
        model(x, 500.0, text, causal=False).sum().backward()
    got = kinds(counter.take())
    lin = hand_linear(tokens, frames)
    # every Linear/conv: dW (= its forward) + dX (= its forward), except dX of those fed by inputs without grad
    assert got[("bwd", "linear")] == 2 * lin["total"] - lin["patch"] - lin["text_in"] - lin["time_in"]
    assert got[("bwd", "self_attn")] == 2.5 * got[("fwd_grad", "self_attn")]  # flash recomputes the scores
    assert got[("bwd", "cross_attn")] == 2.5 * got[("fwd_grad", "cross_attn")]
    for p in model.parameters():
        p.grad = None


def test_flash_routing_keeps_the_forward_flops_of_the_math_path(model):
    x, text = _inputs(model, 3)
    math = PhaseFlopCounter(TEXT_LEN)
    with torch.no_grad(), math:  # no routing: SDPA decomposes into bmm on meta
        model(x, 500.0, text, causal=False)
    assert sum(math.take().values()) == sum(count_forward(model, x, text, causal=False).values())


def _video(model_cfg, memo: bool) -> list[Counter]:
    model = meta_backbone(model_cfg, torch.float32)
    counter = PhaseFlopCounter(model_cfg.text_len)
    meter = Meter(counter)
    with flash_sdpa(), counter, (MemoForward(model, meter) if memo else torch.no_grad()):
        return stream_video(model, MetaNoMemory(), model_cfg, num_frames=24, switch_frames=[12], meter=meter).records


def test_replayed_forwards_count_what_running_them_counts():
    cfg = small_model_cfg()
    assert _video(cfg, memo=True) == _video(cfg, memo=False)


def test_chunk_is_four_denoising_forwards_and_one_commit():
    records = _video(small_model_cfg(), memo=True)
    late = records[-1]
    denoise, commit = flops.top(late, "denoise"), flops.top(late, "commit")
    assert sum(denoise.values()) == 4 * sum(commit.values())  # same shapes; the commit's states are free


def test_extrapolated_depth_equals_counting_at_that_depth():
    """bench/flops.py counts at 1 and 2 blocks and extrapolates (exact: see its docstring); here at 3 blocks."""
    cfg = load_config(REPO / "configs" / "tiny-random-60s.yaml", ["model.num_layers=3", "teacher.num_layers=3"])
    direct = flops.count_video(cfg, "slot", num_frames=30, direct=True)["records"]
    extrapolated = flops.count_video(cfg, "slot", num_frames=30)["records"]
    assert direct == extrapolated
    last = flops.parts(direct[-1])
    assert last["memory_write"] > 0 and last["memory_read"] > 0  # the slot writer and the bank's read are in it


def test_extrapolated_training_update_equals_counting_at_that_depth():
    """The same for the updates, with a teacher deeper than the generator (its phase extrapolates over its own
    depth) and gradient checkpointing (the recompute in the backward); a short trajectory keeps it fast."""
    cfg = load_config(REPO / "configs" / "tiny-random-60s.yaml", [
        "model.num_layers=3", "teacher.num_layers=4", "trainer.gradient_checkpointing=true", "trainer.window_frames=6",
        "rollout.num_frames=12", "rollout.single_prompt_frames=6", "rollout.switch_frames=[6]",
        "rollout.switch_choices=[6]"])
    direct = flops.count_training(cfg, "slot", "full", direct=True)
    extrapolated = flops.count_training(cfg, "slot", "full")
    assert direct["rows"] == extrapolated["rows"] and direct["cycle_total"] == extrapolated["cycle_total"]
    gen = direct["rows"]["generator"]
    assert gen["teacher x2 (cond, uncond)"] > 0 and gen["backward"] > 0 and gen["parts"]["memory_write"] > 0
