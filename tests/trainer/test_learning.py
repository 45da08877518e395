"""DMD learns: the distilled student moves toward the teacher on the judge's adherence (issue 11, item 5).

The toy world's committed models disagree, in a way the judge sees, on one prompt: the causal base draws "a green
square on a grey background" on the wrong background and without the square (adherence 0.01 over 6 samples), while
the toy teacher, sampled with DMD's guidance (CFG 3 against the negative prompt), draws it (0.86 and 0.76 on 2
samples in 20 Euler steps, 10 s; 0.96 and 0.84 in 40, 18 s). Stage I's engines (real DeepSpeed, ZeRO-2, one
process) run the worker's update exactly -- ``generator_loss`` (self-rolled window, DMD teacher vs critic,
+ lambda_slot L_slot), backward, step, then ``critic_updates_per_generator`` critic updates -- on windows of that
prompt at the start of a video.

Measured on 2 CPU cores: after 8 generator updates the student's adherence is 0.48 (training seed 0) and 0.65
(seed 7), after 4 0.24. With the generator loss's sign flipped it falls to 0.00; multiplied by zero (a detached
gradient) it stays at 0.01; either fails this test. The bars: mean <= 0.15 before, >= 0.3 after, teacher >= 0.7.
About 60 s alone, 49 s in the fresh-clone suite (85 s when the teacher check sampled 40 steps).

The prompt is picked where the gap is large (6 prompts probed: the teacher led the base by +0.89 here, +0.41 on "a
yellow triangle on a black background", the previous models' test prompt, where 8 updates now reach 0.47 from
0.11; by -0.03 to +0.38 on the other four). What the test guards is the direction and the reach of the update,
not the teacher's quality.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.text import build_text_encoder
from model.vae import build_vae
from rollout.streaming import encode_prompts, generate
from slotmem.config import load_config
from toyworld import judge
from toyworld.sampling import euler_sample
from trainer.deepspeed_setup import ensure_single_process_group
from trainer.engines import build_engines
from trainer.objectives import critic_loss, generator_loss
from trainer.window import TrajectoryWindow, draw_exit_steps

pytestmark = pytest.mark.timeout(240)

PROMPT = "a green square on a grey background"
GENERATOR_UPDATES = 8
SAMPLES = 6
SEED = 100
TEACHER_STEPS = 20  # Euler steps of the teacher check: 0.86 / 0.76 (40 steps: 0.96 / 0.84) for half the time


def adherence(vae, latents: torch.Tensor) -> list[float]:
    """The judge's adherence of every decoded sample [B, F, C, h, w] to PROMPT (one segment: all its frames)."""
    frames = vae.decode(latents).numpy()  # [B, T, H, W, 3] uint8
    return [judge.segment_adherence(judge.detect(video), [PROMPT], [], latents.shape[1])[0] for video in frames]


def test_dmd_moves_the_student_toward_the_teacher_on_the_judge(repo_root):
    ensure_single_process_group("gloo")
    cfg = load_config(f"{repo_root}/configs/tiny.yaml", [])
    engines = build_engines(cfg, 1, world_size=1, device=torch.device("cpu"), use_bf16=False)
    student = engines.generator.module
    text = build_text_encoder(cfg.model, "cpu", torch.float32)
    vae = build_vae(cfg.model)
    prompts = encode_prompts(text, [PROMPT])
    negative = text.encode([cfg.trainer.negative_prompt])[0]  # [1, Lt, D]
    frames = cfg.trainer.window_frames

    @torch.no_grad()
    def student_adherence() -> list[float]:
        result = generate(student.backbone, student.memory, engines.scheduler, cfg.model, prompts, num_frames=frames,
                          switch_frames=[], seed=SEED, batch_size=SAMPLES, inspect_memory=False)
        return adherence(vae, result.latents)

    teacher = adherence(vae, euler_sample(engines.teacher, text.encode([PROMPT] * 2)[0], negative, seed=SEED,
                                          steps=TEACHER_STEPS, guidance=cfg.trainer.guidance_scale))
    before = student_adherence()
    assert np.mean(teacher) >= 0.7, f"the toy teacher no longer draws the prompt: {teacher}"
    assert np.mean(before) <= 0.15, f"the causal base already draws the prompt, nothing to learn: {before}"

    rng = torch.Generator().manual_seed(0)
    window = TrajectoryWindow(latents=torch.zeros(frames, cfg.model.in_channels, cfg.model.latent_height,
                                                  cfg.model.latent_width),
                              text_embeddings=prompts.embeddings, switch_starts=[], start=0, num_frames=frames,
                              context=0, policy_version=0)
    common = dict(scheduler=engines.scheduler, model_cfg=cfg.model, trainer_cfg=cfg.trainer, first_frame=lambda x: x,
                  generator_rng=rng, noise_rng=rng)
    g, c = engines.generator, engines.critic
    for it in range(GENERATOR_UPDATES * cfg.trainer.critic_updates_per_generator):
        exits = draw_exit_steps(window.num_new // cfg.model.num_frame_per_block, len(cfg.model.denoising_steps), rng,
                                same=cfg.trainer.same_exit_step)
        if it % cfg.trainer.critic_updates_per_generator == 0:  # the worker's order: generator first
            loss, stats = generator_loss(window, generator=student, teacher=engines.teacher, critic=c.module,
                                         negative_embedding=negative[0], stage=1, exit_steps=exits, **common)
            assert np.isfinite(stats["dmd"])
            g.backward(loss)
            g.step()
        loss, _ = critic_loss(window, generator=student, critic=c.module, exit_steps=exits, **common)
        c.backward(loss)
        c.step()
    after = student_adherence()
    assert np.mean(after) >= 0.3, (f"{GENERATOR_UPDATES} DMD updates did not move the student toward the teacher: "
                                    f"adherence {np.mean(before):.2f} -> {np.mean(after):.2f} (teacher "
                                    f"{np.mean(teacher):.2f}; measured 0.48)")
