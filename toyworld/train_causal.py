"""The student's causal few-step base: streaming teacher forcing on 60 s ground-truth latents, memory on.

Why teacher forcing (diffusion forcing on clean context) and not ODE regression on teacher trajectories:
  * the teacher is a 21-frame bidirectional model, so its ODE trajectories cover 5 s clips only, while
    this base must learn 240-frame streams with leave-and-return events through the memory; teacher
    forcing runs on the whole ground-truth video, exactly through the streaming path inference uses;
  * ODE pairs need the teacher's many-step CFG sampling for every training clip (40 steps x 2
    passes of the 6-layer teacher per clip), which a 2-core budget cannot afford;
  * Self-Forcing issue #64 traces chunk discontinuities to the ODE init.
  What it costs: exposure bias (training sees clean context, sampling its own). Scheduled sampling
  softens it: with probability SELF_COMMIT the chunk is committed as the model's own x0 prediction
  instead of the ground truth, so the cache and the memory also hold imperfect frames.

Per video group (the videos of one script, one StreamState batch sharing its prompts), per chunk:
    switch prompt at its chunk (LongLive recache of the committed history)
    memory_kv = state.read_memory()           memory kind slot, modules at their seeded init, frozen
    t ~ the 4 warped sampler timesteps {1000, 937.5, 833.3, 625}, one per video
    x_t = (1 - sigma) x0 + sigma eps; flow = backbone(x_t, t, cache, memory_kv)  (with grad)
    loss = MSE(flow, eps - x0); backward; an optimizer step every STEP_EVERY chunks
    state.commit(ground truth or own prediction, memory_kv)   clean re-run: KV cache + memory write
Training only at the sampler's timesteps makes the base a 4-step sampler for rollout/streaming.py
``generate`` (CausVid's few-step student; DMD then sharpens it). The backbone starts from the
bidirectional student base (CausVid initialises its causal student from the bidirectional model).
Only the backbone is saved; the memory modules are initialised by the pipeline (build_generator,
seed MEMORY_SEED), the same init this training saw.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from model.schedule import build_scheduler, sampler_timesteps
from model.weights import save_checkpoint
from rollout.components import build_generator
from rollout.streaming import StreamState, chunk_switch_starts, encode_prompts
from toyworld.configs import student_memory_config, student_model_config
from toyworld.data import LatentDataset

SELF_COMMIT = 0.25  # probability a chunk is committed as the model's own prediction (scheduled sampling)
STEP_EVERY = 4  # chunks per optimizer step
MEMORY_SEED = 0  # build_generator's seed: the memory modules' init (trainer.seed of the tiny preset)


def stream_video(backbone, memory, scheduler, model_cfg, prompts, script, x: torch.Tensor, *, rng: np.random.Generator,
                 generator: torch.Generator, opt: torch.optim.Optimizer | None, num_frames: int) -> list[float]:
    """Teacher-force one group of videos x [V, F, C, h, w] of ``script``; returns the per-chunk losses."""
    chunk = model_cfg.num_frame_per_block
    steps = sampler_timesteps(model_cfg)  # [4] model timesteps
    with torch.no_grad():  # the prompt's text keys and memory state carry no graph
        state = StreamState(backbone, memory, scheduler, model_cfg, prompts, batch_size=x.shape[0])
    switch_starts = chunk_switch_starts(list(script.switch_frames), chunk)
    history = torch.empty_like(x[:, :num_frames])  # what was committed: the recache reads it
    losses = []
    for n, start in enumerate(range(0, num_frames, chunk)):
        if start in switch_starts:
            with torch.no_grad():
                state.switch_prompt(switch_starts.index(start) + 1, history[:, :start])
        with torch.no_grad():
            memory_kv = state.read_memory()
        x0 = x[:, start:start + chunk]  # [V, 3, C, h, w]
        t = steps[torch.randint(len(steps), (x.shape[0],), generator=generator)][:, None].expand(-1, x0.shape[1])
        noise = torch.randn(x0.shape, generator=generator)
        x_t = scheduler.add_noise(x0, noise, t)
        with torch.set_grad_enabled(opt is not None):
            flow = backbone(x_t, t, state.text, start_frame=start, cache=state.cache, memory_kv=memory_kv)
            loss = F.mse_loss(flow.float(), (noise - x0).float())
        if opt is not None:
            (loss / STEP_EVERY).backward()
            if (n + 1) % STEP_EVERY == 0:
                torch.nn.utils.clip_grad_norm_(backbone.parameters(), 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        committed = x0
        if rng.random() < SELF_COMMIT:
            committed = scheduler.flow_to_x0(x_t, flow.detach(), t).to(x0.dtype)
        history[:, start:start + chunk] = committed
        with torch.no_grad():
            state.commit(committed, memory_kv=memory_kv)
    return losses


def train_causal(data: LatentDataset, text_encoder, init_state: dict, out_file: Path, *, passes: int, lr: float,
                 seed: int = 0, num_frames: int | None = None, log_every: int = 4) -> tuple[torch.nn.Module, dict]:
    """``passes`` streamed video groups (scripts in a seeded shuffled order); saves the backbone (fp16, Wan layout)."""
    model_cfg, memory_cfg = student_model_config(), student_memory_config()
    generator_module = build_generator(model_cfg, memory_cfg, seed=MEMORY_SEED)
    backbone, memory = generator_module.backbone, generator_module.memory
    backbone.load_state_dict(init_state)
    backbone.train()
    memory.requires_grad_(False).eval()
    scheduler = build_scheduler(model_cfg)
    opt = torch.optim.AdamW(backbone.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.01)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, passes), eta_min=lr * 0.1)
    rng = np.random.default_rng([31, seed])
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    frames = num_frames or data.latents.shape[2]
    order = []
    prompts_of = {}
    t0, running, history = time.time(), [], []
    print(f"[causal] {passes} streamed passes of {data.latents.shape[1]} videos x {frames} latent frames, "
          f"memory kind {memory_cfg.kind}", flush=True)
    for p in range(1, passes + 1):
        if not order:
            order = list(rng.permutation(len(data.scripts)))
        s = int(order.pop())
        script = data.scripts[s]
        if s not in prompts_of:
            prompts_of[s] = encode_prompts(text_encoder, list(script.prompts))
        losses = stream_video(backbone, memory, scheduler, model_cfg, prompts_of[s], script, data.latents[s].float(),
                              rng=rng, generator=gen, opt=opt, num_frames=frames)
        sched.step()
        running.extend(losses)
        if p % log_every == 0 or p == passes:
            history.append((p, float(np.mean(running))))
            print(f"[causal] pass {p}/{passes} flow loss {history[-1][1]:.4f} lr {sched.get_last_lr()[0]:.2e} "
                  f"{time.time() - t0:.0f}s", flush=True)
            running = []
    backbone.eval()
    save_checkpoint(copy.deepcopy(backbone).to(torch.float16), out_file, layout="wan")
    seconds = time.time() - t0
    print(f"[causal] done: {passes} passes in {seconds:.0f}s, final flow loss {history[-1][1]:.4f}; saved {out_file}",
          flush=True)
    return backbone, {"passes": passes, "seconds": seconds, "final_loss": history[-1][1], "loss_history": history,
                      "self_commit": SELF_COMMIT, "num_frames": frames}
