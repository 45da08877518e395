"""The networks of a training stage and what of them trains (DESIGN §5; Self-Forcing / LongLive / MemFlow).

    generator  causal Wan backbone + long-term memory (rollout/components.Generator): the policy published to
               rollout actors. Starts from the few-step causal base (``model.model_path``), or from the previous
               stage's weights.
    critic     the "fake score": the generator's architecture run bidirectionally, starting from its own path
               (``trainer.critic_path``: the bidirectional base, Wan2.1-T2V-1.3B for Self-Forcing/LongLive), trained
               by the flow loss on the generator's samples.
    teacher    the "real score": its own architecture and weights (``teacher`` section: Wan2.1-T2V-14B in
               LongLive/MemFlow), frozen, run bidirectionally with CFG.
Only with ``model.allow_random_weights`` (tests, the random-weight tiny preset) may teacher and critic derive from
the generator's seeded initialisation.

What trains (``trainer.backbone``): 'full' every backbone parameter; 'lora' peft adapters on generator and critic
(trainer/lora.py), everything else of their backbones frozen; 'frozen' (paper §4.1) no generator backbone
parameter (the critic then trains in full, it must track the generator). The memory modules always train, in
their own parameter group (``parameter_groups``). Stage 0 trains only the slot modules; Stage I keeps the slot
grouper (slot attention, initialiser, dynamics predictor) in the optimizer at learning rate 0, which freezes it
(Appendix A.1 freeze_slot_grouper) while Stage II can resume Stage I's optimizer state exactly.

Every process builds the same seeded initialisation, so data-parallel ranks agree before DeepSpeed broadcasts
anything. Under ZeRO-3 every parameter a module reads outside its own ``forward`` must be declared to DeepSpeed
(``prepare_for_zero3``), or it would be read while still partitioned (an empty tensor).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from model import CausalWanModel, FlowMatchScheduler, build_scheduler
from model.wan import TextContext
from model.weights import load_checkpoint
from rollout.components import Generator, build_generator
from slotmem.config import MemoryConfig, ModelConfig, TeacherConfig, TrainerConfig
from slotmem.errors import InputError
from trainer.lora import add_lora, has_lora, load_adapter, read_adapter

STAGES = (0, 1, 2)


@dataclass
class TrainingModels:
    generator: Generator
    critic: CausalWanModel | None  # None in Stage 0 (no scores)
    teacher: CausalWanModel | None
    scheduler: FlowMatchScheduler


def load_strict(module: nn.Module, state: dict[str, Tensor], what: str) -> None:
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise InputError(f"{what} does not match the model: {len(missing)} missing (e.g. {missing[:3]}), "
                         f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")


def _load_path(module: CausalWanModel, path: str, field: str) -> None:
    try:
        load_checkpoint(module, path)
    except InputError as e:
        raise InputError(f"{field}: {e}") from None


def build_teacher(model_cfg: ModelConfig, teacher_cfg: TeacherConfig, generator: Generator) -> CausalWanModel:
    """The frozen real score: teacher.model_path in the teacher's architecture, else the generator's init."""
    teacher = CausalWanModel(teacher_cfg.model_config(model_cfg))
    if teacher_cfg.model_path:
        _load_path(teacher, teacher_cfg.model_path, "teacher.model_path")
    else:
        if not model_cfg.allow_random_weights:
            raise InputError("teacher.model_path is empty: training needs the teacher's weights (e.g. "
                             "Wan2.1-T2V-14B); only model.allow_random_weights derives it from the generator")
        teacher.load_state_dict(generator.backbone.state_dict())
    return teacher.requires_grad_(False).eval()


def build_critic(model_cfg: ModelConfig, trainer_cfg: TrainerConfig, generator_init: dict[str, Tensor]) -> CausalWanModel:
    """The fake score: trainer.critic_path (the bidirectional base), else the generator's initial backbone."""
    critic = CausalWanModel(model_cfg)
    if trainer_cfg.critic_path:
        _load_path(critic, trainer_cfg.critic_path, "trainer.critic_path")
    else:
        if not model_cfg.allow_random_weights:
            raise InputError("trainer.critic_path is empty: the critic starts from the bidirectional base (e.g. "
                             "Wan2.1-T2V-1.3B); only model.allow_random_weights derives it from the generator")
        critic.load_state_dict(generator_init)
    return critic


