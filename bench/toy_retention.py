"""Entity recall of the memory kinds on the toy world, with memory modules trained by the project's own stages.

    python bench/memory_retention.py --policy runs/slotmem-tiny/weights/policy_v000110/model.safetensors

The synthetic bench (bench/memory_retention.py) has no generator, so its text projections P_l are fitted by ridge
regression. Here everything is the pipeline's: the toy world's ground-truth 60 s leave-and-return videos
(toyworld/scripts.py memory_script), encoded by the committed VAE, streamed teacher-forced through the committed
causal student (StreamState: prompt switches with recache, read, clean re-run commit, memory write -- the rollout's
path, with ground truth committed instead of samples), and the memory modules of a published policy: the grouper
from Stage 0, P_l from the generation loss of Stages I/II (its straight-through gate, memory/bank.py retrieve).

What is measured, per memory kind (same student, same videos):
  entity recall   for each scripted return, at the first chunk where the returning entity is back in view: the
                  share of (layer, head) reads that hold at least one token of that entity; a token belongs to an
                  entity when it covers >= LABEL_COVERAGE of the token's 16x16 pixels in its latent frame's pixel
                  frames. Tokens are identified by their exact key bytes (memory K/V are copies of the clean
                  re-run's K/V). Returns count only when the entity was on a token outside the sink before it left.
  entity share    share of memory tokens read that belong to any entity (the rest is background)
  mem tok/read    memory tokens per read (max)
  s/chunk         wall time per chunk of the whole streamed step (read, re-run, write), same run
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from model.schedule import build_scheduler
from model.vae import build_vae
from rollout.streaming import StreamState, chunk_switch_starts, encode_prompts
from toyworld.configs import Artifacts, trained_model_config
from toyworld.evaluate import EVAL_SEED, prefix
from toyworld.palette import FRAME_SIZE, SIZES, first_pixel_frame
from toyworld.sampling import student_generator
from toyworld.scripts import memory_script
from toyworld.text import load_text_encoder
from toyworld.world import render, shape_coverage, simulate

from entity_memory import bootstrap_interval  # noqa: E402  (bench/ is on the path of every bench script)

KINDS = ("none", "frame_bank", "slot")
LABEL_COVERAGE = 0.1  # a small entity (10 px) centred in a 16x16-pixel token covers ~0.3 of it


def token_labels(spec, trace, num_latent: int, grid: int) -> np.ndarray:
    """[F, grid*grid] entity index of every token of every latent frame, -1 for background."""
    cell = FRAME_SIZE // grid
    out = np.full((num_latent, grid * grid), -1, dtype=np.int64)
    for f in range(num_latent):
        pixels = range(first_pixel_frame(f), first_pixel_frame(f + 1))  # the pixel frames latent f encodes
        cover = np.zeros((len(spec.entities), grid, grid))
        for i, e in enumerate(spec.entities):
            for p in pixels:
                if trace.visible[p, i]:
                    c = shape_coverage(e.shape, *trace.centre[p, i], SIZES[e.size])
                    cover[i] += c.reshape(grid, cell, grid, cell).mean(axis=(1, 3)) / len(pixels)
        best = cover.argmax(0).reshape(-1)  # [grid*grid]
        out[f] = np.where(cover.max(0).reshape(-1) >= LABEL_COVERAGE, best, -1)
    return out


class KeyLog:
    """Wraps memory.write: remembers which token (its label) every clean re-run key came from, per layer and head.
    ``labels`` holds the labels of the chunk about to be committed."""

    def __init__(self, memory):
        self.labels, self.lookup = None, {}
        self._write = memory.write
        memory.write = self.write

    def write(self, states, **kwargs):
        for y, s in enumerate(states):
            k = s.k[0].detach().contiguous().numpy()  # [L, H, D], batch of one
            for h in range(k.shape[1]):
                table = self.lookup.setdefault((y, h), {})
                for t in range(k.shape[0]):
                    table[k[t, h].tobytes()] = int(self.labels[t])
        return self._write(states, **kwargs)

    def read_labels(self, memory_kv) -> dict[tuple[int, int], list[int]]:
        """(layer, head) -> labels of the memory tokens read."""
        out = {}
        for y, (k, _) in enumerate(memory_kv):
            rows = k[0].contiguous().numpy()  # [M, H, D]
            for h in range(rows.shape[1]):
                out[y, h] = [self.lookup[y, h][rows[m, h].tobytes()] for m in range(rows.shape[0])]
        return out


def videos(vae, model_cfg, count: int, segments: int | None):
    """(script, latents [1, F, C, h, w], token labels [F, T]) of memory_script(EVAL_SEED + 200 + i)."""
    grid = model_cfg.latent_height // model_cfg.patch_size[1]  # tokens per side (4 on the toy world)
    for i in range(count):
        script = prefix(memory_script(EVAL_SEED + 200 + i), segments)
        spec = script.world(EVAL_SEED + 200 + i)
        trace = simulate(spec)
        latents = vae.encode(torch.from_numpy(render(spec, trace=trace))[None])
        yield script, latents, token_labels(spec, trace, script.num_frames, grid)


@torch.no_grad()
def run_kind(kind: str, artifacts: Artifacts, text, data, policy: Path | None) -> dict:
    gen = student_generator(artifacts.causal_base, memory_kind=kind, policy=policy)
    cfg = gen.backbone.cfg
    chunk, tpf = cfg.num_frame_per_block, cfg.tokens_per_frame
    log = KeyLog(gen.memory)  # gen is this run's own: its memory.write stays wrapped
    recall, events, entity_tokens, memory_tokens, per_read, seconds, chunks = [], 0, 0, 0, 0, 0.0, 0
    for script, latents, labels in data:
        state = StreamState(gen.backbone, gen.memory, build_scheduler(cfg), cfg,
                            encode_prompts(text, list(script.prompts)), batch_size=1)
        switches = chunk_switch_starts(list(script.switch_frames), chunk)
        back = [ev for ev in script.events if ev.kind == "return"]
        returns = dict(zip((ev.entity for ev in back), chunk_switch_starts([ev.frame for ev in back], chunk)))
        seen = set()  # entities on a token of a committed chunk after the sink
        for start in range(0, script.num_frames, chunk):
            t0 = time.perf_counter()
            if start in switches:
                state.switch_prompt(switches.index(start) + 1, latents[:, :start])
            memory_kv = state.read_memory()
            seconds += time.perf_counter() - t0
            here = set(labels[start:start + chunk].reshape(-1).tolist())
            read = log.read_labels(memory_kv) if memory_kv is not None else {}
            per_read = max(per_read, max((len(v) for v in read.values()), default=0))
            for labs in read.values():
                memory_tokens += len(labs)
                entity_tokens += sum(lab >= 0 for lab in labs)
            for e, at in list(returns.items()):
                if start >= at and e in here:  # the returning entity is back in view: was it in the read?
                    del returns[e]
                    if e in seen:
                        events += 1
                        recall.append(np.mean([e in labs for labs in read.values()]) if read else 0.0)
            log.labels = labels[start:start + chunk].reshape(-1)  # [chunk * tpf] tokens of this chunk
            assert log.labels.size == chunk * tpf
            t0 = time.perf_counter()
            state.commit(latents[:, start:start + chunk], memory_kv=memory_kv)
            seconds += time.perf_counter() - t0
            chunks += 1
            if start >= cfg.sink_size:
                seen |= {lab for lab in here if lab >= 0}
    return {"kind": kind, "policy": str(policy) if policy and kind == "slot" else None,
            "entity_recall": float(np.mean(recall)) if recall else None, "interval_95": list(bootstrap_interval(recall)),
            "returns": events,
            "entity_share": entity_tokens / max(memory_tokens, 1), "memory_tokens_per_read": per_read,
            "s_per_chunk": seconds / max(chunks, 1)}


def toy_retention(policy: Path | None, *, scripts: int, segments: int | None = None,
                  weights: Path | None = None) -> list[dict]:
    """Rows for none / frame_bank / slot at its seeded init / slot with the policy's trained memory modules."""
    artifacts = Artifacts(root=weights) if weights else Artifacts()
    model_cfg = trained_model_config(artifacts)
    vae, text = build_vae(model_cfg), load_text_encoder(artifacts.text_encoder)
    data = list(videos(vae, model_cfg, scripts, segments))
    rows = [{"name": kind, **run_kind(kind, artifacts, text, data, None)} for kind in KINDS]
    if policy is not None:
        rows.append({"name": "slot_trained", **run_kind("slot", artifacts, text, data, policy)})
    return rows


def print_rows(rows: list[dict]) -> None:
    header = (f"{'memory':<14}{'entity recall':>14}{'95% interval':>15}{'returns':>9}{'entity share':>14}"
              f"{'mem tok/read':>14}{'s/chunk':>9}")
    print(header)
    print("-" * len(header))
    for r in rows:
        recall, (lo, hi) = r["entity_recall"], r["interval_95"]
        cells = ("-", "-") if recall is None else (f"{recall:.3f}", f"[{lo:.2f}, {hi:.2f}]")
        print(f"{r['name']:<14}{cells[0]:>14}{cells[1]:>15}{r['returns']:>9}{r['entity_share']:>14.3f}"
              f"{r['memory_tokens_per_read']:>14}{r['s_per_chunk']:>9.3f}")
