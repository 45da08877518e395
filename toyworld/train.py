"""Train everything the toy world needs: ``python -m toyworld.train all`` (``make toyworld``).

Stages, each reading the artifacts of the stages before it from the run directory (toyworld/weights/
unless --out is given), each deterministic in --seed:

  vae       tiny Wan VAE, reconstruction of rendered 5-frame clips      -> vae/ (diffusers)
  vae_temporal  its fine-tune on 13-frame clips (every cache at its steady state), latent statistics
  text      tiny umT5 with its fixed seeded weights                      -> text_encoder/ (transformers)
  data      60 s training videos encoded by the VAE, and the teacher's   -> toyworld/.cache/ (git-ignored)
            wide set: the first seconds of many more scripts
  teacher   bidirectional teacher, flow matching on the wide set: 6-frame -> teacher.safetensors + teacher.json
            windows, then the trainer's 21-frame ones
  student   bidirectional student-sized base (the critic's init)         -> student_bidirectional.safetensors
  causal    causal few-step base, streaming teacher forcing with memory  -> student_causal.safetensors

``all`` runs them in order; a stage can be rerun alone. Every stage prints a progress line per N steps
and a summary; training.json in the run directory records steps, losses and seconds per stage.
--quick shrinks every budget to a smoke run (seconds, useless weights) for tests and CI; --budget KEY=N
changes one budget (e.g. ``--budget teacher_steps=1400`` to measure a longer teacher into another --out).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from pathlib import Path

import torch

from model.vae import build_vae
from model.weights import WEIGHTS_MODE, read_checkpoint
from toyworld.configs import TEACHER, Artifacts, student_model_config, teacher_model_config, trained_model_config
from toyworld.data import load_or_build
from toyworld.text import load_text_encoder, save_text_encoder
from toyworld.train_causal import train_causal
from toyworld.train_flow import Phase, train_bidirectional
from toyworld.train_vae import TEMPORAL_CLIP_PIXEL_FRAMES, train_vae

STAGES = ("vae", "vae_temporal", "text", "data", "teacher", "student", "causal")
# budgets of the full run (sized for < 45 min on 2 CPU cores) and of --quick
FULL = dict(vae_steps=900, vae_batch=8, vae_temporal_steps=600, stats_videos=24, stats_frames=21, psnr_clips=4,
            num_scripts=12, videos_per_script=2, data_frames=None, teacher_scripts=240, teacher_data_frames=30,
            teacher_steps=1300, teacher_batch=16, teacher_frames=6, teacher_tail_steps=80, teacher_tail_batch=4,
            student_steps=700, student_batch=8, causal_passes=72, causal_frames=240)
# The teacher's data and windows (README "The toy world", colour binding): 12 scripts hold 33 distinct prompts and
# name red in 10 % of windows (blue / green / yellow 40 %); 240 scripts' first 30 latent frames (7 s) balance the
# colours (33-38 % each) for the cost of encoding 2 of the long videos' minutes. 6-frame windows: at batch 16 a step
# sees ~40 objects for the compute of 4-5 21-frame windows; the tail adapts it to the 21-frame windows DMD scores.
# flow-matching peak rate of teacher and critic base: at 3e-4 the loss was 1.56 after 150 steps, at 1e-3 1.40
FLOW_LR = 1e-3
QUICK = dict(vae_steps=2, vae_batch=2, vae_temporal_steps=1, stats_videos=1, stats_frames=6, psnr_clips=1,
             num_scripts=2, videos_per_script=2, data_frames=24, teacher_scripts=2, teacher_data_frames=24,
             teacher_steps=2, teacher_batch=2, teacher_frames=6, teacher_tail_steps=1, teacher_tail_batch=1,
             student_steps=2, student_batch=2, causal_passes=1, causal_frames=12)


def _datasets(artifacts: Artifacts, budget: dict, cache: Path | None):
    """(the long videos of the students, the teacher's wide set)."""
    vae = build_vae(trained_model_config(artifacts))
    kwargs = {"cache_dir": cache} if cache is not None else {}
    long = load_or_build(vae, budget["num_scripts"], budget["videos_per_script"], budget["data_frames"], **kwargs)
    wide = load_or_build(vae, budget["teacher_scripts"], 1, budget["teacher_data_frames"], **kwargs)
    return long, wide


def run(stages, artifacts: Artifacts, budget: dict, seed: int = 0, cache: Path | None = None) -> dict:
    artifacts.root.mkdir(parents=True, exist_ok=True)
    summary = json.loads(artifacts.training_summary.read_text()) if artifacts.training_summary.is_file() else {}
    data = wide = text = None
    t_all = time.time()
    for stage in stages:
        t0, cpu0 = time.time(), _cpu_seconds()
        print(f"[train] stage {stage}", flush=True)
        if stage == "vae":
            summary["vae"] = train_vae(artifacts.vae, steps=budget["vae_steps"], batch=budget["vae_batch"], seed=seed,
                                       measure=False)
        elif stage == "vae_temporal":
            summary["vae_temporal"] = train_vae(
                artifacts.vae, steps=budget["vae_temporal_steps"], batch=budget["vae_batch"], lr=1.5e-3, seed=seed,
                frames=TEMPORAL_CLIP_PIXEL_FRAMES, init=artifacts.vae, stats_videos=budget["stats_videos"],
                stats_frames=budget["stats_frames"], psnr_clips=budget["psnr_clips"])
        elif stage == "text":
            save_text_encoder(artifacts.text_encoder)
            summary["text"] = {"path": artifacts.text_encoder.name}
        else:
            text = text or load_text_encoder(artifacts.text_encoder)
            if data is None:
                data, wide = _datasets(artifacts, budget, cache)
            if stage == "data":
                summary["data"] = {"scripts": len(data.scripts), "videos_per_script": data.latents.shape[1],
                                   "latent_frames": data.latents.shape[2], "teacher_scripts": len(wide.scripts),
                                   "teacher_latent_frames": wide.latents.shape[2]}
            elif stage == "teacher":
                phases = [Phase(budget["teacher_steps"], budget["teacher_batch"], budget["teacher_frames"]),
                          Phase(budget["teacher_tail_steps"], budget["teacher_tail_batch"])]
                _, summary["teacher"] = train_bidirectional(
                    "teacher", teacher_model_config(), wide, text, artifacts.teacher, phases=phases, lr=FLOW_LR,
                    seed=seed)
                artifacts.teacher_json.write_text(json.dumps(TEACHER, indent=2) + "\n")
            elif stage == "student":
                _, summary["student"] = train_bidirectional(
                    "student", student_model_config(), data, text, artifacts.critic_base,
                    phases=[Phase(budget["student_steps"], budget["student_batch"])], lr=FLOW_LR, seed=seed)
            elif stage == "causal":
                init = read_checkpoint(artifacts.critic_base)  # the saved (float16) bidirectional base
                _, summary["causal"] = train_causal(
                    data, text, {k: v.float() for k, v in init.items()}, artifacts.causal_base,
                    passes=budget["causal_passes"], lr=1e-4, seed=seed, num_frames=budget["causal_frames"])
        summary.setdefault("stage_seconds", {})[stage] = time.time() - t0
        # CPU seconds and the machine's load tell a quiet-machine time apart from one shared with other jobs
        summary.setdefault("stage_cpu_seconds", {})[stage] = _cpu_seconds() - cpu0
        summary.setdefault("stage_load_average", {})[stage] = os.getloadavg()[0]
        artifacts.training_summary.write_text(json.dumps(summary, indent=2))
        _group_readable(artifacts.root)
    total = time.time() - t_all
    print(f"[train] finished {', '.join(stages)} in {total:.0f}s ({total / 60:.1f} min, "
          f"{sum(summary['stage_cpu_seconds'][s] for s in stages):.0f} CPU s): "
          + ", ".join(f"{s} {summary['stage_seconds'][s]:.0f}s" for s in stages), flush=True)
    return summary


def with_overrides(budget: dict, overrides: list[str]) -> dict:
    """budget with KEY=N overrides applied; an unknown key or a value that is not a whole number is an error
    naming it (data_frames also takes 'none': whole videos)."""
    out = dict(budget)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or key not in budget:
            raise SystemExit(f"--budget {item!r}: expected KEY=N with KEY one of {', '.join(sorted(budget))}")
        if key == "data_frames" and value.lower() == "none":
            out[key] = None
            continue
        try:
            out[key] = int(value)
        except ValueError:
            raise SystemExit(f"--budget {key}: {value!r} is not a whole number") from None
        if out[key] < 1:
            raise SystemExit(f"--budget {key}: must be >= 1, got {out[key]}")
    return out


def _group_readable(root: Path) -> None:
    """safetensors creates its files 0600 (diffusers' and transformers' save_pretrained included)."""
    for f in root.rglob("*"):
        if f.is_file():
            f.chmod(WEIGHTS_MODE)


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m toyworld.train", description=__doc__.splitlines()[0])
    ap.add_argument("stages", nargs="+", choices=("all", *STAGES))
    ap.add_argument("--out", default=str(Artifacts().root), help="run directory (default: the committed weights)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="smoke-test budgets")
    ap.add_argument("--cache", default=None, help="latent cache directory (default toyworld/.cache)")
    ap.add_argument("--budget", nargs="*", default=[], metavar="KEY=N",
                    help=f"change a budget of the full (or --quick) run; keys: {', '.join(FULL)}")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.manual_seed(args.seed)
    stages = STAGES if "all" in args.stages else tuple(s for s in STAGES if s in args.stages)
    budget = with_overrides(QUICK if args.quick else FULL, args.budget)
    run(stages, Artifacts(root=Path(args.out)), budget, seed=args.seed,
        cache=Path(args.cache) if args.cache else None)


if __name__ == "__main__":
    main()
