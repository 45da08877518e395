"""`slotmem train --stage 1|2`: one training stage as a Ray Train + DeepSpeed job (DESIGN §5).

Driver (``run_stage``): checks the committed rollout rounds it trains on, encodes the negative prompt,
and runs a ``TorchTrainer`` with ``cluster.num_trainer_workers`` workers under a deterministic run name
``{experiment}-stage{N}`` in ``{storage.root}/{experiment}/checkpoints``: a resubmitted job with the
same name resumes from the newest checkpoint (Ray Train V2), and ``FailureConfig`` restarts the
worker group from it after a worker dies.

Workers (``train_loop``): one DeepSpeed engine per trained model (generator with its slot adapter;
critic), each with a client ``torch.optim.AdamW`` (no JIT op builds), ZeRO stage
``trainer.zero_stage``, bf16 on GPU / fp32 on CPU, NCCL / gloo. The teacher is frozen: a plain module
under ZeRO-1/2 (those stages never partition parameters), a ZeRO-3 engine without optimizer (its
parameters partitioned like the trained ones) under ZeRO-3. Rows come from ``get_dataset_shard``;
the split is equal (no rank runs out first and hangs a collective) and order-preserving (each rank's
rows are the same on every attempt, which makes the data cursor exact). A training step is one critic
update; every ``critic_updates_per_generator``-th step the generator updates first (trainer/schedule.py).
Each update takes its own row and window (trainer/window.py).

Every ``trainer.checkpoint_every`` generator updates and at the end every rank saves its part of the
checkpoint and reports it (trainer/checkpoint.py). At the end of the stage the generator (EMA weights
once EMA is active) is published as policy version N = the stage number, and the raw generator and
critic are kept for Stage II. Rank 0 logs to MLflow: a child run of the pipeline's parent run (or a run
of its own), resumed by id after a restart.

Fault injection for tests only: ``SLOTMEM_TRAIN_FAULT_STEP=K`` in the driver's environment makes the
workers raise at the start of training step K, unless the attempt resumed from a checkpoint.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from cluster.shape import ClusterShape
from cluster.storage import Storage, publish_weights, resolve_storage
from cluster.tracking import (METRIC_CRITIC, METRIC_DATA_WAIT, METRIC_DMD, METRIC_POLICY_LAG, METRIC_SLOT_CON,
                              METRIC_SLOT_REC, Tracker, resolve_tracking_uri, stage_run_name)
from rollout.prompts import load_training_prompts
from rollout.shards import batch_to_torch, committed_rounds, read_manifest, read_round_dataset
from slotmem.config import Config, ModelConfig, build_config
from slotmem.errors import InputError
from trainer.checkpoint import (STATE_FILE, TrainerState, load_checkpoint, read_stage_final, save_checkpoint,
                                stage_final_dir, write_stage_final)
from trainer.schedule import num_generator_updates, plan_step, train_steps_for

FAULT_ENV = "SLOTMEM_TRAIN_FAULT_STEP"
PARENT_RUN_ENV = "SLOTMEM_PARENT_RUN_ID"
DATASET = "train"
# What a training window needs from a shard row (the prompt strings and timings stay on disk).
DATA_COLUMNS = ("trajectory_id", "policy_version", "switch_frames", "latents", "latents_dtype", "text_embeddings",
                "text_embeddings_shape", "text_embeddings_dtype")
SAMPLE_CHUNKS = 4  # length of the end-of-stage sample video in chunks (12 latent frames)


def stage_name(stage: int) -> str:
    return f"stage{stage}"


@dataclass
class StageResult:
    """What a finished stage produced; ``to_dict`` goes into the pipeline state."""

    stage: int
    policy_version: int
    rounds: list[int]
    steps: int
    generator_updates: int
    run_name: str
    checkpoint_uri: str | None
    weights_uri: str
    final_weights_uri: str
    mlflow_run_id: str | None
    seconds: float
    last: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("history")
        return d

    def summary(self) -> str:
        losses = ", ".join(f"{k}={v:.4g}" for k, v in self.last.items() if k in ("critic", "dmd", "slot"))
        return (f"stage {self.stage}: {self.steps} steps ({self.generator_updates} generator updates) on rounds "
                f"{self.rounds} in {self.seconds:.1f} s; {losses}; published policy_version {self.policy_version} "
                f"at {self.weights_uri}; checkpoint {self.checkpoint_uri}")


# ----------------------------------------------------------------------------------------------
# driver
# ----------------------------------------------------------------------------------------------


def _encode_prompts(model_cfg: ModelConfig, texts: list[str]) -> np.ndarray:
    """Text embeddings [P, Lt, D] of fixed prompts (the CFG negative prompt, the sample video's prompts),
    encoded once here instead of loading a text encoder in every worker."""
    from model.text import build_text_encoder

    encoder = build_text_encoder(model_cfg, "cpu", torch.float32)
    emb, _ = encoder.encode(list(texts))
    return emb.numpy()


def _check_trainer_fits(cfg: Config, resources: dict[str, float]) -> None:
    """Trainer workers must fit and leave a CPU for Ray Data's read tasks (else the read deadlocks)."""
    n = cfg.cluster.num_trainer_workers
    need_cpu, need_gpu = n * cfg.cluster.cpus_per_worker, n * cfg.cluster.gpus_per_worker
    have_cpu, have_gpu = resources.get("CPU", 0.0), resources.get("GPU", 0.0)
    if need_gpu > have_gpu + 1e-9 or need_cpu > have_cpu + 1e-9:
        raise InputError(f"cluster too small for {n} trainer workers x ({cfg.cluster.cpus_per_worker:g} CPU, "
                         f"{cfg.cluster.gpus_per_worker:g} GPU): it has {have_cpu:g} CPU, {have_gpu:g} GPU")
    if have_cpu - need_cpu < 1.0:
        raise InputError(f"{n} trainer workers x {cfg.cluster.cpus_per_worker:g} CPU take {need_cpu:g} of the "
                         f"cluster's {have_cpu:g} CPUs; Ray Data needs at least one free CPU to read the rollout "
                         "shards (lower cluster.cpus_per_worker, or raise cluster.local_num_cpus)")


def _worker_config(cfg: Config, storage: Storage) -> Config:
    """The config as workers must see it: absolute storage root and a resolved tracking URI."""
    root = storage.root if storage.is_local else cfg.storage.root
    uri = resolve_tracking_uri(cfg.tracking, storage.root if storage.is_local else None)
    tracking = replace(cfg.tracking, tracking_uri=uri or "", enabled=cfg.tracking.enabled and uri is not None)
    return replace(cfg, storage=replace(cfg.storage, root=root), tracking=tracking)


def _run_config(cfg: Config, storage: Storage, run_name: str):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig

    kwargs: dict[str, Any] = {}
    if not storage.is_local:
        kwargs["storage_filesystem"] = storage.fs  # s3: the same endpoint and credentials as the shards
    return RunConfig(name=run_name, storage_path=storage.checkpoints_dir(),
                     checkpoint_config=CheckpointConfig(num_to_keep=cfg.trainer.num_to_keep),
                     failure_config=FailureConfig(max_failures=cfg.cluster.max_failures), **kwargs)


def run_stage(cfg: Config, stage: int, *, round_indices: list[int], parent_run_id: str | None = None) -> StageResult:
    """Train stage `stage` on committed rollout rounds; publish policy version `stage`."""
    import ray
    from ray.data import ExecutionOptions
    from ray.train import DataConfig
    from ray.train.torch import TorchTrainer

    from cluster.placement import scaling_config, torch_config
    from cluster.runtime import connect

    if stage not in (1, 2):
        raise InputError(f"--stage must be 1 or 2, got {stage!r}")
    t0 = time.perf_counter()
    storage = resolve_storage(cfg.storage)
    rounds = sorted(set(int(k) for k in round_indices))
    if not rounds:
        raise InputError("run_stage: no rollout rounds given")
    manifests = [read_manifest(storage, k) for k in rounds]  # InputError names an uncommitted round
    num_rows = sum(m["num_rows"] for m in manifests)
    world = cfg.cluster.num_trainer_workers
    if num_rows < world:
        raise InputError(f"rounds {rounds} hold {num_rows} trajectories, fewer than the {world} trainer workers "
                         "(cluster.num_trainer_workers): every rank needs at least one")
    trainer_version = stage - 1  # the policy the stage starts from
    versions = sorted({v for m in manifests for v in m.get("policy_versions", [])})
    if versions and trainer_version - versions[0] > cfg.pipeline.max_policy_lag:
        raise InputError(f"rounds {rounds} hold trajectories of policy versions {versions}, more than "
                         f"pipeline.max_policy_lag={cfg.pipeline.max_policy_lag} behind stage {stage}'s policy "
                         f"version {trainer_version}")
    if stage == 2:
        _require_stage_final(storage, 1)
    connect(cfg.cluster)
    _check_trainer_fits(cfg, ray.cluster_resources())
    shape = ClusterShape.from_config(cfg.cluster, cfg.trainer)
    run_name = stage_run_name(cfg.storage.experiment, stage_name(stage))
    fault = os.environ.get(FAULT_ENV)
    loop_config = {
        "config": _worker_config(cfg, storage).to_dict(),
        "stage": stage,
        "rounds": rounds,
        "rows_per_epoch": num_rows // world,  # equal split: the remainder is dropped every epoch
        "negative_embedding": _encode_prompts(cfg.model, [cfg.trainer.negative_prompt])[0],
        "sample_embeddings": _encode_prompts(cfg.model, list(load_training_prompts(cfg.rollout.prompt_file)[0])),
        "parent_run_id": parent_run_id or os.environ.get(PARENT_RUN_ENV) or None,
        "run_name": run_name,
        "checkpoint_root_uri": f"{storage.uri(storage.checkpoints_dir())}/{run_name}",
        "fault_step": int(fault) if fault else None,
    }
    # Materialized once: a stage re-reads its rounds every epoch, and an epoch of the lazy read would start
    # new file-listing and read tasks each time (seconds on a small cluster); the blocks stay in the object
    # store for the stage instead.
    dataset = read_round_dataset(storage, rounds, columns=DATA_COLUMNS)
    dataset.context.execution_options.preserve_order = True  # blocks in manifest order, on every attempt
    dataset = dataset.materialize()
    trainer = TorchTrainer(
        train_loop, train_loop_config=loop_config, scaling_config=scaling_config(shape),
        torch_config=torch_config(shape), run_config=_run_config(cfg, storage, run_name),
        datasets={DATASET: dataset},
        # preserve_order makes the split deterministic (no locality hints), so a resumed rank reads the
        # same rows in the same order and the data cursor means the same thing on every attempt.
        dataset_config=DataConfig(execution_options=ExecutionOptions(preserve_order=True),
                                  enable_shard_locality=False))
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"stage {stage} finished without a checkpoint in {storage.uri(storage.checkpoints_dir())}")
    state = _read_state(result.checkpoint)
    last = state.history[-1] if state.history else {}
    return StageResult(stage=stage, policy_version=stage, rounds=rounds, steps=state.step,
                       generator_updates=num_generator_updates(state.step, cfg.trainer), run_name=run_name,
                       checkpoint_uri=storage.uri(result.checkpoint.path),
                       weights_uri=storage.uri(storage.weights_dir(stage)),
                       final_weights_uri=storage.uri(stage_final_dir(storage, stage)),
                       mlflow_run_id=state.mlflow_run_id, seconds=round(time.perf_counter() - t0, 1),
                       last=last, history=state.history)


