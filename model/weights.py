"""Wan2.1 checkpoints from a local path: the original Wan layout and the diffusers layout.

* Wan layout (``WanModel``, also Self-Forcing/LongLive): our own parameter names
  (``blocks.N.self_attn.q``, ``blocks.N.norm3`` = cross-attn norm, ``head.head`` ...). Published as
  ``diffusion_pytorch_model.safetensors`` (1.3B) or shards + ``*.index.json`` (14B), or a ``.pth``.
* diffusers layout (``WanTransformer3DModel``): ``condition_embedder.*``, ``blocks.N.attn1.to_q``,
  ``blocks.N.norm2`` = cross-attn norm, ``proj_out``, ``scale_shift_table`` ... in a directory
  with config.json (a pipeline directory's ``transformer/`` subfolder is found too).

The layout is detected from the key names, never from file names (the original 1.3B release uses
diffusers-style file names with Wan keys). Nothing is ever downloaded.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from model.wan import CausalWanModel
from slotmem.config import ModelConfig
from slotmem.errors import InputError

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
WEIGHTS_MODE = 0o644  # rw-r--r--: readable by the group that runs the cluster, like our videos (rollout/video.py)
# Prefixes that training wrappers put in front of the model's own names.
WRAPPER_PREFIXES = ("model.diffusion_model.", "_orig_mod.", "module.", "model.")

# Wan name -> diffusers name, for modules (their .weight/.bias follow) and bare parameters.
_TOP_LEVEL = {
    "patch_embedding": "patch_embedding",
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "time_projection.1": "condition_embedder.time_proj",
    "head.head": "proj_out",
    "head.modulation": "scale_shift_table",
}
_PER_BLOCK = {
    "self_attn.q": "attn1.to_q",
    "self_attn.k": "attn1.to_k",
    "self_attn.v": "attn1.to_v",
    "self_attn.o": "attn1.to_out.0",
    "self_attn.norm_q": "attn1.norm_q",
    "self_attn.norm_k": "attn1.norm_k",
    "cross_attn.q": "attn2.to_q",
    "cross_attn.k": "attn2.to_k",
    "cross_attn.v": "attn2.to_v",
    "cross_attn.o": "attn2.to_out.0",
    "cross_attn.norm_q": "attn2.norm_q",
    "cross_attn.norm_k": "attn2.norm_k",
    "norm3": "norm2",  # the cross-attention LayerNorm: Wan calls it norm3, diffusers norm2
    "ffn.0": "ffn.net.0.proj",
    "ffn.2": "ffn.net.2",
    "modulation": "scale_shift_table",
}


def wan_to_diffusers_key(key: str) -> str:
    """Our (Wan) parameter name -> WanTransformer3DModel's."""
    prefix, table = "", _TOP_LEVEL
    if key.startswith("blocks."):
        _, index, key = key.split(".", 2)
        prefix, table = f"blocks.{index}.", _PER_BLOCK
    if key in table:
        return prefix + table[key]
    module, leaf = key.rsplit(".", 1)
    if module not in table:
        raise KeyError(f"no diffusers name for Wan parameter {prefix + key!r}")
    return f"{prefix}{table[module]}.{leaf}"


def detect_layout(keys) -> str:
    """'wan' or 'diffusers' from a state dict's key names."""
    keys = list(keys)
    diffusers = any(k.startswith("condition_embedder.") or ".attn1." in k for k in keys)
    wan = any(k.startswith(("text_embedding.", "time_embedding.")) or ".self_attn." in k for k in keys)
    if diffusers == wan:
        raise InputError(f"cannot tell the checkpoint layout: expected Wan keys (text_embedding.0.weight, "
                         f"blocks.0.self_attn.q.weight ...) or diffusers keys (condition_embedder..., "
                         f"blocks.0.attn1.to_q.weight ...); first keys: {keys[:5]}")
    return "diffusers" if diffusers else "wan"


# ----------------------------------------------------------------------------------------------
# files
# ----------------------------------------------------------------------------------------------


