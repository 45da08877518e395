"""Latent training data for the backbones: 60 s toy-world videos rendered, encoded by the trained VAE
once, and cached under toyworld/.cache/ (git-ignored).

The dataset is num_scripts training scripts x videos_per_script videos (the run's budget sets both,
toyworld/train.py FULL: 12 x 2): the videos of one script share its prompts, events and switch frames
but differ in motion and hidden sizes, so a streaming batch of them can share one prompt schedule
(rollout/streaming.py's StreamState encodes one script per batch) and the sizes cannot be read from
the text -- only from the video itself.

Windows for the bidirectional models (``clip_batch``) are CLIP_FRAMES latent frames labelled with the
prompt of the segment holding their last frame (as the trainer labels a window after a switch),
skipping windows that contain an earlier segment's event in progress (the label would not describe
it). The cache file is keyed by the VAE weights' hash, the dataset sizes and the world itself (the
scripts and the first rendered frames of every video), so a changed palette, size, speed or script
grammar re-encodes instead of silently training on the old world's latents.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from model.vae import VAE
from toyworld.configs import CACHE
from toyworld.palette import CLIP_FRAMES, pixel_frames
from toyworld.scripts import Script, training_script
from toyworld.world import EVENT_FRAMES, render

WORLD_HASH_FRAMES = 9  # pixel frames of every video hashed into the cache key (latent frames 0-2)


def window_starts(script: Script, frames: int = CLIP_FRAMES) -> list[int]:
    """Window starts whose label (the prompt of the last frame's segment) describes the whole window."""
    edges = [0, *script.switch_frames, script.num_frames]
    out = []
    for a in range(0, script.num_frames - frames + 1):
        last = a + frames - 1
        seg = max(k for k in range(len(edges) - 1) if edges[k] <= last)
        if all(ev.frame + EVENT_FRAMES <= a for ev in script.events if ev.frame < edges[seg]):
            out.append(a)
    return out


def window_prompt(script: Script, start: int, frames: int = CLIP_FRAMES) -> str:
    """The label of a window: the prompt active at its last frame (the trainer's convention)."""
    return script.prompts[sum(1 for f in script.switch_frames if start + frames - 1 >= f)]


@dataclass
class LatentDataset:
    scripts: list[Script]
    latents: Tensor  # [S, V, F, C, h, w] float16, normalised (model/vae.py convention)

    def video(self, s: int, v: int) -> Tensor:
        return self.latents[s, v].float()  # [F, C, h, w]

    def clip_batch(self, rng: np.random.Generator, batch: int, frames: int = CLIP_FRAMES,
                   scripts: list[int] | None = None) -> tuple[Tensor, list[str]]:
        """(x0 [B, frames, C, h, w], the window prompts) drawn uniformly over scripts, videos, starts (scripts
        with no window of that length, short clips of long windows, are skipped)."""
        pool = [s for s in (range(len(self.scripts)) if scripts is None else scripts) if self._starts(s, frames)]
        if not pool:
            raise ValueError(f"clip_batch: no script has a {frames}-frame window in {self.latents.shape[2]} frames")
        xs, prompts = [], []
        for _ in range(batch):
            s = int(rng.choice(pool))
            v = int(rng.integers(self.latents.shape[1]))
            starts = self._starts(s, frames)
            a = starts[int(rng.integers(len(starts)))]
            xs.append(self.latents[s, v, a:a + frames].float())
            prompts.append(window_prompt(self.scripts[s], a, frames))
        return torch.stack(xs), prompts

    def _starts(self, s: int, frames: int) -> list[int]:
        cache = self.__dict__.setdefault("_start_cache", {})
        if (s, frames) not in cache:
            limit = self.latents.shape[2] - frames  # a dataset may hold only the first frames of each video
            cache[(s, frames)] = [a for a in window_starts(self.scripts[s], frames) if a <= limit]
        return cache[(s, frames)]


def _vae_hash(vae: VAE) -> str:
    h = hashlib.sha256()
    for name, p in sorted(vae.model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().float().numpy().tobytes())
    h.update(np.asarray(vae.latents_mean.numpy()).tobytes() + np.asarray(vae.latents_std.numpy()).tobytes())
    return h.hexdigest()[:16]


def _worlds(script: Script, s: int, videos_per_script: int, seed_offset: int):
    """The worlds of script s's videos (world seed = seed_offset + s * V + v): what is encoded and what is hashed."""
    return [script.world(seed_offset + s * videos_per_script + v) for v in range(videos_per_script)]


def _world_hash(scripts: list[Script], videos_per_script: int, seed_offset: int = 0) -> str:
    """The world the cache holds: every script (prompts, events, switches) and the first WORLD_HASH_FRAMES
    rendered frames of every video (palette, shapes, sizes, starting motion)."""
    h = hashlib.sha256()
    for s, script in enumerate(scripts):
        h.update(repr(script).encode())
        for world in _worlds(script, s, videos_per_script, seed_offset):
            h.update(render(world, 0, WORLD_HASH_FRAMES).tobytes())
    return h.hexdigest()[:16]


@torch.no_grad()
def encode_videos(vae: VAE, scripts: list[Script], videos_per_script: int, latent_frames: int | None = None,
                  seed_offset: int = 0, log=print) -> Tensor:
    """[S, V, F, C, h, w] float16 latents of video v of script s (world seed = seed_offset + s * V + v); F = the
    script's frames or the first latent_frames of them."""
    out = []
    t0 = time.time()
    for s, script in enumerate(scripts):
        worlds = _worlds(script, s, videos_per_script, seed_offset)
        stop = pixel_frames(latent_frames) if latent_frames else None
        video = torch.from_numpy(np.stack([render(w, 0, stop) for w in worlds]))  # [V, T, H, W, 3]
        out.append(vae.encode(video).to(torch.float16))  # [V, F, C, h, w]
        if (s + 1) % max(1, len(scripts) // 10) == 0 or s + 1 == len(scripts):  # ~10 lines, however many scripts
            log(f"[data] encoded script {s + 1}/{len(scripts)} ({videos_per_script} videos of {video.shape[1]} "
                f"frames) {time.time() - t0:.0f}s")
    return torch.stack(out)


def load_or_build(vae: VAE, num_scripts: int, videos_per_script: int,
                  latent_frames: int | None = None, cache_dir: Path = CACHE, log=print) -> LatentDataset:
    """The training dataset (scripts training_script(0..S-1)), from the cache when it matches."""
    scripts = [training_script(s) for s in range(num_scripts)]
    frames = latent_frames or scripts[0].num_frames
    key = f"{_vae_hash(vae)}-{_world_hash(scripts, videos_per_script)}"
    path = Path(cache_dir) / f"latents-{key}-{num_scripts}x{videos_per_script}x{frames}.pt"
    if path.is_file():
        latents = torch.load(path, weights_only=True)
        log(f"[data] {path.name}: {tuple(latents.shape)} from the cache")
    else:
        latents = encode_videos(vae, scripts, videos_per_script, latent_frames, log=log)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(latents, tmp)
        tmp.replace(path)
    return LatentDataset(scripts=scripts, latents=latents)
