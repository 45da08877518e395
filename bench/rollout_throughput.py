"""Streaming cost per chunk over a 60 s rollout, memory overhead, and rollout throughput with 1 vs 2 actors.

    python bench/rollout_throughput.py [--config configs/tiny-random-60s.yaml] [--set section.field=value ...]
        [--repeats 3] [--warmup-frames N] [--trajectories 8] [--part1-only] [--no-flops]
        [--out bench/results/rollout_throughput.json]

Part 1, in this process: one ``rollout.num_frames`` (240 latent frames = 80 chunks = 60 s) rollout per
memory kind (none = LongLive sink + local window, frame_bank = MemFlow NAM, slot = SlotMemory) with the
same backbone weights, seed and prompt pair. The switch is at the middle entry of
``rollout.switch_choices`` (frame 111 -> chunk 37 by default), so it falls in neither window below.
Every chunk is timed (memory read + 4-step denoise + clean re-run + memory write, + recache at the
switch chunk). Kinds are interleaved within each repeat so load drift on a shared machine hits all
of them alike; per chunk the median over repeats is kept (after one warm-up run per kind).
  flat      = mean(last 10 chunks) / mean(chunks 5-14): a bounded cache and bank keep it near 1.
  overhead  = total chunk time of a kind / that of 'none'.
  CPU ratio = the same with the process's CPU time per video (time.process_time, all threads): steadier than wall
              time on a machine other jobs share (run with OMP_NUM_THREADS=1 so that it counts no spin-waiting).
Next to the measured ratios, the FLOP ratios of the same shape and video (bench/flops.py, counted on the meta
device): where the backbone dominates (configs/cpu-mid.yaml, the 1.3B model) time ratio ~ FLOP ratio; where memory
bookkeeping dominates (configs/tiny-random-60s.yaml) the time ratio is larger.

Part 2, on a local Ray cluster the script starts (``cluster.local_num_cpus`` logical CPUs): the same
rollout round (``--trajectories`` trajectories, shards to a temporary directory) with 1 and then
2 rollout actors. Throughput counts from the first dispatch to the last shard back (actor startup
excluded) and is the pixel frames the latents decode to (4(F-1)+1 per trajectory) per second.
``--part1-only`` skips it (no Ray cluster is started).

All ratios are measured side by side in one run; absolute numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

import torch  # noqa: E402

from rollout.components import build_components  # noqa: E402
from rollout.prompts import BUILTIN_PROMPT_PAIRS, resolve_switch_frames  # noqa: E402
from rollout.streaming import encode_prompts, generate  # noqa: E402
from slotmem.config import Config, load_config, replace  # noqa: E402

MEMORY_KINDS = ("none", "frame_bank", "slot")
EARLY_CHUNKS = range(5, 15)  # chunks 5-14: past the sink chunk, cache still filling
LATE_CHUNKS = 10  # the last 10 chunks of the video


# ----------------------------------------------------------------------------------------------
# part 1: per-chunk latency per memory kind
# ----------------------------------------------------------------------------------------------


def chunk_latencies(cfg: Config, repeats: int, warmup_frames: int | None = None) -> dict[str, dict]:
    chunk = cfg.model.num_frame_per_block
    num_frames = cfg.rollout.num_frames
    choices = cfg.rollout.switch_choices
    switch = resolve_switch_frames(2, num_frames, [choices[len(choices) // 2]], chunk=chunk)
    runners = {}
    for kind in MEMORY_KINDS:
        comps = build_components(cfg.model, replace(cfg.memory, kind=kind), device="cpu", seed=cfg.trainer.seed)
        prompts = encode_prompts(comps.text_encoder, list(BUILTIN_PROMPT_PAIRS[0]))
        gen = comps.generator

        def run(gen=gen, comps=comps, prompts=prompts, frames=num_frames, switch=switch):
            return generate(gen.backbone, gen.memory, comps.scheduler, cfg.model, prompts, num_frames=frames,
                            switch_frames=switch, seed=cfg.rollout.seed, inspect_memory=False).chunk_seconds

        runners[kind] = run
    # warm-up: first-call allocations and kernel selection; a short one switches prompts at its last chunk
    warm = num_frames if warmup_frames is None else min(num_frames, max(2 * chunk, warmup_frames // chunk * chunk))
    for run in runners.values():
        run(frames=warm, switch=switch if warm == num_frames else [warm - chunk])
    samples: dict[str, list[list[float]]] = {kind: [] for kind in MEMORY_KINDS}
    cpu: dict[str, list[float]] = {kind: [] for kind in MEMORY_KINDS}
    for r in range(repeats):
        for kind, run in runners.items():
            c0 = time.process_time()
            samples[kind].append(run())
            cpu[kind].append(time.process_time() - c0)
            print(f"  repeat {r + 1}/{repeats} {kind:<10} {sum(samples[kind][-1]):.2f} s wall, "
                  f"{cpu[kind][-1]:.2f} s CPU", flush=True)
    out = {}
    for kind, runs in samples.items():
        per_chunk = [statistics.median(vals) for vals in zip(*runs)]  # [num_chunks]
        early = statistics.mean(per_chunk[i] for i in EARLY_CHUNKS)
        late = statistics.mean(per_chunk[-LATE_CHUNKS:])
        out[kind] = {"chunk_s": per_chunk, "early_mean_s": early, "late_mean_s": late, "flat": late / early,
                     "total_s": sum(per_chunk), "cpu_s": statistics.median(cpu[kind])}
    for kind in MEMORY_KINDS:
        out[kind]["overhead_vs_none"] = out[kind]["total_s"] / out["none"]["total_s"]
        out[kind]["cpu_overhead_vs_none"] = out[kind]["cpu_s"] / out["none"]["cpu_s"]
    out["switch_frame"] = switch[0]
    return out


# ----------------------------------------------------------------------------------------------
# part 2: rollout throughput, 1 vs 2 actors
# ----------------------------------------------------------------------------------------------


def actor_throughput(cfg: Config, trajectories: int, actor_counts=(1, 2)) -> dict[str, dict]:
    from cluster.runtime import connect
    from rollout.round import run_round

    ray = connect(cfg.cluster)
    out = {}
    try:
        with tempfile.TemporaryDirectory(prefix="slotmem-bench-") as root:
            for n in actor_counts:
                run_cfg = dataclasses.replace(
                    cfg, cluster=replace(cfg.cluster, num_rollout_actors=n),
                    rollout=replace(cfg.rollout, trajectories_per_round=trajectories),
                    storage=replace(cfg.storage, root=root, experiment=f"bench-{n}-actors"))
                res = run_round(run_cfg, 0, progress=False)
                print(f"  {res.summary()}", flush=True)
                out[str(n)] = {k: v for k, v in res.to_dict().items() if k not in ("uri",)}
    finally:
        ray.shutdown()
    one, two = out[str(actor_counts[0])], out[str(actor_counts[-1])]
    out["speedup"] = two["pixel_frames_per_s"] / one["pixel_frames_per_s"]
    return out


# ----------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------


def flop_ratios(cfg: Config) -> dict[str, dict]:
    """FLOPs of the same video per kind (bench/flops.py, meta device) and their ratios to 'none'."""
    sys.path.insert(0, str(REPO / "bench"))
    from flops import count_video, parts

    out = {}
    for kind in MEMORY_KINDS:
        records = count_video(cfg, kind)["records"]
        out[kind] = {"video_flops": sum(parts(r)["total"] for r in records),
                     "late_chunk_flops": parts(records[-1])["total"]}
    for kind in MEMORY_KINDS:
        for key in ("video_flops", "late_chunk_flops"):
            out[kind][key.replace("flops", "ratio")] = out[kind][key] / out["none"][key]
    return out


def print_table(lat: dict, thr: dict | None, cfg: Config, flops: dict | None = None) -> None:
    chunks = len(lat["none"]["chunk_s"])
    print()
    print(f"per-chunk latency, {cfg.model.name} preset, {chunks} chunks ({cfg.rollout.num_frames} latent frames), "
          f"switch at frame {lat['switch_frame']}")
    extra = f"{'FLOP ratio':>12}{'late time ratio':>17}{'late FLOP ratio':>17}" if flops else ""
    print(f"{'memory':<12}{'ms/chunk 5-14':>15}{'ms/chunk last 10':>18}{'flat (last/5-14)':>18}"
          f"{'total s':>10}{'overhead vs none':>18}{'CPU ratio':>11}{extra}")
    for kind in MEMORY_KINDS:
        r = lat[kind]
        row = (f"{flops[kind]['video_ratio']:>12.3f}{r['late_mean_s'] / lat['none']['late_mean_s']:>17.3f}"
               f"{flops[kind]['late_chunk_ratio']:>17.3f}") if flops else ""
        print(f"{kind:<12}{1e3 * r['early_mean_s']:>15.2f}{1e3 * r['late_mean_s']:>18.2f}{r['flat']:>18.3f}"
              f"{r['total_s']:>10.2f}{r['overhead_vs_none']:>18.3f}{r['cpu_overhead_vs_none']:>11.3f}{row}")
    if flops:
        print("(overhead and time ratios measured here; FLOP ratios counted by bench/flops.py for this shape)")
    if thr is None:
        return
    print()
    print("rollout throughput (local Ray cluster, actor startup excluded)")
    print(f"{'actors':<8}{'trajectories':>14}{'traj/s':>10}{'pixel frames/s':>16}{'latent frames/s':>17}"
          f"{'speedup':>9}")
    base = None
    for n, r in thr.items():
        if n == "speedup":
            continue
        base = base or r["pixel_frames_per_s"]
        print(f"{n:<8}{r['num_trajectories']:>14}{r['trajectories_per_s']:>10.3f}{r['pixel_frames_per_s']:>16.1f}"
              f"{r['latent_frames_per_s']:>17.1f}{r['pixel_frames_per_s'] / base:>9.2f}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(REPO / "configs" / "tiny-random-60s.yaml"))
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    p.add_argument("--repeats", type=int, default=5, help="timed rollouts per memory kind (median per chunk)")
    p.add_argument("--warmup-frames", type=int, default=None,
                   help="latent frames of the untimed warm-up rollout per kind (default: a whole video)")
    p.add_argument("--trajectories", type=int, default=8, help="trajectories per throughput round")
    p.add_argument("--part1-only", action="store_true", help="per-chunk latency only: no Ray cluster, no part 2")
    p.add_argument("--no-flops", action="store_true", help="skip counting the FLOP ratios of the same shape")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "rollout_throughput.json"))
    args = p.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    chunks = cfg.rollout.num_frames // cfg.model.num_frame_per_block
    if chunks < max(EARLY_CHUNKS) + 1 + LATE_CHUNKS:
        raise SystemExit(f"rollout.num_frames={cfg.rollout.num_frames} gives {chunks} chunks; the flatness ratio "
                         f"needs at least {max(EARLY_CHUNKS) + 1 + LATE_CHUNKS}")
    t0 = time.perf_counter()
    print(f"part 1: per-chunk latency, memory kinds {list(MEMORY_KINDS)}, {args.repeats} repeat(s)", flush=True)
    lat = chunk_latencies(cfg, args.repeats, args.warmup_frames)
    flops = None if args.no_flops else flop_ratios(cfg)
    thr = None
    if not args.part1_only:
        print("part 2: rollout throughput with 1 and 2 actors", flush=True)
        thr = actor_throughput(cfg, args.trajectories)
    print_table(lat, thr, cfg, flops)
    result = {
        "config": args.config, "overrides": args.overrides, "repeats": args.repeats,
        "warmup_frames": args.warmup_frames,
        "machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "platform": platform.platform(), "torch": torch.__version__},
        "latency": lat, "flops": flops, "throughput": thr, "seconds": round(time.perf_counter() - t0, 1),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
