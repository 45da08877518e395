"""Causal Wan2.1 DiT (DESIGN §2; anchors-video §2).

The math is Wan2.1's ``WanModel`` op for op (same order as diffusers' ``WanTransformer3DModel``):
patchify with a (1,2,2) Conv3d; project text with Linear-GELU(tanh)-Linear; embed each frame's
timestep sinusoidally (float64, [cos, sin]) -> Linear-SiLU-Linear -> SiLU-Linear to 6*dim
modulation; then per block
    x += gate_sa * SelfAttn(LN(x) * (1 + scale_sa) + shift_sa)        RMS qk-norm over dim, 3-D RoPE
    x += CrossAttn(LN_affine(x), text)                                 RMS qk-norm
    x += gate_ff * FFN(LN(x) * (1 + scale_ff) + shift_ff)              GELU(tanh)
with (shift, scale, gate) = block.modulation + time projection of the token's frame; finally
head(LN(x) * (1 + scale) + shift) with a 2-way modulation of the time embedding, and unpatchify.
Norms, modulation and the time path run in float32 whatever the parameter dtype (bfloat16 on GPU).

Self-attention has three modes that share the same weights (memory items (K, V) from the slot bank are extra keys
every query of the call attends to):
  * streaming (``cache`` given): one chunk attends to [sink, memory, recent committed frames, itself]
    (model/kv_cache.py); ``commit=True`` (the clean re-run) stores the chunk's K/V; no mask;
  * teacher-forced block-causal (``cache=None, causal=True``): a whole sequence under the windowed block mask that
    reproduces the cache exactly (kv_cache.py ``block_causal_mask``: [L, L] bool, about 1 GB at 21 frames of the 1.3B model);
  * bidirectional (``causal=False``): full attention over the clip (teacher and critic); no mask.
"""

from __future__ import annotations

import functools
import math
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from model.kv_cache import LayerKVCache, block_causal_mask
from model.rope import Rope3D, apply_rope
from model.schedule import build_scheduler
from slotmem.config import ConfigError, ModelConfig
from slotmem.errors import InputError


@dataclass
class LayerState:
    """One layer's view of this call's tokens, for the memory writer."""

    x: Tensor  # [B, L, dim] token features entering self-attention (after norm + modulation): X_l
    k: Tensor  # [B, L, H, D] keys after RoPE, bit-identical to what a commit stores
    v: Tensor  # [B, L, H, D] values


# -- text conditioning -----------------------------------------------------------------------------


class TextContext:
    """One prompt's conditioning for one model: its text embedding and lazily cached projections.

    Under ``torch.no_grad`` the projected text [B, Lt, dim] and every layer's cross-attention K/V
    are computed once and reused by all chunks (Self-Forcing's crossattn_cache); the cache notices
    in-place weight updates. With autograd on they are recomputed per call so that gradients reach
    the text path. A new prompt is a new TextContext; ``reset()`` drops the cached projections.
    """

    def __init__(self, model: CausalWanModel, text_emb: Tensor):
        self._owner = weakref.ref(model)
        self.text_emb = text_emb  # [B, Lt, text_dim], zero-padded encoder output
        self._cache: dict[object, tuple[tuple, object]] = {}

    @property
    def batch_size(self) -> int:
        return self.text_emb.shape[0]

    @property
    def context(self) -> Tensor:
        """Projected text [B, Lt, dim]."""
        model = self.owner
        return model._projected_text(self, model._text_stamp())

    @property
    def owner(self) -> CausalWanModel:
        model = self._owner()
        if model is None:
            raise InputError("the model that built this TextContext no longer exists")
        return model

    def reset(self) -> None:
        self._cache.clear()

    def _cached(self, key: object, stamp: tuple | None, compute: Callable[[], object]) -> object:
        if stamp is None:  # autograd on: always a fresh graph
            return compute()
        hit = self._cache.get(key)
        if hit is not None and hit[0] == stamp:
            return hit[1]
        value = compute()
        self._cache[key] = (stamp, value)
        return value


# -- building blocks -------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """Wan's qk-norm: RMS over the whole hidden dim (all heads at once), normalised in float32."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class FP32LayerNorm(nn.LayerNorm):
    """LayerNorm evaluated in float32 (parameters upcast); returns float32."""

    def forward(self, x: Tensor) -> Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps)


def timestep_embedding(t: Tensor, dim: int) -> Tensor:
    """Wan's sinusoidal_embedding_1d: t [N] -> [N, dim] = [cos(t w), sin(t w)], w_i = 10000^(-i/half)."""
    half = dim // 2
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    angles = torch.outer(t.double(), freqs)
    return torch.cat([angles.cos(), angles.sin()], dim=1).float()


