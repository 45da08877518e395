"""What a training stage saves, so that a resubmitted job continues exactly where it stopped.

A checkpoint directory (one per ``ray.train.report``; Ray Train merges the ranks' directories) holds

    generator/, critic/     DeepSpeed checkpoints of the engines (module, ZeRO partitions, optimizer state);
                            every rank writes its own partition files (Stage 0 has no critic)
    trainer_state.json      rank 0: step, the replay ledger (uses of every row), MLflow run id, loss history
    ema.pt                  rank 0: the generator's EMA shadow (identical on every rank)
    rng_rank{r:04d}.pt      every rank: its random streams (torch global + the trainer's generators)

Restoring all of it continues exactly: same weights and optimizer moments, same random draws, same replay
ledger (with the same committed rounds, the same rows next). Stage II starts from Stage I's last checkpoint
the same way, weights, optimizer state and EMA included (DESIGN §5), with its own step counter.

At the end of a stage the trained weights are also written in plain form (``write_stage_final``):
``{root}/{experiment}/checkpoints/final/stage{N}/{generator,critic}.safetensors`` (fp32 masters) with a
``_COMMITTED.json`` written last, which also carries the replay ledger and the Ray checkpoint the next stage
resumes. Stage I starts its generator from Stage 0's; unlike DeepSpeed's ZeRO files they do not depend on the
ZeRO stage or the number of ranks.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from cluster.storage import COMMITTED, Storage
from slotmem.errors import InputError
from trainer.ema import EMA

ENGINE_NAMES = ("generator", "critic")
STATE_FILE = "trainer_state.json"
EMA_FILE = "ema.pt"
FINAL_FILES = {name: f"{name}.safetensors" for name in ENGINE_NAMES}


def rng_file(rank: int) -> str:
    return f"rng_rank{rank:04d}.pt"


def checkpoint_tag(step: int) -> str:
    """DeepSpeed tag of the checkpoint taken after training step `step` (0-based)."""
    return f"step{step:08d}"


@dataclass
class TrainerState:
    """Progress of one stage; identical on every rank (the ranks run in lock-step)."""

    stage: int
    world_size: int
    step: int = 0
    """Next iteration to run."""
    replay: dict = field(default_factory=dict)
    """The replay planner's state (trainer/data.py): uses of every row trained on."""
    mlflow_run_id: str | None = None
    history: list[dict[str, float]] = field(default_factory=list)
    """Per training step: the rank-averaged losses (what the stage result and the tests read)."""

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "TrainerState":
        return cls(**json.loads(text))


# ----------------------------------------------------------------------------------------------
# random streams
# ----------------------------------------------------------------------------------------------


