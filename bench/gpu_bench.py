"""One prepared GPU benchmark: streamed chunk time, pixel FPS and flatness for 'none' and 'slot', and one training
update's time and peak memory, at 832x480 (latent 60x104) bf16 with random weights.

    bash bench/gpu.sh                          # the lent GPU machine: finds a python with torch, runs this
    python bench/gpu_bench.py --shrink         # CPU: the tiny shape, a few chunks (tests/bench/test_gpu_bench.py)

Phases, each written to the JSON as soon as it is done (a run cut short keeps what it measured):
  sdpa      which SDPA kernels accept the model's attention calls (streaming: a chunk against sink + window +
            memory keys; bidirectional: the 21-frame clip), in its [B, L, H, D] -> transpose(1, 2) layout, and
            their times; the kernel the default dispatch picks (profiler kernel names).
  rollout   per memory kind one video of rollout.num_frames (80 chunks) through bench/meta_stream.py's
            stream_video (StreamState: read, 4 denoising steps, clean re-run, write; the switch at the middle of
            rollout.switch_choices as bench/rollout_throughput.py has it) after a 3-chunk warm-up; every chunk
            timed with torch.cuda.synchronize() before each clock read. steady FPS = 12 pixel frames / mean of
            the last 10 chunks; flat = mean(last 10) / mean(chunks 5-14).
  training  generator (slot memory) + critic at the preset's size and the 14B teacher, trainer.backbone as
            configured, then 'full' if time is left: two generator updates and two critic updates
            (bench/meta_stream.py generator_update / critic_update: prefill at the mean window start, roll with
            grad at the last exit step, teacher CFG pair + critic, backward, then a DeepSpeed-like bf16 step:
            fp32 masters + AdamW + clipping). The first update of each includes CUDA warm-up. Gradient
            checkpointing of the blocks is on (bench/memory_accounting.py: without it the activations alone
            exceed 141 GB); on out-of-memory a teacher of the backbone's size replaces the 14B one. The JSON says
            which setting ran and what ran out of memory before it.
  flops     the same shapes counted on the meta device (bench/flops.py) -> achieved TFLOP/s and MFU.
Output: a table, and JSON to $SLOTMEM_BENCH_OUT, else $OUT/gpu_bench.json (the device tool copies $OUT back),
else bench/results/gpu_bench.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for p in (str(REPO), str(REPO / "bench")):
    if p not in sys.path:
        sys.path.insert(0, p)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from meta_count import Meter  # noqa: E402
from meta_stream import critic_update, generator_update, stream_video, teacher_config  # noqa: E402
from model.wan import CausalWanModel  # noqa: E402
from rollout.components import Generator  # noqa: E402
from slotmem.config import load_config, replace  # noqa: E402

PIXEL_FRAMES_PER_CHUNK = 12  # anchors-video §2.1
PEAK_BF16 = 989.4e12  # H100 / H200 SXM bf16 dense (bench/flops.py PEAK_BF16)
EARLY, LATE = range(5, 15), 10  # bench/rollout_throughput.py's flatness windows
WARMUP_CHUNKS = 3


# ----------------------------------------------------------------------------------------------
# setup
# ----------------------------------------------------------------------------------------------


class Clock:
    """Wall time with the device drained first, so a reading covers all work queued before it."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __call__(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()


