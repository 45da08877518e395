"""3-D RoPE: band split, Wan's complex-number formulation, relative positions, table overflow."""

import pytest
import torch

from model.rope import Rope3D, apply_rope, rope_band_dims
from slotmem.errors import InputError


def test_band_split_like_wan():
    assert rope_band_dims(128) == (44, 42, 42)  # 1.3B: 22/21/21 rotation pairs
    assert rope_band_dims(16) == (8, 4, 4)
    assert sum(rope_band_dims(30)) == 30


def wan_complex_rope(x, start_frame, f, h, w):
    """Reference: Wan's rope_apply, written with complex numbers (x [B, L, H, D])."""
    d = x.shape[-1]
    bands = rope_band_dims(d)

    def freqs(positions, band):
        inv = 1.0 / 10000 ** (torch.arange(0, band, 2, dtype=torch.float64) / band)
        return torch.polar(torch.ones(len(positions), band // 2, dtype=torch.float64),
                           torch.outer(positions.double(), inv))

    ff = freqs(torch.arange(start_frame, start_frame + f), bands[0])
    fh = freqs(torch.arange(h), bands[1])
    fw = freqs(torch.arange(w), bands[2])
    grid = torch.cat([ff[:, None, None].expand(f, h, w, -1), fh[None, :, None].expand(f, h, w, -1),
                      fw[None, None, :].expand(f, h, w, -1)], dim=-1).reshape(f * h * w, 1, -1)
    xc = torch.view_as_complex(x.double().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * grid).flatten(-2).float()


def test_matches_wan_complex_rope():
    rope = Rope3D(head_dim=16, max_positions=64)
    x = torch.randn(2, 3 * 4 * 5, 2, 16)
    cos, sin = rope.freqs(7, 3, 4, 5)
    torch.testing.assert_close(apply_rope(x, cos, sin), wan_complex_rope(x, 7, 3, 4, 5), rtol=1e-5, atol=1e-5)


def test_scores_depend_only_on_relative_position():
    """q_i . k_j after RoPE is a function of (frame, h, w) differences only."""
    rope = Rope3D(head_dim=24, max_positions=256)
    q_vec, k_vec = torch.randn(24), torch.randn(24)
    f, h, w = 4, 3, 3
    L = f * h * w

    def scores(start_frame):
        cos, sin = rope.freqs(start_frame, f, h, w)
        q = apply_rope(q_vec.expand(1, L, 1, 24), cos, sin)[0, :, 0]
        k = apply_rope(k_vec.expand(1, L, 1, 24), cos, sin)[0, :, 0]
        return q @ k.T  # [L, L]

    base = scores(0)
    # shifting every frame by the same offset changes nothing
    torch.testing.assert_close(scores(100), base, rtol=1e-4, atol=1e-4)
    # token pairs with equal (df, dh, dw) score the same
    pos = torch.stack(torch.meshgrid(torch.arange(f), torch.arange(h), torch.arange(w), indexing="ij"), -1).reshape(L, 3)
    i1, j1 = 0, int(((pos == torch.tensor([1, 1, 2])).all(-1)).nonzero())  # (0,0,0) vs (1,1,2)
    i2, j2 = int(((pos == torch.tensor([2, 1, 0])).all(-1)).nonzero()), int(((pos == torch.tensor([3, 2, 2])).all(-1)).nonzero())
    torch.testing.assert_close(base[i1, j1], base[i2, j2], rtol=1e-4, atol=1e-4)
    # and differ when the offset differs (the property is not vacuous)
    assert not torch.allclose(base[i1, j1], base[i1, i1 + 1], atol=1e-3)


def test_table_overflow_is_an_input_error():
    rope = Rope3D(head_dim=16, max_positions=32)
    rope.freqs(29, 3, 2, 2)  # frames 29..31 fit
    with pytest.raises(InputError, match="rope_max_frames"):
        rope.freqs(30, 3, 2, 2)
