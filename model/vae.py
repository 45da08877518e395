"""Wan2.1 VAE (diffusers ``AutoencoderKLWan``) behind the backbone's latent convention (DESIGN §2).

The backbone works on *normalised* latents [B, F, C, h, w] (Self-Forcing/LongLive layout): the VAE's
raw latent z relates to them per channel as ``z = latent * std + mean`` with the ``latents_mean`` /
``latents_std`` of the VAE config (Wan2.1: 16 measured constants). The VAE is causal in time with a
4x temporal and 8x spatial stride, so F latent frames decode to 4(F-1)+1 pixel frames (anchors-video
§2.1: 240 -> 957 frames, 59.8 s at 16 fps).

Decoding streams: the decoder's own causal cache (the same per-latent-frame loop diffusers runs
inside ``AutoencoderKLWan.decode``) is driven here one latent frame at a time and every piece is
turned into uint8 at once, so a 240-frame video never holds more than one latent frame's worth of
float pixels. A decoder whose temporal convolutions are all frame-local (the toy world's) has no state
past latent frame 0, so the later frames are decoded DECODE_BATCH at a time as one batch: the same
numbers, one module call per block instead of per frame (a 60 s toy-world video on one core: ~18 s -> 7.9 s).

Weights: ``model.vae_path`` is a local diffusers directory (``config.json`` +
``diffusion_pytorch_model.safetensors``, or a pipeline directory with a ``vae/`` subfolder); empty
builds a tiny VAE with Wan's structure (z_dim = in_channels, strides 4x8x8) from a fixed seed.
"""

from __future__ import annotations

import sys

from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from model.text import as_dtype
from slotmem.config import ModelConfig
from slotmem.errors import InputError

TINY_SEED = 20250102  # fixed: the tiny VAE must be identical in every process
# Wan2.1 VAE structure (wan/modules/vae.py, diffusers defaults): channel multipliers per level (three
# 2x spatial downsamples = 8x) and temporal downsampling at the two deepest levels (= 4x)
WAN_DIM_MULT = (1, 2, 4, 4)
WAN_TEMPORAL_DOWNSAMPLE = (False, True, True)
DECODE_BATCH = 16  # latent frames decoded as one batch by a stateless (frame-local) decoder


