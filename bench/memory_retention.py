"""Entity retention of the memory kinds on a synthetic stream (the Fig. 4 comparison in miniature).

    python bench/memory_retention.py [--out bench/results/memory_retention.json] [--streams 8] [--segments 12]
                                     [--policy runs/slotmem-tiny/weights/policy_v000110/model.safetensors]

What is simulated. A fixed "backbone" (per-layer random orthogonal feature maps and key/value
projections) and a fixed "text encoder" (a random linear map from entity appearance to word
embeddings) are shared by every stream. Each stream has its own cast: entities and scenes with
random appearance prototypes. A stream is a sequence of segments (one prompt each); a segment shows a
scene with two entities (rectangles of 3x3 or 4x4 tokens that drift by one token per frame), and its
prompt names the scene and both entities (pooled text = mean of the three word embeddings; the
frame bank gets the three word keys). Consecutive segments never share an entity, so an entity that
returns has been out of the local window (sink chunk + 12 frames) for at least one whole segment.

What is measured, per memory at equal memory tokens per query (slot: top-k 12 items x 16 tokens = 192;
frame_bank: 3 frames x 64 tokens = 192; none: 0). `slot` keeps Table 6's ratio (a bank of 6 blocks, read
half of it); `slot_bank3` stores no more tokens than the frame bank (3 blocks = 12 items, all read):
  entity recall   fraction of re-appearances (first chunk of a segment that brings back an entity absent
                  from the previous segment, seen before in a recorded chunk, not in the sink chunk) where
                  the memory read before that chunk holds at least half a frame's worth of the entity's
                  tokens; averaged over layers and heads. Tokens are identified by their exact key bytes,
                  which works because memory K/V are bit-identical copies of the cache.
  named share     fraction of all memory tokens read that belong to the scene or an entity the active
                  prompt names.
  tokens/query    keys a query attends to: sink + local window (12 frames x 64 tokens) + memory tokens.
  ms/chunk        wall time of the memory's own work per chunk (set_prompt + read + write), all streams
                  batched, on CPU; the backbone is not simulated, so this is the memory overhead only.

Training. The slot grouper (phi_l, slot attention, initialiser, dynamics predictor) and the feature
decoder are trained by the project's Stage 0 objective and schedule on calibration streams with disjoint
casts (different entities and scenes, same backbone and text encoder): L_con + stage0_rec_weight * L_feat
(memory.slot_loss(0)), AdamW at memory_lr without weight decay, the rate following
trainer/schedule.py stage0_lr_factor; `slot_untrained` keeps the default initialisation, side by side.
Honesty notes. Two linear maps that the generation loss of Stages I/II would train (it needs a teacher, which
this synthetic world has not) are *fitted* on the calibration streams and their ground-truth token labels:
SlotMemory's text projections P_l (ridge regression from an entity's word embedding to the slot embeddings of
items made of >= 75% that entity's tokens, through the grouper of that row) and, symmetrically, the frame
bank's text keys (ridge regression from the word embedding to the entity's mean key per layer; MemFlow would
use the backbone's cross-attention keys). Keys carry no RoPE here, which favours the frame bank's key-based
text scoring. Nothing about the evaluation streams is used for training or fitting, and outcomes are measured,
not set.

With --policy (a policy published by `slotmem pipeline --config configs/tiny.yaml`), a second table measures the
same entity recall on the toy world with nothing fitted: ground-truth leave-and-return videos streamed through the
committed student, and the memory modules the project's stages trained (grouper: Stage 0; P_l: the generation loss
of Stages I/II) next to none / frame_bank / slot at its seeded init (bench/toy_retention.py).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from memory import build_memory
from memory.writer import top_tokens
from slotmem.config import MemoryConfig, TrainerConfig
from trainer.models import apply_group_settings
from trainer.schedule import stage0_lr_factor

NUM_LAYERS, DIM, HEADS, HEAD_DIM, TEXT_DIM = 2, 64, 4, 16, 32
GRID, FRAMES = 8, 3  # 8x8 tokens per latent frame, 3 frames per chunk
TPF = GRID * GRID
L = FRAMES * TPF
LOCAL_FRAMES = 12  # LongLive window, sink included (Table 6)
SEG_CHUNKS = 4  # chunks per prompt segment
CAST_ENTITIES, CAST_SCENES = 8, 4
NOISE = 0.5  # per-feature token noise against N(0, 1) prototypes
RIDGE = 1e-1

BASE = dict(slot_dim=32, num_slots_per_chunk=4, tokens_per_slot=16, bank_size=6, record_interval=3,
            retrieve_top_k=12, frame_bank_frames=3)
# (row name, memory kind, changes to BASE). slot_bank3 stores as many tokens as the frame bank (12 items x 16)
# and therefore reads its whole bank: it isolates eviction from retrieval.
VARIANTS = [("slot_untrained", "slot", {}), ("slot", "slot", {}), ("slot_bank3", "slot", {"bank_size": 3}),
            ("frame_bank", "frame_bank", {}), ("none", "none", {})]
# Stage 0 on the calibration streams: the tiny preset's rate and length (configs/tiny-random-60s.yaml), the default
# reconstruction weight (these features have object structure; the demo's random backbone's have little)
STAGE0 = TrainerConfig(stage0_steps=150, memory_lr=3e-3)


# ----------------------------------------------------------------------------------------------
# the synthetic world
# ----------------------------------------------------------------------------------------------


@dataclass
class State:
    x: torch.Tensor  # (B, L, dim)
    k: torch.Tensor  # (B, L, H, D)
    v: torch.Tensor  # (B, L, H, D)


@dataclass
class World:
    """Fixed backbone and text encoder shared by every stream."""

    feature_maps: torch.Tensor  # (Y, dim, dim) orthogonal: what each layer sees of a token
    key_maps: torch.Tensor  # (Y, dim, H*D)
    value_maps: torch.Tensor  # (Y, dim, H*D)
    text_map: torch.Tensor  # (dim, text_dim): appearance -> word embedding

    @classmethod
    def make(cls, g: torch.Generator) -> "World":
        ortho = torch.linalg.qr(torch.randn(NUM_LAYERS, DIM, DIM, generator=g)).Q
        proj = lambda: torch.randn(NUM_LAYERS, DIM, HEADS * HEAD_DIM, generator=g) / math.sqrt(DIM)  # noqa: E731
        return cls(ortho, proj(), proj(), torch.randn(DIM, TEXT_DIM, generator=g) / math.sqrt(DIM))

    def states(self, features: torch.Tensor) -> list[State]:
        """features (B, L, dim) -> the per-layer clean re-run."""
        out = []
        for y in range(NUM_LAYERS):
            x = features @ self.feature_maps[y]
            k = (x @ self.key_maps[y]).unflatten(-1, (HEADS, HEAD_DIM))
            v = (x @ self.value_maps[y]).unflatten(-1, (HEADS, HEAD_DIM))
            out.append(State(x, k, v))
        return out

    def word(self, proto: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        return proto @ self.text_map + 0.1 * torch.randn(TEXT_DIM, generator=g)


@dataclass
class Stream:
    """One video: a cast and its script. Labels: entity e >= 0, scene s -> -1 - s."""

    entity_protos: torch.Tensor  # (E, dim)
    scene_protos: torch.Tensor  # (S, dim)
    entity_words: torch.Tensor  # (E, text_dim)
    scene_words: torch.Tensor  # (S, text_dim)
    entity_size: list[int]
    segments: list[tuple[int, tuple[int, int]]]  # (scene, (left entity, right entity))

    @classmethod
    def make(cls, world: World, num_segments: int, g: torch.Generator) -> "Stream":
        ep = torch.randn(CAST_ENTITIES, DIM, generator=g)
        sp = torch.randn(CAST_SCENES, DIM, generator=g)
        segments, prev = [], set()
        for _ in range(num_segments):
            choices = [e for e in range(CAST_ENTITIES) if e not in prev]
            pick = torch.randperm(len(choices), generator=g)[:2].tolist()
            pair = (choices[pick[0]], choices[pick[1]])
            segments.append((int(torch.randint(CAST_SCENES, (1,), generator=g)), pair))
            prev = set(pair)
        return cls(ep, sp, torch.stack([world.word(p, g) for p in ep]), torch.stack([world.word(p, g) for p in sp]),
                   [int(3 + torch.randint(2, (1,), generator=g)) for _ in range(CAST_ENTITIES)], segments)

    def chunk(self, c: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Features (L, dim) and labels (L,) of chunk c."""
        scene, pair = self.segments[c // SEG_CHUNKS]
        labels = torch.full((FRAMES, GRID, GRID), -1 - scene, dtype=torch.long)
        for half, e in enumerate(pair):  # left entity in columns 0-3, right one in 4-7
            size = self.entity_size[e]
            row = int(torch.randint(GRID - size + 1, (1,), generator=g))
            col = half * GRID // 2 + int(torch.randint(GRID // 2 - size + 1, (1,), generator=g))
            for f in range(FRAMES):
                r = min(max(row + int(torch.randint(-1, 2, (1,), generator=g)), 0), GRID - size)
                labels[f, r: r + size, col: col + size] = e
        labels = labels.flatten()  # (L,)
        protos = torch.where((labels >= 0)[:, None], self.entity_protos[labels.clamp(min=0)],
                             self.scene_protos[(-1 - labels).clamp(min=0)])
        return protos + NOISE * torch.randn(L, DIM, generator=g), labels

    def prompt_words(self, segment: int) -> torch.Tensor:
        scene, pair = self.segments[segment]
        return torch.stack([self.scene_words[scene], self.entity_words[pair[0]], self.entity_words[pair[1]]])


# ----------------------------------------------------------------------------------------------
# Stage 0 on the calibration streams
# ----------------------------------------------------------------------------------------------


def train_stage0(mem, world: World, streams: list[Stream], num_chunks: int, tcfg: TrainerConfig, batch: int,
                 g: torch.Generator) -> list[dict[str, float]]:
    """The slot modules Stage 0 trains (trainer/models.py _slot_modules_only), with its objective and rate."""
    params = [p for name in ("writer", "decoder") for p in getattr(mem, name).parameters()]
    opt = torch.optim.AdamW([{"params": params, "name": "memory"}], betas=(tcfg.beta1, tcfg.beta2))
    history = []
    for step in range(tcfg.stage0_steps):
        pick = torch.randperm(len(streams), generator=g)[:batch].tolist()
        mem.reset(batch)
        mem.set_prompt(torch.stack([streams[i].prompt_words(0) for i in pick]).mean(1), 0)
        for c in range(min(num_chunks, 8)):  # a window's worth of chunks, as a Stage 0 update replays
            chunk = [streams[i].chunk(c, g) for i in pick]
            mem.write(world.states(torch.stack([f for f, _ in chunk])), chunk_index=c, start_frame=FRAMES * c,
                      num_frames=FRAMES)
        loss = mem.slot_loss(0, feature_weight=tcfg.stage0_rec_weight)
        apply_group_settings(opt, tcfg, stage=0, lr_scale=stage0_lr_factor(step, tcfg))  # memory_lr, no decay
        opt.zero_grad()
        loss.total.backward()
        opt.step()
        history.append({**loss.health, **{k: float(v) for k, v in loss.parts.items()}})
    return history


# ----------------------------------------------------------------------------------------------
# fitted text maps (calibration stream, disjoint cast)
# ----------------------------------------------------------------------------------------------


def ridge(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """argmin_W |x W - y|^2 + RIDGE |W|^2."""
    return torch.linalg.solve(x.T @ x + RIDGE * torch.eye(x.shape[1]), x.T @ y)


@torch.no_grad()
def fit_text_maps(mem, world: World, streams: list[Stream], num_chunks: int, g: torch.Generator):
    """Per layer: P_l (text -> slot space) for SlotMemory and a text -> key map for the frame bank."""
    R = mem.cfg.tokens_per_slot
    words, slots = [[] for _ in range(NUM_LAYERS)], [[] for _ in range(NUM_LAYERS)]
    key_words, keys = [], [[] for _ in range(NUM_LAYERS)]
    prev = None
    for c in range(num_chunks):
        chunk = [s.chunk(c, g) for s in streams]
        states = world.states(torch.stack([f for f, _ in chunk]))
        grouping = mem.writer([s.x for s in states], prev)  # exactly what a write runs
        prev = grouping.slots
        index = top_tokens(grouping.assign, R)  # (Y, B, S, R)
        for b, (stream, (_, labels)) in enumerate(zip(streams, chunk)):
            for e in labels[labels >= 0].unique().tolist():
                key_words.append(stream.entity_words[e])
                for y in range(NUM_LAYERS):
                    keys[y].append(states[y].k[b, labels == e].mean(0).flatten())
            for y in range(NUM_LAYERS):
                for s in range(index.shape[2]):
                    item_labels = labels[index[y, b, s]]
                    e = int(item_labels.mode().values)
                    if e >= 0 and (item_labels == e).float().mean() >= 0.75:  # an item made of one entity
                        words[y].append(stream.entity_words[e])
                        slots[y].append(torch.nn.functional.normalize(grouping.slots[y, b, s], dim=0))
    text_proj = [ridge(torch.stack(words[y]), torch.stack(slots[y])) for y in range(NUM_LAYERS)]  # (text, d)
    key_proj = [ridge(torch.stack(key_words), torch.stack(keys[y])) for y in range(NUM_LAYERS)]  # (text, H*D)
    return text_proj, key_proj, sum(len(w) for w in words)


# ----------------------------------------------------------------------------------------------
# one run of one memory kind over the evaluation streams
# ----------------------------------------------------------------------------------------------


def make_memory(cfg: MemoryConfig, init_seed: int):
    torch.manual_seed(init_seed)  # every slot memory starts from the same untrained modules
    return build_memory(cfg, num_layers=NUM_LAYERS, dim=DIM, num_heads=HEADS, head_dim=HEAD_DIM, text_dim=TEXT_DIM,
                        tokens_per_frame=TPF, num_frame_per_block=FRAMES)


@torch.no_grad()
def run_kind(name: str, cfg: MemoryConfig, world: World, streams: list[Stream], text_proj, key_proj, seed: int,
             init_seed: int, trained: dict | None = None) -> dict:
    kind = cfg.kind
    mem = make_memory(cfg, init_seed)
    if trained is not None:  # the Stage 0 modules (their shapes do not depend on the bank size)
        mem.writer.load_state_dict(trained["writer"])
        mem.decoder.load_state_dict(trained["decoder"])
    if kind == "slot":
        for proj, w in zip(mem.text_proj, text_proj):
            proj.weight.copy_(w.T)
            proj.bias.zero_()
    B = len(streams)
    num_chunks = len(streams[0].segments) * SEG_CHUNKS
    g = torch.Generator().manual_seed(seed)
    mem.reset(B)
    lookup = [[{} for _ in range(HEADS)] for _ in range(NUM_LAYERS)]  # key bytes of one head -> (stream, label)
    seen_recorded = [set() for _ in range(B)]
    sink_entities = [set() for _ in range(B)]
    events, hits, named_tokens, memory_tokens, mem_per_query = 0, 0.0, 0, 0, []
    seconds = 0.0
    for c in range(num_chunks):
        segment = c // SEG_CHUNKS
        chunk = [s.chunk(c, g) for s in streams]  # drawn identically for every kind (same seed)
        states = world.states(torch.stack([f for f, _ in chunk]))
        t0 = time.perf_counter()
        if c % SEG_CHUNKS == 0:
            words = torch.stack([s.prompt_words(segment) for s in streams])  # (B, 3, text)
            text_keys = [(words @ key_proj[y]).unflatten(-1, (HEADS, HEAD_DIM)) for y in range(NUM_LAYERS)]
            mem.set_prompt(words.mean(1), segment, text_keys)
        memory_kv = mem.read()
        seconds += time.perf_counter() - t0

        M = 0 if memory_kv is None else memory_kv[0][0].shape[1]
        mem_per_query.append(M)
        for b, stream in enumerate(streams):
            scene, pair = stream.segments[segment]
            named = {*pair, -1 - scene}
            returning = []
            if c % SEG_CHUNKS == 0 and segment > 0:
                before = set(stream.segments[segment - 1][1])
                returning = [e for e in pair if e not in before and e in seen_recorded[b]
                             and e not in sink_entities[b]]
            counts = {}  # (layer, head) -> label counts of the memory tokens read
            for y in range(NUM_LAYERS):
                for h in range(HEADS):
                    labels = []
                    if memory_kv is not None:
                        rows = memory_kv[y][0][b, :, h].contiguous().numpy()
                        sources = [lookup[y][h][row.tobytes()] for row in rows]  # exact copies of cached keys
                        assert all(src == b for src, _ in sources), "a memory token came from another stream"
                        labels = [lab for _, lab in sources]
                    counts[(y, h)] = labels
                    memory_tokens += len(labels)
                    named_tokens += sum(1 for lab in labels if lab in named)
            for e in returning:
                need = math.ceil(0.5 * stream.entity_size[e] ** 2)  # half a frame's worth of the entity
                events += 1
                hits += sum(labs.count(e) >= need for labs in counts.values()) / len(counts)

        t0 = time.perf_counter()
        mem.write(states, chunk_index=c, start_frame=FRAMES * c, num_frames=FRAMES)
        seconds += time.perf_counter() - t0
        for b, (_, labels) in enumerate(chunk):
            for y in range(NUM_LAYERS):
                for h in range(HEADS):
                    rows = states[y].k[b, :, h].contiguous().numpy()
                    for t in range(L):
                        lookup[y][h][rows[t].tobytes()] = (b, int(labels[t]))
            present = set(labels[labels >= 0].tolist())
            if c == 0:
                sink_entities[b] = present
            if c % cfg.record_interval == 0:
                seen_recorded[b] |= present

    stored = {"slot": cfg.budget * cfg.tokens_per_slot, "frame_bank": cfg.frame_bank_frames * TPF, "none": 0}[kind]
    return {
        "name": name,
        "kind": kind,
        "entity_recall": hits / max(events, 1),
        "events": events,
        "named_share": named_tokens / max(memory_tokens, 1),
        "memory_tokens_per_query": max(mem_per_query),
        "tokens_per_query": LOCAL_FRAMES * TPF + max(mem_per_query),
        "stored_tokens_per_layer": stored,
        "ms_per_chunk": 1000 * seconds / num_chunks,
        "chunks": num_chunks,
        "streams": B,
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench/results/memory_retention.json", help="JSON results path")
    ap.add_argument("--streams", type=int, default=8, help="streams generated side by side (batch)")
    ap.add_argument("--segments", type=int, default=12, help=f"prompt segments per stream ({SEG_CHUNKS} chunks each)")
    ap.add_argument("--calibration-streams", type=int, default=32,
                    help="streams (8 entities each, disjoint from the evaluation casts) used to fit the text maps")
    ap.add_argument("--stage0-steps", type=int, default=STAGE0.stage0_steps,
                    help="Stage 0 updates of the slot modules on the calibration streams")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (tiny tensors: 1 is fastest)")
    ap.add_argument("--policy", default=None,
                    help="a published toy-world policy (.safetensors): also measure its trained memory on the toy world")
    ap.add_argument("--toy-scripts", type=int, default=8, help="toy-world leave-and-return videos (with --policy)")
    ap.add_argument("--toy-segments", type=int, default=None, help="only each toy video's first N prompts (smoke)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()

    g = torch.Generator().manual_seed(args.seed)
    world = World.make(g)
    calibration = [Stream.make(world, args.segments, g) for _ in range(args.calibration_streams)]
    streams = [Stream.make(world, args.segments, g) for _ in range(args.streams)]

    configs = {name: MemoryConfig(kind=kind, **{**BASE, **changes}) for name, kind, changes in VARIANTS}
    init_seed = args.seed + 1
    num_chunks = args.segments * SEG_CHUNKS
    untrained = make_memory(configs["slot"], init_seed)
    maps = {"untrained": fit_text_maps(untrained, world, calibration, num_chunks,
                                       torch.Generator().manual_seed(args.seed + 2))}
    stage0 = replace(STAGE0, stage0_steps=args.stage0_steps)
    trained_mem = make_memory(configs["slot"], init_seed)
    t0 = time.perf_counter()
    history = train_stage0(trained_mem, world, calibration, num_chunks, stage0, args.streams,
                           torch.Generator().manual_seed(args.seed + 4)) if stage0.stage0_steps else []
    stage0_s = time.perf_counter() - t0
    trained = {"writer": trained_mem.writer.state_dict(), "decoder": trained_mem.decoder.state_dict()}
    maps["stage0"] = fit_text_maps(trained_mem, world, calibration, num_chunks,
                                   torch.Generator().manual_seed(args.seed + 2))
    _, key_proj, _ = maps["untrained"]  # the frame bank's text keys do not depend on the grouper

    rows = []
    for name, cfg in configs.items():
        which = "untrained" if name == "slot_untrained" or cfg.kind != "slot" else "stage0"
        text_proj, _, pairs = maps[which]
        rows.append(run_kind(name, cfg, world, streams, text_proj, key_proj, args.seed + 3, init_seed,
                             trained if which == "stage0" and cfg.kind == "slot" else None))

    header = f"{'memory':<12}{'entity recall':>14}{'named share':>13}{'mem tok/q':>11}{'tok/query':>11}" \
             f"{'stored/layer':>14}{'ms/chunk':>10}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['name']:<12}{r['entity_recall']:>14.3f}{r['named_share']:>13.3f}{r['memory_tokens_per_query']:>11}"
              f"{r['tokens_per_query']:>11}{r['stored_tokens_per_layer']:>14}{r['ms_per_chunk']:>10.2f}")
    elapsed = time.perf_counter() - start
    tail = lambda key: sum(h[key] for h in history[-10:]) / max(len(history[-10:]), 1)  # noqa: E731
    first = history[0] if history else {}
    print(f"Stage 0 on {args.calibration_streams} calibration streams: {len(history)} updates in {stage0_s:.1f} s; "
          f"slot cosine {first.get('cosine', float('nan')):.2f} -> {tail('cosine') if history else float('nan'):.2f}, "
          f"mask coverage {first.get('mask_coverage', float('nan')):.2f} -> "
          f"{tail('mask_coverage') if history else float('nan'):.2f} (first update -> mean of the last 10)")
    print(f"{rows[0]['events']} re-appearances over {args.streams} streams x {rows[0]['chunks']} chunks; "
          f"P fitted on {maps['untrained'][2]} (untrained) / {maps['stage0'][2]} (Stage 0) calibration items; "
          f"{elapsed:.1f} s")

    result = {"config": {"memory": BASE, "num_layers": NUM_LAYERS, "dim": DIM, "heads": HEADS, "head_dim": HEAD_DIM,
                         "text_dim": TEXT_DIM, "tokens_per_frame": TPF, "frames_per_chunk": FRAMES,
                         "segment_chunks": SEG_CHUNKS, "streams": args.streams, "segments": args.segments,
                         "seed": args.seed, "noise": NOISE},
              "results": rows, "calibration_items": {k: v[2] for k, v in maps.items()},
              "stage0": {"steps": len(history), "memory_lr": stage0.memory_lr, "seconds": stage0_s,
                         "first": first, "last10": {k: tail(k) for k in first}}, "seconds": elapsed}
    if args.policy:
        from toy_retention import print_rows, toy_retention  # bench/; loads the toy world's VAE and text encoder
        t0 = time.perf_counter()
        result["toyworld"] = toy_retention(Path(args.policy), scripts=args.toy_scripts, segments=args.toy_segments)
        print(f"\nToy world, memory trained by the project's stages ({args.policy}): {args.toy_scripts} ground-truth "
              f"leave-and-return videos, teacher-forced through the committed student")
        print_rows(result["toyworld"])
        print(f"{time.perf_counter() - t0:.1f} s")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