def _require_stage_final(storage: Storage, stage: int) -> None:
    from cluster.storage import COMMITTED

    if not storage.exists(f"{stage_final_dir(storage, stage)}/{COMMITTED}"):
        raise InputError(f"Stage II starts from Stage I's weights, but stage {stage} has not finished for experiment "
                         f"{storage.experiment!r}; run `slotmem train --stage {stage}` first")


def _read_state(checkpoint) -> TrainerState:
    with checkpoint.filesystem.open_input_stream(f"{checkpoint.path}/{STATE_FILE}") as f:
        return TrainerState.from_json(f.read().decode())


def main(args, cfg: Config) -> int:
    """`slotmem train --stage N [--round K]`: prints progress from rank 0 and a summary; returns 0."""
    storage = resolve_storage(cfg.storage)
    if args.round_index is not None:
        rounds = [args.round_index]
    else:
        available = committed_rounds(storage)
        if not available:
            raise InputError(f"no committed rollout round under {storage.uri(storage.rollouts_dir())}; "
                             "run `slotmem rollout` first")
        rounds = [available[-1]]
    result = run_stage(cfg, args.stage, round_indices=rounds)
    print(result.summary())
    return 0


# ----------------------------------------------------------------------------------------------
# workers: engines and collectives (shared with bench/train_throughput.py)
# ----------------------------------------------------------------------------------------------