class VAE:
    """Normalised latents [B, F, C, h, w] <-> uint8 video [B, T, H, W, 3] with T = 4(F-1)+1."""

    def __init__(self, model):
        if model.config.patch_size is not None:
            raise InputError("model.vae_path: patchified VAEs (Wan2.2) are not supported; use the Wan2.1 VAE")
        self.model = model.eval().requires_grad_(False)
        self.frame_local_convs = use_frame_local_convs(model)
        use_fast_rms_norms(model)
        # stateless past latent frame 0: every temporal convolution of the decoder looks at the current frame only
        taps = len(temporal_tap_convs(model.decoder))
        self.stateless_decoder = taps > 0 and len(frame_local_convs(model.decoder)) == taps
        cfg = model.config
        self.z_dim = cfg.z_dim
        self.temporal_stride = 2 ** sum(bool(d) for d in cfg.temperal_downsample)
        self.spatial_stride = 2 ** (len(cfg.dim_mult) - 1)
        self.latents_mean = torch.tensor(cfg.latents_mean, dtype=torch.float32)  # [C]
        self.latents_std = torch.tensor(cfg.latents_std, dtype=torch.float32)  # [C]
        if self.latents_mean.numel() != self.z_dim or self.latents_std.numel() != self.z_dim:
            raise InputError(f"VAE config: latents_mean/latents_std need {self.z_dim} values (z_dim)")

    @property
    def device(self) -> torch.device:
        return self.model.post_quant_conv.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.post_quant_conv.weight.dtype

    def num_pixel_frames(self, num_latent_frames: int) -> int:
        return self.temporal_stride * (num_latent_frames - 1) + 1

    def _stats(self, ndim_like: Tensor) -> tuple[Tensor, Tensor]:
        shape = (1, 1, self.z_dim, 1, 1)  # broadcast over [B, F, C, h, w]
        mean = self.latents_mean.to(ndim_like.device, torch.float32).view(shape)
        std = self.latents_std.to(ndim_like.device, torch.float32).view(shape)
        return mean, std

    # -- decoding ---------------------------------------------------------------------------------

    @torch.no_grad()
    def decode_iter(self, latents: Tensor, progress: bool = False) -> Iterator[Tensor]:
        """Stream the video: yields uint8 [B, t, H, W, 3] pieces (t = 1 for the first latent frame, then 4 per latent
        frame: 4 at a time, or 4 * DECODE_BATCH from a stateless decoder)."""
        if latents.ndim != 5 or latents.shape[2] != self.z_dim:
            raise InputError(f"latents must be [B, F, {self.z_dim}, h, w], got {tuple(latents.shape)}")
        from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

        mean, std = self._stats(latents)
        z = latents.to(self.device, torch.float32) * std + mean  # un-normalise, [B, F, C, h, w]
        z = z.to(self.dtype).permute(0, 2, 1, 3, 4)  # [B, C, F, h, w] (diffusers layout)
        decoder = self.model.decoder
        # one cache slot per causal conv: each keeps the last frames it saw, so decoding latent frame i
        # alone continues exactly where frame i-1 stopped
        feat_cache = [None] * sum(isinstance(m, WanCausalConv3d) for m in decoder.modules())
        num_frames = z.shape[2]
        bar = tqdm(total=num_frames, desc="VAE decode", unit="latent frame", disable=not progress,
                   mininterval=0.1 if sys.stderr.isatty() else 10.0)
        i = 0
        while i < num_frames:
            if i > 0 and self.stateless_decoder:
                yield self._decode_block(z[:, :, i : i + DECODE_BATCH], feat_cache)
                step = min(DECODE_BATCH, num_frames - i)
            else:
                x = self.model.post_quant_conv(z[:, :, i : i + 1])  # 1x1x1 conv: per frame
                out = decoder(x, feat_cache=feat_cache, feat_idx=[0], first_chunk=(i == 0))  # [B, 3, t, H, W]
                yield to_uint8(out.permute(0, 2, 3, 4, 1))  # [B, t, H, W, 3]
                step = 1
            i += step
            bar.update(step)
        bar.close()

    def _decode_block(self, z: Tensor, first_cache: list) -> Tensor:
        """Latent frames after the first, [B, C, n, h, w], through a stateless decoder as a batch of n single
        frames: uint8 [B, 4n, H, W, 3]. The cache left by frame 0 says which slots are temporal upsamplers
        ("Rep": double the frames from here on); the convolutions ignore their cache, so theirs start empty."""
        b, _, n = z.shape[:3]
        x = self.model.post_quant_conv(z)  # 1x1x1 conv: per frame
        x = x.permute(0, 2, 1, 3, 4).reshape(b * n, -1, 1, *x.shape[3:])  # [B*n, C, 1, h, w]
        cache = ["Rep" if isinstance(c, str) else None for c in first_cache]
        out = self.model.decoder(x, feat_cache=cache, feat_idx=[0], first_chunk=False)  # [B*n, 3, t, H, W]
        out = out.permute(0, 2, 3, 4, 1)  # [B*n, t, H, W, 3]
        return to_uint8(out.reshape(b, n * out.shape[1], *out.shape[2:]))  # [B, n*t, H, W, 3]

    def decode(self, latents: Tensor, progress: bool = False) -> Tensor:
        """Normalised latents [B, F, C, h, w] -> uint8 video [B, 4(F-1)+1, 8h, 8w, 3] on the CPU."""
        b, f, _, h, w = latents.shape
        video = torch.empty(b, self.num_pixel_frames(f), h * self.spatial_stride, w * self.spatial_stride, 3,
                            dtype=torch.uint8)
        t = 0
        for piece in self.decode_iter(latents, progress=progress):
            video[:, t : t + piece.shape[1]] = piece.cpu()
            t += piece.shape[1]
        return video

    # -- encoding (tests, reference latents) --------------------------------------------------------

    @torch.no_grad()
    def encode(self, video: Tensor) -> Tensor:
        """uint8 video [B, T, H, W, 3] with T = 4k+1 -> normalised latents [B, 1+k, C, H/8, W/8] (posterior mean)."""
        if video.dtype != torch.uint8 or video.ndim != 5 or video.shape[-1] != 3:
            raise InputError(f"video must be uint8 [B, T, H, W, 3], got {video.dtype} {tuple(video.shape)}")
        t, h, w = video.shape[1:4]
        if (t - 1) % self.temporal_stride or h % self.spatial_stride or w % self.spatial_stride:
            raise InputError(f"video [T={t}, H={h}, W={w}] needs T = {self.temporal_stride}k+1 and H, W "
                             f"multiples of {self.spatial_stride}")
        x = video.to(self.device).permute(0, 4, 1, 2, 3).to(torch.float32) / 127.5 - 1  # [B, 3, T, H, W]
        z = self.model.encode(x.to(self.dtype)).latent_dist.mode()  # [B, C, F, h, w]
        z = z.permute(0, 2, 1, 3, 4).to(torch.float32)  # [B, F, C, h, w]
        mean, std = self._stats(z)
        return (z - mean) / std

    @torch.no_grad()
    def reencode_first_frame(self, latent: Tensor) -> Tensor:
        """One latent frame [B, 1, C, h, w] decoded alone (as a clip's first frame, one pixel frame) and encoded
        back: the "image latent" LongLive puts at the start of a mid-video training window."""
        if latent.ndim != 5 or latent.shape[1] != 1:
            raise InputError(f"reencode_first_frame takes one latent frame [B, 1, C, h, w], got {tuple(latent.shape)}")
        mean, std = self._stats(latent)
        z = (latent.to(self.device, torch.float32) * std + mean).to(self.dtype).permute(0, 2, 1, 3, 4)
        pixels = self.model.decode(z).sample.clamp(-1, 1)  # [B, 3, 1, H, W], the first frame decodes to one
        z = self.model.encode(pixels).latent_dist.mode().permute(0, 2, 1, 3, 4).to(torch.float32)  # [B, 1, C, h, w]
        return ((z - mean) / std).to(latent.dtype)

    def save_pretrained(self, directory: str | Path) -> None:
        self.model.save_pretrained(str(directory))


