"""Bidirectional flow matching on toy-world latents: the teacher, and the student-sized base (the
critic's initialisation, as Wan2.1-1.3B is for Self-Forcing).

Training runs in phases of (steps, batch, window frames) under one LR schedule: the teacher learns mostly
on short windows (many objects per second of compute), then ends on the trainer's 21-frame windows that DMD
scores. One step (model/schedule.py conventions): x0 = a window of the phase's latent frames with its prompt;
t per sample from trainer/losses.py ``sample_dmd_timestep`` (u ~ U{0..999}, shifted by 5; not clamped
here, so the sampler's t near 1000 is trained too); x_t = (1 - sigma) x0 + sigma eps; the model
(CausalWanModel, causal=False, positions from frame 0 as the trainer calls teacher and critic)
predicts the flow eps - x0; loss = MSE. The text is dropped with probability CFG_DROPOUT to one of the
unconditional prompts (toyworld/text.py), so classifier-free guidance works at sampling and in DMD.
Weights: an EMA (decay ramping up to EMA_DECAY) is what is saved, in float16, Wan layout.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from model.schedule import build_scheduler
from model.wan import CausalWanModel
from model.weights import save_checkpoint
from toyworld.data import LatentDataset
from toyworld.palette import CLIP_FRAMES
from toyworld.text import UNCONDITIONAL_PROMPTS
from trainer.losses import sample_dmd_timestep

CFG_DROPOUT = 0.1  # Wan / Self-Forcing-style text dropout for classifier-free guidance
EMA_DECAY = 0.995
WARMUP_STEPS = 50


@dataclass(frozen=True)
class Phase:
    """steps updates of batch windows of frames latent frames each."""

    steps: int
    batch: int
    frames: int = CLIP_FRAMES


def lr_lambda(steps: int):
    """Linear warmup, then cosine decay to 10% of the peak."""
    def f(step: int) -> float:
        if step < WARMUP_STEPS:
            return (step + 1) / WARMUP_STEPS
        progress = (step - WARMUP_STEPS) / max(1, steps - WARMUP_STEPS)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return f


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, step: int) -> None:
    decay = min(EMA_DECAY, (1 + step) / (10 + step))
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach(), 1 - decay)


def text_batch(text_encoder, prompts: list[str], rng: np.random.Generator, dropout: float) -> torch.Tensor:
    """[B, text_len, text_dim] embeddings, each replaced by an unconditional prompt with probability dropout."""
    chosen = [UNCONDITIONAL_PROMPTS[int(rng.integers(len(UNCONDITIONAL_PROMPTS)))] if rng.random() < dropout else p
              for p in prompts]
    return text_encoder.encode(chosen)[0]


def flow_loss(model: CausalWanModel, scheduler, x0: torch.Tensor, text_emb: torch.Tensor,
              generator: torch.Generator) -> torch.Tensor:
    batch, frames = x0.shape[:2]
    t = sample_dmd_timestep(batch, generator, shift=model.cfg.timestep_shift, num_frames=frames, min_t=0,
                            max_t=model.cfg.num_train_timesteps)  # [B, F]
    noise = torch.randn(x0.shape, generator=generator)
    x_t = scheduler.add_noise(x0, noise, t)
    flow = model(x_t, t, model.encode_text(text_emb), start_frame=0, causal=False)
    return F.mse_loss(flow.float(), (noise - x0).float())


def train_bidirectional(name: str, model_cfg, data: LatentDataset, text_encoder, out_file: Path, *,
                        phases: Sequence[Phase], lr: float, seed: int = 0, log_every: int = 25,
                        init_state: dict | None = None) -> tuple[CausalWanModel, dict]:
    """Train a bidirectional model by flow matching through phases; save its EMA weights to out_file (Wan
    layout, fp16)."""
    torch.manual_seed(seed)
    model = CausalWanModel(model_cfg)
    if init_state is not None:
        model.load_state_dict(init_state)
    model.train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    scheduler = build_scheduler(model_cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.01)
    steps = sum(p.steps for p in phases)
    schedule = [p for p in phases for _ in range(p.steps)]  # the phase of every step
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(steps))
    rng = np.random.default_rng([21, seed])
    gen = torch.Generator().manual_seed(seed)
    params = sum(p.numel() for p in model.parameters())
    plan = " then ".join(f"{p.steps} steps of {p.batch} x {p.frames}-frame windows" for p in phases)
    print(f"[{name}] {params / 1e6:.2f}M parameters, {plan}", flush=True)
    t0, running, history = time.time(), [], []
    for step, phase in enumerate(schedule, start=1):
        x0, prompts = data.clip_batch(rng, phase.batch, frames=phase.frames)
        loss = flow_loss(model, scheduler, x0, text_batch(text_encoder, prompts, rng, CFG_DROPOUT), gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        ema_update(ema, model, step)
        running.append(loss.item())
        if step % log_every == 0 or step == steps:
            history.append((step, float(np.mean(running))))
            print(f"[{name}] step {step}/{steps} ({phase.frames} frames) flow loss {history[-1][1]:.4f} "
                  f"lr {sched.get_last_lr()[0]:.2e} {time.time() - t0:.0f}s", flush=True)
            running = []
    save_checkpoint(copy.deepcopy(ema).to(torch.float16), out_file, layout="wan")
    seconds = time.time() - t0
    print(f"[{name}] done: {steps} steps in {seconds:.0f}s, final flow loss {history[-1][1]:.4f}; saved {out_file}",
          flush=True)
    return ema, {"steps": steps, "phases": [asdict(p) for p in phases], "seconds": seconds,
                 "final_loss": history[-1][1], "loss_history": history, "parameters": params}
