"""`slotmem generate`: stream a single-prompt or interactive video to mp4 (+ JSON sidecar).

Single prompt: ``--prompt "..."`` generates ``rollout.single_prompt_frames`` (120) latent frames.
Interactive: ``--prompts script.jsonl`` generates ``rollout.num_frames`` (240) latent frames with
switches at ``--switch-frames`` (default 40,80,120,160,200; Appendix A.3).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from rollout.components import Components, build_components
from rollout.prompts import load_interactive_script, resolve_switch_frames
from rollout.streaming import encode_prompts, generate
from rollout.video import write_mp4, write_sidecar
from slotmem.config import Config
from slotmem.errors import InputError


def parse_switch_frames(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise InputError(f"--switch-frames must be comma-separated integers, got {text!r}") from None


def render_video(cfg: Config, *, prompts: list[str], switch_frames: list[int], num_frames: int, seed: int,
                 output: str | Path, device: str | None = None, policy_path: str | None = None,
                 progress: bool = True, extra_meta: dict | None = None, components: Components | None = None,
                 vae=None) -> dict:
    """Generate, decode with the VAE and write ``output`` (mp4) + sidecar; returns the sidecar dict.

    components / vae: already built ones (a rollout actor renders the pipeline's sample with its own policy);
    otherwise they are built from cfg (+ policy_path).
    """
    from model.vae import build_vae

    t0 = time.perf_counter()
    comps = components or build_components(cfg.model, cfg.memory, device=device, seed=cfg.trainer.seed,
                                           policy_path=policy_path)
    gen = comps.generator
    encoded = encode_prompts(comps.text_encoder, prompts)
    t_build = time.perf_counter() - t0
    result = generate(gen.backbone, gen.memory, comps.scheduler, cfg.model, encoded, num_frames=num_frames,
                      switch_frames=switch_frames, seed=seed, device=comps.device, progress=progress)
    t_gen = time.perf_counter() - t0 - t_build
    vae = vae or build_vae(cfg.model, comps.device, torch.float32)
    with torch.no_grad():  # decode latent frame by latent frame straight into the encoder: flat memory
        pieces = (piece[0] for piece in vae.decode_iter(result.latents.float(), progress=progress))  # [t, H, W, 3]
        out = write_mp4(output, pieces, fps=cfg.rollout.fps)
    t_dec = time.perf_counter() - t0 - t_build - t_gen
    pixel_frames = vae.num_pixel_frames(num_frames)
    meta = {
        "prompts": prompts,
        "switch_frames": switch_frames,
        "seed": seed,
        "num_latent_frames": num_frames,
        "num_pixel_frames": pixel_frames,
        "fps": cfg.rollout.fps,
        "memory_kind": cfg.memory.kind,
        "policy": policy_path,
        "events": [e.__dict__ for e in result.events],
        "timings": {
            "build_s": round(t_build, 3),
            "generate_s": round(t_gen, 3),
            "decode_and_write_s": round(t_dec, 3),
            "chunk_s_mean": round(sum(result.chunk_seconds) / len(result.chunk_seconds), 5),
            "generated_pixel_frames_per_s": round(pixel_frames / max(t_gen, 1e-9), 2),
        },
        "memory": result.memory_records[-1] if result.memory_records else {},
        **(extra_meta or {}),
    }
    write_sidecar(out, meta)
    return meta


def main(args, cfg: Config) -> int:
    from slotmem.config import check_weights

    check_weights(cfg, "generate")
    if (args.prompt is None) == (args.prompts is None):
        raise InputError("give exactly one of --prompt TEXT (single prompt) or --prompts FILE (interactive script)")
    if args.prompt is not None:
        if not args.prompt.strip():
            raise InputError("--prompt must not be empty")
        prompts = [args.prompt]
        num_frames = args.num_frames or cfg.rollout.single_prompt_frames
        given = parse_switch_frames(args.switch_frames)
        if given:
            raise InputError("--switch-frames needs an interactive script (--prompts FILE)")
        switch_frames: list[int] = []
    else:
        script = load_interactive_script(args.prompts)
        prompts = list(script.prompts)
        num_frames = args.num_frames or cfg.rollout.num_frames
        given = parse_switch_frames(args.switch_frames)
        if given is None and script.switch_frames is not None:
            given = list(script.switch_frames)
        switch_frames = resolve_switch_frames(len(prompts), num_frames, given, default=cfg.rollout.switch_frames,
                                              chunk=cfg.model.num_frame_per_block,
                                              source="--switch-frames" if args.switch_frames else str(args.prompts))
    if num_frames % cfg.model.num_frame_per_block or num_frames <= 0:
        raise InputError(f"--num-frames must be a positive multiple of {cfg.model.num_frame_per_block}, got {num_frames}")
    meta = render_video(cfg, prompts=prompts, switch_frames=switch_frames, num_frames=num_frames, seed=args.seed,
                        output=args.output, device=args.device, policy_path=args.policy)
    t = meta["timings"]
    print(f"wrote {args.output} ({meta['num_pixel_frames']} frames at {meta['fps']} fps, "
          f"{len(prompts)} prompt(s), switches {switch_frames}); generate {t['generate_s']} s "
          f"({t['generated_pixel_frames_per_s']} frames/s), decode+write {t['decode_and_write_s']} s")
    print(f"sidecar: {Path(args.output).with_suffix('.json')}")
    return 0


__all__ = ["main", "render_video", "parse_switch_frames"]
