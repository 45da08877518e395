"""A strip of frames from written toy-world videos, one row per video, one column per prompt segment (the frame
in the middle of the segment): ``python -m toyworld.strip A.mp4 B.mp4 --out docs/toyworld_sample.png``.

The README's picture of the demo is made by it from ``sample_base.mp4`` (the causal base before training) and
``sample.mp4`` (after Stage 0/I/II). Every video needs its sidecar json (prompts, switch frames, latent frames);
the videos of one strip must share the script, so their columns show the same prompts.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from toyworld.palette import first_pixel_frame

SCALE = 3  # 64 px frames are too small to see on a README page; nearest-neighbour keeps the pixels honest
GAP = 4  # pixels of white between frames


def segment_middles(switch_frames: list[int], num_latent_frames: int) -> list[int]:
    """The pixel frame in the middle of every prompt segment."""
    edges = [0, *switch_frames, num_latent_frames]
    return [(first_pixel_frame(a) + first_pixel_frame(b - 1)) // 2 for a, b in zip(edges, edges[1:])]


def _read(video: Path) -> tuple[np.ndarray, dict]:
    import imageio.v3 as iio

    from rollout.video import sidecar_path

    meta_path = sidecar_path(video)
    if not video.is_file():
        raise FileNotFoundError(f"{video}: no such video")
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path} (the prompts and switch frames of {video.name}) is missing")
    return iio.imread(video), json.loads(meta_path.read_text())


def strip(videos: list[Path]) -> np.ndarray:
    """[rows * (64 * SCALE + GAP), columns * (64 * SCALE + GAP), 3] uint8: mid-segment frames, a row per video."""
    rows, script = [], None
    for video in videos:
        frames, meta = _read(video)
        if script is None:
            script = (meta["prompts"], meta["switch_frames"], meta["num_latent_frames"])
        elif script != (meta["prompts"], meta["switch_frames"], meta["num_latent_frames"]):
            raise ValueError(f"{video}: its prompts / switch frames differ from {videos[0]}'s; a strip compares "
                             "videos of one script")
        picks = [min(p, len(frames) - 1) for p in segment_middles(script[1], script[2])]
        big = frames[picks].repeat(SCALE, axis=1).repeat(SCALE, axis=2)  # [columns, H*S, W*S, 3]
        big = np.pad(big, ((0, 0), (0, GAP), (0, GAP), (0, 0)), constant_values=255)
        rows.append(np.concatenate(list(big), axis=1))  # [H*S + GAP, columns * (W*S + GAP), 3]
    return np.concatenate(rows, axis=0)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m toyworld.strip", description=__doc__.splitlines()[0])
    ap.add_argument("videos", nargs="+", help="mp4 files with their sidecar json, one row each")
    ap.add_argument("--out", required=True, help="the png to write")
    args = ap.parse_args(argv)
    import imageio.v3 as iio

    from rollout.video import OUTPUT_MODE

    try:
        image = strip([Path(v) for v in args.videos])
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"toyworld.strip: {e}") from None
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    iio.imwrite(out, image)
    out.chmod(OUTPUT_MODE)
    print(f"[strip] {len(args.videos)} row(s) x {image.shape[1] // (64 * SCALE + GAP)} segment(s) -> {out}")


if __name__ == "__main__":
    main()
