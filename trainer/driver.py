"""`slotmem train --stage 0|1|2`: one training stage as a Ray Train + DeepSpeed job (DESIGN §5).

The driver checks what the stage starts from, gets the fixed prompt embeddings (the CFG negative prompt and the
samples' prompts: encoded once by a task on a worker node and cached in storage, never on the head), and runs a
``TorchTrainer`` with ``cluster.num_trainer_workers`` workers (trainer/worker.py) under a deterministic run name
``{experiment}-stage{N}`` in ``{storage.root}/{experiment}/checkpoints``: a resubmitted job with the same name
resumes from the newest checkpoint (Ray Train V2), and ``FailureConfig`` restarts the worker group from it after a
worker dies. The data is not a fixed dataset: the workers read the newest committed rollout rows themselves
(trainer/data.py), so the stage can run while the rollout fleet keeps committing.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from cluster.storage import Storage, resolve_storage
from cluster.mlflow_names import PARENT_RUN_ENV, resolve_tracking_uri, stage_run_name
from rollout.prompts import load_training_prompts
from slotmem.config import Config, ModelConfig
from slotmem.errors import InputError
from trainer.checkpoint import STATE_FILE, TrainerState, stage_final_dir, stage_final_record
from trainer.metrics import console_losses, stage_name
from trainer.schedule import stage_steps, stage_updates, version_at_start

SUMMARY_LAST = 10  # the stage summary line averages this many last iterations


@dataclass
class StageResult:
    """What a finished stage produced; ``to_dict`` goes into the pipeline state."""

    stage: int
    policy_version: int
    steps: int
    total_steps: int
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

    @property
    def stopped(self) -> bool:
        """The stage ended early on a stop request (its last checkpoint is where a resubmission resumes)."""
        return self.steps < self.total_steps

    def recent(self, n: int = SUMMARY_LAST) -> dict[str, float]:
        """Each metric's mean over the stage's last `n` iterations: one update's window is a single row,
        so its value alone swings with the row it drew."""
        rows = self.history[-n:] or [self.last]
        keys = sorted({k for r in rows for k in r if k != "step"})  # generator-only keys come from its iterations
        return {k: sum(vals) / len(vals) for k in keys for vals in [[r[k] for r in rows if k in r]]}

    def summary(self) -> str:
        recent = self.recent()
        shown = ("slot", *console_losses(self.stage))
        losses = ", ".join(f"{k}={v:.4g}" for k, v in recent.items() if k in shown)
        losses = f"last {min(len(self.history), SUMMARY_LAST) or 1} iterations' mean {losses}"
        if self.stopped:
            return (f"stage {self.stage}: stopped on request at iteration {self.steps}/{self.total_steps} after "
                    f"{self.seconds:.1f} s; {losses}; checkpoint {self.checkpoint_uri}")
        return (f"stage {self.stage}: {self.steps} iterations ({self.generator_updates} generator updates) in "
                f"{self.seconds:.1f} s; {losses}; published policy_version {self.policy_version}")


# ----------------------------------------------------------------------------------------------
# fixed prompt embeddings, encoded on a worker node and cached in storage
# ----------------------------------------------------------------------------------------------


def _encode_on_worker(model_cfg: ModelConfig, texts: list[str]) -> np.ndarray:
    from model.text import build_text_encoder
    from rollout.components import resolve_device

    import torch

    device = resolve_device(None)
    encoder = build_text_encoder(model_cfg, device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    emb, _ = encoder.encode(list(texts))
    return emb.float().cpu().numpy()


def fixed_embeddings(cfg: Config, storage: Storage, texts: list[str]) -> np.ndarray:
    """Text embeddings [P, Lt, D] of fixed prompts, cached at {experiment}/text/{hash}.npy (encoded once, by a Ray
    task with a trainer worker's resources: the umT5-XXL encoder never runs on the head)."""
    import io

    import ray

    from cluster.shape import ClusterShape

    key = hashlib.sha256(repr((cfg.model.text_encoder_path, cfg.model.tokenizer_path, cfg.model.text_len,
                               cfg.model.text_dim, list(texts))).encode()).hexdigest()[:16]
    path = storage.path("text", f"{key}.npy")
    if storage.exists(path):
        return np.load(io.BytesIO(storage.read_bytes(path)))
    res = ClusterShape.from_config(cfg.cluster, cfg.trainer).worker_resources()
    task = ray.remote(_encode_on_worker).options(num_cpus=res.get("CPU", 0), num_gpus=res.get("GPU", 0),
                                                resources={k: v for k, v in res.items() if k not in ("CPU", "GPU")})
    emb = ray.get(task.remote(cfg.model, list(texts)))
    buf = io.BytesIO()
    np.save(buf, emb)
    storage.write_bytes(path, buf.getvalue())
    return emb


# ----------------------------------------------------------------------------------------------
# the stage
# ----------------------------------------------------------------------------------------------


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
        kwargs["storage_filesystem"] = storage.checkpoint_filesystem()  # s3: retrying, the node's own credentials
    return RunConfig(name=run_name, storage_path=storage.checkpoints_dir(),
                     checkpoint_config=CheckpointConfig(num_to_keep=cfg.trainer.num_to_keep),
                     failure_config=FailureConfig(max_failures=cfg.cluster.max_failures), **kwargs)


def _check_generator_fits(cfg: Config, storage: Storage, stage: int) -> None:
    """The final generator of `stage` has exactly this config's generator parameters (read from the header)."""
    import torch

    from rollout.components import Generator

    record = stage_final_record(storage, stage)
    path = f"{stage_final_dir(storage, stage)}/generator.safetensors"
    with storage.fs.open_input_file(path) as f:  # the safetensors header names every tensor
        keys = set(_safetensors_keys(f))
    with torch.device("meta"):
        own = set(Generator(cfg.model, cfg.memory).state_dict())
    if keys != own:
        missing, unexpected = sorted(own - keys), sorted(keys - own)
        raise InputError(f"stage {stage}'s final generator {storage.uri(path)} (run {record['meta'].get('run_name')}) "
                         f"does not fit this config's generator: {len(missing)} missing (e.g. {missing[:3]}), "
                         f"{len(unexpected)} unexpected (e.g. {unexpected[:3]}); use a new storage.experiment to "
                         "start over with a changed model or memory")


def _safetensors_keys(f) -> list[str]:
    """Tensor names from a safetensors file's JSON header (8-byte length, then the header)."""
    import json
    import struct

    (length,) = struct.unpack("<Q", f.read(8))
    return [k for k in json.loads(f.read(length)) if k != "__metadata__"]


def previous_ledger(storage: Storage, stage: int) -> dict[str, int]:
    """The replay ledger handed over by the stage before `stage` (row uses count across stages)."""
    for prev in range(stage - 1, -1, -1):
        if storage.exists(f"{stage_final_dir(storage, prev)}/_COMMITTED.json"):
            return stage_final_record(storage, prev)["meta"].get("ledger", {})
    return {}


def run_stage(cfg: Config, stage: int, *, parent_run_id: str | None = None, demand=None, control=None,
              preflight_job: bool = True) -> StageResult:
    """Train `stage` on the committed rollout rows (waiting for the fleet as needed); publish its versions.

    demand: the rollout fleet's back-pressure actor (rollout/fleet.py ReplayDemand), reported to by rank 0.
    control: the job's JobControl actor (cluster/control.py): rank 0 posts its console lines there and stops the
    stage (checkpointed, ``StageResult.stopped``) when a stop is requested."""
    from ray.train.torch import TorchTrainer

    from cluster.placement import scaling_config, torch_config
    from cluster.preflight import preflight
    from cluster.runtime import connect
    from cluster.shape import ClusterShape

    if stage not in (0, 1, 2):
        raise InputError(f"--stage must be 0, 1 or 2, got {stage!r}")
    if stage_steps(stage, cfg.trainer) == 0:
        raise InputError(f"trainer.stage{stage}_steps is 0: stage {stage} is disabled")
    t0 = time.perf_counter()
    storage = resolve_storage(cfg.storage)
    after_stage0 = stage == 1 and cfg.trainer.stage0_steps > 0
    if after_stage0:  # Stage I starts from Stage 0's slot modules: check they fit before any worker starts
        _check_generator_fits(cfg, storage, 0)
    if stage == 2:
        stage_final_record(storage, 1)  # Stage II resumes Stage I
    connect(cfg.cluster)
    if preflight_job:
        preflight(cfg, storage, job="train", tracking_uri=resolve_tracking_uri(
            cfg.tracking, storage.root if storage.is_local else None))
    shape = ClusterShape.from_config(cfg.cluster, cfg.trainer)
    run_name = stage_run_name(cfg.experiment, stage_name(stage))
    loop_config = {
        "config": _worker_config(cfg, storage).to_dict(),
        "stage": stage,
        "after_stage0": after_stage0,
        "ledger": previous_ledger(storage, stage),
        "negative_embedding": fixed_embeddings(cfg, storage, [cfg.trainer.negative_prompt])[0],
        "sample_embeddings": fixed_embeddings(cfg, storage, list(load_training_prompts(cfg.rollout.prompt_file)[0])),
        "parent_run_id": parent_run_id,
        "run_name": run_name,
        "checkpoint_root_uri": f"{storage.uri(storage.checkpoints_dir())}/{run_name}",
        "demand": demand,
        "control": control,
    }
    from trainer.worker import train_loop

    trainer = TorchTrainer(train_loop, train_loop_config=loop_config, scaling_config=scaling_config(shape),
                           torch_config=torch_config(shape), run_config=_run_config(cfg, storage, run_name))
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"stage {stage} finished without a checkpoint in {storage.uri(storage.checkpoints_dir())}")
    state = read_state(result.checkpoint)
    last = state.history[-1] if state.history else {}
    version = version_at_start(stage, cfg.trainer) + stage_updates(stage, cfg.trainer, state.step)
    return StageResult(stage=stage, policy_version=version, steps=state.step, total_steps=stage_steps(stage, cfg.trainer),
                       generator_updates=stage_updates(stage, cfg.trainer, state.step), run_name=run_name,
                       checkpoint_uri=storage.uri(result.checkpoint.path),
                       weights_uri=storage.uri(storage.weights_dir(version)),
                       final_weights_uri=storage.uri(stage_final_dir(storage, stage)),
                       mlflow_run_id=state.mlflow_run_id, seconds=round(time.perf_counter() - t0, 1),
                       last=last, history=state.history)


def read_state(checkpoint) -> TrainerState:
    with checkpoint.filesystem.open_input_stream(f"{checkpoint.path}/{STATE_FILE}") as f:
        return TrainerState.from_json(f.read().decode())


def main(args, cfg: Config) -> int:
    """`slotmem train --stage N`: trains on the committed rows; prints progress from rank 0 and a summary."""
    import os

    from slotmem.config import check_weights

    from cluster.control import Control
    from cluster.runtime import connect

    check_weights(cfg, "train")
    connect(cfg.cluster)
    control = Control()
    control.install_signal_handlers()
    try:
        result = run_stage(cfg, args.stage, parent_run_id=os.environ.get(PARENT_RUN_ENV) or None,
                           control=control.actor)
    finally:
        control.close()
    print(result.summary())
    if result.stopped:
        print(f"stage {args.stage} stopped on request at iteration {result.steps}/{result.total_steps} "
              f"(checkpoint {result.checkpoint_uri}); run the same command again to resume")
        return 130
    return 0