def build_training_models(model_cfg: ModelConfig, teacher_cfg: TeacherConfig, memory_cfg: MemoryConfig,
                          trainer_cfg: TrainerConfig, *, stage: int, device: torch.device | str = "cpu",
                          generator_state: dict[str, Tensor] | None = None) -> TrainingModels:
    """Generator, critic and teacher of `stage` in float32 on `device` (DeepSpeed casts to bf16 on GPUs).

    generator_state: the previous stage's generator to start from (Stage I starts from Stage 0's; Stage II
    resumes Stage I's DeepSpeed checkpoint instead and passes nothing).
    """
    if stage not in STAGES:
        raise InputError(f"stage must be one of {STAGES}, got {stage!r}")
    generator = build_generator(model_cfg, memory_cfg, device="cpu", seed=trainer_cfg.seed).float()
    if generator_state is not None:
        load_strict(generator, generator_state, "the previous stage's generator")
    scheduler = build_scheduler(model_cfg)
    if stage == 0:  # slot warm-up: the frozen backbone's features train the slot modules, no scores
        generator.backbone.requires_grad_(False)
        _slot_modules_only(generator)
        return TrainingModels(generator=generator.to(device).train(), critic=None, teacher=None, scheduler=scheduler)
    teacher = build_teacher(model_cfg, teacher_cfg, generator)
    critic = build_critic(model_cfg, trainer_cfg, generator.backbone.state_dict())
    # activations of the rolled chunks and the critic's 21-frame clip are what fills a 1.3B rank without it
    # (bench/memory_accounting.py); the teacher never runs backward
    generator.backbone.gradient_checkpointing = critic.gradient_checkpointing = trainer_cfg.gradient_checkpointing
    apply_backbone_mode(generator, critic, trainer_cfg)
    if hasattr(generator.memory, "decoder"):
        generator.memory.decoder.requires_grad_(False)  # Stage 0 only
    return TrainingModels(generator=generator.to(device).train(), critic=critic.to(device).train(),
                          teacher=teacher.to(device), scheduler=scheduler)


def _slot_modules_only(generator: Generator) -> None:
    """Stage 0 trains phi, the grouper and the decoder; the text projection P has no Stage 0 signal."""
    memory = generator.memory
    memory.requires_grad_(False)
    for name in ("writer", "decoder"):
        if hasattr(memory, name):
            getattr(memory, name).requires_grad_(True)


def apply_backbone_mode(generator: Generator, critic: CausalWanModel, trainer_cfg: TrainerConfig) -> None:
    """trainer.backbone on the generator's and the critic's backbones (module docstring)."""
    mode = trainer_cfg.backbone
    if mode == "frozen":
        generator.backbone.requires_grad_(False)
    elif mode == "lora":
        for role, module in (("generator", generator.backbone), ("critic", critic)):
            add_lora(module, rank=trainer_cfg.lora_rank, alpha=trainer_cfg.lora_alpha)
            if trainer_cfg.lora_path:
                load_adapter(module, read_adapter(trainer_cfg.lora_path, role), trainer_cfg.lora_path, role)