@dataclass
class Engines:
    generator: Any
    """DeepSpeed engine of the generator (backbone + memory); ``.module`` is the Generator."""
    critic: Any
    """DeepSpeed engine of the critic."""
    teacher: torch.nn.Module
    """Frozen teacher: the module itself (ZeRO-1/2) or the module of a ZeRO-3 engine without optimizer."""
    scheduler: Any
    zero_stage: int


def build_engines(cfg: Config, stage: int, *, world_size: int, device: torch.device, use_bf16: bool,
                  zero_stage: int | None = None, init: dict[str, dict] | None = None) -> Engines:
    """Generator and critic engines (client AdamW, ZeRO `zero_stage`) and the frozen teacher, on every rank."""
    import deepspeed

    from trainer.deepspeed_setup import ds_config, make_engine
    from trainer.models import build_training_models, prepare_for_zero3

    tcfg = cfg.trainer
    zero_stage = tcfg.zero_stage if zero_stage is None else zero_stage
    init = init or {}
    models = build_training_models(cfg.model, cfg.memory, tcfg, stage=stage, device=device,
                                   generator_state=init.get("generator"), critic_state=init.get("critic"))
    dsc = ds_config(tcfg, zero_stage=zero_stage, use_bf16=use_bf16, train_batch_size=world_size,
                    param_persistence_threshold=tcfg.zero3_param_persistence_threshold)
    if zero_stage == 3:
        for module in (models.generator, models.critic, models.teacher):
            prepare_for_zero3(module)
    betas = (tcfg.beta1, tcfg.beta2)
    generator = make_engine(models.generator, lr=tcfg.lr, betas=betas, weight_decay=tcfg.weight_decay, ds_config=dsc)
    critic = make_engine(models.critic, lr=tcfg.critic_lr, betas=betas, weight_decay=tcfg.weight_decay, ds_config=dsc)
    if zero_stage == 3:
        teacher = deepspeed.initialize(model=models.teacher, config=dsc)[0].module  # no optimizer: partitioned
    else:
        teacher = models.teacher.to(torch.bfloat16) if use_bf16 else models.teacher  # ZeRO-1/2 never partition
    return Engines(generator=generator, critic=critic, teacher=teacher, scheduler=models.scheduler,
                   zero_stage=zero_stage)


