"""A short sample of a stage's published policy for MLflow (rank 0, at the end of the stage).

The video uses the first script of the training prompts (a switch half-way) at the same seed for every stage, so
the samples of Stage 0, I and II compare side by side; the slot-assignment picture shows the grouping of the last
chunk. Both are artifacts of the stage's run.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from slotmem.config import Config

SAMPLE_CHUNKS = 4  # length of the end-of-stage sample video in chunks (12 latent frames)


def log_stage_samples(cfg: Config, stage: int, tracker, sample_embeddings: torch.Tensor, device: torch.device,
                      scheduler, *, version: int) -> None:
    from cluster.storage import fetch_weights, resolve_storage
    from model.vae import build_vae
    from rollout.components import build_generator
    from rollout.streaming import generate
    from rollout.video import write_mp4
    from trainer.window import prompts_from_embeddings

    chunk = cfg.model.num_frame_per_block
    num_frames = SAMPLE_CHUNKS * chunk
    storage = resolve_storage(cfg.storage)
    with tempfile.TemporaryDirectory(prefix="slotmem-sample-") as d:
        policy = fetch_weights(storage, version, d)
        gen = build_generator(cfg.model, cfg.memory, device=device, seed=cfg.trainer.seed, policy_path=str(policy))
        emb = sample_embeddings[:2].to(device, next(gen.parameters()).dtype)  # [P, Lt, D]
        switches = [num_frames // 2 // chunk * chunk] if emb.shape[0] > 1 else []
        with torch.no_grad():
            result = generate(gen.backbone, gen.memory, scheduler, cfg.model, prompts_from_embeddings(emb),
                              num_frames=num_frames, switch_frames=switches, seed=cfg.trainer.seed, device=device,
                              inspect_memory=False)
            vae = build_vae(cfg.model, device, torch.float32)
            video = write_mp4(Path(d) / f"stage{stage}_sample.mp4",
                              (piece[0] for piece in vae.decode_iter(result.latents.float())), fps=cfg.rollout.fps)
        tracker.log_artifact(video, "samples")
        if hasattr(gen.memory, "save_assignment_png"):
            ph, pw = cfg.model.patch_size[1:]
            png = gen.memory.save_assignment_png(Path(d) / f"stage{stage}_slots.png",
                                                 height=cfg.model.latent_height // ph, width=cfg.model.latent_width // pw)
            tracker.log_artifact(png, "samples")
