"""Entity memory on the toy world: does an entity that leaves and returns come back with its hidden attribute?

    python bench/entity_memory.py [--scripts 8] [--samples 2] [--out bench/results/entity_memory.json]

What runs. Scripted 60 s videos (toyworld/scripts.py memory_script: an entity leaves and comes back 30-75
latent frames later, beyond the 12-frame local window) streamed by the 4-step sampler (rollout/streaming.py
``generate``) with the same student backbone for every memory kind: `none` (LongLive: sink + window),
`frame_bank` (MemFlow's NAM), `slot` (SlotMemory); same scripts, same noise seeds. The memory modules are
the pipeline's seeded init (rollout/components.py build_generator) unless --policy names a published policy,
whose memory tensors are loaded where they fit the kind.

What is measured, per kind, by the procedural judge (toyworld/judge.py) on the decoded frames:
  return match   share of scripted returns whose size (the hidden attribute no prompt names) after the return
                 equals the size at first appearance, over the returns where both could be read; 95 %
                 bootstrap interval over returns (BOOTSTRAP resamples)
  readable       returns where both sizes were read / all returns
  adherence      mean per-segment prompt adherence of the videos
  s/chunk        wall time of the streamed generation per 3-frame chunk (decode excluded), and its ratio to
                 `none` measured in the same run
Chance for the return match is about 1/2 (two sizes). The ranking is whatever it is.
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
from toyworld.configs import Artifacts, trained_model_config  # noqa: E402
from toyworld.evaluate import EVAL_SEED, prefix  # noqa: E402
from toyworld.sampling import stream_sample, student_generator  # noqa: E402
from toyworld.scripts import memory_script  # noqa: E402
from toyworld.text import load_text_encoder  # noqa: E402

KINDS = ("none", "frame_bank", "slot")
BOOTSTRAP = 2000


def bootstrap_interval(values: list[float], seed: int = 0) -> tuple[float | None, float | None]:
    """95 % percentile interval of the mean over BOOTSTRAP resamples (None when there is nothing to resample)."""
    if not values:
        return None, None
    v = np.asarray(values, dtype=np.float64)
    means = np.random.default_rng(seed).choice(v, size=(BOOTSTRAP, v.size)).mean(1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def run_kind(kind: str, artifacts: Artifacts, vae, text, scripts: int, samples: int, seed: int,
             policy: Path | None, segments: int | None = None) -> dict:
    gen = student_generator(artifacts.causal_base, memory_kind=kind, policy=policy)
    matches, adherence, seconds, chunks = [], [], 0.0, 0
    for i in range(scripts):
        script = prefix(memory_script(EVAL_SEED + 200 + i), segments)
        t0 = time.perf_counter()
        latents = stream_sample(gen, text, script, seed=seed + i, batch=samples)
        seconds += time.perf_counter() - t0
        chunks += script.num_frames // gen.backbone.cfg.num_frame_per_block
        for frames in vae.decode(latents).numpy():
            reports = judge.detect(frames)
            matches += judge.return_matches(reports, script)
            adherence.append(float(np.mean(judge.segment_adherence(reports, script.prompts, script.switch_frames,
                                                                   script.num_frames))))
    defined = [float(m["match"]) for m in matches if m["match"] is not None]
    low, high = bootstrap_interval(defined, seed)
    return {"return_match": float(np.mean(defined)) if defined else None, "interval_95": [low, high],
            "readable": len(defined), "returns": len(matches), "adherence": float(np.mean(adherence)),
            "s_per_chunk": seconds / chunks, "videos": scripts * samples}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", default=str(Artifacts().root), help="the toy world's trained artifacts")
    ap.add_argument("--policy", default=None, help="a published policy (.safetensors) whose memory tensors to use")
    ap.add_argument("--scripts", type=int, default=8)
    ap.add_argument("--samples", type=int, default=2, help="videos per script (different noise)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--segments", type=int, default=None, help="only each script's first N prompts (smoke runs)")
    ap.add_argument("--kinds", nargs="*", default=list(KINDS), choices=KINDS)
    ap.add_argument("--out", default=None, help="write the table as JSON here")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.manual_seed(args.seed)
    artifacts = Artifacts(root=Path(args.weights))
    if not artifacts.causal_base.is_file():
        sys.exit(f"bench/entity_memory.py: no causal student base at {artifacts.causal_base} (run `make toyworld`)")
    cfg = trained_model_config(artifacts)
    vae, text = build_vae(cfg), load_text_encoder(artifacts.text_encoder)
    rows = {}
    for kind in args.kinds:
        rows[kind] = run_kind(kind, artifacts, vae, text, args.scripts, args.samples, args.seed,
                              Path(args.policy) if args.policy else None, args.segments)
        r = rows[kind]
        print(f"[entity-memory] {kind}: {r['readable']}/{r['returns']} returns read, {r['s_per_chunk']:.3f} s/chunk",
              flush=True)
    base = rows.get("none", {}).get("s_per_chunk")
    print(f"\n{'memory':<11} {'return match':>12} {'95% interval':>15} {'readable':>9} {'adherence':>9} "
          f"{'s/chunk':>8} {'/ none':>7}")
    for kind, r in rows.items():
        match = "-" if r["return_match"] is None else f"{r['return_match']:.3f}"
        lo, hi = r["interval_95"]
        interval = "-" if lo is None else f"[{lo:.2f}, {hi:.2f}]"
        ratio = f"{r['s_per_chunk'] / base:.2f}" if base else "-"
        print(f"{kind:<11} {match:>12} {interval:>15} {r['readable']:>4}/{r['returns']:<4} {r['adherence']:>9.3f} "
              f"{r['s_per_chunk']:>8.3f} {ratio:>7}")
    result = {"rows": rows, "scripts": args.scripts, "samples": args.samples, "segments": args.segments,
              "seed": args.seed, "weights": str(artifacts.root), "policy": args.policy}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
