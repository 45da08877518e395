"""Sampling the trained toy-world models: the teacher's many-step sampler and the student's streaming one.

Teacher: Euler on the flow ODE dx/dsigma = eps - x0 (the model's flow), from sigma = 1 to 0 over
steps whose model timesteps follow the shift-5 schedule, with classifier-free guidance in the
trainer's convention (trainer/losses.py dmd_loss: real = cond + g (cond - uncond), g = 3).

Student: rollout/streaming.py ``generate`` (4 warped steps per 3-frame chunk, KV cache with sink and
window, memory read/write, LongLive switches) on a Generator built like the pipeline's
(rollout/components.py build_generator) with the causal base loaded into its backbone.
"""

from __future__ import annotations

import torch

from model.schedule import build_scheduler
from model.wan import CausalWanModel
from model.weights import load_checkpoint, load_state_dict_file
from rollout.components import build_generator
from rollout.streaming import encode_prompts, generate
from toyworld.configs import student_memory_config, student_model_config
from toyworld.palette import CLIP_FRAMES
from toyworld.scripts import Script
from toyworld.train_causal import MEMORY_SEED

TEACHER_STEPS = 40
GUIDANCE = 3.0  # trainer.guidance_scale


@torch.no_grad()
def euler_sample(model: CausalWanModel, text_emb: torch.Tensor, uncond_emb: torch.Tensor, *, seed: int,
                 frames: int = CLIP_FRAMES, steps: int = TEACHER_STEPS, guidance: float = GUIDANCE,
                 start: torch.Tensor | None = None, start_sigma: float = 1.0) -> torch.Tensor:
    """Latents [B, frames, C, h, w] for text embeddings [B, Lt, D] (uncond_emb [1, Lt, D]).

    With ``start`` (clean latents [B, frames, C, h, w]) the ODE starts from them noised to ``start_sigma`` and
    runs the schedule's steps below it (SDEdit): how well the model refines a layout it is given, apart from
    drawing one from pure noise."""
    cfg = model.cfg
    scheduler = build_scheduler(cfg)
    batch = text_emb.shape[0]
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((batch, frames, cfg.in_channels, cfg.latent_height, cfg.latent_width), generator=gen)
    t = scheduler.shift_timestep(torch.linspace(cfg.num_train_timesteps, 0, steps + 1))  # [steps + 1]
    if start is not None:
        if not 0 < start_sigma <= 1:
            raise ValueError(f"start_sigma must be in (0, 1], got {start_sigma}")
        t_start = start_sigma * cfg.num_train_timesteps  # sigma = t / T (model/schedule.py)
        t = torch.cat([torch.tensor([t_start]), t[t < t_start]])
        x = scheduler.add_noise(start.float(), x, t_start)
    sigma = scheduler.sigma(t).float()
    cond = model.encode_text(text_emb)
    uncond = model.encode_text(uncond_emb.expand(batch, -1, -1))
    for i in range(len(t) - 1):
        tt = t[i].expand(batch, frames)
        flow_c = model(x, tt, cond, start_frame=0, causal=False)
        flow_u = model(x, tt, uncond, start_frame=0, causal=False) if guidance else flow_c
        x = x + (sigma[i + 1] - sigma[i]) * (flow_c + guidance * (flow_c - flow_u))
    return x


def load_teacher(model_cfg, path) -> CausalWanModel:
    model = CausalWanModel(model_cfg)
    load_checkpoint(model, path)
    return model.eval()


def student_generator(backbone_path=None, memory_kind: str = "slot", policy=None):
    """The pipeline's Generator with the given backbone weights; its memory modules at their seeded init, or, with
    ``policy`` (a published policy's .safetensors), that policy's memory tensors where they fit the kind (the
    backbone stays the given one, so every memory kind runs on the same student)."""
    gen = build_generator(student_model_config(), student_memory_config(kind=memory_kind), seed=MEMORY_SEED)
    if backbone_path is not None:
        load_checkpoint(gen.backbone, backbone_path)
    if policy is not None:
        own = gen.state_dict()
        state = {k: v for k, v in load_state_dict_file(policy).items()
                 if k.startswith("memory.") and k in own and own[k].shape == v.shape}
        gen.load_state_dict(state, strict=False)
    return gen.eval()


@torch.no_grad()
def stream_sample(gen, text_encoder, script: Script, *, seed: int, batch: int = 1) -> torch.Tensor:
    """Latents [batch, F, C, h, w] of the script streamed by the 4-step sampler."""
    cfg = gen.backbone.cfg
    prompts = encode_prompts(text_encoder, list(script.prompts))
    result = generate(gen.backbone, gen.memory, build_scheduler(cfg), cfg, prompts, num_frames=script.num_frames,
                      switch_frames=list(script.switch_frames), seed=seed, batch_size=batch, inspect_memory=False)
    return result.latents
