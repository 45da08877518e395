"""LoRA adapters on the backbone through peft (LongLive / MemFlow: rank 256, alpha 256, generator and critic).

The adapter wraps every ``nn.Linear`` of the transformer blocks (self- and cross-attention q, k, v, o and both
FFN layers), as LongLive's ``utils/lora_utils.py`` targets every Linear inside an attention block; the patch and
text/time embeddings, norms, modulation tables and head stay frozen. ``peft.inject_adapter_in_model`` edits the
module in place, so parameter names gain ``.base_layer`` / ``.lora_A.default`` / ``.lora_B.default`` and the
backbone stays a ``CausalWanModel``. Published policies carry no adapter: ``merged_state_dict`` folds it into the
base weights with peft's own merge, so rollout actors and ``slotmem generate`` load plain Wan-layout weights.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import Tensor, nn

from slotmem.errors import InputError

ADAPTER = "default"  # peft's adapter name
# Every Linear of a transformer block (model/wan.py WanBlock): attention projections and the FFN.
TARGET_MODULES = r"blocks\.\d+\.(self_attn|cross_attn)\.(q|k|v|o)|blocks\.\d+\.ffn\.(0|2)"
# Prefixes training wrappers put before the module's own names (peft's PeftModel, DeepSpeed, LongLive's wrapper).
_PREFIXES = ("base_model.model.", "module.", "model.")


def add_lora(backbone: nn.Module, *, rank: int, alpha: int) -> nn.Module:
    """Inject fresh adapters (lora_B = 0, so the output is unchanged) and freeze everything else."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=TARGET_MODULES)
    backbone.requires_grad_(False)
    inject_adapter_in_model(config, backbone, adapter_name=ADAPTER)
    for name, p in backbone.named_parameters():
        p.requires_grad_(".lora_" in name)
    return backbone


def is_lora_key(key: str) -> bool:
    return ".lora_A." in key or ".lora_B." in key


def has_lora(module: nn.Module) -> bool:
    return any(is_lora_key(k) for k, _ in module.named_parameters())


@torch.no_grad()
def merged_state_dict(state: dict[str, Tensor], *, alpha: int) -> dict[str, Tensor]:
    """A state dict with LoRA keys -> the plain one (base names, adapter folded in by peft's merge, scale
    alpha / rank; alpha is not part of a state dict, so the caller passes trainer.lora_alpha).

    Works on a CPU copy: each adapted Linear is rebuilt from its tensors, merged, and its base weights kept.
    A state dict without LoRA keys is returned as it is.
    """
    from peft import LoraConfig
    from peft.tuners.lora import Linear as LoraLinear

    if not any(is_lora_key(k) for k in state):
        return dict(state)
    bases = sorted({k[: -len(".base_layer.weight")] for k in state if k.endswith(".base_layer.weight")})
    out = {k: v for k, v in state.items() if ".base_layer." not in k and not is_lora_key(k)}
    for name in bases:
        weight = state[f"{name}.base_layer.weight"]
        bias = state.get(f"{name}.base_layer.bias")
        a = state[f"{name}.lora_A.{ADAPTER}.weight"]
        b = state[f"{name}.lora_B.{ADAPTER}.weight"]
        base = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=torch.float32)
        base.weight.copy_(weight.float())
        if bias is not None:
            base.bias.copy_(bias.float())
        rank = a.shape[0]
        layer = LoraLinear(base, ADAPTER, LoraConfig(r=rank, lora_alpha=alpha), r=rank, lora_alpha=alpha)
        layer.lora_A[ADAPTER].weight.copy_(a.float())
        layer.lora_B[ADAPTER].weight.copy_(b.float())
        layer.merge(safe_merge=True)
        out[f"{name}.weight"] = layer.get_base_layer().weight.detach().to(weight.dtype).clone()
        if bias is not None:
            out[f"{name}.bias"] = layer.get_base_layer().bias.detach().to(bias.dtype).clone()
    return out


# ----------------------------------------------------------------------------------------------
# starting from an adapter checkpoint (trainer.lora_path)
# ----------------------------------------------------------------------------------------------


def read_adapter(path: str, role: str) -> dict[str, Tensor]:
    """The adapter weights of `role` ('generator' or 'critic') in `path`, renamed to our module's keys.

    Accepts a safetensors / torch state dict of LoRA keys (ours or peft's get_peft_model_state_dict, with or
    without the adapter name), or LongLive's lora.pt {'generator_lora': ..., 'critic_lora': ...}.
    """
    from model.weights import load_state_dict_file

    p = Path(path)
    if not p.is_file():
        raise InputError(f"trainer.lora_path: {path!r} does not exist (a safetensors or .pt file of LoRA weights)")
    if p.suffix == ".safetensors":
        state = load_state_dict_file(p)
    else:
        try:
            obj = torch.load(str(p), map_location="cpu", weights_only=True)
        except Exception as e:
            raise InputError(f"trainer.lora_path: {path!r} could not be read by torch.load: {e}") from None
        if isinstance(obj, dict) and f"{role}_lora" in obj:
            obj = obj[f"{role}_lora"]
        if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
            raise InputError(f"trainer.lora_path: {path!r} does not hold a state dict of tensors for the {role}")
        state = obj
    renamed = {}
    for key, value in state.items():
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
        key = re.sub(r"\.lora_([AB])\.weight$", rf".lora_\1.{ADAPTER}.weight", key)
        renamed[key] = value
    adapters = {k: v for k, v in renamed.items() if is_lora_key(k)}
    if not adapters:
        raise InputError(f"trainer.lora_path: {path!r} holds no LoRA adapter keys (lora_A / lora_B) for the {role}; "
                         f"first keys: {list(state)[:4]}")
    return adapters


def load_adapter(module: nn.Module, adapters: dict[str, Tensor], path: str, role: str) -> None:
    """Copy adapter weights into an adapted module; every key and shape must match."""
    own = dict(module.named_parameters())
    unknown = sorted(k for k in adapters if k not in own)
    wrong = sorted(k for k in adapters if k in own and own[k].shape != adapters[k].shape)
    if unknown or wrong:
        detail = (f"{len(unknown)} unknown (e.g. {unknown[:3]})" if unknown else "") + (
            f"{len(wrong)} with other shapes (e.g. {[(k, tuple(adapters[k].shape)) for k in wrong[:2]]}; "
            "check trainer.lora_rank)" if wrong else "")
        raise InputError(f"trainer.lora_path: {path!r} does not fit the {role}'s adapters: {detail}")
    with torch.no_grad():
        for key, value in adapters.items():
            own[key].copy_(value.to(own[key].dtype))
