"""The three networks of a training stage: generator (trained), critic (trained), teacher (frozen).

    generator  causal Wan backbone + long-term memory (rollout/components.Generator): the policy that
               is published to rollout actors; Stage I freezes its slot grouper (Appendix A.1)
    critic     the "fake score": the same architecture run bidirectionally, initialised from the teacher
               (Self-Forcing) in Stage I and continued from Stage I's critic in Stage II
    teacher    the "real score": the base model (``trainer.teacher_path``, else the generator's initial
               backbone: ``model.model_path`` or the seeded random init), frozen, run bidirectionally

All three start from the same seeded initialisation in every process, so data-parallel ranks agree
before DeepSpeed broadcasts anything. Under ZeRO-3 every parameter a module reads outside its own
``forward`` must be declared to DeepSpeed (``prepare_for_zero3``), or it would be read while still
partitioned (an empty tensor).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from model import CausalWanModel, FlowMatchScheduler, build_scheduler
from model.wan import TextContext
from model.weights import load_checkpoint
from rollout.components import Generator, build_generator
from slotmem.config import MemoryConfig, ModelConfig, TrainerConfig
from slotmem.errors import InputError


@dataclass
class TrainingModels:
    generator: Generator
    critic: CausalWanModel
    teacher: CausalWanModel
    scheduler: FlowMatchScheduler


def _load_strict(module: nn.Module, state: dict[str, Tensor], what: str) -> None:
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise InputError(f"{what} does not match the model: {len(missing)} missing (e.g. {missing[:3]}), "
                         f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")


def build_training_models(model_cfg: ModelConfig, memory_cfg: MemoryConfig, trainer_cfg: TrainerConfig, *,
                          stage: int, device: torch.device | str = "cpu",
                          generator_state: dict[str, Tensor] | None = None,
                          critic_state: dict[str, Tensor] | None = None) -> TrainingModels:
    """Generator, critic and teacher for `stage`, in float32 on `device` (DeepSpeed casts to bf16).

    generator_state / critic_state: weights to continue from (Stage II: Stage I's final weights);
    None = the initial weights (generator: seeded init + model.model_path; critic: the teacher).
    """
    if stage not in (1, 2):
        raise InputError(f"stage must be 1 or 2, got {stage!r}")
    generator = build_generator(model_cfg, memory_cfg, device="cpu", seed=trainer_cfg.seed).float()
    teacher = CausalWanModel(model_cfg)
    if trainer_cfg.teacher_path:
        load_checkpoint(teacher, trainer_cfg.teacher_path)
    else:
        teacher.load_state_dict(generator.backbone.state_dict())
    if generator_state is not None:
        _load_strict(generator, generator_state, "generator weights to continue from")
    critic = CausalWanModel(model_cfg)
    if critic_state is not None:
        _load_strict(critic, critic_state, "critic weights to continue from")
    else:
        critic.load_state_dict(teacher.state_dict())
    teacher.requires_grad_(False).eval()
    generator.train()
    critic.train()
    # Stage I trains phi and P only; Stage II unfreezes slot attention, initialiser and dynamics.
    generator.memory.freeze_slot_grouper(stage == 1)
    return TrainingModels(generator=generator.to(device), critic=critic.to(device), teacher=teacher.to(device),
                          scheduler=build_scheduler(model_cfg))


def predict_x0(model: CausalWanModel, scheduler: FlowMatchScheduler, x_t: Tensor, t: Tensor,
               text: TextContext) -> Tensor:
    """Bidirectional x0 prediction on a whole window (teacher and critic, causal=False).

    Calls the module (not ``model.forward``) so ZeRO-3's hooks on the root module gather its external
    parameters. Positions start at frame 0: the teacher only ever saw clips starting there.
    """
    flow = model(x_t, t, text, start_frame=0, causal=False)
    return scheduler.flow_to_x0(x_t, flow, t)


def prepare_for_zero3(module: nn.Module) -> None:
    """Declare parameters read outside their owner's forward, for ZeRO-3 partitioning.

    * CausalWanModel evaluates its time-embedding Linears functionally in float32 (``_linear32``)
      inside the root forward: they are registered as external parameters of the root module.
    * ``nn.MultiheadAttention`` (the slot dynamics predictor) reads ``out_proj``'s weights inside
      ``F.multi_head_attention_forward``: it is made a ZeRO-3 leaf, gathered whole at its forward.
    """
    import deepspeed
    from deepspeed.utils import set_z3_leaf_modules

    for sub in module.modules():
        if isinstance(sub, CausalWanModel):
            for layer in (sub.time_embedding[0], sub.time_embedding[2], sub.time_projection[1]):
                for p in layer.parameters():
                    deepspeed.zero.register_external_parameter(sub, p)
    if any(isinstance(m, nn.MultiheadAttention) for m in module.modules()):
        set_z3_leaf_modules(module, [nn.MultiheadAttention])
