"""mp4 output: H.264 / yuv420p at 16 fps (Wan2.1 sample_fps) through imageio's bundled ffmpeg.

Files appear atomically: frames go to a temporary file in the same directory, which is renamed over
the target only once ffmpeg has finished, so a reader never sees a half-written video. The temporary file is
private (mkstemp), so it is made group- and world-readable (``OUTPUT_MODE``) before the rename: a team shares
the outputs. ``frames``
may be one uint8 array [T, H, W, 3] or an iterable of such pieces (e.g. ``VAE.decode_iter``), which
streams a long video to disk without holding it in memory.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from slotmem.errors import InputError

DEFAULT_FPS = 16  # Wan2.1 sample_fps (anchors-video §2.1)
OUTPUT_MODE = 0o644  # rw-r--r--, what a plain open() gives under the usual umask


def _as_numpy(frames) -> np.ndarray:
    if hasattr(frames, "detach"):  # torch tensor
        frames = frames.detach().cpu().numpy()
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise InputError(f"video frames must be uint8 [T, H, W, 3], got {frames.dtype} {frames.shape}")
    return frames


def _pieces(frames) -> Iterable[np.ndarray]:
    if hasattr(frames, "shape"):  # one array / tensor
        yield _as_numpy(frames)
    else:
        for piece in frames:
            yield _as_numpy(piece)


def write_mp4(path: str | Path, frames, fps: int = DEFAULT_FPS, quality: int = 8) -> Path:
    """Write uint8 frames [T, H, W, 3] (or an iterable of pieces) as H.264 mp4; returns the path.

    H and W must be even (yuv420p subsamples chroma 2x2); multiples of 16 avoid encoder padding.
    """
    import imageio.v2 as iio

    if not isinstance(fps, int) or isinstance(fps, bool) or fps < 1:
        raise InputError(f"video fps must be a positive integer, got {fps!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".mp4", dir=path.parent)
    os.close(fd)
    count, size = 0, None
    try:
        # macro_block_size=2: never rescale; even sizes are all yuv420p needs
        writer = iio.get_writer(tmp, format="FFMPEG", mode="I", fps=fps, codec="libx264", pixelformat="yuv420p",
                                quality=quality, macro_block_size=2)
        try:  # close explicitly: imageio's writer context skips close() on error and leaves ffmpeg running
            for piece in _pieces(frames):
                if size is None:
                    size = piece.shape[1:3]
                    if size[0] % 2 or size[1] % 2:
                        raise InputError(f"video frames must have even height and width for yuv420p, got {size}")
                elif piece.shape[1:3] != size:
                    raise InputError(f"video frames change size from {size} to {piece.shape[1:3]}")
                for frame in piece:
                    writer.append_data(frame)
                count += len(piece)
        finally:
            writer.close()
        if count == 0:
            raise InputError(f"no frames to write to {str(path)!r}")
        os.chmod(tmp, OUTPUT_MODE)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def sidecar_path(video_path: str | Path) -> Path:
    return Path(video_path).with_suffix(".json")


def _jsonable(value: Any):
    if hasattr(value, "tolist"):  # numpy / torch arrays and scalars
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    raise TypeError(f"cannot write {type(value).__name__} to a JSON sidecar")


def write_sidecar(video_path: str | Path, meta: dict) -> Path:
    """Write ``meta`` as JSON next to the video (same stem, ``.json``), atomically; returns its path."""
    out = sidecar_path(video_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(meta, indent=2, default=_jsonable)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.stem}.", suffix=".json", dir=out.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text + "\n")
        os.chmod(tmp, OUTPUT_MODE)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out
