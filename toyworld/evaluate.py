"""Measure the toy world's models with the procedural judge: ``python -m toyworld.evaluate``.

Everything is on held-out scripts and videos (seeds from EVAL_SEED on; training used 0..N) and
deterministic per seed. Numbers (mean, std, n) go to the run's metrics.json:

  vae        PSNR of encode -> decode on held-out 81-frame clips, and the judge's agreement between the
             reconstructions and the ground truth (background, set of colours, shape and size of each
             wholly visible entity, per frame)
  judge      adherence of ground-truth 60 s renders to their own prompts, to another script's
             prompts, and of uniform-noise videos (the judge's own reference points), raw and after
             a VAE round trip
  teacher    adherence of many-step Euler + CFG 3 samples on 21-frame clips (prompts of held-out
             windows), next to the VAE round trip of the ground-truth windows
  student    per-segment adherence of 60 s six-prompt interactive videos from the 4-step streaming
             sampler: the causal base and an untrained (seeded random) student
  memory     hidden-attribute match on return (toyworld/judge.py return_matches) on memory_script
             videos, the causal base with memory kind slot vs none (same weights, same noise)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch

from model.vae import build_vae
from toyworld import judge
from toyworld.configs import Artifacts, trained_model_config, trained_teacher_config
from toyworld.data import window_prompt, window_starts
from toyworld.palette import CLIP_FRAMES, first_pixel_frame, pixel_frames
from toyworld.sampling import euler_sample, load_teacher, stream_sample, student_generator
from toyworld.scripts import interactive_script, memory_script, training_script
from toyworld.text import UNCONDITIONAL_PROMPTS, load_text_encoder
from toyworld.train_vae import EVAL_SEED_OFFSET, held_out_psnr, psnr, random_clip
from toyworld.world import render

EVAL_SEED = EVAL_SEED_OFFSET


def _stats(values: list[float]) -> dict:
    v = np.asarray([x for x in values if x is not None], dtype=np.float64)
    return {"mean": float(v.mean()) if v.size else None, "std": float(v.std()) if v.size else None, "n": int(v.size)}


def _decode(vae, latents: torch.Tensor) -> np.ndarray:
    return vae.decode(latents).numpy()  # [B, T, H, W, 3] uint8


def _roundtrip(vae, video: np.ndarray) -> np.ndarray:
    return _decode(vae, vae.encode(torch.from_numpy(video)[None]))[0]


def prefix(script, num_segments: int | None):
    """The script's first num_segments prompts only (smoke runs), or the script itself."""
    if num_segments is None or num_segments >= len(script.prompts):
        return script
    stop = script.switch_frames[num_segments - 1]
    return dataclasses.replace(script, prompts=script.prompts[:num_segments], num_frames=stop,
                               switch_frames=script.switch_frames[:num_segments - 1],
                               events=tuple(e for e in script.events if e.frame < stop))


def video_adherence(frames: np.ndarray, script) -> float:
    """Mean over the script's segments of the judge's segment adherence."""
    reports = judge.detect(frames)
    return float(np.mean(judge.segment_adherence(reports, script.prompts, script.switch_frames, script.num_frames)))


def judge_agreement(vae, n: int, frames: int = pixel_frames(CLIP_FRAMES), seed: int = 7) -> dict:
    """Per-frame agreement of the judge's reading of VAE round trips with its reading of the held-out clips
    themselves: background, the set of colours, and shape / size of every entity read on the truth."""
    rng = np.random.default_rng(seed)
    frames_seen, background, colours, entities, shape, size, values = 0, 0, 0, 0, 0, 0, []
    for _ in range(n):
        clip, _ = random_clip(rng, frames, seed_offset=EVAL_SEED_OFFSET)
        rec = _roundtrip(vae, clip)
        values.append(psnr(clip, rec))
        for truth, read in zip(judge.detect(clip), judge.detect(rec)):
            frames_seen += 1
            background += truth.background == read.background
            colours += set(truth.entities) == set(read.entities)
            for colour, det in truth.entities.items():
                if det.full:
                    got = read.entities.get(colour)
                    entities += 1
                    shape += got is not None and got.shape == det.shape
                    size += got is not None and got.size == det.size
    return {"psnr_db": float(np.mean(values)), "background": background / frames_seen,
            "colour_set": colours / frames_seen, "shape": shape / max(entities, 1), "size": size / max(entities, 1),
            "frames": frames_seen, "entities_read_on_truth": entities, "clips": f"{n} held-out clips of {frames} frames"}


