"""DeepSpeed engines of a stage and the collectives that keep ranks in lock-step (shared with bench/).

One engine per trained model, each with a client ``torch.optim.AdamW`` over its parameter groups (no JIT op
builds), ZeRO stage ``trainer.zero_stage``, bf16 on GPU / fp32 on CPU:
    Stage 0       the generator (only its slot modules train);
    Stages I/II   the generator (backbone per trainer.backbone + memory modules) and the critic; the teacher
                  is frozen: a plain module under ZeRO-1/2 (which never partition parameters), a ZeRO-3 engine
                  without optimizer (its parameters partitioned like the trained ones) under ZeRO-3.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch

from slotmem.config import Config
from trainer.window import RankSync


@dataclass
class Engines:
    generator: Any
    """DeepSpeed engine of the generator (backbone + memory); ``.module`` is the Generator."""
    critic: Any | None
    """DeepSpeed engine of the critic (None in Stage 0)."""
    teacher: torch.nn.Module | None
    """Frozen teacher: the module itself (ZeRO-1/2) or the module of a ZeRO-3 engine without optimizer."""
    scheduler: Any
    zero_stage: int

    @property
    def trained(self) -> dict[str, Any]:
        return {name: e for name, e in (("generator", self.generator), ("critic", self.critic)) if e is not None}


def build_engines(cfg: Config, stage: int, *, world_size: int, device: torch.device, use_bf16: bool,
                  zero_stage: int | None = None, generator_state: dict | None = None) -> Engines:
    """The stage's engines on every rank (generator_state: the previous stage's generator to start from)."""
    import deepspeed

    from trainer.deepspeed_setup import ds_config, make_engine
    from trainer.models import build_training_models, critic_parameter_groups, parameter_groups, prepare_for_zero3

    tcfg = cfg.trainer
    zero_stage = tcfg.zero_stage if zero_stage is None else zero_stage
    models = build_training_models(cfg.model, cfg.teacher, cfg.memory, tcfg, stage=stage, device=device,
                                   generator_state=generator_state)
    dsc = ds_config(tcfg, zero_stage=zero_stage, use_bf16=use_bf16, train_batch_size=world_size,
                    param_persistence_threshold=tcfg.zero3_param_persistence_threshold)
    scored = [m for m in (models.critic, models.teacher) if m is not None]
    if zero_stage == 3:
        for module in (models.generator, *scored):
            prepare_for_zero3(module)
    betas = (tcfg.beta1, tcfg.beta2)
    generator = make_engine(models.generator, param_groups=parameter_groups(models.generator, tcfg, stage=stage),
                            betas=betas, ds_config=dsc)
    critic = teacher = None
    if models.critic is not None:
        critic = make_engine(models.critic, param_groups=critic_parameter_groups(models.critic, tcfg), betas=betas,
                             ds_config=dsc)
        if zero_stage == 3:
            teacher = deepspeed.initialize(model=models.teacher, config=dsc)[0].module  # no optimizer: partitioned
        else:
            teacher = models.teacher.to(torch.bfloat16) if use_bf16 else models.teacher  # ZeRO-1/2 never partition
    return Engines(generator=generator, critic=critic, teacher=teacher, scheduler=models.scheduler,
                   zero_stage=zero_stage)


def rank_sync(engines: Engines, device: torch.device) -> RankSync:
    """The window's collectives over the default process group; under ZeRO-3 ``local`` gathers the
    generator's parameters and detaches DeepSpeed's per-module hooks for the block (DeepSpeed's own
    ``unwrap_model_for_generation``)."""
    import torch.distributed as dist

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
