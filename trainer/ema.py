"""Exponential moving average of the generator's parameters (Appendix A.1: decay 0.99 from step 200).

The shadow is an fp32 copy of every parameter (kept on CPU by default, as Self-Forcing does, so it
costs no accelerator memory). Under DeepSpeed ZeRO-3 a parameter holds only its local partition,
so updates, ``copy_to`` and nothing else gather the full tensors group by group under
``deepspeed.zero.GatheredParameters``; every rank must then call them together (they are
collectives) and every rank ends with the same shadow. Plain modules and ZeRO-1/2 engines (whose
parameters are replicated) need no communication.

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
def _gathered(params: list[nn.Parameter], *, modifier_rank: int | None) -> Iterator[None]:
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
            with _gathered([q for _, q in group], modifier_rank=modifier_rank):
                yield group
            group, size = [], 0
    if group:
        with _gathered([q for _, q in group], modifier_rank=modifier_rank):
            yield group


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
        """Fold the current weights into the shadow; returns whether anything was done at this step."""
        if step < self.start_step:
            return False
        named = list(unwrap(model).named_parameters())
        first = not self.initialized
        for group in iter_gathered(named):
            for name, p in group:
                value = p.detach().to(self.device, torch.float32)
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
