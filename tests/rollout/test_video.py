"""mp4 + sidecar writing: read back with imageio, atomic replacement, input validation."""

from __future__ import annotations

import json

import imageio.v3 as iio
import numpy as np
import pytest
import torch

from rollout.video import sidecar_path, write_mp4, write_sidecar
from slotmem.errors import InputError


def _gradient_video(t=17, h=64, w=48):
    """Smooth moving gradients: compress well, so a lossy round trip stays close."""
    tt, yy, xx = np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij")
    r = (xx * 4 + tt * 6) % 256
    g = (yy * 3) % 256
    b = np.full_like(r, 128)
    return np.stack([r, g, b], axis=-1).astype(np.uint8)  # [T, H, W, 3]


def test_write_then_read_back(tmp_path):
    frames = _gradient_video()
    out = write_mp4(tmp_path / "a" / "clip.mp4", frames, fps=16)
    back = iio.imread(out)
    assert back.shape == frames.shape and back.dtype == np.uint8
    assert np.abs(back.astype(int) - frames.astype(int)).mean() < 10  # lossy, but the same picture
    meta = iio.immeta(out)
    assert meta["fps"] == 16
    assert [p.name for p in out.parent.iterdir()] == ["clip.mp4"]  # no temporary file left behind


def test_streamed_pieces_and_torch_input(tmp_path):
    frames = _gradient_video(t=9, h=32, w=32)
    pieces = [torch.from_numpy(frames[:1]), torch.from_numpy(frames[1:5]), torch.from_numpy(frames[5:])]
    out = write_mp4(tmp_path / "s.mp4", iter(pieces))
    assert iio.imread(out).shape == (9, 32, 32, 3)


def test_overwrite_is_atomic_and_failed_write_keeps_old_file(tmp_path):
    target = tmp_path / "v.mp4"
    write_mp4(target, _gradient_video(t=5))
    before = target.read_bytes()

    def broken():
        yield _gradient_video(t=3)
        raise RuntimeError("decoder died")

    with pytest.raises(RuntimeError, match="decoder died"):
        write_mp4(target, broken())
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.mp4"]


@pytest.mark.parametrize(
    "frames, message",
    [
        (np.zeros((4, 16, 16, 3), np.float32), "uint8"),
        (np.zeros((16, 16, 3), np.uint8), r"\[T, H, W, 3\]"),
        (np.zeros((4, 15, 16, 3), np.uint8), "even height and width"),
        (np.zeros((0, 16, 16, 3), np.uint8), "no frames"),
    ],
)
def test_bad_frames_are_input_errors(tmp_path, frames, message):
    with pytest.raises(InputError, match=message):
        write_mp4(tmp_path / "bad.mp4", frames)
    assert not (tmp_path / "bad.mp4").exists()


def test_sidecar_next_to_video(tmp_path):
    video = tmp_path / "out.mp4"
    meta = {"prompts": ["a", "b"], "switch_frames": np.array([42]), "seed": np.int64(3),
            "latents": torch.tensor([1.5]), "path": video}
    out = write_sidecar(video, meta)
    assert out == sidecar_path(video) == tmp_path / "out.json"
    assert json.loads(out.read_text()) == {"prompts": ["a", "b"], "switch_frames": [42], "seed": 3,
                                           "latents": [1.5], "path": str(video)}
