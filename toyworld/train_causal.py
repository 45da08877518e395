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
  And the first chunk, drawn from the text alone, is 1 of a 60 s stream's 80 chunks: trained on long
  streams only, the base learnt to copy its context and drew the first chunk's background wrong, and the
  rest of the video copied it (a grey-background prompt came out blue for the whole minute, while the
  bidirectional base through the same sampler corrected the colour after one chunk). So every pass also
  streams COLD_STARTS short clips cut at random chunk starts inside one prompt's segment, from an empty
  cache (positions from 0, as a fresh rollout): the share of text-only chunks rises from 1/80 to about 1/10,
  the way Self-Forcing's 21-frame windows give every 7th chunk no context.

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
COLD_STARTS = 8  # short fresh streams per pass (first chunks from the text alone)
COLD_CHUNKS = 2  # chunks per short stream: the text-only chunk and one that reads it
STEP_EVERY = 4  # chunks per optimizer step
MEMORY_SEED = 0  # build_generator's seed: the memory modules' init (trainer.seed of the tiny preset)


class ChunkSteps:
    """Backward per chunk, an optimizer step every STEP_EVERY chunks, counted across streams (long and short)."""

    def __init__(self, backbone: torch.nn.Module, opt: torch.optim.Optimizer):
        self.backbone, self.opt, self.chunks = backbone, opt, 0

    def add(self, loss: torch.Tensor) -> None:
        (loss / STEP_EVERY).backward()
        self.chunks += 1
        if self.chunks % STEP_EVERY == 0:
            torch.nn.utils.clip_grad_norm_(self.backbone.parameters(), 1.0)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)


def stream_video(backbone, memory, scheduler, model_cfg, prompts, switch_frames: list[int], x: torch.Tensor, *,
                 rng: np.random.Generator, generator: torch.Generator, steps: ChunkSteps | None,
                 num_frames: int) -> list[float]:
    """Teacher-force one group of videos x [V, F, C, h, w] from an empty cache, its prompts switching at
    ``switch_frames``; returns the per-chunk losses (no training when ``steps`` is None)."""
    chunk = model_cfg.num_frame_per_block
    timesteps = sampler_timesteps(model_cfg)  # [4] model timesteps
    with torch.no_grad():  # the prompt's text keys and memory state carry no graph
        state = StreamState(backbone, memory, scheduler, model_cfg, prompts, batch_size=x.shape[0])
    switch_starts = chunk_switch_starts(list(switch_frames), chunk)
    history = torch.empty_like(x[:, :num_frames])  # what was committed: the recache reads it
    losses = []
    for start in range(0, num_frames, chunk):
        if start in switch_starts:
            with torch.no_grad():
                state.switch_prompt(switch_starts.index(start) + 1, history[:, :start])
        with torch.no_grad():
            memory_kv = state.read_memory()
        x0 = x[:, start:start + chunk]  # [V, 3, C, h, w]
        t = timesteps[torch.randint(len(timesteps), (x.shape[0],), generator=generator)][:, None].expand(-1, x0.shape[1])
        noise = torch.randn(x0.shape, generator=generator)
        x_t = scheduler.add_noise(x0, noise, t)
        with torch.set_grad_enabled(steps is not None):
            flow = backbone(x_t, t, state.text, start_frame=start, cache=state.cache, memory_kv=memory_kv)
            loss = F.mse_loss(flow.float(), (noise - x0).float())
        if steps is not None:
            steps.add(loss)
        losses.append(loss.item())
        committed = x0
        if rng.random() < SELF_COMMIT:
            committed = scheduler.flow_to_x0(x_t, flow.detach(), t).to(x0.dtype)
        history[:, start:start + chunk] = committed
        with torch.no_grad():
            state.commit(committed, memory_kv=memory_kv)
    return losses


def cold_start(data: LatentDataset, text_encoder, prompt_cache: dict, chunk: int, num_frames: int,
               rng: np.random.Generator) -> tuple[object, torch.Tensor] | None:
    """A short fresh stream's prompt and clip [V, COLD_CHUNKS * chunk, C, h, w]: cut at a random chunk start inside
    a random segment (of the first ``num_frames``) of a random script, so it shows one prompt throughout; None when
    no segment is long enough (smoke-test budgets)."""
    length = COLD_CHUNKS * chunk
    spans = [(s, k, -(-a // chunk), (min(b, num_frames) - length) // chunk)  # chunk-aligned first and last start
             for s, script in enumerate(data.scripts) for k, (a, b) in enumerate(script.segments())]
    spans = [span for span in spans if span[3] >= span[2]]
    if not spans:
        return None
    s, k, first, last = spans[int(rng.integers(len(spans)))]
    start = chunk * int(rng.integers(first, last + 1))
    if (s, k) not in prompt_cache:
        prompt_cache[s, k] = encode_prompts(text_encoder, [data.scripts[s].prompts[k]])
    return prompt_cache[s, k], data.latents[s, :, start:start + length].float()


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
    prompts_of, segment_prompts = {}, {}
    steps = ChunkSteps(backbone, opt)
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
        losses = stream_video(backbone, memory, scheduler, model_cfg, prompts_of[s], list(script.switch_frames),
                              data.latents[s].float(), rng=rng, generator=gen, steps=steps, num_frames=frames)
        for _ in range(COLD_STARTS):
            if (cut := cold_start(data, text_encoder, segment_prompts, model_cfg.num_frame_per_block, frames, rng)) is None:
                break
            prompt, clip = cut
            losses += stream_video(backbone, memory, scheduler, model_cfg, prompt, [], clip, rng=rng, generator=gen,
                                   steps=steps, num_frames=clip.shape[1])
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
                      "self_commit": SELF_COMMIT, "num_frames": frames,
                      "cold_starts": COLD_STARTS, "cold_chunks": COLD_CHUNKS}
