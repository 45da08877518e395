"""toyworld.strip: the README's frame strip, read back from written videos."""

from __future__ import annotations

import imageio.v3 as iio
import numpy as np
import pytest

from rollout.video import write_mp4, write_sidecar
from toyworld import strip

# 30 latent frames (117 pixel frames), switches at latent 10 and 20: the segments' pixel frames are 0-33, 37-73 and
# 77-113 (4 per latent frame, the first latent frame one), so their middles are 16, 55 and 95
META = {"prompts": ["a", "b", "c"], "switch_frames": [10, 20], "num_latent_frames": 30}
MIDDLES = [16, 55, 95]


def _video(path, meta=META, step=2):
    frames = np.stack([np.full((64, 64, 3), step * p, np.uint8) for p in range(117)])  # grey level 2 p: frame p
    write_mp4(path, frames)
    write_sidecar(path, meta)
    return path


def test_strip_shows_the_middle_frame_of_every_segment_a_row_per_video(tmp_path):
    a, b = _video(tmp_path / "a.mp4"), _video(tmp_path / "b.mp4")
    out = tmp_path / "docs" / "strip.png"
    strip.main([str(a), str(b), "--out", str(out)])
    image = iio.imread(out)
    tile = 64 * strip.SCALE + strip.GAP
    assert image.shape == (2 * tile, 3 * tile, 3)
    for row in range(2):
        for col, p in enumerate(MIDDLES):
            cell = image[row * tile:(row + 1) * tile - strip.GAP, col * tile:(col + 1) * tile - strip.GAP]
            assert abs(cell.mean() - 2 * p) < 4, (row, col, cell.mean())  # H.264 moves grey levels by a step or two
    assert (image[:, tile - strip.GAP:tile] == 255).all()  # the white gap between columns
    assert out.stat().st_mode & 0o040  # group-readable


def test_strip_refuses_videos_of_different_scripts_and_names_a_missing_sidecar(tmp_path):
    a = _video(tmp_path / "a.mp4")
    b = _video(tmp_path / "b.mp4", {**META, "switch_frames": [12, 20]})
    with pytest.raises(SystemExit, match="differ from"):
        strip.main([str(a), str(b), "--out", str(tmp_path / "s.png")])
    (tmp_path / "b.json").unlink()
    with pytest.raises(SystemExit, match="b.json"):
        strip.main([str(a), str(b), "--out", str(tmp_path / "s.png")])
