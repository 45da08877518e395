"""Frozen umT5 text encoder with Wan2.1's conventions (DESIGN §2, anchors-video §2.1).

Wan encodes a prompt with the umT5-XXL encoder, keeps the hidden states of the real tokens (the EOS
token included) and zero-pads them to ``text_len`` (512) positions; the DiT's cross-attention sees
those zeros. ``TextEncoder.encode`` returns exactly that, plus the boolean mask of real tokens.

Where the weights come from (``model.text_encoder_path``, local files only, nothing is downloaded):
- a transformers directory (``UMT5EncoderModel.save_pretrained`` or a full umT5 checkpoint);
- Wan2.1's original ``models_t5_umt5-xxl-enc-bf16.pth``: the state dict of Wan's own ``T5Encoder``
  (``wan/modules/t5.py``), whose keys are mapped onto transformers' UMT5 encoder below;
- '' : a tiny UMT5 built from ``text_dim`` / ``text_encoder_layers`` / ``text_encoder_heads`` with a
  fixed seed, so every process (rollout actors, trainer ranks) builds identical weights.

The tokenizer comes from ``model.tokenizer_path``; when that is empty, from the encoder directory if
it holds one, else the byte-level ``ByT5Tokenizer`` (needs no files; 384 ids).
"""

from __future__ import annotations

import html
import json
import re
from collections import OrderedDict
from pathlib import Path

import torch
from torch import Tensor

from slotmem.config import ModelConfig
from slotmem.errors import InputError

