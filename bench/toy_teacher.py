"""Where the toy teacher fails: drawing a layout from noise, or refining a layout it is given.

    python bench/toy_teacher.py [--clips 8] [--guidance 0 1 3] [--strengths 1.0 0.9 0.8 0.6]

What runs. Held-out 21-latent-frame windows (toyworld/evaluate.py's teacher windows: prompts of
training_script(EVAL_SEED + i), never trained on). Each window's ground-truth clip is rendered and encoded by
the toy VAE; every cell of the table samples the teacher (toyworld/sampling.py ``euler_sample``: Euler on the
40-step shifted schedule) from that clip noised to sigma = strength (SDEdit) at CFG scale g, with the same noise
in every cell. Strength 1.0 is pure noise: the teacher's ordinary sample, what DMD distils.

What is measured on the decoded clips by the procedural judge (toyworld/judge.py), per cell:
  adherence   the judge's prompt adherence of the window (toyworld.evaluate's teacher metric)
  present     share of (frame, prompted entity) pairs where an entity of that colour is read
  spurious    colours read per frame that the prompt does not name (the junk blobs)
and the ground truth's VAE round trip as the ceiling. If strength 0.8 comes back clean while 1.0 does not, the
denoiser knows the shapes and what fails is choosing one layout from noise; if spurious rises with g, guidance
draws the junk.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.vae import build_vae  # noqa: E402
from toyworld import judge  # noqa: E402
from toyworld.configs import Artifacts, teacher_model_config, trained_model_config  # noqa: E402
from toyworld.data import window_prompt  # noqa: E402
from toyworld.evaluate import teacher_windows, window_clip  # noqa: E402
from toyworld.language import parse  # noqa: E402
from toyworld.palette import CLIP_FRAMES  # noqa: E402
from toyworld.sampling import euler_sample, load_teacher  # noqa: E402
from toyworld.text import UNCONDITIONAL_PROMPTS, load_text_encoder  # noqa: E402


def read_clip(frames: np.ndarray, prompt: str) -> dict:
    """adherence, present, spurious of one decoded clip [T, H, W, 3] against its prompt."""
    reports = judge.detect(frames)
    scene = parse(prompt)
    named = {c for c, _ in (*scene.present, *scene.absent)}
    present = [c in r.entities for r in reports for c, _ in scene.present]
    return {"adherence": float(np.mean(judge.segment_adherence(reports, [prompt], [], CLIP_FRAMES))),
            "present": float(np.mean(present)) if present else None,
            "spurious": float(np.mean([len(set(r.entities) - named) for r in reports]))}


def _mean(rows: list[dict]) -> dict:
    out = {}
    for key in rows[0]:
        values = [r[key] for r in rows if r[key] is not None]
        out[key] = float(np.mean(values)) if values else None
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", default=str(Artifacts().root), help="the toy world's trained artifacts")
    ap.add_argument("--clips", type=int, default=8, help="held-out windows")
    ap.add_argument("--guidance", type=float, nargs="+", default=[0.0, 1.0, 3.0])
    ap.add_argument("--strengths", type=float, nargs="+", default=[1.0, 0.9, 0.8, 0.6],
                    help="sigma the ground truth is noised to before sampling (1.0: pure noise)")
    ap.add_argument("--steps", type=int, default=40, help="Euler steps of the full schedule")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="write the table as JSON here")
    args = ap.parse_args(argv)
    for s in args.strengths:
        if not 0 < s <= 1:
            ap.error(f"--strengths: {s} is not in (0, 1]")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    artifacts = Artifacts(root=Path(args.weights))
    if not artifacts.teacher.is_file():
        sys.exit(f"bench/toy_teacher.py: no teacher at {artifacts.teacher} (run `make toyworld`)")
    cfg = trained_model_config(artifacts)
    vae, text = build_vae(cfg), load_text_encoder(artifacts.text_encoder)
    teacher = load_teacher(teacher_model_config(), artifacts.teacher)
    uncond = text.encode([UNCONDITIONAL_PROMPTS[0]])[0]

    windows = teacher_windows(args.clips)
    groups = []  # (prompts, ground-truth latents [B, F, C, h, w])
    for b in range(0, len(windows), args.batch):
        group = windows[b:b + args.batch]
        clips = np.stack([window_clip(world, a) for _, world, a in group])  # [B, T, H, W, 3]
        groups.append(([window_prompt(script, a) for script, _, a in group], vae.encode(torch.from_numpy(clips))))
    truth = [read_clip(frames, p) for prompts, latents in groups
             for frames, p in zip(vae.decode(latents).numpy(), prompts)]
    rows, t0 = [], time.time()
    for strength in args.strengths:
        for g in args.guidance:
            cells = []
            for i, (prompts, latents) in enumerate(groups):
                sample = euler_sample(teacher, text.encode(prompts)[0], uncond, seed=args.seed + i, steps=args.steps,
                                      guidance=g, start=latents, start_sigma=strength)
                cells += [read_clip(frames, p) for frames, p in zip(vae.decode(sample).numpy(), prompts)]
            rows.append({"strength": strength, "guidance": g, **_mean(cells)})
            print(f"[toy-teacher] strength {strength:g} CFG {g:g}: adherence {rows[-1]['adherence']:.3f} "
                  f"({time.time() - t0:.0f}s)", flush=True)

    print(f"\n{len(windows)} held-out windows; ground truth through the VAE: " + _line(_mean(truth)))
    print(f"{'strength':>8} {'CFG':>4} {'adherence':>9} {'present':>8} {'spurious':>8}")
    for r in rows:
        present = "-" if r["present"] is None else f"{r['present']:.2f}"
        print(f"{r['strength']:>8g} {r['guidance']:>4g} {r['adherence']:>9.3f} {present:>8} {r['spurious']:>8.2f}")
    result = {"rows": rows, "ground_truth_vae_roundtrip": _mean(truth), "clips": len(windows),
              "steps": args.steps, "seed": args.seed, "weights": str(artifacts.root)}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


def _line(m: dict) -> str:
    present = "-" if m["present"] is None else f"{m['present']:.2f}"
    return f"adherence {m['adherence']:.3f}, present {present}, spurious {m['spurious']:.2f}"


if __name__ == "__main__":
    main()