def temporal_tap_convs(model) -> list:
    """The causal convolutions of ``model`` with 3 temporal taps and stride 1 (all but the encoder's stride-2
    temporal downsamplers): the ones that can be frame-local."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

    return [m for m in model.modules() if isinstance(m, WanCausalConv3d) and m.kernel_size[0] == 3 and m.stride[0] == 1]


def frame_local_convs(model) -> list:
    """The temporal_tap_convs of ``model`` whose two past-frame taps are zero: they look at the current frame only.
    The toy world's VAE (toyworld/train_vae.py) is trained so: every convolution of its decoder and all but
    the temporal downsamplers of its encoder, so the decoder behaves the same at frame 900 as at frame 20,
    where Wan's 2-frame taps chained through ~20 convolutions drift past the clip length seen in training."""
    return [m for m in temporal_tap_convs(model) if not torch.any(m.weight[:, :, :2])]


def _frame_local_forward(self, x: Tensor, cache_x: Tensor | None = None) -> Tensor:
    # the past taps are zero: the causal pad and the cached frames would only be multiplied by zero
    pad = self._padding  # (w, w, h, h, 2t, 0), F.pad order
    return torch.nn.functional.conv3d(x, self.weight[:, :, 2:], self.bias, self.stride, (0, pad[2], pad[0]))


def use_frame_local_convs(model) -> int:
    """Run every frame-local convolution of ``model`` on its current frame only: the same numbers, a third of
    the work (and of the gradient: the zero taps stay zero under training). Returns how many there are."""
    import types

    convs = frame_local_convs(model)
    for m in convs:
        m.forward = types.MethodType(_frame_local_forward, m)
    return len(convs)


