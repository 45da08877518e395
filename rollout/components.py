"""One small factory for everything a streaming generator needs (backbone, memory, scheduler, text, VAE).

The ``Generator`` module bundles the causal backbone with its long-term memory (slot adapter, slot
attention, text projection) so that one state dict is what training optimises and what is published
as a ``policy_version`` for rollout actors.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from memory import build_memory
from model import CausalWanModel, FlowMatchScheduler
from model.schedule import build_scheduler
from model.text import build_text_encoder
from model.weights import load_checkpoint, load_state_dict_file
from slotmem.config import MemoryConfig, ModelConfig
from slotmem.errors import InputError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class Generator(nn.Module):
    """Causal Wan backbone + long-term memory: the trained and published policy."""

    def __init__(self, model_cfg: ModelConfig, memory_cfg: MemoryConfig):
        super().__init__()
        self.backbone = CausalWanModel(model_cfg)
        self.memory = build_memory(
            memory_cfg,
            num_layers=model_cfg.num_layers,
            dim=model_cfg.dim,
            num_heads=model_cfg.num_heads,
            head_dim=model_cfg.head_dim,
            text_dim=model_cfg.text_dim,
            tokens_per_frame=model_cfg.tokens_per_frame,
            num_frame_per_block=model_cfg.num_frame_per_block,
        )


def policy_file(path: str) -> Path:
    """A published policy: its safetensors file, a version directory (weights/policy_vNNNNNN/) holding it, or the
    weights directory of an experiment ({root}/{experiment}/weights), meaning its newest committed version."""
    p = Path(path)
    versions = sorted(d for d in p.glob("policy_v[0-9]*") if (d / "_COMMITTED.json").is_file()) if p.is_dir() else []
    if versions:
        p = versions[-1]
    if p.is_dir():
        files = sorted(p.glob("*.safetensors"))
        if len(files) != 1:
            raise InputError(f"--policy {path!r}: a policy directory holds one .safetensors file (model.safetensors), "
                             f"found {[f.name for f in files]}")
        return files[0]
    if not p.is_file():
        raise InputError(f"--policy {path!r} does not exist (a published version's model.safetensors or its directory)")
    return p


def resolve_device(device: str | None) -> torch.device:
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def build_generator(model_cfg: ModelConfig, memory_cfg: MemoryConfig, *, device: torch.device | str = "cpu",
                    seed: int = 0, policy_path: str | None = None) -> Generator:
    """Build the generator: seeded init, then Wan weights (model.model_path), then a published policy."""
    torch.manual_seed(seed)  # identical random init in every process (actors, trainer ranks)
    gen = Generator(model_cfg, memory_cfg)
    if model_cfg.model_path:
        load_checkpoint(gen.backbone, model_cfg.model_path)
    if policy_path:
        state = load_state_dict_file(policy_file(policy_path))
        missing, unexpected = gen.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise InputError(f"policy weights {policy_path!r} do not match the generator: "
                             f"{len(missing)} missing (e.g. {missing[:3]}), {len(unexpected)} unexpected "
                             f"(e.g. {unexpected[:3]})")
    dtype = DTYPES[model_cfg.dtype]
    if torch.device(device).type == "cpu" and dtype == torch.bfloat16:
        dtype = torch.float32  # bf16 matmuls are slow on CPU; the tiny preset and tests use fp32
    return gen.to(device=device, dtype=dtype).eval()


@dataclass
class Components:
    generator: Generator
    scheduler: FlowMatchScheduler
    text_encoder: object
    device: torch.device


def build_components(model_cfg: ModelConfig, memory_cfg: MemoryConfig, *, device: str | None = None,
                     seed: int = 0, policy_path: str | None = None) -> Components:
    dev = resolve_device(device)
    gen = build_generator(model_cfg, memory_cfg, device=dev, seed=seed, policy_path=policy_path)
    dtype = next(gen.parameters()).dtype
    text = build_text_encoder(model_cfg, dev, dtype)
    return Components(gen, build_scheduler(model_cfg), text, dev)
