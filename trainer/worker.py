"""The per-rank side of a training stage, run by Ray Train in every worker (``train_loop``).

    setup     engines (trainer/engines.py), random streams, resume from the stage's own latest checkpoint or, for
              Stage II, from Stage I's last one (weights, optimizer state, EMA); rank 0's replay planner
    each iteration (trainer/schedule.py plan_step)
              rows: rank 0 plans which committed row every rank trains on (trainer/data.py) and broadcasts it
              Stage 0: the slot warm-up update; Stages I/II: a generator update every 5th iteration, then a critic
              update, each on its own row and window (trainer/objectives.py), EMA after generator updates
              publish every trainer.publish_every generator updates (fp32 masters, LoRA merged)
              checkpoint every trainer.checkpoint_every iterations
    finish    publish the stage's last version (EMA once active), write the plain final weights and the replay
              ledger for the next stage

Rank 0 logs to MLflow: a child run of the pipeline's parent run (or a run of its own), resumed by id after a
restart.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from typing import Any, Iterator

import numpy as np
import torch

from cluster.storage import resolve_storage
from cluster.tracking import Tracker, node_label
from slotmem.config import build_config
from slotmem.errors import JobStopped
from trainer.checkpoint import (STATE_FILE, TrainerState, load_checkpoint, read_stage_final, save_checkpoint,
                                stage_final_record, write_stage_final)
from trainer.data import (Assignment, ReplayPlanner, RowCache, assignment_from_wire, assignment_to_wire)
from trainer.metrics import StepMetrics, stage_name
from trainer.schedule import plan_step, stage0_lr_factor, stage_steps, stage_updates, version_at_start


class StageWorker:
    def __init__(self, loop_config: dict[str, Any]):
        import ray.train
        import ray.train.torch
        import torch.distributed as dist

        from trainer.deepspeed_setup import init_distributed_cpu_safe
        from trainer.ema import EMA
        from trainer.engines import build_engines, rank_sync

        self.cfg = cfg = build_config(loop_config["config"])
        self.stage = int(loop_config["stage"])
        self.run_name = loop_config["run_name"]
        self.checkpoint_root_uri = loop_config["checkpoint_root_uri"]
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.use_gpu = cfg.cluster.gpus_per_worker > 0
        if not self.use_gpu:
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        init_distributed_cpu_safe("nccl" if self.use_gpu else "gloo")
        self.dist = dist
        self.device = ray.train.torch.get_device() if self.use_gpu else torch.device("cpu")
        self.storage = resolve_storage(cfg.storage)
        self.total_steps = stage_steps(self.stage, cfg.trainer)
        self.base_version = version_at_start(self.stage, cfg.trainer)
        self.end_version = self.base_version + stage_updates(self.stage, cfg.trainer)  # published by finish()
        self.negative = torch.tensor(np.asarray(loop_config["negative_embedding"]))  # [Lt, D]

        start = read_stage_final(self.storage, 0)["generator"] if self.stage == 1 and loop_config.get(
            "after_stage0") else None
        self.engines = build_engines(cfg, self.stage, world_size=self.world, device=self.device,
                                     use_bf16=self.use_gpu, generator_state=start)
        self.sync = rank_sync(self.engines, self.device)
        self.ema = EMA.from_config(cfg.trainer)
        self.first_frame = self._first_frame() if self.stage else None

        # random streams: window starts, exit steps, timesteps (CPU) and noise (on the device)
        seed = [cfg.trainer.seed, self.stage, self.rank]
        self.rng = torch.Generator().manual_seed(int(np.random.SeedSequence(seed).generate_state(1)[0]))
        self.noise_rng = torch.Generator(device=self.device).manual_seed(
            int(np.random.SeedSequence(seed + [1]).generate_state(1)[0]))

        self.state = TrainerState(stage=self.stage, world_size=self.world)
        self.resumed = False
        self.resume_version: int | None = None
        self.last_checkpoint_uri: str | None = None
        checkpoint = ray.train.get_checkpoint()
        ledger = loop_config.get("ledger") or {}
        # the old sequential shape trains each stage on fixed rounds: no staleness or reuse bound there
        continuous = cfg.pipeline.mode == "continuous"
        if checkpoint is not None:  # this stage's own latest checkpoint: a restarted or resubmitted attempt
            with checkpoint.as_directory() as d:
                self.state = load_checkpoint(d, engines=self.engines.trained, rank=self.rank, world_size=self.world,
                                             generators=self.generators, ema=self.ema)
            self.resumed = True
            self.last_checkpoint_uri = self.storage.uri(checkpoint.path)
            # versions after the checkpoint's were published by the attempt that failed: this one replaces them
            self.resume_version = self.base_version + stage_updates(self.stage, cfg.trainer, self.state.step)
            ledger = self.state.replay.get("ledger", ledger)
        elif self.stage == 2:  # Stage II continues Stage I's weights, optimizer state and EMA (DESIGN §5)
            self._start_from(stage_final_record(self.storage, 1)["meta"]["checkpoint"])
        self.planner = ReplayPlanner(
            self.storage, world=self.world, max_policy_lag=cfg.pipeline.max_policy_lag,
            max_row_reuse=cfg.pipeline.max_row_reuse, enforce_lag=self.stage > 0 and continuous,
            enforce_reuse=continuous, wait_timeout_s=cfg.pipeline.data_wait_timeout_s,
            ledger=dict(ledger)) if self.rank == 0 else None
        self.demand = loop_config.get("demand")  # the fleet's back-pressure actor (continuous pipeline only)
        self.cache = RowCache(self.storage)
        self.parent_run_id = loop_config.get("parent_run_id")
        self.tracker = self._tracker()
        self.control = loop_config.get("control")  # the job's control actor (cluster/control.py), if any
        post = (lambda line: self.control.post.remote(line)) if self.control is not None else None
        self.metrics = StepMetrics(stage=self.stage, total=self.total_steps, tracker=self.tracker, rank=self.rank,
                                   post=post)
        self.sample_embeddings = torch.tensor(np.asarray(loop_config["sample_embeddings"]))  # [P, Lt, D]

    # -- setup helpers ----------------------------------------------------------------------------

    @property
    def generators(self) -> dict[str, torch.Generator]:
        return {"rng": self.rng, "noise_rng": self.noise_rng}

    def _tracker(self) -> Tracker:
        if self.rank != 0:
            return Tracker.disabled()
        return Tracker(self.cfg.tracking, storage_root_local=self.storage.root if self.storage.is_local else None,
                       experiment=self.cfg.experiment, node_id=node_label("trainer-rank0"))

    def _first_frame(self):
        """The VAE re-encode of a mid-video window's first latent (trainer/window.py scored_clip)."""
        from model.vae import build_vae

        vae = build_vae(self.cfg.model, self.device, torch.float32)
        return vae.reencode_first_frame

    def _start_from(self, uri: str) -> None:
        from ray.train import Checkpoint

        path = uri.split("://", 1)[1] if "://" in uri else uri
        with Checkpoint(path=path, filesystem=self.storage.fs).as_directory() as d:
            load_checkpoint(d, engines=self.engines.trained, rank=self.rank, world_size=self.world, generators=None,
                            ema=self.ema, trainer_cfg=self.cfg.trainer, stage=self.stage)

    # -- rows ---------------------------------------------------------------------------------------

    def _rows(self, version: int) -> tuple[dict[str, Any], Assignment]:
        """This rank's row for the next update at trainer version `version` (rank 0 plans, everyone waits)."""
        if self.rank == 0:
            planned = self.planner.plan(version)
            if self.demand is not None:
                self.demand.report.remote(planned.fresh_unused)
        box = [assignment_to_wire(planned) if self.rank == 0 else None]
        self.dist.broadcast_object_list(box, src=0)
        plan = assignment_from_wire(box[0])
        return self.cache.get(plan.rows[self.rank], plan.drop[self.rank]), plan

    def _window(self, version: int):
        from trainer.window import draw_exit_steps, window_from_row

        cfg = self.cfg
        t0 = time.perf_counter()
        row, plan = self._rows(version)
        self.metrics.data(plan, time.perf_counter() - t0)
        window = window_from_row(row, window_frames=cfg.trainer.window_frames, chunk=cfg.model.num_frame_per_block,
                                 generator=self.rng, sync=self.sync)
        exits = draw_exit_steps(window.num_new // cfg.model.num_frame_per_block, len(cfg.model.denoising_steps),
                                self.rng, same=cfg.trainer.same_exit_step, broadcast=self.sync.broadcast)
        self._check_same([window.start, *exits], "window start and exit steps")
        return window, exits

    def _check_same(self, values: list[int], what: str) -> None:
        """Assert that every rank holds the same values (exit steps must be identical across ranks)."""
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        lo, hi = t.clone(), t.clone()
        self.dist.all_reduce(lo, op=self.dist.ReduceOp.MIN)
        self.dist.all_reduce(hi, op=self.dist.ReduceOp.MAX)
        if not torch.equal(lo, hi):
            raise RuntimeError(f"{what} differ across ranks: min {lo.tolist()} max {hi.tolist()}")

    # -- one update ---------------------------------------------------------------------------------

    def _objective_kwargs(self) -> dict[str, Any]:
        return {"scheduler": self.engines.scheduler, "model_cfg": self.cfg.model, "trainer_cfg": self.cfg.trainer,
                "noise_rng": self.noise_rng, "sync": self.sync}

    def warmup_update(self, version: int, step: int) -> dict[str, float]:
        from trainer.models import apply_group_settings
        from trainer.objectives import warmup_loss

        window, _ = self._window(version)
        engine = self.engines.generator
        loss, stats = warmup_loss(window, generator=engine.module, **self._objective_kwargs())
        engine.backward(loss)
        scale = stage0_lr_factor(step, self.cfg.trainer)  # a function of the step: a resumed stage continues it
        apply_group_settings(engine.optimizer, self.cfg.trainer, stage=0, lr_scale=scale)
        engine.step()
        return {**stats, "grad_norm_generator": float(engine.get_global_grad_norm() or 0.0)}

    def generator_update(self, version: int, step: int, update_ema: bool) -> dict[str, float]:
        from trainer.objectives import generator_loss

        window, exits = self._window(version)
        g, c = self.engines.generator, self.engines.critic
        loss, stats = generator_loss(window, generator=g.module, teacher=self.engines.teacher, critic=c.module,
                                     negative_embedding=self.negative, stage=self.stage, exit_steps=exits,
                                     first_frame=self.first_frame, generator_rng=self.rng, **self._objective_kwargs())
        g.backward(loss)
        g.step()
        if update_ema or self.ema.initialized:  # fp32 masters; a collective on every rank
            self.ema.update(g, step)
        return {**stats, "grad_norm_generator": float(g.get_global_grad_norm() or 0.0)}

    def critic_update(self, version: int) -> dict[str, float]:
        from trainer.objectives import critic_loss

        window, exits = self._window(version)
        g, c = self.engines.generator, self.engines.critic
        loss, _ = critic_loss(window, generator=g.module, critic=c.module, exit_steps=exits,
                              first_frame=self.first_frame, generator_rng=self.rng, **self._objective_kwargs())
        c.backward(loss)
        c.step()
        return {"critic": float(loss.detach()), "grad_norm_critic": float(c.get_global_grad_norm() or 0.0)}

    # -- the loop -----------------------------------------------------------------------------------

    def run(self) -> None:
        try:
            self._run()
        except JobStopped:  # checkpointed; the driver sees a stage that ended early
            return

    def _stop_requested(self) -> bool:
        """Whether the operator asked to stop: rank 0 asks the control actor, every rank gets the same answer."""
        if self.control is None:
            return False
        import ray

        flag = torch.zeros(1, device=self.device)
        if self.rank == 0:
            flag[0] = float(bool(ray.get(self.control.stop_requested.remote())))
        self.dist.all_reduce(flag, op=self.dist.ReduceOp.MAX)
        return bool(flag.item())

    def _run(self) -> None:
        with self._mlflow_run():
            self.metrics.start(resumed=self.resumed, step=self.state.step, world=self.world,
                               zero=self.cfg.trainer.zero_stage, device=str(self.device))
            every = self.cfg.trainer.checkpoint_every
            for step in range(self.state.step, self.total_steps):
                plan = plan_step(self.stage, step, self.cfg.trainer)
                version = plan.version - int(plan.train_generator)  # the policy these updates start from
                t0 = time.perf_counter()
                values: dict[str, float] = {}
                if self.stage == 0:
                    values.update(self.warmup_update(version, step))
                elif plan.train_generator:
                    values.update(self.generator_update(version, step, plan.update_ema))
                if plan.train_critic:
                    values.update(self.critic_update(plan.version))
                self.state.step = step + 1
                self.state.replay = self.planner.state_dict() if self.planner else {}
                mean = self._mean(values)
                last = step + 1 == self.total_steps
                if plan.publish and plan.version != self.end_version:  # the stage's last version: finish()
                    self.publish(plan.version, final=False)
                self.metrics.step(step, plan, mean, seconds=time.perf_counter() - t0, engines=self.engines)
                self.state.history.append({"step": step, **mean})
                checkpointed = (step + 1) % every == 0 or last
                if checkpointed:
                    self.checkpoint(mean)
                if not last and self._stop_requested():
                    if not checkpointed:
                        self.checkpoint(mean)
                    self.metrics.stopped(step)
                    raise JobStopped(f"stage {self.stage} stopped at step {step + 1}")
            self.finish()

    def _mean(self, values: dict[str, float]) -> dict[str, float]:
        keys = sorted(values)
        t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=self.device)
        self.dist.all_reduce(t)
        return {k: float(v) / self.world for k, v in zip(keys, t.tolist())}

    @contextlib.contextmanager
    def _mlflow_run(self) -> Iterator[None]:
        """Rank 0's MLflow run for the stage: the checkpoint's run after a restart, else found or created
        by its deterministic name under the parent run; ended FINISHED, FAILED or KILLED with the block."""
        tracker = self.tracker
        if self.state.mlflow_run_id:
            run = tracker.attach(self.state.mlflow_run_id)
        else:
            tags = tracker.standard_tags(stage=stage_name(self.stage), policy_version=self.base_version)
            run = tracker.child(self.run_name, tags, parent_run_id=self.parent_run_id, resume=True)
        with run as run_id:
            self.state.mlflow_run_id = self.state.mlflow_run_id or run_id
            tracker.log_params({**self.cfg.flat(), "train.stage": self.stage, "train.world_size": self.world,
                                "train.total_steps": self.total_steps})
            if self.resumed:  # visible in MLflow: which checkpoint the latest attempt started from
                tracker.set_tags({"resumed_from_step": self.state.step})
            yield

    def checkpoint(self, metrics: dict[str, float]) -> None:
        """Every rank saves its part and reports it; Ray Train merges them into one checkpoint."""
        import ray.train

        name = f"checkpoint_step{self.state.step:08d}"
        with tempfile.TemporaryDirectory(prefix="slotmem-ckpt-") as d:
            save_checkpoint(d, engines=self.engines.trained, state=self.state, rank=self.rank,
                            generators=self.generators, ema=self.ema)
            ray.train.report({**metrics, "step": self.state.step}, checkpoint=ray.train.Checkpoint.from_directory(d),
                             checkpoint_dir_name=name)
        self.last_checkpoint_uri = f"{self.checkpoint_root_uri}/{name}"
        self.tracker.set_tags({"checkpoint_uri": self.last_checkpoint_uri})

    # -- publishing and the end of the stage --------------------------------------------------------

    def publish(self, version: int, *, final: bool) -> dict | None:
        """Gather the generator's fp32 masters (every rank) and publish them as `version` (rank 0)."""
        from trainer.deepspeed_setup import gather_full_state_dict
        from trainer.publish import publish_policy

        full = gather_full_state_dict(self.engines.generator)  # collectives: every rank
        if self.rank == 0:
            vdir = publish_policy(self.storage, version, full, model_cfg=self.cfg.model, trainer_cfg=self.cfg.trainer,
                                  ema=self.ema if final else None,
                                  meta={"stage": self.stage, "step": self.state.step, "run_name": self.run_name},
                                  supersede=self.resume_version is not None and version > self.resume_version)
            self.tracker.set_tags({"published_weights": self.storage.uri(vdir), "policy_version": version})
        return full if self.rank == 0 else None

    def finish(self) -> None:
        """Publish the stage's last version (EMA once active); keep the fp32 weights and ledger for the next stage."""
        from trainer.deepspeed_setup import gather_full_state_dict
        from trainer.lora import merged_state_dict
        from trainer.samples import log_stage_samples

        end_version = self.end_version
        full = self.publish(end_version, final=True)
        critic = gather_full_state_dict(self.engines.critic) if self.engines.critic is not None else {}
        if self.rank == 0:
            alpha = self.cfg.trainer.lora_alpha
            weights = {"generator": merged_state_dict(full, alpha=alpha)}
            if critic:
                weights["critic"] = merged_state_dict(critic, alpha=alpha)
            write_stage_final(self.storage, self.stage, weights,
                              meta={"run_name": self.run_name, "steps": self.state.step, "version": end_version,
                                    "checkpoint": self.last_checkpoint_uri, "ledger": self.planner.ledger})
            self.metrics.say(f"published policy_version {end_version} at "
                             f"{self.storage.uri(self.storage.weights_dir(end_version))}")
            if self.tracker.enabled:
                log_stage_samples(self.cfg, self.stage, self.tracker, self.sample_embeddings, self.device,
                                  self.engines.scheduler, version=end_version)
        self.dist.barrier()


def train_loop(loop_config: dict[str, Any]) -> None:
    """Ray Train's per-worker entry point."""
    StageWorker(loop_config).run()


__all__ = ["STATE_FILE", "StageWorker", "train_loop"]