def peak_bytes(device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def reset_peak(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def build(module_fn, device, dtype):
    """Seeded init on the device (fast for 14B), then the compute dtype, as build_generator casts."""
    torch.manual_seed(0)
    with torch.device(device):
        module = module_fn()
    return module.to(dtype)


class SlotLossMemory:
    """The pipeline's memory with the zero-argument slot_loss() that bench/meta_stream.py calls (Stage I's L_slot)."""

    def __init__(self, memory):
        self._memory = memory

    def __getattr__(self, name):
        return getattr(self._memory, name)

    def slot_loss(self):
        out = self._memory.slot_loss(1)
        out = getattr(out, "total", out)
        return out if out.requires_grad else None


class MixedAdam:
    """DeepSpeed's bf16 recipe on one device: bf16 weights and gradients, fp32 masters + AdamW moments, clipping."""

    def __init__(self, module, trainer_cfg):
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.masters = [p.detach().float().clone() for p in self.params]
        self.clip = trainer_cfg.grad_clip
        self.opt = torch.optim.AdamW(self.masters, lr=trainer_cfg.lr, betas=(trainer_cfg.beta1, trainer_cfg.beta2),
                                     weight_decay=trainer_cfg.weight_decay,
                                     fused=True if self.params and self.params[0].is_cuda else None)

    @torch.no_grad()
    def step(self) -> None:
        for p, m in zip(self.params, self.masters):
            m.grad = None if p.grad is None else p.grad.float()
            p.grad = None
        torch.nn.utils.clip_grad_norm_(self.masters, self.clip)
        self.opt.step()
        for p, m in zip(self.params, self.masters):
            p.copy_(m)
            m.grad = None


# ----------------------------------------------------------------------------------------------
# phases
# ----------------------------------------------------------------------------------------------


def sdpa_check(cfg, device, dtype, clock) -> dict:
    """Which SDPA backends take the model's calls, and how fast (model/wan.py attention: [B, L, H, D] transposed)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    m = cfg.model
    T, chunk = m.tokens_per_frame, m.num_frame_per_block * m.tokens_per_frame
    memory_keys = cfg.memory.retrieve_top_k * cfg.memory.tokens_per_slot
    calls = {"streaming chunk": (chunk, m.local_attn_size * T + memory_keys),
             "bidirectional clip": (cfg.trainer.window_frames * T,) * 2}
    out = {}
    for name, (lq, lk) in calls.items():
        q = torch.randn(1, lq, m.num_heads, m.head_dim, device=device, dtype=dtype).transpose(1, 2)
        k, v = (torch.randn(1, lk, m.num_heads, m.head_dim, device=device, dtype=dtype).transpose(1, 2)
                for _ in range(2))
        row = {"q": lq, "k": lk}
        for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                        SDPBackend.MATH):
            if backend == SDPBackend.MATH and lq * lk > 2e8:
                row[backend.name] = "skipped (materialises the scores)"
                continue
            with warnings.catch_warnings(record=True) as why:  # SDPA says why a backend refuses as warnings
                warnings.simplefilter("always")
                try:
                    with sdpa_kernel(backend):
                        F.scaled_dot_product_attention(q, k, v)
                        t0 = clock()
                        for _ in range(3):
                            F.scaled_dot_product_attention(q, k, v)
                        row[backend.name] = f"{1e3 * (clock() - t0) / 3:.3f} ms"
                except RuntimeError:
                    reasons = "; ".join(str(w.message).splitlines()[0] for w in why)
                    row[backend.name] = f"not eligible ({reasons[:240]})"
        with torch.profiler.profile() as prof:
            F.scaled_dot_product_attention(q, k, v)
            clock()
        row["default kernels"] = sorted({e.key for e in prof.key_averages()
                                         if any(w in e.key.lower() for w in ("attention", "fmha", "flash", "sdpa",
                                                                             "cudnn"))})[:8]
        out[name] = row
    return out


def rollout_phase(cfg, kind: str, device, dtype, clock, num_frames: int, switch: list[int]) -> dict:
    gen = build(lambda: Generator(cfg.model, replace(cfg.memory, kind=kind)), device, dtype).eval()
    chunk = cfg.model.num_frame_per_block
    stream_video(gen.backbone, gen.memory, cfg.model, num_frames=WARMUP_CHUNKS * chunk, switch_frames=[],
                 meter=Meter())
    reset_peak(device)
    stamps = []
    stream_video(gen.backbone, gen.memory, cfg.model, num_frames=num_frames, switch_frames=switch, meter=Meter(),
                 tick=lambda: stamps.append(clock()))
    chunk_s = [b - a for a, b in zip(stamps, stamps[1:])]
    early = statistics.mean(chunk_s[i] for i in EARLY)
    late = statistics.mean(chunk_s[-LATE:])
    result = {"chunk_s": chunk_s, "early_mean_s": early, "late_mean_s": late, "flat": late / early,
              "steady_pixel_fps": PIXEL_FRAMES_PER_CHUNK / late,
              "video_pixel_fps": PIXEL_FRAMES_PER_CHUNK * len(chunk_s) / sum(chunk_s),
              "peak_bytes": peak_bytes(device), "switch_frames": switch}
    del gen
    reset_peak(device)
    return result


def training_attempt(cfg, backbone: str, teacher_cfg, checkpointing: bool, device, dtype, clock, start: int) -> dict:
    teacher = build(lambda: CausalWanModel(teacher_cfg), device, dtype).requires_grad_(False).eval()
    gen = build(lambda: Generator(cfg.model, cfg.memory), device, dtype)
    critic = build(lambda: CausalWanModel(cfg.model), device, dtype)
    if backbone == "lora":
        from trainer.lora import add_lora
        for module in (gen.backbone, critic):
            add_lora(module, rank=cfg.trainer.lora_rank, alpha=cfg.trainer.lora_alpha).to(dtype)
    gen.backbone.gradient_checkpointing = critic.gradient_checkpointing = checkpointing
    opt_g, opt_c = MixedAdam(gen, cfg.trainer), MixedAdam(critic, cfg.trainer)
    state_bytes = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
    kw = dict(start=start, window_frames=cfg.trainer.window_frames, switch_start=None,
              exit_step=len(cfg.model.denoising_steps) - 1, meter=Meter())
    memory = SlotLossMemory(gen.memory)
    reset_peak(device)
    times = {"generator": [], "critic": []}
    for _ in range(2):
        t0 = clock()
        generator_update(gen.backbone, memory, teacher, critic, cfg.model, **kw)
        opt_g.step()
        critic.zero_grad(set_to_none=True)
        times["generator"].append(clock() - t0)
    for _ in range(2):
        t0 = clock()
        critic_update(gen.backbone, memory, critic, cfg.model, **kw)
        opt_c.step()
        times["critic"].append(clock() - t0)
    return {"backbone": backbone, "teacher": f"{teacher_cfg.num_layers} layers, dim {teacher_cfg.dim}",
            "teacher_params": sum(p.numel() for p in teacher.parameters()), "gradient_checkpointing": checkpointing,
            "generator_update_s": times["generator"], "critic_update_s": times["critic"],
            "state_bytes": state_bytes, "peak_bytes": peak_bytes(device), "window_start": kw["start"],
            "exit_step": kw["exit_step"]}


def training_phase(cfg, backbone: str, device, dtype, clock, start: int, checkpointing_first: bool) -> dict:
    """bench/memory_accounting.py counts ~140 GiB of activations for a generator update without checkpointing at
    1.3B, so on one GPU the 14B teacher is tried with checkpointing first, unless asked otherwise."""
    attempts = [(teacher_config(cfg), True), (cfg.model, True)]
    if not checkpointing_first:
        attempts.insert(0, (teacher_config(cfg), False))
    failures = []
    for teacher_cfg, checkpointing in attempts:
        try:
            result = training_attempt(cfg, backbone, teacher_cfg, checkpointing, device, dtype, clock, start)
            result["out_of_memory_before"] = failures
            return result
        except torch.cuda.OutOfMemoryError as e:
            failures.append(f"teacher {teacher_cfg.num_layers}x{teacher_cfg.dim}, checkpointing {checkpointing}: "
                            f"{str(e).splitlines()[0][:160]}")
        finally:
            reset_peak(device)
    return {"backbone": backbone, "out_of_memory_before": failures}


def flops_phase(cfg, kinds, rollout: dict, num_frames: int, direct: bool) -> dict:
    from flops import count_video, parts

    out = {}
    for kind in kinds:
        late = parts(count_video(cfg, kind, num_frames=num_frames, direct=direct)["records"][-1])["total"]
        seconds = rollout[kind]["late_mean_s"]
        out[kind] = {"late_chunk_flops": late, "achieved_tflops": late / seconds / 1e12,
                     "mfu": late / seconds / PEAK_BF16 if rollout[kind]["peak_bytes"] is not None else None}
    return out


# ----------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------


def output_path(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    if os.environ.get("SLOTMEM_BENCH_OUT"):
        return Path(os.environ["SLOTMEM_BENCH_OUT"])
    if os.environ.get("OUT"):
        return Path(os.environ["OUT"]) / "gpu_bench.json"
    return REPO / "bench" / "results" / "gpu_bench.json"


def print_table(result: dict) -> None:
    gib = 1 << 30
    print(f"\n{result['device']} ({result['torch']}), {result['config']}, dtype {result['dtype']}")
    for name, row in result.get("sdpa", {}).items():
        print(f"  sdpa {name} (q {row['q']}, k {row['k']}): " + "; ".join(
            f"{k}: {v}" for k, v in row.items() if k not in ("q", "k")))
    print(f"{'memory':<8}{'ms/chunk 5-14':>15}{'ms/chunk last 10':>18}{'flat':>7}{'steady px FPS':>15}"
          f"{'video px FPS':>14}{'peak GiB':>10}{'MFU':>7}")
    for kind, r in result.get("rollout", {}).items():
        peak = f"{r['peak_bytes'] / gib:.1f}" if r["peak_bytes"] else "-"
        mfu = result.get("flops", {}).get(kind, {}).get("mfu")
        print(f"{kind:<8}{1e3 * r['early_mean_s']:>15.1f}{1e3 * r['late_mean_s']:>18.1f}{r['flat']:>7.3f}"
              f"{r['steady_pixel_fps']:>15.1f}{r['video_pixel_fps']:>14.1f}{peak:>10}"
              f"{'-' if mfu is None else f'{mfu:.3f}':>7}")
    for name, t in result.get("training", {}).items():
        if "generator_update_s" not in t:
            print(f"training {name}: {t.get('skipped') or 'out of memory in every setting: ' + str(t['out_of_memory_before'])}")
            continue
        peak = f"{t['peak_bytes'] / gib:.1f} GiB" if t["peak_bytes"] else "-"
        print(f"training {name}: teacher {t['teacher']}, checkpointing {t['gradient_checkpointing']}: generator "
              f"update {' / '.join(f'{s:.2f}' for s in t['generator_update_s'])} s, critic update "
              f"{' / '.join(f'{s:.2f}' for s in t['critic_update_s'])} s (first includes warm-up), peak {peak}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=None, help="default: configs/wan2.1-1.3b.yaml (configs/tiny-random-60s.yaml with --shrink)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    p.add_argument("--shrink", action="store_true", help="small shape and few chunks (the default without CUDA)")
    p.add_argument("--budget-s", type=float, default=420.0, help="skip phases that would start after this")
    p.add_argument("--window-start", type=int, default=None,
                   help="first generated frame of the training window (default: the mean window start; shrunk: 9)")
    p.add_argument("--no-flops", action="store_true")
    p.add_argument("--try-without-checkpointing", action="store_true",
                   help="first try the training update without gradient checkpointing (expected not to fit at 1.3B)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    t_start = time.perf_counter()
    cuda = torch.cuda.is_available()
    shrink = args.shrink or not cuda
    if shrink and not args.shrink:
        print("gpu_bench: no CUDA device, running the shrunk CPU mode", flush=True)
    config = args.config or str(REPO / "configs" / ("tiny-random-60s.yaml" if shrink else "wan2.1-1.3b.yaml"))
    cfg = load_config(config, args.overrides)
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32  # bf16 matmuls are slow on CPU (rollout/components.py)
    chunk = cfg.model.num_frame_per_block
    num_frames = 9 * chunk * 3 if shrink else cfg.rollout.num_frames  # shrunk: 27 chunks, both windows fit
    choices = cfg.rollout.switch_choices
    switch = [choices[len(choices) // 2]] if choices[len(choices) // 2] < num_frames else [num_frames // 2]
    from flops import mean_window_start
    start = args.window_start if args.window_start is not None else (3 * chunk if shrink else mean_window_start(cfg))
    out = output_path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    clock = Clock(device)
    result = {"config": config, "overrides": args.overrides, "shrink": shrink, "dtype": str(dtype),
              "torch": torch.__version__, "python": platform.python_version(),
              "device": torch.cuda.get_device_name(0) if cuda else platform.processor() or "cpu",
              "latent": [cfg.model.latent_height, cfg.model.latent_width], "num_frames": num_frames}

    def save(phase: str) -> None:
        result["seconds"] = round(time.perf_counter() - t_start, 1)
        out.write_text(json.dumps(result, indent=2, default=str) + "\n")
        print(f"  [{result['seconds']:.0f} s] {phase} done -> {out}", flush=True)

    def time_left() -> float:
        return args.budget_s - (time.perf_counter() - t_start)

    with torch.no_grad():
        result["sdpa"] = sdpa_check(cfg, device, dtype, clock)
    save("sdpa")
    result["rollout"] = {}
    for kind in ("none", "slot"):
        result["rollout"][kind] = rollout_phase(cfg, kind, device, dtype, clock, num_frames, switch)
        save(f"rollout {kind}")
    result["training"] = {}
    for backbone in dict.fromkeys((cfg.trainer.backbone, "full")):
        if time_left() < (0 if shrink else 120):
            result["training"][backbone] = {"skipped": "time budget"}
            continue
        result["training"][backbone] = training_phase(cfg, backbone, device, dtype, clock, start,
                                                      checkpointing_first=not args.try_without_checkpointing)
        save(f"training {backbone}")
    if not args.no_flops and time_left() > (0 if shrink else 60):
        # shrunk: 16 chunks already reach the late chunk's shapes (full window, enough items), and meta is slow:
        # count the few blocks directly instead of at 1 and 2 blocks
        result["flops"] = flops_phase(cfg, ("none", "slot"), result["rollout"], 16 * chunk if shrink else num_frames,
                                      direct=shrink)
        save("flops")
    print_table(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
