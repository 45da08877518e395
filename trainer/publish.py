"""What a trainer publishes for rollout actors and `slotmem generate`: plain generator weights of a version.

The weights come from the fp32 master weights (``deepspeed_setup.gather_full_state_dict``), or the EMA shadow
where one is asked for, then any LoRA adapter is merged into its base layer by peft (trainer/lora.py), and the
result is cast to the model's compute dtype (``model.dtype``: bf16 safetensors on GPU presets). Nothing of the
training layout (adapters, ZeRO partitions) reaches a reader.
"""

from __future__ import annotations

import torch
from torch import Tensor

from cluster.storage import Storage, publish_weights
from slotmem.config import ModelConfig, TrainerConfig
from trainer.ema import EMA
from trainer.lora import merged_state_dict


def policy_state(full: dict[str, Tensor], *, model_cfg: ModelConfig, trainer_cfg: TrainerConfig,
                 ema: EMA | None = None) -> dict[str, Tensor]:
    """Plain, merged generator weights in the compute dtype from a full fp32 state dict (+ EMA shadow)."""
    state = dict(full)
    if ema is not None and ema.initialized:
        state.update({k: v for k, v in ema.shadow.items() if k in state})
    state = merged_state_dict(state, alpha=trainer_cfg.lora_alpha)
    dtype = getattr(torch, model_cfg.dtype)
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}


def publish_policy(storage: Storage, version: int, full: dict[str, Tensor], *, model_cfg: ModelConfig,
                   trainer_cfg: TrainerConfig, ema: EMA | None = None, meta: dict | None = None,
                   supersede: bool = False) -> str:
    """Publish version `version` (rank 0 only); returns its directory. supersede: see publish_weights."""
    state = policy_state(full, model_cfg=model_cfg, trainer_cfg=trainer_cfg, ema=ema)
    return publish_weights(storage, version, state, meta={**(meta or {}), "dtype": model_cfg.dtype,
                                                          "ema": bool(ema is not None and ema.initialized)},
                           supersede=supersede)
