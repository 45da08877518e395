"""3-D rotary position embedding over (frame, height, width), Wan2.1 style.

The head dimension is split into three bands of rotation pairs: temporal d - 4*(d//6) dims, height
and width 2*(d//6) each (head_dim 128 -> 44/42/42 dims = 22/21/21 pairs). Each band rotates
consecutive pairs (x[2i], x[2i+1]) by position * theta^(-2i/band), theta = 10000, exactly like Wan's
complex-number ``rope_apply``. Temporal positions are absolute latent frame indices
(start_frame + f) so that keys cached post-RoPE keep their phase; height/width start at 0.
Tables are built in float64 and applied in float32, and they are plain tensors rather than module
buffers so that casting the model to bfloat16 does not round them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from slotmem.errors import InputError

THETA = 10000.0


def rope_band_dims(head_dim: int) -> tuple[int, int, int]:
    """(temporal, height, width) dims of the head dimension, as in Wan's WanModel.freqs."""
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def _angles(max_positions: int, band_dim: int) -> Tensor:
    """[max_positions, band_dim / 2] rotation angles position * theta^(-2i / band_dim), float64."""
    inv_freq = 1.0 / THETA ** (torch.arange(0, band_dim, 2, dtype=torch.float64) / band_dim)
    return torch.outer(torch.arange(max_positions, dtype=torch.float64), inv_freq)


class Rope3D:
    def __init__(self, head_dim: int, max_positions: int):
        if head_dim % 2 or head_dim < 6:
            raise ValueError(f"head_dim must be even and >= 6, got {head_dim}")
        self.head_dim = head_dim
        self.max_positions = max_positions
        # one angle table per band: frame, height, width; each [max_positions, band_dim / 2]
        self._angles = [_angles(max_positions, d) for d in rope_band_dims(head_dim)]
        self._cos_sin: dict[torch.device, list[tuple[Tensor, Tensor]]] = {}

    def _tables(self, device: torch.device) -> list[tuple[Tensor, Tensor]]:
        if device not in self._cos_sin:
            self._cos_sin[device] = [(a.cos().float().to(device), a.sin().float().to(device))
                                     for a in self._angles]
        return self._cos_sin[device]

    def freqs(self, start_frame: int, num_frames: int, height: int, width: int,
              device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
        """cos, sin of shape [L, 1, head_dim / 2] for tokens ordered (frame, h, w), L = F*h*w."""
        end = start_frame + num_frames
        if start_frame < 0 or end > self.max_positions:
            raise InputError(f"latent frames [{start_frame}, {end}) exceed the RoPE table of "
                             f"model.rope_max_frames = {self.max_positions} positions")
        if height > self.max_positions or width > self.max_positions:
            raise InputError(f"token grid {height}x{width} exceeds model.rope_max_frames = {self.max_positions}")
        (cos_f, sin_f), (cos_h, sin_h), (cos_w, sin_w) = self._tables(torch.device(device))
        grid = (num_frames, height, width)

        def band(table: Tensor, positions: slice, axis: int) -> Tensor:
            # [n, pairs] -> broadcast over the other two grid axes -> [F, h, w, pairs]
            values = table[positions]
            shape = [1, 1, 1, values.shape[-1]]
            shape[axis] = values.shape[0]
            return values.view(shape).expand(*grid, -1)

        cos = torch.cat([band(cos_f, slice(start_frame, end), 0), band(cos_h, slice(0, height), 1),
                         band(cos_w, slice(0, width), 2)], dim=-1)
        sin = torch.cat([band(sin_f, slice(start_frame, end), 0), band(sin_h, slice(0, height), 1),
                         band(sin_w, slice(0, width), 2)], dim=-1)
        # [F, h, w, pairs] -> [L, 1, pairs]; the 1 broadcasts over heads
        return cos.reshape(-1, 1, cos.shape[-1]), sin.reshape(-1, 1, sin.shape[-1])


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate consecutive pairs of x [B, L, H, D] by the angles of cos/sin [L, 1, D/2]."""
    pairs = x.float().unflatten(-1, (-1, 2))  # [B, L, H, D/2, 2]
    real, imag = pairs.unbind(-1)
    rotated = torch.stack([real * cos - imag * sin, real * sin + imag * cos], dim=-1)
    return rotated.flatten(-2).to(x.dtype)