def eval_judge(vae, n: int, segments: int | None = None) -> dict:
    truth, other, noise, truth_vae = [], [], [], []
    rng = np.random.default_rng(EVAL_SEED)
    for i in range(n):
        script = prefix(interactive_script(EVAL_SEED + i), segments)
        video = render(script.world(EVAL_SEED + i))
        truth.append(video_adherence(video, script))
        other.append(video_adherence(video, prefix(interactive_script(EVAL_SEED + n + i), segments)))
        noise.append(video_adherence(rng.integers(0, 256, video.shape, dtype=np.uint8), script))
        truth_vae.append(video_adherence(_roundtrip(vae, video), script))
    return {"ground_truth": _stats(truth), "other_script_prompts": _stats(other), "uniform_noise": _stats(noise),
            "ground_truth_vae_roundtrip": _stats(truth_vae), "videos": "interactive_script(EVAL_SEED + i), 60 s"}


def teacher_windows(n: int):
    """n held-out (script, world, window start) triples."""
    out, i = [], 0
    rng = np.random.default_rng(EVAL_SEED + 1)
    while len(out) < n:
        script = training_script(EVAL_SEED + i)
        starts = window_starts(script)
        out.append((script, script.world(EVAL_SEED + i), starts[int(rng.integers(len(starts)))]))
        i += 1
    return out


def window_clip(world, start: int) -> np.ndarray:
    """The rendered pixel frames [T, H, W, 3] of the CLIP_FRAMES-latent-frame window starting at latent frame start."""
    p0 = first_pixel_frame(start)
    return render(world, p0, p0 + pixel_frames(CLIP_FRAMES))


def eval_teacher(teacher, vae, text, n: int, seed: int, batch: int = 4) -> dict:
    windows = teacher_windows(n)
    uncond = text.encode([UNCONDITIONAL_PROMPTS[0]])[0]
    sampled, truth = [], []
    for b in range(0, n, batch):
        group = windows[b:b + batch]
        prompts = [window_prompt(s, a) for s, _, a in group]
        latents = euler_sample(teacher, text.encode(prompts)[0], uncond, seed=seed + b)
        for frames, prompt in zip(_decode(vae, latents), prompts):
            sampled.append(np.mean(judge.segment_adherence(judge.detect(frames), [prompt], [], CLIP_FRAMES)))
        for (script, world, a), prompt in zip(group, prompts):
            clip = window_clip(world, a)
            truth.append(np.mean(judge.segment_adherence(judge.detect(_roundtrip(vae, clip)), [prompt], [],
                                                         CLIP_FRAMES)))
    return {"teacher_samples": _stats(sampled), "ground_truth_vae_roundtrip": _stats(truth),
            "clips": f"{n} windows of {CLIP_FRAMES} latent frames of training_script(EVAL_SEED + i)",
            "sampler": "Euler, 40 shifted steps, CFG 3 (trainer convention) against ''", "seed": seed}


def eval_student(gen, vae, text, n_scripts: int, samples: int, seed: int, segments: int | None = None) -> dict:
    scores, per_segment = [], []
    for i in range(n_scripts):
        script = prefix(interactive_script(EVAL_SEED + 100 + i), segments)
        for frames in _decode(vae, stream_sample(gen, text, script, seed=seed + i, batch=samples)):
            reports = judge.detect(frames)
            seg = judge.segment_adherence(reports, script.prompts, script.switch_frames, script.num_frames)
            per_segment.append(seg)
            scores.append(float(np.mean(seg)))
    return {"video_adherence": _stats(scores), "per_segment_mean": np.mean(per_segment, axis=0).tolist(),
            "videos": f"{n_scripts} interactive_script(EVAL_SEED + 100 + i) x {samples} samples, 240 latent frames",
            "seed": seed}