def rank_sync(engines: Engines, device: torch.device):
    """The window's collectives over the default process group; under ZeRO-3 ``local`` gathers the
    generator's parameters and detaches DeepSpeed's per-module hooks for the block (DeepSpeed's own
    ``unwrap_model_for_generation``)."""
    import torch.distributed as dist

    from trainer.window import RankSync

    def broadcast(t: torch.Tensor) -> torch.Tensor:
        t = t.to(device, copy=True)  # the collectives work in place; the caller's tensor stays its own
        dist.broadcast(t, src=0)
        return t.cpu()

    def reduce_max(t: torch.Tensor) -> torch.Tensor:
        t = t.to(device, copy=True)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.cpu()

    local = contextlib.nullcontext
    if engines.zero_stage == 3:
        from deepspeed.runtime.zero.stage3 import unwrap_model_for_generation

        def local():
            return unwrap_model_for_generation(engines.generator)

    return RankSync(broadcast=broadcast, reduce_max=reduce_max, local=local)


# ----------------------------------------------------------------------------------------------
# workers: the stage
# ----------------------------------------------------------------------------------------------


class RowStream:
    """This rank's rows, epoch after epoch, starting after `consumed` rows (the data cursor).

    Ranks are in lock-step (each takes one row per window), so all of them start every new epoch of
    the streaming split together. Skipping whole epochs needs no reading: each epoch holds the same
    rows in the same order (order-preserving split), so only the offset inside an epoch is replayed.
    """

    def __init__(self, shard, *, rows_per_epoch: int, consumed: int):
        if rows_per_epoch < 1:
            raise InputError("each trainer rank needs at least one row per epoch")
        self.shard = shard
        self.rows_per_epoch = rows_per_epoch
        self.consumed = consumed
        self._skip = consumed % rows_per_epoch
        self._iter: Iterator | None = None
        self._seen = 0
        self.wait_s = 0.0

    def _epoch(self) -> Iterator[dict]:
        self._seen = 0
        for batch in self.shard.iter_batches(batch_size=1, batch_format="numpy", prefetch_batches=1):
            self._seen += 1
            yield batch
        if self._seen != self.rows_per_epoch:
            raise RuntimeError(f"an epoch of this rank's shard had {self._seen} rows, expected "
                               f"{self.rows_per_epoch}: the data cursor would be wrong")

    def next(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        while True:
            if self._iter is None:
                self._iter = self._epoch()
            batch = next(self._iter, None)
            if batch is None:
                self._iter = None
                continue
            if self._skip:
                self._skip -= 1
                continue
            break
        self.consumed += 1
        self.wait_s += time.perf_counter() - t0
        return batch_to_torch(batch)


class StageWorker:
    """The per-rank side of a stage: engines, data, the step loop, checkpoints, publishing."""

    def __init__(self, loop_config: dict[str, Any]):
        import ray.train
        import ray.train.torch
        import torch.distributed as dist

        from trainer.deepspeed_setup import init_distributed_cpu_safe
        from trainer.ema import EMA

        self.cfg = cfg = build_config(loop_config["config"])
        self.stage = int(loop_config["stage"])
        self.rounds = list(loop_config["rounds"])
        self.run_name = loop_config["run_name"]
        self.checkpoint_root_uri = loop_config["checkpoint_root_uri"]
        self.fault_step = loop_config.get("fault_step")
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.use_gpu = cfg.cluster.gpus_per_worker > 0
        if not self.use_gpu:
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        init_distributed_cpu_safe("nccl" if self.use_gpu else "gloo")
        self.dist = dist
        self.device = ray.train.torch.get_device() if self.use_gpu else torch.device("cpu")
        self.storage = resolve_storage(cfg.storage)
        self.trainer_version = self.stage - 1
        self.total_steps = train_steps_for(cfg.trainer.stage1_steps if self.stage == 1 else cfg.trainer.stage2_steps,
                                           cfg.trainer)
        self.negative = torch.tensor(np.asarray(loop_config["negative_embedding"]))  # [Lt, D]

        # models and engines
        init = read_stage_final(self.storage, 1) if self.stage == 2 else {}
        tcfg = cfg.trainer
        engines = build_engines(cfg, self.stage, world_size=self.world, device=self.device, use_bf16=self.use_gpu,
                                init=init)
        self.g_engine, self.c_engine, self.teacher = engines.generator, engines.critic, engines.teacher
        self.scheduler = engines.scheduler
        self.sync = rank_sync(engines, self.device)
        self.ema = EMA.from_config(tcfg)

        # random streams: window starts, exit steps, timesteps (CPU) and noise (on the device)
        seed = [tcfg.seed, self.stage, self.rank]
        self.rng = torch.Generator().manual_seed(int(np.random.SeedSequence(seed).generate_state(1)[0]))
        self.noise_rng = torch.Generator(device=self.device).manual_seed(
            int(np.random.SeedSequence(seed + [1]).generate_state(1)[0]))

        # resume
        self.state = TrainerState(stage=self.stage, world_size=self.world)
        self.resumed = False
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is not None:
            with checkpoint.as_directory() as d:
                self.state = load_checkpoint(d, engines=self.engines, rank=self.rank, world_size=self.world,
                                             generators=self.generators, ema=self.ema)
            self.resumed = True
        self.rows = RowStream(ray.train.get_dataset_shard(DATASET), rows_per_epoch=int(loop_config["rows_per_epoch"]),
                              consumed=self.state.rows_consumed)
        self.parent_run_id = loop_config.get("parent_run_id")
        self.tracker = self._tracker()
        self.sample_embeddings = torch.tensor(np.asarray(loop_config["sample_embeddings"]))  # [P, Lt, D]

    # -- setup helpers ----------------------------------------------------------------------------

    @property
    def engines(self) -> dict[str, Any]:
        return {"generator": self.g_engine, "critic": self.c_engine}

    @property
    def generators(self) -> dict[str, torch.Generator]:
        return {"rng": self.rng, "noise_rng": self.noise_rng}

    def _tracker(self) -> Tracker:
        if self.rank != 0:
            return Tracker.disabled()
        return Tracker(self.cfg.tracking, storage_root_local=self.storage.root if self.storage.is_local else None,
                       experiment=self.cfg.storage.experiment)

    # -- collectives ------------------------------------------------------------------------------

    def _check_same(self, values: list[int], what: str) -> None:
        """Assert that every rank holds the same values (exit steps must be identical across ranks)."""
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        lo, hi = t.clone(), t.clone()
        self.dist.all_reduce(lo, op=self.dist.ReduceOp.MIN)
        self.dist.all_reduce(hi, op=self.dist.ReduceOp.MAX)
        if not torch.equal(lo, hi):
            raise RuntimeError(f"{what} differ across ranks: min {lo.tolist()} max {hi.tolist()}")

    def _mean(self, values: dict[str, float]) -> dict[str, float]:
        keys = sorted(values)
        t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=self.device)
        self.dist.all_reduce(t)
        return {k: float(v) / self.world for k, v in zip(keys, t.tolist())}

    # -- one update -------------------------------------------------------------------------------

    def _window(self):
        from trainer.window import draw_exit_steps, window_from_row

        cfg = self.cfg
        row = self.rows.next()
        window = window_from_row(row, window_frames=cfg.trainer.window_frames, chunk=cfg.model.num_frame_per_block,
                                 generator=self.rng, sync=self.sync)
        exits = draw_exit_steps(window.num_frames // cfg.model.num_frame_per_block, len(cfg.model.denoising_steps),
                                self.rng, broadcast=self.sync.broadcast)
        self._check_same([window.start, *exits], "window start and exit steps")
        return window, exits

    def generator_update(self, plan) -> dict[str, float]:
        from trainer.window import generator_loss

        window, exits = self._window()
        loss, stats = generator_loss(window, generator=self.g_engine.module, teacher=self.teacher,
                                     critic=self.c_engine.module, scheduler=self.scheduler, model_cfg=self.cfg.model,
                                     trainer_cfg=self.cfg.trainer, negative_embedding=self.negative, stage=self.stage,
                                     exit_steps=exits, generator_rng=self.rng, noise_rng=self.noise_rng,
                                     sync=self.sync)
        self.g_engine.backward(loss)
        self.g_engine.step()
        if plan.update_ema:
            self.ema.update(self.g_engine, plan.generator_update)
        return {"dmd": stats["dmd"], "slot": stats["slot"], "slot_con": stats["slot_con"],
                "slot_rec": stats["slot_rec"], "dmd_grad_norm": stats["dmd_grad_norm"],
                "grad_norm_generator": float(self.g_engine.get_global_grad_norm() or 0.0),
                "policy_lag_generator": float(self.trainer_version - window.policy_version)}

    def critic_update(self) -> dict[str, float]:
        from trainer.window import critic_loss

        window, exits = self._window()
        loss, _ = critic_loss(window, generator=self.g_engine.module, critic=self.c_engine.module,
                              scheduler=self.scheduler, model_cfg=self.cfg.model, trainer_cfg=self.cfg.trainer,
                              exit_steps=exits, generator_rng=self.rng, noise_rng=self.noise_rng, sync=self.sync)
        self.c_engine.backward(loss)
        self.c_engine.step()
        return {"critic": float(loss.detach()), "grad_norm_critic": float(self.c_engine.get_global_grad_norm() or 0.0),
                "policy_lag": float(self.trainer_version - window.policy_version)}

    # -- the loop -----------------------------------------------------------------------------------

    def run(self) -> None:
        with self._mlflow_run():
            if self.rank == 0:
                print(f"[train {stage_name(self.stage)}] {'resuming at' if self.resumed else 'starting at'} step "
                      f"{self.state.step}/{self.total_steps} (rows consumed {self.state.rows_consumed}), "
                      f"{self.world} workers, ZeRO-{self.cfg.trainer.zero_stage}, device {self.device}", flush=True)
                if self.resumed:  # visible in MLflow: which checkpoint the latest attempt started from
                    self.tracker.set_tags({"resumed_from_step": self.state.step})
            every = self.cfg.trainer.checkpoint_every * self.cfg.trainer.critic_updates_per_generator
            self._attempt_start = (self.state.step, time.perf_counter())
            for step in range(self.state.step, self.total_steps):
                if self.fault_step is not None and step == self.fault_step and not self.resumed:
                    raise RuntimeError(f"fault injected at training step {step} ({FAULT_ENV})")
                t0 = time.perf_counter()
                wait0 = self.rows.wait_s
                plan = plan_step(step, self.cfg.trainer)
                values: dict[str, float] = {}
                if plan.train_generator:
                    values.update(self.generator_update(plan))
                values.update(self.critic_update())
                self.state.step = step + 1
                self.state.rows_consumed = self.rows.consumed
                seconds = time.perf_counter() - t0
                values["data_wait_s"] = self.rows.wait_s - wait0
                values["data_wait_fraction"] = values["data_wait_s"] / max(seconds, 1e-9)
                mean = self._mean(values)
                mean["steps_per_s"] = 1.0 / max(seconds, 1e-9)
                self.state.history.append({"step": step, **mean})
                self._log_step(step, plan, mean)
                if (step + 1) % every == 0 or step + 1 == self.total_steps:
                    self.checkpoint(mean)
            self.finish()

    @contextlib.contextmanager
    def _mlflow_run(self) -> Iterator[None]:
        """Rank 0's MLflow run for the stage: the checkpoint's run after a restart, else found or created
        by its deterministic name under the parent run; ended FINISHED or FAILED with the block."""
        tracker = self.tracker
        if self.state.mlflow_run_id:
            run = tracker.attach(self.state.mlflow_run_id)
        else:
            tags = tracker.standard_tags(stage=stage_name(self.stage), round_index=self.rounds[-1],
                                         policy_version=self.stage)
            run = tracker.child(self.run_name, tags, parent_run_id=self.parent_run_id, resume=True)
        with run as run_id:
            self.state.mlflow_run_id = self.state.mlflow_run_id or run_id
            tracker.log_params({**self.cfg.flat(), "train.stage": self.stage, "train.rounds": self.rounds,
                                "train.world_size": self.world, "train.total_steps": self.total_steps})
            yield

    def _log_step(self, step: int, plan, mean: dict[str, float]) -> None:
        if self.rank != 0:
            return
        names = {"dmd": METRIC_DMD, "critic": METRIC_CRITIC, "slot_con": METRIC_SLOT_CON, "slot_rec": METRIC_SLOT_REC,
                 "policy_lag": METRIC_POLICY_LAG, "data_wait_s": METRIC_DATA_WAIT, "slot": "loss/slot",
                 "grad_norm_generator": "grad_norm/generator", "grad_norm_critic": "grad_norm/critic",
                 "dmd_grad_norm": "dmd/grad_norm", "data_wait_fraction": "data_wait_fraction",
                 "steps_per_s": "steps_per_s", "policy_lag_generator": "policy_lag_generator"}
        metrics = {names[k]: v for k, v in mean.items() if k in names}
        metrics["lr/generator"] = self.g_engine.get_lr()[0]
        metrics["lr/critic"] = self.c_engine.get_lr()[0]
        metrics["generator_updates"] = num_generator_updates(step + 1, self.cfg.trainer)
        metrics["rows_consumed"] = self.state.rows_consumed
        first, t_start = self._attempt_start
        if step == first:  # what this rank holds under the ZeRO stage (optimizer state exists after a step)
            from trainer.deepspeed_setup import zero_partition_stats

            for name, engine in self.engines.items():
                stats = zero_partition_stats(engine)
                metrics.update({f"zero/{name}_param_elements": stats.param_elements,
                                f"zero/{name}_param_elements_total": stats.param_elements_total,
                                f"zero/{name}_optimizer_state_elements": stats.optimizer_state_elements})
        self.tracker.log_metrics(metrics, step=step)
        interval = max(1, self.total_steps // 20)
        if (step + 1) % interval == 0 or step + 1 == self.total_steps or step == first:
            gen = f" dmd={mean['dmd']:.4g} slot={mean['slot']:.4g}" if plan.train_generator else ""
            rate = (step + 1 - first) / max(time.perf_counter() - t_start, 1e-9)
            print(f"[train {stage_name(self.stage)}] step {step + 1}/{self.total_steps} critic={mean['critic']:.4g}"
                  f"{gen} lag={mean['policy_lag']:.2g} {rate:.2f} steps/s", flush=True)

    def checkpoint(self, metrics: dict[str, float]) -> None:
        """Every rank saves its part and reports it; Ray Train merges them into one checkpoint."""
        import ray.train

        name = f"checkpoint_step{self.state.step:08d}"
        with tempfile.TemporaryDirectory(prefix="slotmem-ckpt-") as d:
            save_checkpoint(d, engines=self.engines, state=self.state, rank=self.rank, generators=self.generators,
                            ema=self.ema)
            ray.train.report({**metrics, "step": self.state.step, "rows_consumed": self.state.rows_consumed},
                             checkpoint=ray.train.Checkpoint.from_directory(d), checkpoint_dir_name=name)
        self.tracker.set_tags({"checkpoint_uri": f"{self.checkpoint_root_uri}/{name}"})

    # -- end of the stage -------------------------------------------------------------------------

    def finish(self) -> None:
        """Publish the generator (EMA once active) as policy version = stage; keep raw weights for Stage II."""
        from trainer.deepspeed_setup import gather_full_state_dict

        generator = gather_full_state_dict(self.g_engine)  # collectives: every rank
        critic = gather_full_state_dict(self.c_engine)
        if self.rank == 0:
            published = dict(generator)
            if self.ema.initialized:
                published.update({k: v.to(published[k].dtype) for k, v in self.ema.shadow.items()})
            write_stage_final(self.storage, self.stage, {"generator": generator, "critic": critic},
                              meta={"run_name": self.run_name, "steps": self.state.step})
            vdir = publish_weights(self.storage, self.stage, published,
                                   meta={"stage": self.stage, "steps": self.state.step, "rounds": self.rounds,
                                         "ema": self.ema.initialized, "run_name": self.run_name})
            self.tracker.set_tags({"published_weights": self.storage.uri(vdir), "policy_version": self.stage})
            print(f"[train {stage_name(self.stage)}] published policy_version {self.stage} at "
                  f"{self.storage.uri(vdir)}", flush=True)
            if self.tracker.enabled:
                self._log_samples(published)
        self.dist.barrier()

    def _log_samples(self, weights: dict[str, torch.Tensor]) -> None:
        """A short sample video and the slot-assignment picture of the published policy (rank 0 only).

        The prompts are the first script of the training prompts (a switch half-way), the same for every
        stage so that the samples compare across stages."""
        from model.vae import build_vae
        from rollout.components import Generator
        from rollout.streaming import generate
        from rollout.video import write_mp4
        from trainer.window import prompts_from_embeddings

        cfg = self.cfg
        chunk = cfg.model.num_frame_per_block
        num_frames = SAMPLE_CHUNKS * chunk
        gen = Generator(cfg.model, cfg.memory).to(self.device)
        gen.load_state_dict({k: v.to(self.device) for k, v in weights.items()})
        gen.eval()
        emb = self.sample_embeddings[:2].to(self.device, torch.float32)  # [P, Lt, D]
        switches = [num_frames // 2 // chunk * chunk] if emb.shape[0] > 1 else []
        with torch.no_grad(), tempfile.TemporaryDirectory(prefix="slotmem-sample-") as d:
            result = generate(gen.backbone, gen.memory, self.scheduler, cfg.model, prompts_from_embeddings(emb),
                              num_frames=num_frames, switch_frames=switches, seed=cfg.trainer.seed,
                              device=self.device, inspect_memory=False)
            vae = build_vae(cfg.model, self.device, torch.float32)
            video = write_mp4(Path(d) / f"stage{self.stage}_sample.mp4",
                              (piece[0] for piece in vae.decode_iter(result.latents.float())), fps=cfg.rollout.fps)
            self.tracker.log_artifact(video, "samples")
            if hasattr(gen.memory, "save_assignment_png"):
                ph, pw = cfg.model.patch_size[1:]
                png = gen.memory.save_assignment_png(Path(d) / f"stage{self.stage}_slots.png",
                                                     height=cfg.model.latent_height // ph,
                                                     width=cfg.model.latent_width // pw)
                self.tracker.log_artifact(png, "samples")


def train_loop(loop_config: dict[str, Any]) -> None:
    """Ray Train's per-worker entry point."""
    StageWorker(loop_config).run()