def _linear32(layer: nn.Linear, x: Tensor) -> Tensor:
    """A Linear evaluated in float32 (the time path stays fp32 like Wan's autocast region)."""
    bias = layer.bias.float() if layer.bias is not None else None
    return F.linear(x.float(), layer.weight.float(), bias)


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    """Softmax attention on [B, L, H, D] layouts; mask [Lq, Lk] bool, True = may attend."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2)


def modulate(normed: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """normed [B, F*T, dim] * (1 + scale) + shift, with shift/scale [B, F, dim] per frame."""
    per_frame = normed.unflatten(1, (shift.shape[1], -1))  # [B, F, T, dim]
    return (per_frame * (1 + scale[:, :, None]) + shift[:, :, None]).flatten(1, 2)


def gate(y: Tensor, g: Tensor) -> Tensor:
    """y [B, F*T, dim] * g [B, F, dim] per frame."""
    return (y.unflatten(1, (g.shape[1], -1)) * g[:, :, None]).flatten(1, 2)


class _Projections(nn.Module):
    """q, k, v, o projections with RMS qk-norm over the full dim (Wan's attention parameters)."""

    def __init__(self, dim: int, num_heads: int, eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q = RMSNorm(dim, eps)
        self.norm_k = RMSNorm(dim, eps)


class SelfAttention(_Projections):
    def qkv(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x [B, L, dim] -> q, k (normed, RoPE'd), v, each [B, L, H, D]."""
        q = self.norm_q(self.q(x)).unflatten(-1, (self.num_heads, -1))
        k = self.norm_k(self.k(x)).unflatten(-1, (self.num_heads, -1))
        v = self.v(x).unflatten(-1, (self.num_heads, -1))
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


class CrossAttention(_Projections):
    def text_kv(self, context: Tensor) -> tuple[Tensor, Tensor]:
        """Projected text [B, Lt, dim] -> k (normed), v, each [B, Lt, H, D]."""
        k = self.norm_k(self.k(context)).unflatten(-1, (self.num_heads, -1))
        v = self.v(context).unflatten(-1, (self.num_heads, -1))
        return k, v

    def forward(self, x: Tensor, k: Tensor, v: Tensor) -> Tensor:
        q = self.norm_q(self.q(x)).unflatten(-1, (self.num_heads, -1))
        return self.o(attention(q, k, v).flatten(2))


class WanBlock(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        dim = cfg.dim
        self.norm1 = FP32LayerNorm(dim, cfg.eps, elementwise_affine=False)
        self.self_attn = SelfAttention(dim, cfg.num_heads, cfg.eps)
        self.norm3 = FP32LayerNorm(dim, cfg.eps, elementwise_affine=True)  # Wan2.1 cross_attn_norm
        self.cross_attn = CrossAttention(dim, cfg.num_heads, cfg.eps)
        self.norm2 = FP32LayerNorm(dim, cfg.eps, elementwise_affine=False)
        self.ffn = nn.Sequential(nn.Linear(dim, cfg.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.ffn_dim, dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def forward(self, x: Tensor, e: Tensor, cos: Tensor, sin: Tensor, text_k: Tensor, text_v: Tensor,
                attend_self: Callable[[Tensor, Tensor, Tensor], Tensor]) -> tuple[Tensor, LayerState]:
        """x [B, F*T, dim]; e [B, F, 6, dim] float32 time projection of each token's frame."""
        shift_sa, scale_sa, gate_sa, shift_ff, scale_ff, gate_ff = (self.modulation.float() + e).unbind(2)

        h = modulate(self.norm1(x), shift_sa, scale_sa).type_as(x)
        q, k, v = self.self_attn.qkv(h, cos, sin)
        y = self.self_attn.o(attend_self(q, k, v).flatten(2))
        x = (x.float() + gate(y, gate_sa)).type_as(x)

        x = x + self.cross_attn(self.norm3(x).type_as(x), text_k, text_v)

        y = self.ffn(modulate(self.norm2(x), shift_ff, scale_ff).type_as(x))
        x = (x.float() + gate(y.float(), gate_ff)).type_as(x)
        return x, LayerState(h, k, v)


class Head(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = FP32LayerNorm(cfg.dim, cfg.eps, elementwise_affine=False)
        self.head = nn.Linear(cfg.dim, cfg.in_channels * math.prod(cfg.patch_size))
        self.modulation = nn.Parameter(torch.randn(1, 2, cfg.dim) / cfg.dim**0.5)

    def forward(self, x: Tensor, e: Tensor) -> Tensor:
        """x [B, F*T, dim]; e [B, F, dim] float32 time embedding of each frame."""
        shift, scale = (self.modulation.float() + e[:, :, None]).unbind(2)
        return self.head(modulate(self.norm(x), shift, scale).type_as(x))


@dataclass
class _SelfAttentionPlan:
    """How this call's queries see keys in every layer (the mode of the forward)."""

    start_frame: int
    num_frames: int
    cache: list[LayerKVCache] | None
    commit: bool
    memory: list[tuple[Tensor, Tensor] | None] | None
    mask: Tensor | None

    def window(self, layer: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """A copy of the cached keys/values `layer` sees now (for a checkpointed block: its recompute in backward
        runs after later chunks' commits have rewritten the cache buffers in place)."""
        return tuple(t.clone() for t in self.cache[layer].window(self.num_frames))

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, *,
               window: tuple[Tensor, Tensor, Tensor, Tensor] | None = None) -> Tensor:
        mem = self.memory[layer] if self.memory is not None else None
        if self.cache is not None:
            cache = self.cache[layer]
            sink_k, sink_v, local_k, local_v = window if window is not None else cache.window(self.num_frames)
            mem_k, mem_v = mem if mem is not None else (k[:, :0], v[:, :0])
            out = attention(q, torch.cat([sink_k, mem_k, local_k, k], dim=1),
                            torch.cat([sink_v, mem_v, local_v, v], dim=1))
            if self.commit:
                cache.commit(k, v, self.start_frame)
            return out
        mask = self.mask
        if mem is not None:
            # memory keys are visible to every query of the call
            k, v = torch.cat([mem[0], k], dim=1), torch.cat([mem[1], v], dim=1)
            if mask is not None:
                mask = torch.cat([mask.new_ones(mask.shape[0], mem[0].shape[1]), mask], dim=1)
        return attention(q, k, v, mask)


# -- the model -------------------------------------------------------------------------------------


class CausalWanModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.freq_dim % 2:
            raise ConfigError(f"model.freq_dim must be even (sin/cos halves), got {cfg.freq_dim}")
        self.cfg = cfg
        dim = cfg.dim
        # Parameter names follow the original Wan2.1 checkpoint layout (model/weights.py maps diffusers').
        self.patch_embedding = nn.Conv3d(cfg.in_channels, dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, dim), nn.GELU(approximate="tanh"),
                                            nn.Linear(dim, dim))
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.blocks = nn.ModuleList(WanBlock(cfg) for _ in range(cfg.num_layers))
        self.head = Head(cfg)
        self.rope = Rope3D(cfg.head_dim, cfg.rope_max_frames)
        self.scheduler = build_scheduler(cfg)
        self.gradient_checkpointing = False
        self.init_weights()

    @property
    def dtype(self) -> torch.dtype:
        return self.patch_embedding.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.patch_embedding.weight.device

    @torch.no_grad()
    def init_weights(self) -> None:
        """Wan2.1's initialisation (WanModel.init_weights), with one deliberate change.

        * every Linear: xavier-uniform weight, zero bias;
        * patch embedding: xavier-uniform over the flattened kernel, Conv3d's default bias;
        * text- and time-embedding Linears: normal(0, 0.02);
        * RMS / LayerNorm affine: ones and zeros; modulation tables: N(0, 1/dim) (Wan's randn/sqrt(dim));
        * head.head: Wan zero-inits it so an untrained model predicts zero flow. We keep xavier so a
          randomly initialised model has non-trivial outputs (tests compare them); loaded weights
          replace it anyway.
        """
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, (RMSNorm, nn.LayerNorm)) and m.weight is not None:
                nn.init.ones_(m.weight)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
        self.patch_embedding.reset_parameters()
        nn.init.xavier_uniform_(self.patch_embedding.weight.flatten(1))
        for m in (*self.text_embedding, *self.time_embedding):
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
        for table in (*(b.modulation for b in self.blocks), self.head.modulation):
            nn.init.normal_(table, std=self.cfg.dim**-0.5)

    # -- text -------------------------------------------------------------------------------

    def encode_text(self, text_emb: Tensor) -> TextContext:
        """Wrap a text-encoder output [B, Lt, text_dim] (padding zeroed) as this model's TextContext."""
        if text_emb.ndim != 3 or text_emb.shape[-1] != self.cfg.text_dim:
            raise InputError(f"text embedding must be [B, Lt, model.text_dim={self.cfg.text_dim}], "
                             f"got {tuple(text_emb.shape)}")
        return TextContext(self, text_emb)

    def _text_stamp(self) -> tuple | None:
        """Identity of the text-path weights (None with autograd on = do not cache)."""
        if torch.is_grad_enabled():
            return None
        params = [*self.text_embedding.parameters()]
        for block in self.blocks:
            attn = block.cross_attn
            params += [*attn.k.parameters(), *attn.v.parameters(), *attn.norm_k.parameters()]
        return tuple((p.data_ptr(), p._version, p.dtype) for p in params)

    def _projected_text(self, ctx: TextContext, stamp: tuple | None) -> Tensor:
        emb = ctx.text_emb.to(device=self.device, dtype=self.dtype)
        return ctx._cached("context", stamp, lambda: self.text_embedding(emb))

    def _text_kv(self, ctx: TextContext, layer: int, stamp: tuple | None, context: Tensor) -> tuple[Tensor, Tensor]:
        attn = self.blocks[layer].cross_attn
        return ctx._cached(layer, stamp, lambda: attn.text_kv(context))

    def _check_text(self, ctx: TextContext, batch_size: int) -> None:
        if not isinstance(ctx, TextContext) or ctx.owner is not self:
            raise InputError("text must be a TextContext from this model's encode_text (teacher, critic and "
                             "generator each need their own)")
        if ctx.batch_size != batch_size:
            raise InputError(f"text batch {ctx.batch_size} does not match the latent batch {batch_size}")

    def text_keys(self, ctx: TextContext) -> list[Tensor]:
        """Per layer cross-attention keys [B, Lt, H, D] after qk-norm (frame_bank text relevance)."""
        self._check_text(ctx, ctx.batch_size)
        stamp = self._text_stamp()
        context = self._projected_text(ctx, stamp)
        return [self._text_kv(ctx, layer, stamp, context)[0] for layer in range(len(self.blocks))]

    # -- cache ------------------------------------------------------------------------------

    def new_cache(self, batch_size: int) -> list[LayerKVCache]:
        cfg = self.cfg
        return [LayerKVCache(batch_size=batch_size, num_heads=cfg.num_heads, head_dim=cfg.head_dim,
                             tokens_per_frame=cfg.tokens_per_frame, sink_size=cfg.sink_size,
                             local_attn_size=cfg.local_attn_size, num_frame_per_block=cfg.num_frame_per_block,
                             dtype=self.dtype, device=self.device)
                for _ in range(cfg.num_layers)]

    # -- input checks -----------------------------------------------------------------------

    def _frame_timesteps(self, t: Tensor | float, batch: int, frames: int, device: torch.device) -> Tensor:
        t = torch.as_tensor(t, dtype=torch.float32, device=device)
        if t.ndim == 0:
            return t.expand(batch, frames)
        if t.ndim == 1 and t.shape[0] == batch:
            return t[:, None].expand(batch, frames)
        if t.shape == (batch, frames):
            return t
        raise InputError(f"timesteps must be a scalar, [B={batch}] or [B={batch}, F={frames}], got {tuple(t.shape)}")

    def _check_memory(self, memory_kv, batch: int) -> list[tuple[Tensor, Tensor] | None] | None:
        if memory_kv is None:
            return None
        if len(memory_kv) != len(self.blocks):
            raise InputError(f"memory_kv needs one entry per layer ({len(self.blocks)}), got {len(memory_kv)}")
        heads, head_dim = self.cfg.num_heads, self.cfg.head_dim
        out = []
        for layer, item in enumerate(memory_kv):
            if item is None:
                out.append(None)
                continue
            k, v = item
            if k.shape != v.shape or k.ndim != 4 or k.shape[0] != batch or k.shape[2:] != (heads, head_dim):
                raise InputError(f"memory_kv[{layer}] must be (K, V) each [B={batch}, M, {heads}, {head_dim}], "
                                 f"got {tuple(k.shape)} and {tuple(v.shape)}")
            out.append((k.to(self.dtype), v.to(self.dtype)) if k.shape[1] else None)
        return out if any(item is not None for item in out) else None

    # -- forward ----------------------------------------------------------------------------

    def forward(self, x: Tensor, t: Tensor | float, text: TextContext, *, start_frame: int = 0,
                cache: list[LayerKVCache] | None = None, commit: bool = False,
                memory_kv: Sequence[tuple[Tensor, Tensor] | None] | None = None,
                return_states: bool = False, causal: bool = True):
        """Flow prediction [B, F, C, H, W] for latents x [B, F, C, H, W] at per-frame timesteps t [B, F].

        start_frame: absolute index of x's first frame (RoPE phase, cache position, chunk alignment).
        cache / commit: streaming mode (see module docstring); commit stores this call's K/V.
        memory_kv: per layer (K, V) [B, M, H, D] post-RoPE, attended between sink and local keys.
        return_states: also return per-layer LayerState of this call's tokens.
        """
        cfg = self.cfg
        if x.ndim != 5 or x.shape[2] != cfg.in_channels:
            raise InputError(f"latents must be [B, F, C={cfg.in_channels}, H, W], got {tuple(x.shape)}")
        batch, frames, _, height, width = x.shape
        _, ph, pw = cfg.patch_size
        if height % ph or width % pw:
            raise InputError(f"latent size {height}x{width} must be divisible by model.patch_size {cfg.patch_size[1:]}")
        h, w = height // ph, width // pw
        t = self._frame_timesteps(t, batch, frames, x.device)
        self._check_text(text, batch)
        if cache is not None:
            if not causal:
                raise InputError("the KV cache is for the causal model; causal=False takes no cache")
            if len(cache) != len(self.blocks):
                raise InputError(f"cache needs one LayerKVCache per layer ({len(self.blocks)}), got {len(cache)}")
            for layer_cache in cache:
                if layer_cache.tokens_per_frame != h * w or layer_cache.batch_size != batch:
                    raise InputError(f"cache was built for batch {layer_cache.batch_size} and "
                                     f"{layer_cache.tokens_per_frame} tokens/frame, got batch {batch} and {h * w}")
                layer_cache.check_call(start_frame, frames, commit=commit)
        elif commit:
            raise InputError("commit=True needs a cache")
        plan = _SelfAttentionPlan(
            start_frame=start_frame, num_frames=frames, cache=cache, commit=commit,
            memory=self._check_memory(memory_kv, batch),
            mask=block_causal_mask(cfg, start_frame, frames, h * w, x.device) if causal and cache is None else None)

        # embeddings
        tokens = self.patch_embedding(x.to(self.dtype).transpose(1, 2))  # [B, dim, F, h, w]
        tokens = rearrange(tokens, "b d f h w -> b (f h w) d")
        cos, sin = self.rope.freqs(start_frame, frames, h, w, device=x.device)
        e = _linear32(self.time_embedding[2], F.silu(_linear32(self.time_embedding[0],
                                                                timestep_embedding(t.flatten(), cfg.freq_dim))))
        e0 = _linear32(self.time_projection[1], F.silu(e)).view(batch, frames, 6, cfg.dim)
        e = e.view(batch, frames, cfg.dim)

        # blocks
        stamp = self._text_stamp()
        context = self._projected_text(text, stamp)
        states = []
        for layer, block in enumerate(self.blocks):
            text_k, text_v = self._text_kv(text, layer, stamp, context)
            attend_self = functools.partial(plan.attend, layer)
            if self.gradient_checkpointing and torch.is_grad_enabled() and not commit:
                if cache is not None:  # the recompute must see the window of now, not of the backward's time
                    attend_self = functools.partial(plan.attend, layer, window=plan.window(layer))
                tokens, state = checkpoint(block, tokens, e0, cos, sin, text_k, text_v, attend_self,
                                           use_reentrant=False)
            else:
                tokens, state = block(tokens, e0, cos, sin, text_k, text_v, attend_self)
            if return_states:
                states.append(state)

        # head and unpatchify: [B, F*h*w, (1 ph pw C)] -> [B, F, C, H, W]
        out = self.head(tokens, e)
        flow = rearrange(out, "b (f h w) (pt ph pw c) -> b (f pt) c (h ph) (w pw)",
                         f=frames, h=h, w=w, pt=1, ph=ph, pw=pw).to(x.dtype)
        return (flow, states) if return_states else flow

    def predict_x0(self, x: Tensor, t: Tensor | float, text: TextContext, **kwargs):
        """forward() then x0 = x_t - sigma(t) * flow; same return structure as forward."""
        out = self.forward(x, t, text, **kwargs)
        flow, states = out if kwargs.get("return_states") else (out, None)
        t = self._frame_timesteps(t, x.shape[0], x.shape[1], x.device)
        x0 = self.scheduler.flow_to_x0(x, flow, t)
        return (x0, states) if states is not None else x0