def load_state_dict_file(path: str | Path) -> dict[str, Tensor]:
    """One weights file (.safetensors, or a torch .pth/.pt/.bin holding a state dict) -> CPU tensors."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"weights file {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path), device="cpu")
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise InputError(f"weights file {str(path)!r} is not a readable safetensors file: {e}") from None
    if path.suffix not in WEIGHT_SUFFIXES:
        raise InputError(f"weights file {str(path)!r} must end in one of {list(WEIGHT_SUFFIXES)}")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise InputError(f"weights file {str(path)!r} could not be read by torch.load: {e}") from None
    if isinstance(obj, dict) and obj and not all(isinstance(v, Tensor) for v in obj.values()):
        nested = [v for v in obj.values() if isinstance(v, dict)]
        if len(nested) == 1:  # e.g. {"state_dict": {...}, "step": 3}
            obj = nested[0]
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        top = list(obj)[:8] if isinstance(obj, dict) else type(obj).__name__
        raise InputError(f"weights file {str(path)!r} does not hold one state dict of tensors (top level: {top})")
    return obj


def save_state_dict_file(state_dict: dict[str, Tensor], path: str | Path,
                         metadata: dict[str, str] | None = None) -> None:
    """Write tensors to a .safetensors file (contiguous CPU copies); parent directories are created. The file
    appears whole (written beside it, then renamed) and group-readable (safetensors itself creates it 0600)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise InputError(f"weights file {str(path)!r} must end in .safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    tmp = path.with_name(f".{path.name}.partial")
    save_file(tensors, str(tmp), metadata=metadata)
    os.chmod(tmp, WEIGHTS_MODE)
    os.replace(tmp, path)


def _prefer_model_files(files: list[Path]) -> list[Path]:
    """The transformer's own files when a directory also holds others (Wan ships the VAE and T5 beside it)."""
    own = [f for f in files if f.name.startswith("diffusion_pytorch_model")]
    return own or files


def _weight_files(directory: Path) -> list[Path]:
    """The weight files of a checkpoint directory: those an index json names, else all of one kind."""
    if not any(p.suffix in WEIGHT_SUFFIXES for p in directory.iterdir()) and (directory / "transformer").is_dir():
        directory = directory / "transformer"  # a diffusers pipeline directory
    indexes = _prefer_model_files(sorted(directory.glob("*.index.json")))
    if indexes:
        try:
            weight_map = json.loads(indexes[0].read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise InputError(f"checkpoint index {str(indexes[0])!r} is not a valid index json: {e}") from None
        return [directory / name for name in sorted(set(weight_map.values()))]
    for suffix in WEIGHT_SUFFIXES:
        files = _prefer_model_files(sorted(directory.glob(f"*{suffix}")))
        if files:
            return files
    raise InputError(f"checkpoint directory {str(directory)!r} holds no weights "
                     f"({', '.join(WEIGHT_SUFFIXES)} files or an *.index.json)")


def read_checkpoint(path: str | Path) -> dict[str, Tensor]:
    """All tensors of a checkpoint file or directory, wrapper prefixes stripped."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"checkpoint path {str(path)!r} does not exist (weights are only read from local paths)")
    files = _weight_files(path) if path.is_dir() else [path]
    state: dict[str, Tensor] = {}
    for file in files:
        state.update(load_state_dict_file(file))
    for prefix in WRAPPER_PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


# ----------------------------------------------------------------------------------------------
# model <-> checkpoint
# ----------------------------------------------------------------------------------------------


def _first(items: list[str], n: int = 5) -> str:
    return ", ".join(items[:n]) + (" ..." if len(items) > n else "")


def load_checkpoint(model: CausalWanModel, path: str | Path) -> str:
    """Load a Wan2.1 checkpoint (either layout, auto-detected) into model; returns the layout."""
    state = read_checkpoint(path)
    layout = detect_layout(state)
    own = model.state_dict()
    # checkpoint name of each of our parameters
    names = {key: (wan_to_diffusers_key(key) if layout == "diffusers" else key) for key in own}
    missing = [name for name in names.values() if name not in state]
    unexpected = sorted(set(state) - set(names.values()))
    mismatched = [f"{name} {tuple(state[name].shape)} vs model {tuple(own[key].shape)}"
                  for key, name in names.items() if name in state and state[name].shape != own[key].shape]
    if missing or unexpected or mismatched:
        problems = [f"{len(x)} {what} ({_first(x)})" for x, what in
                    ((missing, "missing keys"), (unexpected, "unexpected keys"), (mismatched, "shape mismatches"))
                    if x]
        raise InputError(f"checkpoint {str(path)!r} ({layout} layout) does not fit model "
                         f"{model.cfg.name!r}: " + "; ".join(problems))
    model.load_state_dict({key: state[name] for key, name in names.items()})
    return layout


def _wan_config(cfg: ModelConfig) -> dict:
    return {"_class_name": "WanModel", "model_type": "t2v", "patch_size": list(cfg.patch_size),
            "text_len": cfg.text_len, "in_dim": cfg.in_channels, "dim": cfg.dim, "ffn_dim": cfg.ffn_dim,
            "freq_dim": cfg.freq_dim, "text_dim": cfg.text_dim, "out_dim": cfg.in_channels,
            "num_heads": cfg.num_heads, "num_layers": cfg.num_layers, "eps": cfg.eps}


def _diffusers_config(cfg: ModelConfig) -> dict:
    return {"_class_name": "WanTransformer3DModel", "patch_size": list(cfg.patch_size),
            "num_attention_heads": cfg.num_heads, "attention_head_dim": cfg.head_dim,
            "in_channels": cfg.in_channels, "out_channels": cfg.in_channels, "text_dim": cfg.text_dim,
            "freq_dim": cfg.freq_dim, "ffn_dim": cfg.ffn_dim, "num_layers": cfg.num_layers,
            "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads", "eps": cfg.eps,
            "image_dim": None, "added_kv_proj_dim": None, "rope_max_seq_len": cfg.rope_max_frames}


def save_checkpoint(model: CausalWanModel, path: str | Path, layout: str = "wan",
                    max_shard_bytes: int | None = None) -> Path:
    """Write model weights in the Wan or diffusers layout.

    layout="wan": a single file if path ends in .safetensors, otherwise a directory like the
    original release (config.json + diffusion_pytorch_model.safetensors). layout="diffusers": a
    directory loadable by WanTransformer3DModel.from_pretrained. max_shard_bytes splits the tensors
    into diffusion_pytorch_model-0000i-of-0000n.safetensors files plus an index json.
    """
    if layout not in ("wan", "diffusers"):
        raise InputError(f"checkpoint layout must be 'wan' or 'diffusers', got {layout!r}")
    path = Path(path)
    state = model.state_dict()
    if layout == "diffusers":
        state = {wan_to_diffusers_key(k): v for k, v in state.items()}
    if layout == "wan" and path.suffix == ".safetensors":
        save_state_dict_file(state, path)
        return path
    path.mkdir(parents=True, exist_ok=True)
    config = _diffusers_config(model.cfg) if layout == "diffusers" else _wan_config(model.cfg)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    shards = _shard(state, max_shard_bytes)
    if len(shards) == 1:
        save_state_dict_file(state, path / "diffusion_pytorch_model.safetensors")
        return path
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        name = f"diffusion_pytorch_model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_state_dict_file(shard, path / name)
        weight_map.update({k: name for k in shard})
    total = sum(v.numel() * v.element_size() for v in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return path


def _shard(state: dict[str, Tensor], max_bytes: int | None) -> list[dict[str, Tensor]]:
    if max_bytes is None:
        return [state]
    shards, current, size = [], {}, 0
    for key, value in state.items():
        nbytes = value.numel() * value.element_size()
        if current and size + nbytes > max_bytes:
            shards.append(current)
            current, size = {}, 0
        current[key] = value
        size += nbytes
    return shards + [current]


def build_model(model_cfg: ModelConfig, device: torch.device | str = "cpu") -> CausalWanModel:
    """The backbone of model_cfg: Wan-initialised, or loaded from model_cfg.model_path; in model_cfg.dtype."""
    model = CausalWanModel(model_cfg)
    if model_cfg.model_path:
        load_checkpoint(model, model_cfg.model_path)
    return model.to(device=device, dtype=getattr(torch, model_cfg.dtype))