def capture_rng(generators: dict[str, torch.Generator]) -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
                             "generators": {name: g.get_state() for name, g in generators.items()}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any], generators: dict[str, torch.Generator]) -> None:
    torch.set_rng_state(state["torch"])
    version, _, gauss = random.getstate()
    random.setstate((version, tuple(state["python"]), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    missing = sorted(set(generators) - set(state["generators"]))
    if missing:
        raise InputError(f"checkpoint has no random state for {missing}")
    for name, g in generators.items():
        g.set_state(state["generators"][name])


# ----------------------------------------------------------------------------------------------
# save / load (every rank; DeepSpeed's save and load are collectives)
# ----------------------------------------------------------------------------------------------


def save_checkpoint(directory: str | Path, *, engines: dict[str, Any], state: TrainerState, rank: int,
                    generators: dict[str, torch.Generator], ema: EMA | None) -> None:
    """Write this rank's part of the checkpoint after training step ``state.step - 1``."""
    d = Path(directory)
    tag = checkpoint_tag(state.step - 1)
    for name, engine in engines.items():
        engine.save_checkpoint(str(d / name), tag=tag, client_state={"step": state.step})
    torch.save(capture_rng(generators), d / rng_file(rank))
    if rank == 0:
        (d / STATE_FILE).write_text(state.to_json())
        if ema is not None and ema.initialized:
            torch.save(ema.state_dict(), d / EMA_FILE)


def load_checkpoint(directory: str | Path, *, engines: dict[str, Any], rank: int, world_size: int,
                    generators: dict[str, torch.Generator] | None, ema: EMA | None,
                    trainer_cfg=None, stage: int | None = None) -> TrainerState:
    """Restore engines (weights + optimizer state), random streams and EMA from a checkpoint; returns the progress
    it recorded. generators=None keeps the random streams (Stage II starting from Stage I's checkpoint); with
    trainer_cfg and stage, the optimizers then get that stage's learning rates and weight decays (the loaded
    state carries the writer's)."""
    d = Path(directory)
    if not (d / STATE_FILE).is_file():
        raise InputError(f"{d} is not a trainer checkpoint (no {STATE_FILE})")
    state = TrainerState.from_json((d / STATE_FILE).read_text())
    if state.world_size != world_size:
        raise InputError(f"checkpoint {d} was written by {state.world_size} workers, this job has {world_size}: "
                         "ZeRO partitions only load at the same world size (set cluster.num_trainer_workers "
                         f"back to {state.world_size}, or use a new storage.experiment to start over)")
    tag = checkpoint_tag(state.step - 1)
    for name, engine in engines.items():
        try:
            path, _ = engine.load_checkpoint(str(d / name), tag=tag, load_optimizer_states=True,
                                             load_lr_scheduler_states=False)
        except (RuntimeError, KeyError, ValueError) as e:  # a different model or ZeRO layout
            raise InputError(f"checkpoint {d}: the {name} checkpoint does not fit this job's engine (same "
                             f"trainer.backbone, trainer.zero_stage and model as the run that wrote it?): {e}") from e
        if path is None:
            raise InputError(f"checkpoint {d}: DeepSpeed found no {name} checkpoint with tag {tag}")
    if trainer_cfg is not None:
        from trainer.models import apply_group_settings

        for engine in engines.values():
            apply_group_settings(engine.optimizer, trainer_cfg, stage=stage)
    if generators is not None:
        restore_rng(torch.load(d / rng_file(rank), weights_only=True), generators)
    if ema is not None and (d / EMA_FILE).is_file():
        ema.load_state_dict(torch.load(d / EMA_FILE, weights_only=True))
    return state


# ----------------------------------------------------------------------------------------------
# end-of-stage weights (Stage I -> Stage II hand-off)
# ----------------------------------------------------------------------------------------------


def stage_final_dir(storage: Storage, stage: int) -> str:
    return storage.path("checkpoints", "final", f"stage{stage}")


def write_stage_final(storage: Storage, stage: int, states: dict[str, dict[str, torch.Tensor]],
                      meta: dict[str, Any] | None = None) -> str:
    """Write the stage's final generator and critic weights; the commit marker goes last."""
    from safetensors.torch import save

    unknown = sorted(set(states) - set(FINAL_FILES))
    if unknown:
        raise InputError(f"unknown final weight sets {unknown}; expected {sorted(FINAL_FILES)}")
    d = stage_final_dir(storage, stage)
    for name, state in states.items():
        storage.write_bytes(f"{d}/{FINAL_FILES[name]}",
                            save({k: v.detach().cpu().contiguous() for k, v in state.items()}))
    storage.write_json(f"{d}/{COMMITTED}", {"stage": stage, "files": sorted(FINAL_FILES[n] for n in states),
                                            "meta": meta or {}})
    return d


def stage_final_record(storage: Storage, stage: int) -> dict[str, Any]:
    """The commit record of a finished stage: files, meta (replay ledger, checkpoint, steps)."""
    d = stage_final_dir(storage, stage)
    if not storage.exists(f"{d}/{COMMITTED}"):
        raise InputError(f"stage {stage} has not finished for experiment {storage.experiment!r} (no "
                         f"{storage.uri(d)}/{COMMITTED}); run `slotmem train --stage {stage}` first")
    return storage.read_json(f"{d}/{COMMITTED}")


def read_stage_final(storage: Storage, stage: int) -> dict[str, dict[str, torch.Tensor]]:
    """The final weights of a finished stage (InputError if it has not finished)."""
    from safetensors.torch import load

    record = stage_final_record(storage, stage)
    d = stage_final_dir(storage, stage)
    return {name: load(storage.read_bytes(f"{d}/{file}")) for name, file in FINAL_FILES.items()
            if file in record["files"]}
