"""Exponential moving average of the generator's parameters (Appendix A.1: decay 0.99 from step 200).

The shadow is an fp32 copy of every parameter (kept on CPU by default, as Self-Forcing does, so it
costs no accelerator memory). For a DeepSpeed engine the values folded in are the fp32 master weights of
the optimizer (``deepspeed_setup.iter_full_fp32``), never the bf16 compute copy; assembling them is a
collective under every ZeRO stage, so every rank calls ``update`` together and ends with the same shadow.
Under ZeRO-3 ``copy_to`` gathers the module's full tensors group by group under
``deepspeed.zero.GatheredParameters``. Plain modules need no communication.

``step`` is the caller's generator-update counter (see trainer/schedule.py): before
``start_step`` nothing happens, at the first update at or after it the shadow is a copy of the
weights, and from then on shadow <- decay * shadow + (1 - decay) * weights.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from slotmem.config import TrainerConfig

# Elements gathered at once under ZeRO-3: bounds the transient full-weight copies (~200 MB fp32).
_GATHER_NUMEL = 50_000_000


def unwrap(model: nn.Module) -> nn.Module:
    """The user module inside a DeepSpeed engine or DDP wrapper (parameter names without 'module.')."""
    while isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    return model


def _is_partitioned(p: torch.Tensor) -> bool:
    return hasattr(p, "ds_id")


def _full_numel(p: torch.Tensor) -> int:
    return p.ds_numel if _is_partitioned(p) else p.numel()


@contextlib.contextmanager
def gathered(params: list[nn.Parameter], *, modifier_rank: int | None) -> Iterator[None]:
    """Full tensors of ZeRO-3 partitioned params inside the block; a no-op for ordinary params."""
    partitioned = [p for p in params if _is_partitioned(p)]
    if not partitioned:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=modifier_rank):
        yield


def iter_gathered(named: list[tuple[str, nn.Parameter]], *, modifier_rank: int | None = None,
                  max_numel: int = _GATHER_NUMEL) -> Iterator[list[tuple[str, nn.Parameter]]]:
    """Yield groups of (name, param) whose full values are available while the group is current."""
    group: list[tuple[str, nn.Parameter]] = []
    size = 0
    for name, p in named:
        group.append((name, p))
        size += _full_numel(p)
        if size >= max_numel:
            with gathered([q for _, q in group], modifier_rank=modifier_rank):
                yield group
            group, size = [], 0
    if group:
        with gathered([q for _, q in group], modifier_rank=modifier_rank):
            yield group


def _full_values(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Full parameter values: fp32 masters of a DeepSpeed engine, else the (gathered) module parameters."""
    if hasattr(model, "optimizer") and hasattr(model, "zero_optimization_stage"):
        from trainer.deepspeed_setup import iter_full_fp32

        yield from iter_full_fp32(model)
        return
    for group in iter_gathered(list(unwrap(model).named_parameters())):
        for name, p in group:
            yield name, p.detach()


class EMA:
    """fp32 EMA shadow of a module's parameters."""

    def __init__(self, *, decay: float, start_step: int, device: str | torch.device = "cpu"):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.decay = decay
        self.start_step = start_step
        self.device = torch.device(device)
        self.shadow: dict[str, torch.Tensor] = {}

    @classmethod
    def from_config(cls, trainer_cfg: TrainerConfig, device: str | torch.device = "cpu") -> "EMA":
        return cls(decay=trainer_cfg.ema_weight, start_step=trainer_cfg.ema_start_step, device=device)

    @property
    def initialized(self) -> bool:
        return bool(self.shadow)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> bool:
        """Fold the current weights into the shadow; returns whether anything was done at this step (before
        start_step nothing happens, unless a shadow already exists, e.g. carried over from the previous stage)."""
        if step < self.start_step and not self.initialized:
            return False
        first = not self.initialized
        for name, value in _full_values(model):
            value = value.to(self.device, torch.float32)
            if first:
                self.shadow[name] = value.clone()
            else:
                self.shadow[name].mul_(self.decay).add_(value, alpha=1.0 - self.decay)
        return True

    @torch.no_grad()
    def copy_to(self, module: nn.Module) -> None:
        """Overwrite the module's parameters with the shadow (e.g. to publish or evaluate EMA weights)."""
        if not self.initialized:
            raise RuntimeError("EMA.copy_to before the first update: the shadow is empty")
        named = list(unwrap(module).named_parameters())
        missing = sorted({n for n, _ in named} - set(self.shadow))
        if missing:
            raise KeyError(f"EMA shadow has no entry for parameters {missing[:5]}")
        # Every rank holds the same shadow, so rank 0's write is the one ZeRO-3 re-partitions.
        for group in iter_gathered(named, modifier_rank=0):
            for name, p in group:
                p.data.copy_(self.shadow[name].to(p.device, p.dtype))

    def state_dict(self) -> dict:
        return {"decay": self.decay, "start_step": self.start_step,
                "shadow": {k: v.clone() for k, v in self.shadow.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.decay = float(state["decay"])
        self.start_step = int(state["start_step"])
        self.shadow = {k: v.to(self.device, torch.float32).clone() for k, v in state["shadow"].items()}