def eval_memory(artifacts: Artifacts, vae, text, n_scripts: int, samples: int, seed: int,
                segments: int | None = None) -> dict:
    out = {}
    for kind in ("slot", "none"):
        gen = student_generator(artifacts.causal_base, memory_kind=kind)
        matches = []
        for i in range(n_scripts):
            script = prefix(memory_script(EVAL_SEED + 200 + i), segments)
            for frames in _decode(vae, stream_sample(gen, text, script, seed=seed + i, batch=samples)):
                matches += judge.return_matches(judge.detect(frames), script)
        defined = [m["match"] for m in matches if m["match"] is not None]
        out[kind] = {"return_match": _stats([float(m) for m in defined]), "returns": len(matches),
                     "unreadable": len(matches) - len(defined)}
    out["videos"] = f"{n_scripts} memory_script(EVAL_SEED + 200 + i) x {samples} samples; same seeds for both kinds"
    out["seed"] = seed
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m toyworld.evaluate", description=__doc__.splitlines()[0])
    ap.add_argument("--weights", default=str(Artifacts().root), help="directory of the trained artifacts")
    ap.add_argument("--quick", action="store_true", help="a smoke run with n = 1-2 everywhere")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", nargs="*", default=["vae", "judge", "teacher", "student", "memory"])
    ap.add_argument("--n", nargs="*", default=[], metavar="KEY=N",
                    help="override sample counts (vae, judge, teacher, scripts, samples, memory, segments)")
    ap.add_argument("--video", default=None, help="judge this video (with its .json) and exit")
    args = ap.parse_args(argv)
    if args.video:
        try:
            print(json.dumps(judge.judge_video(args.video), indent=2))
        except FileNotFoundError as e:
            raise SystemExit(f"toyworld.evaluate --video: {e}") from None
        return
    torch.manual_seed(args.seed)
    artifacts = Artifacts(root=Path(args.weights))
    n = dict(vae=1, judge=1, teacher=2, scripts=1, samples=1, memory=1, segments=3) if args.quick else \
        dict(vae=16, judge=4, teacher=16, scripts=4, samples=2, memory=8, segments=None)
    for item in args.n:
        key, value = item.split("=")
        if key not in n:
            ap.error(f"--n: unknown count {key!r}")
        n[key] = int(value)
    cfg = trained_model_config(artifacts)
    vae, text = build_vae(cfg), load_text_encoder(artifacts.text_encoder)
    metrics = json.loads(artifacts.metrics.read_text()) if artifacts.metrics.is_file() else {}
    t0 = time.time()
    if "vae" in args.only:
        metrics["vae"] = {"held_out_psnr_db": held_out_psnr(vae, num_clips=n["vae"]), "n_clips": n["vae"],
                          "clip_pixel_frames": 81, "judge_agreement": judge_agreement(vae, n["vae"])}
    if "judge" in args.only:
        metrics["judge"] = eval_judge(vae, n["judge"], n["segments"])
    if "teacher" in args.only:
        teacher = load_teacher(trained_teacher_config(artifacts), artifacts.teacher)
        metrics["teacher"] = eval_teacher(teacher, vae, text, n["teacher"], seed=args.seed)
    if "student" in args.only:
        metrics["student"] = {
            "causal_base": eval_student(student_generator(artifacts.causal_base), vae, text, n["scripts"],
                                        n["samples"], seed=args.seed, segments=n["segments"]),
            "untrained": eval_student(student_generator(None), vae, text, n["scripts"], n["samples"], seed=args.seed,
                                      segments=n["segments"])}
    if "memory" in args.only:
        metrics["memory"] = eval_memory(artifacts, vae, text, n["memory"], n["samples"], seed=args.seed,
                                        segments=n["segments"])
    metrics["evaluate_seconds"] = time.time() - t0
    artifacts.metrics.write_text(json.dumps(metrics, indent=2))
    print(json.dumps(metrics, indent=2))
    print(f"[evaluate] wrote {artifacts.metrics} in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
