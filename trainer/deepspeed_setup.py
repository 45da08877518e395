"""DeepSpeed plumbing shared by the generator and critic engines: config, process group, engine, stats.

CPU-safe by construction (reference/cpu-stack-notes.md §2): the shared-memory allreduce op, which
DeepSpeed JIT-compiles at every ``init_distributed`` (30-60 s on 2 cores), is disabled (gloo does
not need it), and the optimizer is a client ``torch.optim.AdamW`` instead of a DS-config optimizer,
which would JIT-build FusedAdam. Nothing here compiles anything, on CPU or GPU.
"""

from __future__ import annotations

import importlib
import os
import socket
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import nn

from slotmem.config import TrainerConfig
from trainer.ema import gathered, unwrap

# Steps between DeepSpeed's own progress prints: never (the trainer reports progress itself).
_QUIET_STEPS = 1 << 30


def ds_config(trainer_cfg: TrainerConfig, *, zero_stage: int | None = None, use_bf16: bool,
              train_batch_size: int, grad_clip: float | None = None,
              param_persistence_threshold: int = 100_000) -> dict[str, Any]:
    """DeepSpeed config dict for one engine; zero_stage / grad_clip default to the trainer config.

    ``train_batch_size`` is the global batch (per-rank micro batch x world size, no gradient
    accumulation). bf16 is for GPUs; CPU runs use fp32. There is deliberately no "optimizer"
    entry: the optimizer is passed to ``make_engine`` as a client torch AdamW.
    ``param_persistence_threshold`` (ZeRO-3 only): parameters with fewer elements stay replicated
    (DeepSpeed's default 1e5 avoids gathering norms and biases); 0 partitions every parameter,
    which tiny models need for ZeRO-3 to partition anything.
    """
    stage = trainer_cfg.zero_stage if zero_stage is None else zero_stage
    if stage not in (1, 2, 3):
        raise ValueError(f"zero_stage must be 1, 2 or 3, got {stage!r}")
    if train_batch_size < 1:
        raise ValueError(f"train_batch_size must be >= 1, got {train_batch_size!r}")
    return {
        "train_batch_size": train_batch_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": trainer_cfg.grad_clip if grad_clip is None else grad_clip,
        # gradients are all-reduced in fp32 even when the compute copy is bf16 (Self-Forcing's FSDP MixedPrecision
        # reduces in fp32); a bf16 reduction of 8-64 ranks' gradients loses the small ones
        "communication_data_type": "fp32",
        "zero_optimization": {"stage": stage, **(
            {"stage3_param_persistence_threshold": param_persistence_threshold} if stage == 3 else {})},
        "bf16": {"enabled": bool(use_bf16)},
        "fp16": {"enabled": False},
        "steps_per_print": _QUIET_STEPS,
        "wall_clock_breakdown": False,
    }


def local_dist_env(*, rank: int = 0, world_size: int = 1, port: int | None = None) -> dict[str, str]:
    """Environment for a process group on this host (in-process tests, single-process tools).

    With ``port=None`` a free port is picked; ranks of one group must share the port.
    """
    if port is None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    return {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
            "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size)}


def ensure_single_process_group(backend: str = "gloo") -> None:
    """A world-size-1 process group on a free local port for in-process use (tests, benchmarks).

    Reuses a group that already exists. The group and its environment variables (RANK, LOCAL_RANK,
    WORLD_SIZE, MASTER_*; ``deepspeed.initialize`` reads LOCAL_RANK) stay for the rest of the
    process: DeepSpeed caches its sub-groups module-wide, so a destroyed group cannot be replaced.
    """
    import torch.distributed as dist

    if dist.is_initialized():
        return
    os.environ.update(local_dist_env())
    init_distributed_cpu_safe(backend)


def init_distributed_cpu_safe(backend: str | None = None) -> None:
    """``deepspeed.init_distributed`` without building the shm comm op; a no-op if already initialised.

    Reads RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT / LOCAL_RANK from the environment (set by
    torchrun, Ray Train or ``local_dist_env``). ``backend=None`` lets the accelerator choose
    (nccl on CUDA, gloo on CPU).
    """
    # Must go through importlib: `import deepspeed.comm.torch as m` binds the real `torch` module
    # (deepspeed.comm re-exports it), and the patch would silently do nothing.
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    import deepspeed

    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)