def parameter_groups(generator: Generator, trainer_cfg: TrainerConfig, *, stage: int) -> list[dict]:
    """AdamW groups of the generator: backbone (trainer.lr, weight decay), memory modules (trainer.memory_lr, no
    decay) and the slot grouper (memory_lr, or 0 in Stage I: frozen but kept, so Stage II resumes the optimizer)."""
    grouper = {id(p) for p in generator.memory.writer.grouper.parameters()} if hasattr(generator.memory, "writer") \
        else set()
    groups = {"backbone": [], "memory": [], "slot_grouper": []}
    for name, p in generator.named_parameters():
        if not p.requires_grad:
            continue
        key = "slot_grouper" if id(p) in grouper else "memory" if name.startswith("memory.") else "backbone"
        groups[key].append(p)
    settings = group_settings(trainer_cfg, stage=stage)
    out = [{"params": params, **settings[key], "name": key} for key, params in groups.items() if params]
    if not out:
        raise InputError(f"nothing of the generator trains in stage {stage} (trainer.backbone={trainer_cfg.backbone!r}, "
                         "memory.kind without parameters?)")
    return out


def group_settings(trainer_cfg: TrainerConfig, *, stage: int) -> dict[str, dict[str, float]]:
    """lr and weight decay of every parameter group of `stage` (generator groups, and the critic's)."""
    return {"backbone": {"lr": trainer_cfg.lr, "weight_decay": trainer_cfg.weight_decay},
            "memory": {"lr": trainer_cfg.memory_lr, "weight_decay": 0.0},
            "slot_grouper": {"lr": 0.0 if stage == 1 else trainer_cfg.memory_lr, "weight_decay": 0.0},
            "critic": {"lr": trainer_cfg.critic_lr, "weight_decay": trainer_cfg.weight_decay},
            "critic_lora": {"lr": trainer_cfg.critic_lr, "weight_decay": trainer_cfg.weight_decay}}


def apply_group_settings(optimizer, trainer_cfg: TrainerConfig, *, stage: int, lr_scale: float = 1.0) -> None:
    """Set every named group's lr (times `lr_scale`: Stage 0's warm-up and decay) and weight decay for `stage`
    (a resumed optimizer carries the previous stage's: Stage II resumes Stage I's moments but unfreezes the
    grouper)."""
    settings = group_settings(trainer_cfg, stage=stage)
    for group in optimizer.param_groups:
        if group.get("name") in settings:
            group.update(settings[group["name"]])
            group["lr"] *= lr_scale


def critic_parameter_groups(critic: CausalWanModel, trainer_cfg: TrainerConfig) -> list[dict]:
    params = [p for p in critic.parameters() if p.requires_grad]
    name = "critic_lora" if has_lora(critic) else "critic"
    return [{"params": params, **group_settings(trainer_cfg, stage=1)[name], "name": name}]


def predict_x0(model: CausalWanModel, scheduler: FlowMatchScheduler, x_t: Tensor, t: Tensor,
               text: TextContext) -> Tensor:
    """Bidirectional x0 prediction on a whole window (teacher and critic, causal=False).

    Calls the module (not ``model.forward``) so ZeRO-3's hooks on the root module gather its external
    parameters. Positions start at frame 0: the scores see a clip as Wan was trained, from its first frame
    (a mid-video window's first latent is re-encoded as an image latent, trainer/window.py).
    """
    flow = model(x_t, t, text, start_frame=0, causal=False)
    return scheduler.flow_to_x0(x_t, flow, t)


def prepare_for_zero3(module: nn.Module) -> None:
    """Declare parameters read outside their owner's forward, for ZeRO-3 partitioning.

    CausalWanModel evaluates its time-embedding Linears functionally in float32 (``_linear32``) inside the root
    forward: they are registered as external parameters of the root module. (Nothing else reads weights outside
    its module: the slot dynamics predictor is built from Linear layers for this reason.)
    """
    import deepspeed

    for sub in module.modules():
        if isinstance(sub, CausalWanModel):
            for layer in (sub.time_embedding[0], sub.time_embedding[2], sub.time_projection[1]):
                for p in layer.parameters():
                    deepspeed.zero.register_external_parameter(sub, p)