def _fast_rms_norm_forward(self, x: Tensor) -> Tensor:
    if not (self.channel_first and x.device.type == "cpu" and x.dtype == torch.float32):
        return self._library_forward(x)
    # F.normalize over the channel dim, computed as a sum of squares: the same numbers (within 1e-7), but
    # torch's CPU vector norm over dim 1 of [B, C, T, H, W] took 36 % of a toy-world decode, the sum 1/6 of that
    norm = (x * x).sum(1, keepdim=True).sqrt().clamp_min(1e-12)  # F.normalize's eps
    return x / norm * self.scale * self.gamma + self.bias


def use_fast_rms_norms(model) -> int:
    """Give every WanRMS_norm of ``model`` the fast CPU float32 path above (other devices and dtypes keep
    diffusers' forward). Returns how many there are."""
    import types

    from diffusers.models.autoencoders.autoencoder_kl_wan import WanRMS_norm

    norms = [m for m in model.modules() if isinstance(m, WanRMS_norm)]
    for m in norms:
        m._library_forward = m.forward
        m.forward = types.MethodType(_fast_rms_norm_forward, m)
    return len(norms)


def to_uint8(x: Tensor) -> Tensor:
    """[-1, 1] floats -> uint8 (clamped, rounded), as Wan/diffusers write videos."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


# ----------------------------------------------------------------------------------------------
# building
# ----------------------------------------------------------------------------------------------


def build_vae(model_cfg: ModelConfig, device: torch.device | str = "cpu",
              dtype: torch.dtype | str = torch.float32) -> VAE:
    """The VAE named by ``model_cfg.vae_path`` (local diffusers layout), or the tiny seeded one."""
    dtype = as_dtype(dtype)
    model = _load_vae(model_cfg.vae_path, dtype) if model_cfg.vae_path else tiny_vae_model(model_cfg)
    if model.config.z_dim != model_cfg.in_channels:
        raise InputError(f"model.in_channels is {model_cfg.in_channels} but the VAE at model.vae_path "
                         f"{model_cfg.vae_path!r} has z_dim {model.config.z_dim}")
    if model.dtype != dtype:
        model = model.to(dtype=dtype)
    return VAE(model.to(device=device))


def tiny_vae_model(model_cfg: ModelConfig, latents_mean=None, latents_std=None):
    """Wan's VAE structure at ``vae_base_dim`` channels, one residual block per level, no attention.

    A random VAE has no measured latent statistics, so mean 0 / std 1 unless given.
    """
    from diffusers import AutoencoderKLWan

    c = model_cfg.in_channels
    with torch.random.fork_rng(devices=[]):  # private seed: identical weights, caller's RNG untouched
        torch.manual_seed(TINY_SEED)
        return AutoencoderKLWan(
            base_dim=model_cfg.vae_base_dim, z_dim=c, dim_mult=list(WAN_DIM_MULT), num_res_blocks=1,
            attn_scales=[], temperal_downsample=list(WAN_TEMPORAL_DOWNSAMPLE),
            latents_mean=list(latents_mean) if latents_mean is not None else [0.0] * c,
            latents_std=list(latents_std) if latents_std is not None else [1.0] * c,
        )


def _load_vae(path: str, dtype: torch.dtype):
    from diffusers import AutoencoderKLWan

    p = Path(path)
    if not p.exists():
        raise InputError(f"model.vae_path: {path!r} does not exist (local paths only)")
    if p.is_dir() and not (p / "config.json").is_file() and (p / "vae" / "config.json").is_file():
        p = p / "vae"  # a diffusers pipeline directory (e.g. Wan2.1-T2V-1.3B-Diffusers)
    if not p.is_dir():
        raise InputError(f"model.vae_path: {path!r} must be a diffusers AutoencoderKLWan directory "
                         f"(config.json + diffusion_pytorch_model.safetensors), not a file")
    try:
        return AutoencoderKLWan.from_pretrained(str(p), local_files_only=True, torch_dtype=dtype)
    except (OSError, ValueError, EnvironmentError) as e:
        raise InputError(f"model.vae_path: cannot load a diffusers AutoencoderKLWan from {path!r}: {e}") from e
