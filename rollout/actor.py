"""The rollout actor: one Ray actor role, self-rollout generation + shard writing (DESIGN §4).

A ``RolloutActor`` builds its generator once, then serves ``generate_trajectory`` calls from the
round driver (rollout/round.py). Before every trajectory it looks for a newer published policy
version and loads it (anchors-infra §8.4: weight sync is a versioned publish that actors pick up
between videos, so no collective group spans rollout and training). Each trajectory becomes one
parquet shard ``part-{actor_id}-{traj_index:05d}.parquet`` (rollout/shards.py), and the actor
returns its ``ShardFile``; only the driver commits a round.

What a trajectory is (seed, prompts, switch frames) is decided by the driver in a
``TrajectorySpec`` that depends only on (rollout.seed, round, trajectory index). A trajectory
retried after an actor restart, or moved to another actor, therefore produces the same latents, and
its file name (``seq`` = trajectory index) is the one an uncommitted earlier attempt may have left.

The class is plain Python; the worker group makes it remote (``ray.remote(RolloutActor)``) with
its placement, restart and retry options, and tests may also drive it in-process.
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from cluster.storage import Storage, fetch_weights, latest_policy_version, policy_meta
from model.weights import load_state_dict_file
from rollout.components import Components, build_components
from rollout.shards import TrajectoryRow, write_shard
from rollout.streaming import encode_prompts, generate
from slotmem.config import MemoryConfig, ModelConfig, RolloutConfig
from slotmem.errors import InputError


@dataclass(frozen=True)
class TrajectorySpec:
    """Everything that decides a trajectory's content; made by the driver, never by an actor."""

    round_index: int
    traj_index: int
    prompts: tuple[str, ...]
    switch_frames: tuple[int, ...]
    """Effective latent switch frames (chunk starts), len(prompts) - 1 of them."""
    seed: int

    @property
    def trajectory_id(self) -> str:
        return f"r{self.round_index:04d}-t{self.traj_index:05d}"


