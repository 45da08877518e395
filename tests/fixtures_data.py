"""Shared test data: a small committed rollout round, generated in-process (no Ray actors).

Trajectories are real streaming generations of the tiny model (rollout.streaming.generate), written
and committed exactly as rollout actors and the round driver do (write_shard + commit_round).
"""

from __future__ import annotations

import torch

from cluster.storage import Storage
from rollout.components import build_components
from rollout.prompts import BUILTIN_PROMPT_PAIRS
from rollout.shards import TrajectoryRow, commit_round, hash_config, write_shard
from rollout.streaming import encode_prompts, generate
from slotmem.config import Config

ACTOR_ID = "fixture"


def fixture_switch_frame(index: int, num_trajectories: int, num_frames: int, chunk: int) -> int:
    """Chunk-aligned switch frames spread over (0, num_frames) so windows see switches at many offsets."""
    frame = (index + 1) * num_frames // (num_trajectories + 1)
    return min(max(chunk, frame // chunk * chunk), num_frames - chunk)


def make_committed_round(cfg: Config, storage: Storage, round_index: int, num_trajectories: int,
                         num_frames: int, *, policy_version: int = 0) -> dict:
    """Generate `num_trajectories` two-prompt trajectories of `num_frames` latent frames and commit them.

    Returns the round's manifest. Trajectory i uses prompt pair i (cycling over the built-in pairs),
    seed 1000 * round_index + i and a switch frame from ``fixture_switch_frame``.
    """
    chunk = cfg.model.num_frame_per_block
    comps = build_components(cfg.model, cfg.memory, device="cpu", seed=cfg.trainer.seed)
    gen = comps.generator
    files = []
    for i in range(num_trajectories):
        prompts = list(BUILTIN_PROMPT_PAIRS[i % len(BUILTIN_PROMPT_PAIRS)])
        switch = [fixture_switch_frame(i, num_trajectories, num_frames, chunk)]
        seed = 1000 * round_index + i
        with torch.no_grad():
            encoded = encode_prompts(comps.text_encoder, prompts)
            result = generate(gen.backbone, gen.memory, comps.scheduler, cfg.model, encoded, num_frames=num_frames,
                              switch_frames=switch, seed=seed, inspect_memory=False)
        row = TrajectoryRow(trajectory_id=f"r{round_index:04d}-t{i:05d}", round=round_index, actor_id=ACTOR_ID,
                            policy_version=policy_version, seed=seed, prompts=prompts, switch_frames=switch,
                            text_embeddings=encoded.embeddings.cpu(), latents=result.latents[0].cpu())
        files.append(write_shard(storage, round_index, ACTOR_ID, i, [row]))
    return commit_round(storage, round_index, files, config_hash=hash_config(cfg.to_dict()))
