"""Causal Wan2.1 DiT backbone with KV cache (torch only; no ray, no torch.distributed)."""

from model.kv_cache import LayerKVCache, block_causal_mask
from model.rope import Rope3D, apply_rope, rope_band_dims
from model.schedule import FlowMatchScheduler, build_scheduler, sampler_timesteps
from model.wan import CausalWanModel, LayerState, TextContext
from model.weights import (build_model, detect_layout, load_checkpoint, load_state_dict_file, read_checkpoint,
                           save_checkpoint, save_state_dict_file, wan_to_diffusers_key)

__all__ = [
    "CausalWanModel", "FlowMatchScheduler", "LayerKVCache", "LayerState", "Rope3D", "TextContext",
    "apply_rope", "block_causal_mask", "build_model", "build_scheduler", "detect_layout", "load_checkpoint",
    "load_state_dict_file", "read_checkpoint", "rope_band_dims", "sampler_timesteps", "save_checkpoint",
    "save_state_dict_file", "wan_to_diffusers_key",
]
