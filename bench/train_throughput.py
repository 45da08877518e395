"""Trainer steps/s and per-rank parameter + optimizer memory under ZeRO 1, 2 and 3, measured in one run.

    python bench/train_throughput.py [--config configs/tiny-random-60s.yaml] [--set section.field=value ...]
                                     [--workers 2] [--steps 10] [--out bench/results/train_throughput.json]

One Ray Train job with ``--workers`` workers (gloo on CPU, NCCL on GPU). Each worker rolls out one
trajectory of ``rollout.num_frames`` frames in-process, then, for each ZeRO stage in turn, builds the
generator and critic engines exactly as the training job does (trainer/engines.py ``build_engines``,
``trainer.zero3_param_persistence_threshold`` forced to 0 so that every tensor of a small model is
partitioned under ZeRO-3) and runs ``--steps`` real training steps (1 generator : 5 critic updates, each
on a fresh window of its trajectory) after one untimed warm-up step.

Reported per stage: training steps/s (the slowest rank's wall time), and per rank the elements held of
model parameters, fp32 master weights and AdamW moments for generator + critic
(``trainer.deepspeed_setup.zero_partition_stats``) plus the frozen teacher's parameters, in MiB at 4
bytes per element. Gradient buffers are not counted (ZeRO-2 partitions them; ZeRO-1 does not), so
ZeRO-1 and ZeRO-2 show the same memory here.
Ratios are against ZeRO-1 of the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

MIB = 1 << 20
BYTES_PER_ELEMENT = 4  # fp32 on CPU; under bf16 the compute copy is 2 bytes, master and moments stay fp32


def _trajectory(cfg, rank: int, device):
    """One self-rollout of the initial policy, as a batch_to_torch-style row."""
    import torch

    from rollout.components import build_components
    from rollout.prompts import BUILTIN_PROMPT_PAIRS
    from rollout.streaming import encode_prompts, generate

    comps = build_components(cfg.model, cfg.memory, device=str(device), seed=cfg.trainer.seed)
    prompts = list(BUILTIN_PROMPT_PAIRS[rank % len(BUILTIN_PROMPT_PAIRS)])
    chunk = cfg.model.num_frame_per_block
    switch = [cfg.rollout.num_frames // 2 // chunk * chunk]
    with torch.no_grad():
        encoded = encode_prompts(comps.text_encoder, prompts)
        result = generate(comps.generator.backbone, comps.generator.memory, comps.scheduler, cfg.model, encoded,
                          num_frames=cfg.rollout.num_frames, switch_frames=switch, seed=rank, device=device,
                          inspect_memory=False)
        negative = comps.text_encoder.encode([cfg.trainer.negative_prompt])[0][0]
    row = {"latents": result.latents.cpu(), "text_embeddings": [encoded.embeddings.cpu()],
           "switch_frames": [switch], "policy_version": torch.tensor([0])}
    return row, negative.cpu()


def _measure(cfg, zero_stage: int, row, negative, *, steps: int, rank: int, world: int, device, use_gpu: bool):
    import torch
    import torch.distributed as dist

    from model.vae import build_vae
    from trainer.deepspeed_setup import zero_partition_stats
    from trainer.engines import build_engines, rank_sync
    from trainer.objectives import critic_loss, generator_loss
    from trainer.schedule import plan_step
    from trainer.window import draw_exit_steps, window_from_row

    engines = build_engines(cfg, 1, world_size=world, device=device, use_bf16=use_gpu, zero_stage=zero_stage)
    sync = rank_sync(engines, device)
    first_frame = build_vae(cfg.model, device, torch.float32).reencode_first_frame  # as trainer/worker.py does
    rng = torch.Generator().manual_seed(rank)
    noise = torch.Generator(device=device).manual_seed(1000 + rank)
    chunk = cfg.model.num_frame_per_block

    def window():
        w = window_from_row(row, window_frames=cfg.trainer.window_frames, chunk=chunk, generator=rng, sync=sync)
        return w, draw_exit_steps(w.num_new // chunk, len(cfg.model.denoising_steps), rng,
                                  same=cfg.trainer.same_exit_step, broadcast=sync.broadcast)  # as trainer/worker.py

    def train_step(step: int):
        if plan_step(1, step, cfg.trainer).train_generator:
            w, exits = window()
            loss, _ = generator_loss(w, generator=engines.generator.module, teacher=engines.teacher,
                                     critic=engines.critic.module, scheduler=engines.scheduler, model_cfg=cfg.model,
                                     trainer_cfg=cfg.trainer, negative_embedding=negative, stage=1, exit_steps=exits,
                                     first_frame=first_frame, generator_rng=rng, noise_rng=noise, sync=sync)
            engines.generator.backward(loss)
            engines.generator.step()
        w, exits = window()
        loss, _ = critic_loss(w, generator=engines.generator.module, critic=engines.critic.module,
                              scheduler=engines.scheduler, model_cfg=cfg.model, trainer_cfg=cfg.trainer,
                              exit_steps=exits, first_frame=first_frame, generator_rng=rng, noise_rng=noise,
                              sync=sync)
        engines.critic.backward(loss)
        engines.critic.step()

    train_step(0)  # warm-up (also creates the AdamW state counted below)
    dist.barrier()
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        train_step(step)
    if use_gpu:
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    slowest = torch.tensor([seconds], dtype=torch.float64, device=device)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    held = {}
    for name, engine in (("generator", engines.generator), ("critic", engines.critic)):
        s = zero_partition_stats(engine)
        held[name] = {"param_elements": s.param_elements, "param_elements_total": s.param_elements_total,
                      "master_param_elements": s.master_param_elements,
                      "optimizer_state_elements": s.optimizer_state_elements}
    teacher = list(engines.teacher.parameters())  # frozen: parameters only (partitioned under ZeRO-3)
    held["teacher"] = {"param_elements": sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel()
                                             for p in teacher),
                       "param_elements_total": sum(getattr(p, "ds_numel", p.numel()) for p in teacher),
                       "master_param_elements": 0, "optimizer_state_elements": 0}
    engines = None  # frees the engines before the next ZeRO stage builds its own (train_step closes over it)
    return {"steps": steps, "seconds": float(slowest), "held": held}


def bench_loop(config: dict) -> None:
    """Ray Train worker: all ZeRO stages one after the other; rank 0 writes the results."""
    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist

    from slotmem.config import build_config
    from trainer.deepspeed_setup import init_distributed_cpu_safe

    cfg = build_config(config["config"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    use_gpu = cfg.cluster.gpus_per_worker > 0
    if not use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    init_distributed_cpu_safe("nccl" if use_gpu else "gloo")
    device = ray.train.torch.get_device() if use_gpu else torch.device("cpu")
    row, negative = _trajectory(cfg, rank, device)
    results = []
    for zero_stage in config["zero_stages"]:
        out = _measure(cfg, zero_stage, row, negative, steps=config["steps"], rank=rank, world=world, device=device,
                       use_gpu=use_gpu)
        per_rank = [None] * world
        dist.all_gather_object(per_rank, out["held"])
        results.append({"zero_stage": zero_stage, "steps": out["steps"], "seconds": out["seconds"],
                        "steps_per_s": out["steps"] / out["seconds"], "per_rank": per_rank})
        if rank == 0:
            print(f"[bench] ZeRO-{zero_stage}: {out['steps'] / out['seconds']:.2f} steps/s", flush=True)
    if rank == 0:
        Path(config["out"]).write_text(json.dumps({"workers": world, "results": results}, indent=2))


def _mib(held: dict, keys: tuple[str, ...]) -> float:
    return sum(held[model][k] for model in held for k in keys) * BYTES_PER_ELEMENT / MIB


def summarize(data: dict) -> list[dict]:
    """Per stage: steps/s, per-rank MiB (max over ranks), and ratios against ZeRO-1."""
    rows = []
    for r in data["results"]:
        params = max(_mib(h, ("param_elements",)) for h in r["per_rank"])
        optim = max(_mib(h, ("master_param_elements", "optimizer_state_elements")) for h in r["per_rank"])
        rows.append({"zero_stage": r["zero_stage"], "steps_per_s": r["steps_per_s"], "param_mib": params,
                     "master_and_optimizer_mib": optim, "total_mib": params + optim})
    base = next((row for row in rows if row["zero_stage"] == 1), rows[0])
    for row in rows:
        row["memory_ratio"] = row["total_mib"] / base["total_mib"]
        row["speed_ratio"] = row["steps_per_s"] / base["steps_per_s"]
    return rows


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(REPO / "configs" / "tiny-random-60s.yaml"))
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10, help="timed training steps per ZeRO stage")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "train_throughput.json"))
    args = ap.parse_args(argv)

    from ray.train import RunConfig
    from ray.train.torch import TorchTrainer

    from cluster.placement import scaling_config, torch_config
    from cluster.runtime import connect
    from cluster.shape import ClusterShape
    from slotmem.config import load_config

    cfg = load_config(args.config, [*args.overrides, f"cluster.num_trainer_workers={args.workers}",
                                    "trainer.zero3_param_persistence_threshold=0"])
    connect(cfg.cluster)
    shape = ClusterShape.from_config(cfg.cluster, cfg.trainer)
    out = Path(args.out).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="slotmem-bench-") as storage:
        TorchTrainer(bench_loop, train_loop_config={"config": cfg.to_dict(), "zero_stages": [1, 2, 3],
                                                    "steps": args.steps, "out": str(out)},
                     scaling_config=scaling_config(shape), torch_config=torch_config(shape),
                     run_config=RunConfig(name="bench-train-throughput", storage_path=storage)).fit()
    data = json.loads(out.read_text())
    rows = summarize(data)
    data.update({"summary": rows, "config": args.config, "overrides": args.overrides,
                 "seconds": round(time.perf_counter() - t0, 1)})
    out.write_text(json.dumps(data, indent=2))
    print(f"\ntraining steps/s and per-rank memory (generator, critic and teacher params + fp32 master + AdamW "
          f"moments) at {data['workers']} "
          f"workers, {cfg.model.name} preset, {args.steps} timed steps per stage")
    print(f"{'ZeRO':>4}  {'steps/s':>8}  {'params MiB':>10}  {'master+opt MiB':>14}  {'total MiB':>9}  "
          f"{'memory vs Z1':>12}  {'speed vs Z1':>11}")
    for r in rows:
        print(f"{r['zero_stage']:>4}  {r['steps_per_s']:>8.2f}  {r['param_mib']:>10.3f}  "
              f"{r['master_and_optimizer_mib']:>14.3f}  {r['total_mib']:>9.3f}  {r['memory_ratio']:>12.2f}  "
              f"{r['speed_ratio']:>11.2f}")
    print(f"results: {out}")
    return data


if __name__ == "__main__":
    main()
