"""Where the toy teacher fails: drawing a layout from noise, or refining a layout it is given.

    python bench/toy_teacher.py [--clips 8] [--guidance 0 1 3] [--strengths 1.0 0.9 0.8 0.6]
                                [--binding-sigmas 0.8 0.6 0.4]

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

Colour binding, without sampling: the teacher's one-step x0 prediction from the ground truth noised to sigma, its
squared error on the latent positions the entities touch, with the window's prompt, with the same prompt's colour
words permuted (red -> green -> blue -> yellow -> red) and with the empty prompt. permuted/right near 1 means the
teacher does not read the colour words: whatever the prompt, it draws the colours it drew most in training.
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

from model.schedule import build_scheduler  # noqa: E402
from model.vae import build_vae  # noqa: E402
from toyworld import judge  # noqa: E402
from toyworld.configs import LATENT_SIZE, Artifacts, trained_model_config, trained_teacher_config  # noqa: E402
from toyworld.data import window_prompt  # noqa: E402
from toyworld.evaluate import teacher_windows, window_clip  # noqa: E402
from toyworld.language import parse  # noqa: E402
from toyworld.palette import BACKGROUNDS, CLIP_FRAMES, COLOURS, FRAME_SIZE, VAE_TEMPORAL_STRIDE  # noqa: E402
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


ENTITY_DISTANCE = 30  # RGB max-channel distance from the background above which a pixel is an entity's
SPATIAL_STRIDE = FRAME_SIZE // LATENT_SIZE  # the toy VAE: 64x64 pixels -> 16x16 latents
_COLOUR_CYCLE = dict(zip(COLOURS, [*list(COLOURS)[1:], list(COLOURS)[0]]))  # red -> green -> blue -> yellow -> red


def latent_entity_mask(clip: np.ndarray, background: str) -> torch.Tensor:
    """[F, h, w] float: latent positions an entity touches in a rendered clip [T, H, W, 3] -- its pixels away from
    the background, grouped as the VAE groups frames (frame 0 alone, then VAE_TEMPORAL_STRIDE per latent frame) and
    max-pooled over the VAE's spatial stride."""
    away = np.abs(clip.astype(np.int16) - np.array(BACKGROUNDS[background])).max(-1) > ENTITY_DISTANCE  # [T, H, W]
    away = torch.from_numpy(away).float()
    rest = away[1:].unflatten(0, (-1, VAE_TEMPORAL_STRIDE)).amax(1)  # [(T-1)/4, H, W]
    frames = torch.cat([away[:1], rest])  # [F, H, W]
    return torch.nn.functional.max_pool2d(frames[:, None], SPATIAL_STRIDE)[:, 0]  # [F, h, w]


def window_groups(windows, vae, batch: int) -> list[tuple[list[str], torch.Tensor, torch.Tensor]]:
    """The windows in batches: (prompts, ground-truth latents [B, F, C, h, w], entity masks [B, F, h, w])."""
    groups = []
    for b in range(0, len(windows), batch):
        group = windows[b:b + batch]
        clips = np.stack([window_clip(world, a) for _, world, a in group])  # [B, T, H, W, 3]
        masks = torch.stack([latent_entity_mask(clip, world.background) for clip, (_, world, _) in zip(clips, group)])
        prompts = [window_prompt(script, a) for script, _, a in group]
        groups.append((prompts, vae.encode(torch.from_numpy(clips)), masks))
    return groups


def permute_colours(prompt: str) -> str:
    """The prompt with every colour word replaced by the next palette colour (every entity named in a wrong one)."""
    return " ".join(_COLOUR_CYCLE.get(word, word) for word in prompt.split(" "))


@torch.no_grad()
def colour_binding(teacher, text, groups, sigmas: list[float], seed: int) -> list[dict]:
    """Per sigma: the x0 prediction's mean squared error on entity latents with the right prompt, and the ratios of
    the colour-permuted and the empty prompt's error to it (module docstring). groups: (prompts, latents, masks)."""
    scheduler = build_scheduler(teacher.cfg)
    rows = []
    for sigma in sigmas:
        sums = {"right": 0.0, "permuted": 0.0, "empty": 0.0}
        count = 0.0
        for i, (prompts, latents, masks) in enumerate(groups):
            noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(seed + i))
            t = torch.full(latents.shape[:2], sigma * teacher.cfg.num_train_timesteps)  # sigma = t / T
            x_t = scheduler.add_noise(latents, noise, t)
            weight = masks[:, :, None].expand_as(latents)  # [B, F, C, h, w]
            for key, texts in (("right", prompts), ("permuted", [permute_colours(p) for p in prompts]),
                               ("empty", [UNCONDITIONAL_PROMPTS[0]] * len(prompts))):
                flow = teacher(x_t, t, teacher.encode_text(text.encode(texts)[0]), start_frame=0, causal=False)
                x0 = scheduler.flow_to_x0(x_t, flow, t)
                sums[key] += float(((x0 - latents) ** 2 * weight).sum())
            count += float(weight.sum())
        right = sums["right"] / count
        rows.append({"sigma": sigma, "right": right, "permuted_ratio": sums["permuted"] / count / right,
                     "empty_ratio": sums["empty"] / count / right})
    return rows


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
    ap.add_argument("--binding-sigmas", type=float, nargs="*", default=[0.8, 0.6, 0.4],
                    help="sigmas of the colour-binding table (none: skip it)")
    ap.add_argument("--steps", type=int, default=40, help="Euler steps of the full schedule")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="write the table as JSON here")
    args = ap.parse_args(argv)
    for flag, values in (("--strengths", args.strengths), ("--binding-sigmas", args.binding_sigmas)):
        for s in values:
            if not 0 < s <= 1:
                ap.error(f"{flag}: {s} is not in (0, 1]")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    artifacts = Artifacts(root=Path(args.weights))
    if not artifacts.teacher.is_file():
        sys.exit(f"bench/toy_teacher.py: no teacher at {artifacts.teacher} (run `make toyworld`)")
    cfg = trained_model_config(artifacts)
    vae, text = build_vae(cfg), load_text_encoder(artifacts.text_encoder)
    teacher = load_teacher(trained_teacher_config(artifacts), artifacts.teacher)
    uncond = text.encode([UNCONDITIONAL_PROMPTS[0]])[0]

    windows = teacher_windows(args.clips)
    groups = window_groups(windows, vae, args.batch)
    truth = [read_clip(frames, p) for prompts, latents, _ in groups
             for frames, p in zip(vae.decode(latents).numpy(), prompts)]
    binding = colour_binding(teacher, text, groups, args.binding_sigmas, args.seed)
    rows, t0 = [], time.time()
    for strength in args.strengths:
        for g in args.guidance:
            cells = []
            for i, (prompts, latents, _) in enumerate(groups):
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
    if binding:
        print("\ncolour binding: x0 error on entity latents (CFG 0; permuted/right ~ 1: the colour words are not read)")
        print(f"{'sigma':>8} {'right':>8} {'permuted/right':>15} {'empty/right':>12}")
        for r in binding:
            print(f"{r['sigma']:>8g} {r['right']:>8.3f} {r['permuted_ratio']:>15.3f} {r['empty_ratio']:>12.3f}")
    result = {"rows": rows, "binding": binding, "ground_truth_vae_roundtrip": _mean(truth), "clips": len(windows),
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