class RolloutActor:
    """Self-rollout generation for one device; writes one shard per trajectory."""

    def __init__(self, actor_id: str, storage: Storage, *, model_cfg: ModelConfig, memory_cfg: MemoryConfig,
                 rollout_cfg: RolloutConfig, init_seed: int, device: str | None = None):
        t0 = time.perf_counter()
        self.actor_id = actor_id
        self.storage = storage
        self.model_cfg = model_cfg
        self.rollout_cfg = rollout_cfg
        # init_seed = the trainer's seed, so policy version 0 is the same network the trainer starts from
        comps = build_components(model_cfg, memory_cfg, device=device, seed=init_seed)
        self.generator = comps.generator
        self.scheduler = comps.scheduler
        self.text_encoder = comps.text_encoder
        self.device = comps.device
        self.loaded_version: int | None = None  # None: the initial weights (policy_version 0)
        self.loaded_sha256: str | None = None  # of the loaded version's file
        self.build_s = time.perf_counter() - t0

    @property
    def policy_version(self) -> int:
        return 0 if self.loaded_version is None else self.loaded_version

    # -- control ------------------------------------------------------------------------------

    def pid(self) -> int:
        return os.getpid()

    def track_system(self, run_id: str, tracking_uri: str) -> bool:
        """Sample this node's CPU, memory and GPUs into MLflow run `run_id` under the node id
        ``rollout-<actor>.<ray node>`` (the fleet asks one actor per node); False if system metrics are unavailable."""
        from cluster.tracking import node_label, start_system_metrics

        if getattr(self, "_monitor", None) is None:
            self._monitor = start_system_metrics(run_id, tracking_uri=tracking_uri,
                                                 node_id=node_label(f"rollout-{self.actor_id}", _node_id()[:12]))
        return self._monitor is not None

    def ready(self) -> dict:
        """Identity of this process (the driver logs it and counts restarts by pid)."""
        return {"actor_id": self.actor_id, "pid": os.getpid(), "host": socket.gethostname(), "node": _node_id(),
                "device": str(self.device), "policy_version": self.policy_version, "build_s": round(self.build_s, 3)}

    # -- weights ------------------------------------------------------------------------------

    def sync_weights(self) -> float:
        """Load the newest published policy version if it is not the one loaded; returns seconds spent.

        A version is known by its number and its sha256: a trainer attempt restarted from a checkpoint re-publishes
        (supersedes) the versions its failed attempt published after that checkpoint, with other bytes."""
        t0 = time.perf_counter()
        latest = latest_policy_version(self.storage)
        if latest is None:
            return time.perf_counter() - t0
        try:
            sha = policy_meta(self.storage, latest)["sha256"]
        except InputError:  # its marker is being replaced by a superseding publish: keep what is loaded for now
            return time.perf_counter() - t0
        if (latest, sha) == (self.loaded_version, self.loaded_sha256):
            return time.perf_counter() - t0
        # the file lives only while it is read: a killed actor (ray.kill runs no finalizers) leaves nothing behind
        with tempfile.TemporaryDirectory(prefix=f"slotmem-{self.actor_id}-weights-") as tmp:
            state = load_state_dict_file(fetch_weights(self.storage, latest, tmp))
        missing, unexpected = self.generator.load_state_dict(state, strict=False)
        if missing or unexpected:
            where = self.storage.uri(self.storage.weights_dir(latest))
            raise InputError(f"published policy version {latest} ({where}) "
                             f"does not match the generator: {len(missing)} missing (e.g. {missing[:3]}), "
                             f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")
        self.loaded_version, self.loaded_sha256 = latest, sha
        return time.perf_counter() - t0

    # -- sample videos -------------------------------------------------------------------------

    def render_sample(self, cfg_dict: dict, *, prompts: list[str], switch_frames: list[int], num_frames: int,
                      seed: int, name: str) -> dict:
        """Render a video with the newest published policy and publish it (mp4 + JSON sidecar) under
        {root}/{experiment}/samples/ (the pipeline's sample runs here, on a rollout GPU, never on the head)."""
        from model.vae import build_vae
        from rollout.generate import render_video
        from rollout.video import sidecar_path
        from slotmem.config import build_config

        self.sync_weights()
        cfg = build_config(cfg_dict)
        if not hasattr(self, "_vae"):
            self._vae = build_vae(self.model_cfg, self.device, torch.float32)
        comps = Components(self.generator, self.scheduler, self.text_encoder, self.device)
        with tempfile.TemporaryDirectory(prefix="slotmem-sample-") as d:
            video = Path(d) / f"{name}.mp4"
            meta = render_video(cfg, prompts=prompts, switch_frames=switch_frames, num_frames=num_frames, seed=seed,
                                output=video, progress=False, components=comps, vae=self._vae,
                                extra_meta={"policy_version": self.policy_version})
            uris = {}
            for path in (video, sidecar_path(video)):
                self.storage.upload_file(path, self.storage.path("samples", path.name))
                uris[path.suffix.lstrip(".")] = self.storage.uri(self.storage.path("samples", path.name))
        return {"meta": meta, "uris": uris, "policy_version": self.policy_version}

    # -- the role -----------------------------------------------------------------------------

    def generate_trajectory(self, spec: TrajectorySpec) -> dict:
        """Roll out ``rollout.num_frames`` latent frames for ``spec`` and write them as one shard.

        Returns {"shard": ShardFile dict, "trajectory_id", "actor_id", "pid", "policy_version",
        "timings": seconds per phase}.
        """
        t0 = time.perf_counter()
        load_s = self.sync_weights()
        t1 = time.perf_counter()
        gen = self.generator
        with torch.no_grad():
            prompts = encode_prompts(self.text_encoder, list(spec.prompts))
        t2 = time.perf_counter()
        result = generate(gen.backbone, gen.memory, self.scheduler, self.model_cfg, prompts,
                          num_frames=self.rollout_cfg.num_frames, switch_frames=list(spec.switch_frames),
                          seed=spec.seed, device=self.device, inspect_memory=False)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t3 = time.perf_counter()
        chunks = result.chunk_seconds
        timings = {"load_weights_s": load_s, "encode_s": t2 - t1, "generate_s": t3 - t2,
                   "chunk_s_mean": sum(chunks) / len(chunks), "chunk_s_max": max(chunks)}
        row = TrajectoryRow(
            trajectory_id=spec.trajectory_id, round=spec.round_index, actor_id=self.actor_id,
            policy_version=self.policy_version, seed=spec.seed, prompts=list(spec.prompts),
            switch_frames=list(result.switch_frames),
            text_embeddings=prompts.embeddings.cpu(),  # [P, Lt, D]
            latents=result.latents[0].cpu(),  # [B=1, F, C, h, w] -> [F, C, h, w]
            timings={k: round(v, 6) for k, v in timings.items()})
        shard = write_shard(self.storage, spec.round_index, self.actor_id, spec.traj_index, [row])
        timings["write_s"] = time.perf_counter() - t3
        timings["total_s"] = time.perf_counter() - t0
        return {"shard": shard.to_dict(), "trajectory_id": spec.trajectory_id, "actor_id": self.actor_id,
                "pid": os.getpid(), "node": _node_id(), "policy_version": self.policy_version, "timings": timings}


def _node_id() -> str:
    """The Ray node this process runs on (several nodes may share a host name, e.g. on one test machine)."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else socket.gethostname()