TINY_SEED = 20250101  # fixed: the tiny encoder must be bit-identical in every process
TINY_NUM_BUCKETS = 32  # umT5-XXL's relative-attention buckets (Wan t5.py umt5_xxl: num_buckets=32)
REL_MAX_DISTANCE = 128  # Wan T5RelativeEmbedding max_dist, transformers relative_attention_max_distance
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise InputError(f"model.dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def clean_prompt(text: str) -> str:
    """Wan's 'whitespace' cleaning (wan/modules/tokenizers.py) minus ftfy: unescape HTML, collapse spaces."""
    text = html.unescape(html.unescape(text))
    return re.sub(r"\s+", " ", text).strip()


# ----------------------------------------------------------------------------------------------
# the encoder
# ----------------------------------------------------------------------------------------------


class TextEncoder:
    """umT5 encoder + tokenizer; ``encode`` gives Wan's zero-padded [B, text_len, text_dim] context.

    Each new prompt is encoded on its own (only its real tokens, no padding), so its embedding never
    depends on which other prompts share the call; results are kept in a small LRU cache because
    rollouts reuse the same prompts over and over.
    """

    def __init__(self, model, tokenizer, text_len: int, cache_size: int = 64):
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.text_len = text_len
        self.cache_size = cache_size
        self._cache: OrderedDict[str, tuple[Tensor, int]] = OrderedDict()

    @property
    def text_dim(self) -> int:
        return self.model.config.d_model

    @property
    def device(self) -> torch.device:
        return self.model.shared.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.shared.weight.dtype

    def to(self, device=None, dtype=None) -> "TextEncoder":
        self.model.to(device=device, dtype=dtype)
        self._cache.clear()
        return self

    def clear_cache(self) -> None:
        self._cache.clear()

    @torch.no_grad()
    def _encode_one(self, prompt: str) -> tuple[Tensor, int]:
        """Hidden states of the real tokens of one prompt: ([n, text_dim], n), n <= text_len."""
        ids = self.tokenizer(prompt, truncation=True, max_length=self.text_len, add_special_tokens=True,
                             return_tensors="pt").input_ids.to(self.device)  # [1, n]
        hidden = self.model(input_ids=ids).last_hidden_state[0]  # [n, text_dim]
        return hidden, ids.shape[1]

    def encode(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """prompts -> (emb [B, text_len, text_dim] with padded positions zeroed, mask [B, text_len] bool)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        emb = torch.zeros(len(prompts), self.text_len, self.text_dim, device=self.device, dtype=self.dtype)
        mask = torch.zeros(len(prompts), self.text_len, dtype=torch.bool, device=self.device)
        for b, prompt in enumerate(prompts):
            if not isinstance(prompt, str):
                raise InputError(f"prompts must be strings, got {type(prompt).__name__} at index {b}")
            key = clean_prompt(prompt)
            if key in self._cache:
                self._cache.move_to_end(key)
            else:
                self._cache[key] = self._encode_one(key)
                if len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
            hidden, n = self._cache[key]
            emb[b, :n] = hidden
            mask[b, :n] = True
        return emb, mask

    @staticmethod
    def pooled(emb: Tensor, mask: Tensor) -> Tensor:
        """Masked mean over the real tokens: [B, L, D], [B, L] -> [B, D]."""
        m = mask.to(emb.dtype).unsqueeze(-1)  # [B, L, 1]
        return (emb * m).sum(1) / m.sum(1).clamp(min=1)

    def save_pretrained(self, directory: str | Path) -> None:
        """Write encoder and tokenizer in transformers layout; ``text_encoder_path`` loads it back."""
        self.model.save_pretrained(str(directory))
        self.tokenizer.save_pretrained(str(directory))


# ----------------------------------------------------------------------------------------------
# building: tiny, transformers directory, or Wan's original state dict
# ----------------------------------------------------------------------------------------------


def build_text_encoder(model_cfg: ModelConfig, device: torch.device | str = "cpu",
                       dtype: torch.dtype | str = torch.float32, cache_size: int = 64, tokenizer=None) -> TextEncoder:
    """The text encoder named by ``model_cfg`` (see the module docstring), frozen, on ``device``.

    tokenizer: an already-built one instead of model.tokenizer_path's (the toy world builds its word-level
    tokenizer this way before it saves the pair)."""
    dtype = as_dtype(dtype)
    tokenizer = tokenizer if tokenizer is not None else _load_tokenizer(model_cfg)
    if model_cfg.text_encoder_path:
        model = _load_encoder(model_cfg.text_encoder_path, dtype)
    else:
        model = _tiny_encoder(model_cfg, vocab_size=len(tokenizer))
    if model.config.d_model != model_cfg.text_dim:
        raise InputError(f"model.text_dim is {model_cfg.text_dim} but the encoder at model.text_encoder_path "
                         f"{model_cfg.text_encoder_path!r} has hidden size {model.config.d_model}")
    if len(tokenizer) > model.config.vocab_size:
        raise InputError(f"the tokenizer has {len(tokenizer)} ids but the text encoder's vocabulary has only "
                         f"{model.config.vocab_size}; set model.tokenizer_path to the encoder's tokenizer")
    model.to(device=device, dtype=dtype)
    return TextEncoder(model, tokenizer, model_cfg.text_len, cache_size=cache_size)


def _load_tokenizer(model_cfg: ModelConfig):
    import transformers
    from transformers import AutoTokenizer, ByT5Tokenizer

    path = model_cfg.tokenizer_path
    field = "model.tokenizer_path"
    if not path:
        enc = Path(model_cfg.text_encoder_path) if model_cfg.text_encoder_path else None
        if enc is not None and (enc / "tokenizer_config.json").is_file():
            path, field = str(enc), "model.text_encoder_path"
        else:
            return ByT5Tokenizer()
    if not Path(path).is_dir():
        raise InputError(f"{field}: tokenizer directory {path!r} does not exist (local paths only)")
    # the class named in tokenizer_config.json wins: next to a umT5 config.json, AutoTokenizer would
    # pick the T5 sentencepiece tokenizer even for a saved ByT5 one
    config_file = Path(path) / "tokenizer_config.json"
    try:
        named = json.loads(config_file.read_text()).get("tokenizer_class") if config_file.is_file() else None
        loader = getattr(transformers, named or "", None) or AutoTokenizer
        return loader.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise InputError(f"{field}: cannot load a tokenizer from {path!r}: {e}") from e


def _tiny_encoder(model_cfg: ModelConfig, vocab_size: int):
    from transformers import UMT5Config, UMT5EncoderModel

    dim, heads = model_cfg.text_dim, model_cfg.text_encoder_heads
    if dim % heads:
        raise InputError(f"model.text_dim ({dim}) must be divisible by model.text_encoder_heads ({heads})")
    config = UMT5Config(vocab_size=vocab_size, d_model=dim, d_kv=dim // heads, d_ff=4 * dim,
                        num_layers=model_cfg.text_encoder_layers, num_heads=heads,
                        relative_attention_num_buckets=TINY_NUM_BUCKETS,
                        relative_attention_max_distance=REL_MAX_DISTANCE, feed_forward_proj="gated-gelu")
    # transformers initialises from the global RNG: seed it privately so every process builds the
    # same weights without disturbing the caller's random stream
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        return UMT5EncoderModel(config)


def _load_encoder(path: str, dtype: torch.dtype):
    from transformers import UMT5EncoderModel

    p = Path(path)
    if p.is_dir():
        try:
            return UMT5EncoderModel.from_pretrained(str(p), local_files_only=True, dtype=dtype)
        except (OSError, ValueError) as e:
            raise InputError(f"model.text_encoder_path: cannot load a transformers UMT5 encoder from {path!r}: "
                             f"{e}") from e
    if not p.is_file():
        raise InputError(f"model.text_encoder_path: {path!r} does not exist (local paths only)")
    state = _read_state_dict(p)
    if "token_embedding.weight" in state and "blocks.0.attn.q.weight" in state:
        return _from_wan_state_dict(state, path)
    raise InputError(f"model.text_encoder_path: {path!r} is not Wan's umT5 encoder state dict (expected keys "
                     f"'token_embedding.weight', 'blocks.N.attn.q.weight', ...); for transformers weights "
                     f"pass the directory written by save_pretrained")


def _read_state_dict(p: Path) -> dict[str, Tensor]:
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(p))
        state = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:  # a corrupt or foreign file: say which field pointed at it
        raise InputError(f"model.text_encoder_path: cannot read {str(p)!r}: {e}") from e
    if not isinstance(state, dict):
        raise InputError(f"model.text_encoder_path: {str(p)!r} does not hold a state dict")
    return state


# Wan T5Encoder (wan/modules/t5.py, umt5_xxl with shared_pos=False) -> transformers UMT5EncoderModel.
# Wan's FFN is fc2(fc1(x) * gelu_tanh(gate(x))); transformers' gated FFN is wo(gelu_new(wi_0(x)) * wi_1(x)).
_WAN_BLOCK_KEYS = {
    "norm1.weight": "layer.0.layer_norm.weight",
    "attn.q.weight": "layer.0.SelfAttention.q.weight",
    "attn.k.weight": "layer.0.SelfAttention.k.weight",
    "attn.v.weight": "layer.0.SelfAttention.v.weight",
    "attn.o.weight": "layer.0.SelfAttention.o.weight",
    "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
    "norm2.weight": "layer.1.layer_norm.weight",
    "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",
    "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight",
    "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight",
}


def wan_t5_to_transformers(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename Wan's umT5 encoder keys to transformers' UMT5EncoderModel keys (unknown keys are errors)."""
    out = {"shared.weight": state["token_embedding.weight"],
           "encoder.embed_tokens.weight": state["token_embedding.weight"],
           "encoder.final_layer_norm.weight": state["norm.weight"]}
    for key, value in state.items():
        if key in ("token_embedding.weight", "norm.weight"):
            continue
        m = re.fullmatch(r"blocks\.(\d+)\.(.+)", key)
        if m is None or m.group(2) not in _WAN_BLOCK_KEYS:
            raise InputError(f"model.text_encoder_path: unexpected key {key!r} in Wan's umT5 state dict")
        out[f"encoder.block.{m.group(1)}.{_WAN_BLOCK_KEYS[m.group(2)]}"] = value
    return out


def _from_wan_state_dict(state: dict[str, Tensor], path: str):
    from transformers import UMT5Config, UMT5EncoderModel

    # every size is readable from the tensors: vocab x dim embedding, [dim_attn, dim] q, [ffn, dim] fc1,
    # and the per-layer relative bias [num_buckets, num_heads]
    vocab, dim = state["token_embedding.weight"].shape
    dim_attn = state["blocks.0.attn.q.weight"].shape[0]
    dim_ffn = state["blocks.0.ffn.fc1.weight"].shape[0]
    num_buckets, num_heads = state["blocks.0.pos_embedding.embedding.weight"].shape
    num_layers = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    config = UMT5Config(vocab_size=vocab, d_model=dim, d_kv=dim_attn // num_heads, d_ff=dim_ffn,
                        num_layers=num_layers, num_heads=num_heads, relative_attention_num_buckets=num_buckets,
                        relative_attention_max_distance=REL_MAX_DISTANCE, feed_forward_proj="gated-gelu")
    with torch.device("meta"):
        model = UMT5EncoderModel(config)
    try:
        model.load_state_dict(wan_t5_to_transformers(state), strict=True, assign=True)
    except RuntimeError as e:
        raise InputError(f"model.text_encoder_path: {path!r} does not match a umT5 encoder: {e}") from e
    model.tie_weights()
    return model