def make_engine(module: nn.Module, *, param_groups: list[dict], betas: tuple[float, float],
                ds_config: dict[str, Any]):
    """Wrap `module` in a DeepSpeed engine whose optimizer is torch AdamW over `param_groups` (each group its own
    lr and weight decay; trainer/models.py parameter_groups)."""
    import deepspeed

    if not any(group["params"] for group in param_groups):
        raise ValueError("make_engine: the module has no trainable parameters")
    optimizer = torch.optim.AdamW(param_groups, betas=tuple(betas))
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, config=ds_config)
    return engine


def base_optimizer(engine) -> torch.optim.Optimizer:
    """The torch optimizer under DeepSpeed's ZeRO wrapper (it steps the local fp32 partitions)."""
    opt = engine.optimizer
    while not isinstance(opt, torch.optim.Optimizer):
        opt = opt.optimizer
    return opt


@dataclass(frozen=True)
class PartitionStats:
    """Elements this rank holds, for the ZeRO 1/2/3 memory comparison."""

    rank: int
    world_size: int
    zero_stage: int
    param_elements_total: int
    """Elements of the full model (all parameters, trainable or not)."""
    param_elements: int
    """Model parameter elements held locally (the whole model, or the ZeRO-3 partition)."""
    master_param_elements: int
    """fp32 master-weight elements the optimizer steps on this rank (the ZeRO partition)."""
    optimizer_state_elements: int
    """Optimizer-state elements held locally (AdamW: exp_avg + exp_avg_sq of the partition)."""


def zero_partition_stats(engine) -> PartitionStats:
    """Count what this rank holds. AdamW creates its state at the first step: call after one."""
    import torch.distributed as dist

    module = unwrap(engine)
    local = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in module.parameters())
    total = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in module.parameters())
    opt = base_optimizer(engine)
    # ZeRO-1/2 keep the fp32 partitions in the torch optimizer's param groups; ZeRO-3 swaps its flat
    # partitions in only for the duration of step(), so they are read from the ZeRO optimizer.
    flat = (getattr(engine.optimizer, "fp32_partitioned_groups_flat", None)
            or [p for group in opt.param_groups for p in group["params"]])
    master = sum(p.numel() for p in flat)
    state = sum(v.numel() for s in opt.state.values() for v in s.values()
                if torch.is_tensor(v) and v.ndim > 0)  # skip the scalar 'step'
    return PartitionStats(rank=dist.get_rank() if dist.is_initialized() else 0,
                          world_size=dist.get_world_size() if dist.is_initialized() else 1,
                          zero_stage=engine.zero_optimization_stage(), param_elements_total=total,
                          param_elements=local, master_param_elements=master, optimizer_state_elements=state)


def iter_full_fp32(engine) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, full fp32 CPU tensor) of every parameter of the engine's module, in order, on every rank.

    A trained parameter's value is its fp32 master weight, assembled by DeepSpeed's ``safe_get_full_fp32_param``
    from the optimizer's partitions (under bf16 the module only holds a rounded compute copy); a frozen parameter
    has no master and is read from the module (gathered under ZeRO-3). A collective: every rank must call it.
    """
    from deepspeed.utils import safe_get_full_fp32_param

    for name, p in unwrap(engine).named_parameters():
        master = safe_get_full_fp32_param(p) if p.requires_grad else None
        if master is None:
            with gathered([p], modifier_rank=None):
                master = p.detach()
        yield name, master.detach().to("cpu", torch.float32).clone()


@torch.no_grad()
def gather_full_state_dict(engine) -> dict[str, torch.Tensor]:
    """Full fp32 CPU state dict of the engine's module (trained parameters from the fp32 masters), on rank 0
    ({} on other ranks). A collective: every rank must call it."""
    import torch.distributed as dist

    module = unwrap(engine)
    is_rank0 = not dist.is_initialized() or dist.get_rank() == 0
    aliases: dict[str, list[str]] = {}  # tied parameters appear under several state-dict keys
    first: dict[int, str] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        aliases.setdefault(first.setdefault(id(p), name), []).append(name)
    out: dict[str, torch.Tensor] = {}
    for name, value in iter_full_fp32(engine):
        if is_rank0:
            out.update({alias: value for alias in aliases[name]})
    if not is_rank0:
        return {}
    for name, b in module.named_buffers(remove_duplicate=False):
        value = b.detach().to("cpu").clone()
        out[name] = value.float() if value.is_floating_point() else value
    return {k: out[k] for k in module.state_dict(keep_vars=True)}
