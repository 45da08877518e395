"""FLOPs per streamed chunk and per training update, counted on the meta device, and what they imply at bf16 peak.

    python bench/flops.py [--config configs/wan2.1-1.3b.yaml] [--set section.field=value ...]
        [--kinds none,frame_bank,frame_bank+sma,slot] [--train-kind slot] [--backbones full,lora] [--no-train]
        [--direct] [--out bench/results/flops.json]

At the 1.3B preset the whole run took 9 minutes on 2 shared CPU cores; `--config configs/tiny-random-60s.yaml --no-train
--kinds none,slot` is a ~25 CPU-second smoke run.

Counted, not measured: the models are built on the meta device (shapes, no weights, no arithmetic) and every op
passes through torch.utils.flop_counter.FlopCounterMode (bench/meta_count.py: phases, flash-attention routing,
replay of repeated cached forwards; bench/meta_stream.py: the control flow). 1 multiply-add = 2 FLOPs; elementwise
ops, norms, softmax and the optimizer step are not counted (FlopCounterMode counts matmuls, convolutions and
attention); the bytes every op reads and writes are counted separately (unfused eager traffic of a late chunk).

Depth: counts are taken at 1 and 2 blocks and extrapolated to the real depth (`extrapolate`), which is exact:
every op either runs once per call outside the blocks (patch and time embeddings, text projection, head) or once
per block with shapes that do not depend on the block's index or on the depth (each layer has its own KV cache of
the same size; the memory writes and reads per layer, stacking layers into a batch dimension that only scales the
count), and the control flow (chunks, steps, bank admission) does not depend on the depth either. So every count
is a + b L. tests/bench/test_flops.py checks it against counting at the real depth (--direct), for a video and for
the training updates with a teacher deeper than the generator. Memory peaks are not affine (a block's output state
overlaps the next block), so bench/memory_accounting.py runs at full depth.

Per chunk: one 240-frame video per memory kind through rollout/streaming.py's StreamState (memory read, 4
denoising forwards, the clean re-run that commits, memory write; a prompt switch at the middle of
rollout.switch_choices as bench/rollout_throughput.py has it). "Late chunk" is the last one: sink 3 + 6 recent
committed frames + its own 3 (12 frames = 18,720 keys at 1.3B), the bank at budget. "Video mean" averages all
chunks (a filling cache, a growing bank, the switch's recache).

Per training update (trainer/window.py, trainer/losses.py): the no-grad prefill counted as its mean over the
uniformly drawn window starts (trainer/window.py window_starts, a switch at a uniform rollout.switch_choices
frame), the roll of the window's new frames with grad at one exit step (expected exit step (steps-1)/2 no-grad
forwards before it), the Wan2.1-T2V-14B teacher twice (CFG cond + uncond) and the critic once without grad on the
21-frame clip, the generator backward; a critic update is its own prefill + a no-grad roll + critic forward and
backward. One generator step of trainer.critic_updates_per_generator = 5 is 1 generator + 5 critic updates.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for p in (str(REPO), str(REPO / "bench")):
    if p not in sys.path:
        sys.path.insert(0, p)

import torch  # noqa: E402

from meta_count import MemoForward, Meter, PhaseFlopCounter, Traffic, flash_sdpa  # noqa: E402
from meta_stream import (critic_update, generator_update, meta_backbone, meta_generator, read_memory,  # noqa: E402
                         stand_in_memory, stream_video, teacher_config)
from rollout.streaming import chunk_switch_starts  # noqa: E402
from slotmem.config import load_config, replace  # noqa: E402

# NVIDIA H100 Tensor Core GPU Architecture whitepaper, H100 SXM5: BF16 tensor 989.4 TFLOP/s dense (1,978.9 with
# 2:4 sparsity). NVIDIA H200 datasheet, H200 SXM: BF16 tensor 1,979 TFLOP/s with sparsity, the same 989.4 dense.
PEAK_BF16 = {"H100 SXM": 989.4e12, "H200 SXM": 989.4e12}
# Measured here: an 8192^3 bf16 matmul on this workplace's H200 ran 769-798 TFLOP/s (/work/.library/device/KINDS.md).
H200_MEASURED_MATMUL = 788e12
# HBM bandwidth, vendor datasheets: H100 SXM 3.35 TB/s, H200 SXM 4.8 TB/s (a device-to-device copy measured 4.3 TB/s
# on this workplace's H200, KINDS.md).
HBM_BYTES_PER_S = {"H100 SXM": 3.35e12, "H200 SXM": 4.8e12}
PIXEL_FRAMES_PER_CHUNK = 12  # anchors-video §2.1: one 3-latent-frame chunk = 12 new pixel frames
# anchors-video §7, one H100: LongLive 1.3B bf16 (sink + window, no memory), MemFlow (with its frame memory).
REPORTED_FPS = {"LongLive (none)": ("none", 20.7), "MemFlow (frame_bank)": ("frame_bank", 18.7),
                "MemFlow (frame_bank, sma)": ("frame_bank+sma", 18.7)}
MEMORY_PHASES = ("memory_read", "memory_write")


# ----------------------------------------------------------------------------------------------
# splitting counts
# ----------------------------------------------------------------------------------------------


def parts(flops: Counter) -> dict[str, float]:
    """linear / self_attn / cross_attn of the backbone, memory_read / memory_write, and the total."""
    out = dict.fromkeys(("linear", "self_attn", "cross_attn", "other", *MEMORY_PHASES), 0.0)
    for (phase, _, kind), n in flops.items():
        memory = next((m for m in MEMORY_PHASES if m in phase.split("/")), None)
        out[memory or kind] += n
    out["total"] = sum(flops.values())
    return out


def top(flops: Counter, *phases: str) -> Counter:
    """The counts whose outermost phase is one of `phases`."""
    return Counter({key: n for key, n in flops.items() if key[0].split("/")[0] in phases})


def scaled(flops: Counter, factor: float) -> Counter:
    return Counter({key: n * factor for key, n in flops.items()})


def by_mode(flops: Counter, mode: str) -> Counter:
    return Counter({key: n for key, n in flops.items() if key[1] == mode})


# ----------------------------------------------------------------------------------------------
# streaming
# ----------------------------------------------------------------------------------------------


def _kind(kind: str) -> tuple[str, bool]:
    base, _, extra = kind.partition("+")
    return base, extra == "sma"


def video_switch(cfg) -> list[int]:
    """The switch bench/rollout_throughput.py uses: the middle entry of rollout.switch_choices."""
    choices = cfg.rollout.switch_choices
    return [choices[len(choices) // 2]]


def extrapolate(one: Counter, two: Counter, layers) -> Counter:
    """Counts at the real depth from counts at 1 and 2 blocks: every block has the same shapes, so FLOPs are affine in
    the block count (f(L) = f(1) + (L - 1) (f(2) - f(1)), exact; tests/bench/test_flops.py checks it at 3).
    layers(phase) is the block count of the model that phase runs (the teacher's for 'teacher')."""
    out = Counter()
    for key in one.keys() | two.keys():
        out[key] = one[key] + (layers(key[0]) - 1) * (two[key] - one[key])
    return out


def _video_at(cfg, kind: str, num_frames: int, gen=None, traffic: bool = False):
    """(prompt FLOPs, per-chunk FLOP records, bytes moved by one more late chunk if `traffic`)."""
    base, sma = _kind(kind)
    memory_cfg = replace(cfg.memory, sma=sma) if base == "frame_bank" else cfg.memory
    gen = gen if gen is not None else meta_generator(cfg.model, memory_cfg, base)
    counter = PhaseFlopCounter(cfg.model.text_len)
    meter = Meter(counter)
    memory = stand_in_memory(gen, memory_cfg, cfg.model, meter)
    with flash_sdpa(), counter, MemoForward(gen.backbone, meter):
        run = stream_video(gen.backbone, memory, cfg.model, meter=meter, num_frames=num_frames,
                           switch_frames=video_switch(cfg))
    moved = None
    if traffic:  # every op of one more chunk, run (not replayed): read, 4 denoising steps, commit, write
        moved = Traffic()
        grid = (cfg.model.in_channels, cfg.model.latent_height, cfg.model.latent_width)
        with flash_sdpa(), moved, torch.no_grad():
            memory_kv = read_memory(run.state)
            noise = torch.empty(1, cfg.model.num_frame_per_block, *grid, dtype=gen.backbone.dtype, device="meta")
            run.state.commit(run.state.denoise(noise, memory_kv=memory_kv), memory_kv=memory_kv)
        moved = moved.bytes
    return run.prompt, run.records, moved


def at_depth(cfg, blocks: int):
    """The config with `blocks` blocks in the backbone (generator, critic) and in the teacher."""
    changes = {"model": replace(cfg.model, num_layers=blocks)}
    if getattr(cfg, "teacher", None) is not None:
        changes["teacher"] = replace(cfg.teacher, num_layers=blocks)
    return dataclasses.replace(cfg, **changes)


def count_video(cfg, kind: str, num_frames: int | None = None, direct: bool = False, traffic: bool = False) -> dict:
    """Per-chunk FLOP records of one streamed video of memory `kind` ('frame_bank+sma' for MemFlow's SMA), and with
    `traffic` the bytes one more late chunk moves; direct=True counts at the real depth instead of extrapolating from
    1 and 2 blocks (bytes are affine in the block count too)."""
    frames = num_frames or cfg.rollout.num_frames
    if direct:
        prompt, records, moved = _video_at(cfg, kind, frames, traffic=traffic)
        return {"records": records, "prompt": prompt, "traffic": moved}
    one, two = (_video_at(at_depth(cfg, n), kind, frames, traffic=traffic) for n in (1, 2))
    depth = cfg.model.num_layers
    moved = None
    if traffic:
        moved = {k: one[2][k] + (depth - 1) * (two[2][k] - one[2][k]) for k in one[2].keys() | two[2].keys()}
    return {"records": [extrapolate(a, b, lambda phase: depth) for a, b in zip(one[1], two[1])],
            "prompt": extrapolate(one[0], two[0], lambda phase: depth), "traffic": moved}


def chunk_summary(video: dict) -> dict:
    records = video["records"]
    total = sum(records, Counter())
    return {"late_chunk": parts(records[-1]), "video_mean": {k: v / len(records) for k, v in parts(total).items()},
            "video_total": parts(total)["total"], "chunks": len(records), "late_chunk_bytes": video.get("traffic")}


# ----------------------------------------------------------------------------------------------
# training
# ----------------------------------------------------------------------------------------------


def window_starts(cfg) -> list[int]:
    """trainer/window.py window_starts: 0 (all new frames), or one context chunk + window - chunk new frames."""
    chunk, frames, window = cfg.model.num_frame_per_block, cfg.rollout.num_frames, cfg.trainer.window_frames
    try:
        from trainer.window import window_starts as starts
        return starts(frames, window, chunk)
    except ImportError:
        return [0] + list(range(chunk, frames - (window - chunk) + 1, chunk))


def mean_window_start(cfg) -> int:
    starts = window_starts(cfg)
    return min(starts, key=lambda s: abs(s - statistics.mean(starts)))


def expected_prefill(cfg, records: list[Counter], switch_cost: Counter) -> tuple[Counter, float, float]:
    """Mean prefill FLOPs over the window starts and switch frames (both uniform), from one video's per-chunk
    records (a prefill chunk = memory read + clean re-run + memory write); also the mean prefill frames and the
    probability that the window's roll holds the switch."""
    chunk = cfg.model.num_frame_per_block
    starts = window_starts(cfg)
    switches = chunk_switch_starts(list(cfg.rollout.switch_choices), chunk)
    per_chunk = [top(r, "memory_read", "commit") for r in records]
    total, in_roll = Counter(), 0.0
    for s in starts:
        for c in range(s // chunk):
            total += per_chunk[c]
        total += scaled(switch_cost, sum(w < s for w in switches) / len(switches))
        new = cfg.trainer.window_frames - (chunk if s else 0)
        in_roll += sum(s <= w < s + new for w in switches) / len(switches)
    return scaled(total, 1 / len(starts)), statistics.mean(starts), in_roll / len(starts)


def training_models(cfg, kind: str, backbone: str):
    """Meta generator (backbone + memory), critic and teacher as trainer/models.py sets them up for `backbone`."""
    gen = meta_generator(cfg.model, cfg.memory, kind)
    critic = meta_backbone(cfg.model)
    teacher = meta_backbone(teacher_config(cfg)).requires_grad_(False)
    if backbone == "lora":
        from trainer.lora import add_lora
        with torch.device("meta"):
            for module in (gen.backbone, critic):
                add_lora(module, rank=cfg.trainer.lora_rank, alpha=cfg.trainer.lora_alpha)
                module.to(torch.bfloat16)
    elif backbone == "frozen":
        gen.backbone.requires_grad_(False)
    # trainer/models.py: checkpointed generator and critic blocks recompute their forward in the backward
    gen.backbone.gradient_checkpointing = critic.gradient_checkpointing = getattr(
        cfg.trainer, "gradient_checkpointing", False)
    return gen, critic, teacher


def _updates_at(cfg, kind: str, backbone: str, start: int) -> dict[str, Counter]:
    gen, critic, teacher = training_models(cfg, kind, backbone)
    out = {}
    for name in ("generator", "critic"):
        counter = PhaseFlopCounter(cfg.model.text_len)
        meter = Meter(counter)
        memory = stand_in_memory(gen, cfg.memory, cfg.model, meter)
        kw = dict(start=start, window_frames=cfg.trainer.window_frames, switch_start=None, exit_step=0, meter=meter)
        with flash_sdpa(), counter, MemoForward(gen.backbone, meter):
            if name == "generator":
                generator_update(gen.backbone, memory, teacher, critic, cfg.model, **kw)
            else:
                critic_update(gen.backbone, memory, critic, cfg.model, **kw)
        out[name] = counter.take()
    # the prefill's mean comes from a video of the training generator itself (adapters unmerged, unlike a policy)
    _, out["video"], _ = _video_at(cfg, kind, cfg.rollout.num_frames, gen)
    return out


def count_training(cfg, kind: str, backbone: str, start: int | None = None, direct: bool = False) -> dict:
    """FLOPs of one generator and one critic update (module docstring), split by phase; direct=True counts at the
    real depths instead of extrapolating from 1 and 2 blocks."""
    start = mean_window_start(cfg) if start is None else start
    depth, teacher_depth = cfg.model.num_layers, teacher_config(cfg).num_layers
    if direct:
        counted = _updates_at(cfg, kind, backbone, start)
        out = {name: counted[name] for name in ("generator", "critic")}
        records = counted["video"]
    else:
        one, two = (_updates_at(at_depth(cfg, n), kind, backbone, start) for n in (1, 2))

        def layers(phase: str) -> int:
            return teacher_depth if phase.split("/")[0] == "teacher" else depth

        out = {name: extrapolate(one[name], two[name], layers) for name in ("generator", "critic")}
        records = [extrapolate(a, b, layers) for a, b in zip(one["video"], two["video"])]
    chunk = cfg.model.num_frame_per_block
    switch_cost = top(records[chunk_switch_starts(video_switch(cfg), chunk)[0] // chunk], "switch")
    prefill, mean_frames, p_switch_in_roll = expected_prefill(cfg, records, switch_cost)
    per_denoise = scaled(top(records[-1], "denoise"), 1 / len(cfg.model.denoising_steps))
    new_chunks = (cfg.trainer.window_frames - (chunk if start else 0)) // chunk
    mean_exit = (len(cfg.model.denoising_steps) - 1) / 2
    extra = scaled(per_denoise, mean_exit * new_chunks)  # the no-grad steps before the exit step (counted at exit 0)
    rows = {}
    for name, flops in out.items():
        roll = top(flops, "roll")
        rows[name] = {
            "prefill (mean)": parts(prefill)["total"],
            "prefill (this window)": parts(top(flops, "prefill"))["total"],
            "roll no-grad forwards": parts(by_mode(roll, "fwd") + extra)["total"],
            "roll grad forwards": parts(by_mode(roll, "fwd_grad"))["total"],
            "switch recache (expected)": parts(switch_cost)["total"] * p_switch_in_roll,
            "teacher x2 (cond, uncond)": parts(top(flops, "teacher"))["total"],
            "critic forward": parts(top(flops, "critic"))["total"],
            "backward": parts(top(flops, "backward"))["total"],
        }
        rows[name]["total"] = sum(v for k, v in rows[name].items() if k != "prefill (this window)")
        rows[name]["parts"] = parts(flops + extra)
    cycle = rows["generator"]["total"] + cfg.trainer.critic_updates_per_generator * rows["critic"]["total"]
    return {"rows": rows, "cycle_total": cycle, "window_start": start, "mean_prefill_frames": mean_frames,
            "p_switch_in_roll": p_switch_in_roll, "new_chunks": new_chunks, "mean_exit_step": mean_exit,
            "kind": kind, "backbone": backbone, "teacher_layers": teacher_depth,
            "gradient_checkpointing": getattr(cfg.trainer, "gradient_checkpointing", False)}


# ----------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------


def is_wan_13b(model_cfg) -> bool:
    """The shape LongLive's and MemFlow's FPS were reported at: Wan2.1-T2V-1.3B, 832x480 (1,560 tokens per frame)."""
    return (model_cfg.num_layers, model_cfg.dim, model_cfg.tokens_per_frame) == (30, 1536, 1560)


def unit(largest: float) -> tuple[float, str]:
    """TFLOP at the real shapes, GFLOP / MFLOP for the small presets."""
    return next((scale, name) for scale, name in ((1e12, "TFLOP"), (1e9, "GFLOP"), (1e6, "MFLOP"), (1.0, "FLOP"))
                if largest >= scale or scale == 1.0)


def print_chunks(summaries: dict[str, dict], cfg) -> None:
    none = summaries["none"]
    scale, name = unit(max(s["late_chunk"]["total"] for s in summaries.values()))

    def _t(x: float) -> str:
        return f"{x / scale:.3f}"

    print(f"\nFLOPs per chunk, {cfg.model.name} ({cfg.model.num_layers} layers, dim {cfg.model.dim}, "
          f"{cfg.model.tokens_per_frame} tokens/frame), {name} (counted on meta)")
    print(f"{'memory':<16}{'linear':>9}{'self-attn':>11}{'cross-attn':>12}{'mem write':>11}{'mem read':>10}"
          f"{'total':>9}{'vs none':>9}{'video mean':>12}{'vs none':>9}")
    for kind, s in summaries.items():
        late, mean = s["late_chunk"], s["video_mean"]
        print(f"{kind:<16}{_t(late['linear']):>9}{_t(late['self_attn']):>11}{_t(late['cross_attn']):>12}"
              f"{late['memory_write'] / scale:>11.4f}{late['memory_read'] / scale:>10.4f}{_t(late['total']):>9}"
              f"{late['total'] / none['late_chunk']['total']:>9.3f}{_t(mean['total']):>12}"
              f"{mean['total'] / none['video_mean']['total']:>9.3f}")
    print(f"\nideal chunk time and pixel FPS at bf16 dense peak ({PIXEL_FRAMES_PER_CHUNK} pixel frames per chunk)")
    header = "".join(f"{name + ' ms':>14}{name + ' FPS':>15}" for name in PEAK_BF16)
    print(f"{'memory':<16}{header}{'H200 @788 FPS':>15}")
    for kind, s in summaries.items():
        flops = s["late_chunk"]["total"]
        row = "".join(f"{1e3 * flops / peak:>14.1f}{PIXEL_FRAMES_PER_CHUNK * peak / flops:>15.1f}"
                      for peak in PEAK_BF16.values())
        print(f"{kind:<16}{row}{PIXEL_FRAMES_PER_CHUNK * H200_MEASURED_MATMUL / flops:>15.1f}")
    largest = max((sum(s["late_chunk_bytes"].values()) for s in summaries.values() if s.get("late_chunk_bytes")),
                  default=0)
    bscale, bname = next((f, n) for f, n in ((1e9, "GB"), (1e6, "MB"), (1.0, "B")) if largest >= 10 * f or f == 1.0)
    print("\nbytes one late chunk moves through device memory in eager PyTorch (each op's inputs + outputs, unfused; "
          f"counted), {bname}, and the time the non-matmul part alone takes at HBM bandwidth")
    print(f"{'memory':<16}{'matmul/attn':>13}{'elementwise':>13}{'copies/casts':>14}"
          + "".join(f"{name + ' ms':>14}" for name in HBM_BYTES_PER_S))
    for kind, s in summaries.items():
        moved = s.get("late_chunk_bytes")
        if moved:
            rest = moved.get("elementwise/norms", 0) + moved.get("copies/casts/cat", 0)
            columns = (("matmul/attention", 13), ("elementwise/norms", 13), ("copies/casts/cat", 14))
            print(f"{kind:<16}" + "".join(f"{moved.get(c, 0) / bscale:>{w}.1f}" for c, w in columns)
                  + "".join(f"{1e3 * rest / bw:>14.3g}" for bw in HBM_BYTES_PER_S.values()))
    if not is_wan_13b(cfg.model):
        print(f"\nMFU implied by reported FPS: not shown, the published FPS are for Wan2.1-1.3B at 832x480, not "
              f"{cfg.model.name}")
        return
    print("\nMFU implied by reported FPS (one H100, late-chunk FLOPs; whether their FPS includes VAE decoding is "
          "not stated)")
    for label, (kind, fps) in REPORTED_FPS.items():
        if kind in summaries:
            flops = summaries[kind]["late_chunk"]["total"]
            print(f"  {label:<28}{fps:>6.1f} FPS -> {fps / PIXEL_FRAMES_PER_CHUNK * flops / PEAK_BF16['H100 SXM']:.3f}"
                  f"  (chunk {1e3 * PIXEL_FRAMES_PER_CHUNK / fps:.0f} ms vs ideal "
                  f"{1e3 * flops / PEAK_BF16['H100 SXM']:.0f} ms)")


def print_training(train: dict, cfg) -> None:
    rows = train["rows"]
    scale, unit_name = unit(rows["generator"]["total"])

    def _t(x: float) -> str:
        return f"{x / scale:.2f}"

    print(f"\nFLOPs per training update, memory {train['kind']}, backbone {train['backbone']}, gradient checkpointing "
          f"{train['gradient_checkpointing']} (its recompute is in 'backward'), {unit_name}; prefill mean over "
          f"windows = {train['mean_prefill_frames']:.1f} frames, roll = {train['new_chunks']} chunks at window start "
          f"{train['window_start']}, expected exit step {train['mean_exit_step']}")
    names = [k for k in rows["generator"] if k != "parts"]
    print(f"{'phase':<28}{'generator':>12}{'critic':>12}")
    for name in names:
        print(f"{name:<28}{_t(rows['generator'][name]):>12}{_t(rows['critic'][name]):>12}")
    ratio = cfg.trainer.critic_updates_per_generator
    peak = PEAK_BF16["H100 SXM"]
    print(f"1 generator + {ratio} critic updates: {_t(train['cycle_total'])} {unit_name} = "
          f"{train['cycle_total'] / peak:.3g} s at H100/H200 bf16 peak (generator update "
          f"{rows['generator']['total'] / peak:.3g} s, critic update {rows['critic']['total'] / peak:.3g} s)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(REPO / "configs" / "wan2.1-1.3b.yaml"))
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    p.add_argument("--kinds", default="none,frame_bank,frame_bank+sma,slot")
    p.add_argument("--train-kind", default="slot")
    p.add_argument("--backbones", default="full,lora", help="trainer.backbone modes to count the update for")
    p.add_argument("--no-train", action="store_true", help="count the streamed chunks only")
    p.add_argument("--direct", action="store_true",
                   help="count at the real depth instead of extrapolating from 1 and 2 blocks (same numbers, slower)")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "flops.json"))
    args = p.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    t0 = time.perf_counter()
    videos, summaries = {}, {}
    for kind in args.kinds.split(","):
        videos[kind] = count_video(cfg, kind, direct=args.direct, traffic=True)
        summaries[kind] = chunk_summary(videos[kind])
        print(f"  counted {kind}: {time.perf_counter() - t0:.0f} s", flush=True)
    print_chunks(summaries, cfg)
    training = {}
    if not args.no_train:
        for backbone in args.backbones.split(","):
            training[backbone] = count_training(cfg, args.train_kind, backbone, direct=args.direct)
            print(f"  counted training ({backbone}): {time.perf_counter() - t0:.0f} s", flush=True)
            print_training(training[backbone], cfg)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"config": args.config, "overrides": args.overrides, "peak_bf16": PEAK_BF16,
                               "chunks": summaries, "training": training,
                               "seconds": round(time.perf_counter() - t0, 1)}, indent=2, default=float) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
