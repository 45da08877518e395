"""A judge that needs no learned model: a procedural detector for decoded toy-world frames and the
scores built on it.

Detection, per frame (frames may be blurry, noisy, VAE-decoded):
  1. background: the palette background that most pixels lie within MATCH_DIST of (RGB distance);
     none when fewer than BACKGROUND_SHARE of the pixels match any (noise, garbage);
  2. entity masks: a pixel belongs to entity colour c when it lies on the blend line background -> c
     more than half-way to c (alpha >= ALPHA_MIN: more than half covered) and within LINE_DIST of that
     line; the closest such colour wins. Two passes dropping pixels with fewer than MIN_NEIGHBOURS
     same-colour neighbours remove speckle (noise pixels, thin fringes);
  3. per colour (one entity per colour within a video): present when the mask has >= MIN_AREA pixels;
     centre = mask centroid; when the mask touches neither the border (bouncing entities keep
     world.WALL_MARGIN from it, so touching means cut) nor another entity's box (occlusion)
     its shape and hidden size are those of the best-matching template: the renderer's own masks of
     every (shape, size) at sub-pixel centres around the mask's box centre, by IoU.

Scores:
  * ``segment_adherence``: per evaluated frame, 1[background right] x the fraction of entity checks
    that hold -- each prompted entity visible with its colour (and its shape when wholly visible),
    each entity said to have left not visible, no unprompted entity visible; averaged over the
    frames. Event segments are judged on their second half only (the event completes inside the
    first EVENT_FRAMES latent frames). In [0, 1].
  * ``consistency``: identity stability (fraction of wholly-visible frames showing the entity's
    majority shape) and attribute stability (same for the size, within each visible run).
  * ``return_matches``: for each scripted return, whether the size seen after the return equals the
    size of the entity's first appearance (both read from the video).
  * ``judge_video``: a written video (a pipeline sample, `slotmem generate` output) against the prompts and
    switch frames of the json beside it: adherence per segment and its mean, and consistency.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from toyworld.language import parse
from toyworld.palette import BACKGROUNDS, COLOURS, FRAME_SIZE, SHAPES, SIZES, first_pixel_frame
from toyworld.scripts import Script
from toyworld.world import EVENT_FRAMES, shape_coverage

MATCH_DIST = 60.0  # RGB distance for a pixel to count as a background colour
BACKGROUND_SHARE = 0.4  # fraction of pixels that must match the winning background
LINE_DIST = 60.0  # RGB distance of an entity pixel from the background -> colour blend line
ALPHA_MIN = 0.52  # more than half-way along it; the margin puts exactly half-covered pixels (uint8-rounded) out
MIN_AREA = 12  # pixels: a small triangle wholly visible has ~50
MIN_NEIGHBOURS = 3  # despeckling: a uniform-noise pixel (~10% per colour) keeps 3 of 8 neighbours with p ~ 0.04
WINDOW = 24  # px: the window a wholly visible entity is matched in (the largest shape is 16 px)
TEMPLATE_OFFSETS = np.arange(-1.0, 1.01, 0.25)  # px: template centres around the mask box's centre

_BG_NAMES = list(BACKGROUNDS)
_BG_RGB = np.array([BACKGROUNDS[n] for n in _BG_NAMES], dtype=np.float32)  # [K, 3]
_COLOUR_NAMES = list(COLOURS)
_COLOUR_RGB = np.array([COLOURS[n] for n in _COLOUR_NAMES], dtype=np.float32)  # [N, 3]


@dataclass(frozen=True)
class Detection:
    colour: str
    centre: tuple[float, float]  # (x, y) mask centroid, pixels, origin at the top-left corner
    area: int  # mask pixels
    full: bool  # wholly visible and clear of other entities: shape and size are read
    shape: str | None
    size: str | None


@dataclass(frozen=True)
class FrameReport:
    background: str | None
    entities: dict[str, Detection]  # colour -> detection


# ----------------------------------------------------------------------------------------------
# detection
# ----------------------------------------------------------------------------------------------


def _despeckle(mask: np.ndarray, passes: int = 2) -> np.ndarray:
    """Keep the pixels of [T, H, W] bool with at least MIN_NEIGHBOURS of their 8 neighbours set, twice.

    Unlike a 3x3 opening this keeps a square's corner pixels and the one-pixel caps of a small disc
    (an opening turns a 10 px disc square).
    """
    H, W = mask.shape[1:]
    for _ in range(passes):
        p = np.pad(mask, ((0, 0), (1, 1), (1, 1))).astype(np.uint8)
        count = sum(p[:, dy:dy + H, dx:dx + W] for dy in (0, 1, 2) for dx in (0, 1, 2)) - mask  # [T, H, W]
        mask = mask & (count >= MIN_NEIGHBOURS)
    return mask


def _sq_dist(x: np.ndarray, rgb) -> np.ndarray:
    """Squared RGB distance of every pixel of float32 [..., 3] to one colour: [...]."""
    d = x - np.asarray(rgb, dtype=np.float32)
    return np.einsum("...c,...c->...", d, d)


def detect_backgrounds(frames: np.ndarray) -> list[str | None]:
    """Background name per frame of uint8 [T, H, W, 3]."""
    x = frames.astype(np.float32)
    share = np.stack([(_sq_dist(x, rgb) < MATCH_DIST**2).mean(axis=(1, 2)) for rgb in _BG_RGB], axis=1)  # [T, K]
    best = share.argmax(axis=1)
    return [_BG_NAMES[k] if share[t, k] >= BACKGROUND_SHARE else None for t, k in enumerate(best)]


def entity_masks(frames: np.ndarray, backgrounds: list[str | None]) -> np.ndarray:
    """[N, T, H, W] bool: the pixels of each palette colour (see the module docstring)."""
    x = frames.astype(np.float32)  # [T, H, W, 3]
    # reference background per frame: the detected one, else the palette background nearest the median
    ref = []
    for t, name in enumerate(backgrounds):
        if name is None:
            med = np.median(x[t].reshape(-1, 3), axis=0)
            name = _BG_NAMES[int(np.linalg.norm(_BG_RGB - med, axis=1).argmin())]
        ref.append(BACKGROUNDS[name])
    bg = np.array(ref, dtype=np.float32)[:, None, None, :]  # [T, 1, 1, 3]
    d = x - bg  # [T, H, W, 3]
    dd = np.einsum("...c,...c->...", d, d)  # [T, H, W] |d|^2
    best_dist = np.full(x.shape[:3], np.inf, dtype=np.float32)
    owner = np.full(x.shape[:3], -1, dtype=np.int8)
    for n, rgb in enumerate(_COLOUR_RGB):
        line = rgb - bg  # [T, 1, 1, 3] background -> colour
        ll = np.einsum("...c,...c->...", line, line)  # [T, 1, 1]
        dl = np.einsum("...c,...c->...", d, line)  # [T, H, W]
        alpha = dl / ll  # position along the blend line
        resid2 = dd - dl * alpha  # squared distance from the line
        dist = _sq_dist(x, rgb)
        ok = (alpha >= ALPHA_MIN) & (resid2 < LINE_DIST**2) & (dist < best_dist)
        owner[ok], best_dist[ok] = n, dist[ok]
    return np.stack([_despeckle(owner == n) for n in range(len(_COLOUR_RGB))])


def _template_bank() -> tuple[np.ndarray, np.ndarray, list[tuple[str, str]]]:
    """Masks [M, WINDOW^2] of every (shape, size) at centres TEMPLATE_OFFSETS around a window's centre, with
    the detector's rule: more than half covered (a pixel covered exactly half belongs to neither)."""
    masks, labels = [], []
    c, r = FRAME_SIZE // 2, WINDOW // 2
    for shape in SHAPES:
        for size_name, size in SIZES.items():
            for dy in TEMPLATE_OFFSETS:
                for dx in TEMPLATE_OFFSETS:
                    cov = shape_coverage(shape, c + dx, c + dy, size)[c - r:c + r, c - r:c + r]
                    masks.append((cov > 0.5).ravel())
                    labels.append((shape, size_name))
    bank = np.stack(masks).astype(np.float32)  # [M, WINDOW^2]
    return bank, bank.sum(1), labels


_TEMPLATES = None


def _classify(mask: np.ndarray, box: tuple[int, int, int, int]) -> tuple[str, str]:
    """(shape, size) of a wholly visible entity mask [H, W]: the template with the best IoU."""
    global _TEMPLATES
    if _TEMPLATES is None:
        _TEMPLATES = _template_bank()
    bank, areas, labels = _TEMPLATES
    top, bottom, left, right = box
    ay, ax = round((top + bottom + 1) / 2), round((left + right + 1) / 2)  # box centre, pixel coordinates
    r = WINDOW // 2
    padded = np.pad(mask, r)
    window = padded[ay:ay + 2 * r, ax:ax + 2 * r].ravel().astype(np.float32)  # rows ay-r .. ay+r of the frame
    inter = bank @ window  # [M]
    iou = inter / (areas + window.sum() - inter)
    return labels[int(iou.argmax())]


def detect(frames: np.ndarray) -> list[FrameReport]:
    """A FrameReport per frame of uint8 [T, H, W, 3]."""
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"judge.detect: frames must be uint8 [T, H, W, 3], got {frames.dtype} {frames.shape}")
    backgrounds = detect_backgrounds(frames)
    masks = entity_masks(frames, backgrounds)  # [N, T, H, W]
    areas = masks.sum(axis=(2, 3))  # [N, T]
    border = masks[:, :, 0].any(-1) | masks[:, :, -1].any(-1) | masks[:, :, :, 0].any(-1) | masks[:, :, :, -1].any(-1)
    ys, xs = np.arange(frames.shape[1]), np.arange(frames.shape[2])
    reports = []
    for t, name in enumerate(backgrounds):
        present = [n for n in range(len(_COLOUR_NAMES)) if areas[n, t] >= MIN_AREA]
        boxes = {n: _box(masks[n, t]) for n in present}
        found = {}
        for n in present:
            m, area = masks[n, t], int(areas[n, t])
            cy = float((m.sum(1) * ys).sum() / area) + 0.5  # pixel centres: the simulator's coordinates
            cx = float((m.sum(0) * xs).sum() / area) + 0.5
            # readable: not cut by the border, and not touching another entity (an occluded shape misleads)
            full = not bool(border[n, t]) and not any(_near(boxes[n], boxes[o]) for o in present if o != n)
            shape, size = _classify(m, boxes[n]) if full else (None, None)
            found[_COLOUR_NAMES[n]] = Detection(_COLOUR_NAMES[n], (cx, cy), area, full, shape, size)
        reports.append(FrameReport(name, found))
    return reports


def _box(mask: np.ndarray) -> tuple[int, int, int, int]:
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return rows[0], rows[-1], cols[0], cols[-1]


def _near(a: tuple[int, int, int, int], b: tuple[int, int, int, int], gap: int = 2) -> bool:
    """Boxes (top, bottom, left, right) within ``gap`` pixels of each other."""
    return a[0] <= b[1] + gap and b[0] <= a[1] + gap and a[2] <= b[3] + gap and b[2] <= a[3] + gap


# ----------------------------------------------------------------------------------------------
# scores
# ----------------------------------------------------------------------------------------------


def frame_adherence(report: FrameReport, prompt: str) -> float:
    """Adherence of one frame to one prompt (module docstring), in [0, 1]."""
    scene = parse(prompt)
    if report.background != scene.background:
        return 0.0
    checks = []
    for colour, shape in scene.present:
        det = report.entities.get(colour)
        checks.append(det is not None and (not det.full or det.shape == shape))
    for colour, _ in scene.absent:
        checks.append(colour not in report.entities)
    prompted = {c for c, _ in (*scene.present, *scene.absent)}
    checks.append(not (set(report.entities) - prompted))
    return float(np.mean(checks))


def segment_pixel_frames(start: int, stop: int, num_latent_frames: int, event: bool) -> range:
    """Pixel frames judged for the latent segment [start, stop): all of them, or the second half of an
    event segment."""
    lo = first_pixel_frame(start)
    hi = first_pixel_frame(stop) if stop < num_latent_frames else first_pixel_frame(num_latent_frames - 1) + 4
    if event:
        lo = max(lo + first_pixel_frame(EVENT_FRAMES), (lo + hi) // 2)
    return range(lo, hi)


def segment_adherence(reports: list[FrameReport], prompts: tuple[str, ...] | list[str],
                      switch_frames: tuple[int, ...] | list[int], num_latent_frames: int) -> list[float]:
    """Mean frame adherence of every prompt's segment of a decoded video."""
    edges = [0, *switch_frames, num_latent_frames]
    scores = []
    for k, prompt in enumerate(prompts):
        frames = segment_pixel_frames(edges[k], edges[k + 1], num_latent_frames, parse(prompt).event is not None)
        frames = [p for p in frames if p < len(reports)]
        scores.append(float(np.mean([frame_adherence(reports[p], prompt) for p in frames])) if frames else 0.0)
    return scores


def _majority(values: list[str]) -> tuple[str | None, float]:
    """Most common value and its share (None, 1.0 when empty)."""
    if not values:
        return None, 1.0
    value, count = Counter(values).most_common(1)[0]
    return value, count / len(values)


def _runs(present: list[bool], max_gap: int = 2) -> list[tuple[int, int]]:
    """[start, stop) of the runs of True, bridging gaps of up to max_gap frames."""
    runs: list[list[int]] = []
    for t, p in enumerate(present):
        if not p:
            continue
        if runs and t - runs[-1][1] <= max_gap:
            runs[-1][1] = t + 1
        else:
            runs.append([t, t + 1])
    return [(a, b) for a, b in runs]


def consistency(reports: list[FrameReport]) -> dict:
    """Identity (shape) and attribute (size) stability of every detected colour; means over colours."""
    identity, attribute = {}, {}
    for colour in _COLOUR_NAMES:
        dets = [r.entities.get(colour) for r in reports]
        full = [d for d in dets if d is not None and d.full]
        if len(full) < 2:
            continue
        identity[colour] = _majority([d.shape for d in full])[1]
        shares = []
        for a, b in _runs([d is not None for d in dets]):
            sizes = [d.size for d in dets[a:b] if d is not None and d.full]
            if sizes:
                shares.append((_majority(sizes)[1], len(sizes)))
        attribute[colour] = sum(s * n for s, n in shares) / sum(n for _, n in shares)
    return {"identity_stability": float(np.mean(list(identity.values()))) if identity else None,
            "attribute_stability": float(np.mean(list(attribute.values()))) if attribute else None,
            "per_colour": {c: {"identity": identity[c], "attribute": attribute[c]} for c in identity}}


def _sizes_in(reports: list[FrameReport], colour: str, frames: range) -> list[str]:
    out = []
    for p in frames:
        if p < len(reports):
            d = reports[p].entities.get(colour)
            if d is not None and d.full:
                out.append(d.size)
    return out


def return_matches(reports: list[FrameReport], script: Script) -> list[dict]:
    """For each 'return' event of the script: the size at first appearance vs after the return.

    First appearance: the wholly visible frames of the entity's first stay (up to its first leave);
    return: the wholly visible frames from EVENT_FRAMES after the return to its next leave (or the end).
    ``match`` is None when either size could not be read (the entity was never wholly visible there).
    """
    out = []
    for ev in script.events:
        if ev.kind != "return":
            continue
        colour = script.kinds[ev.entity][0]
        mine = [e for e in script.events if e.entity == ev.entity]
        arrive = next((e.frame for e in mine if e.kind == "enter"), 0)
        first_leave = next(e.frame for e in mine if e.kind == "leave")
        next_leave = next((e.frame for e in mine if e.kind == "leave" and e.frame > ev.frame), script.num_frames)
        before = _sizes_in(reports, colour, range(first_pixel_frame(arrive), first_pixel_frame(first_leave)))
        after = _sizes_in(reports, colour, range(first_pixel_frame(ev.frame + EVENT_FRAMES),
                                                 first_pixel_frame(next_leave)))
        first, _ = _majority(before)
        back, _ = _majority(after)
        out.append({"colour": colour, "frame": ev.frame, "first": first, "returned": back,
                    "match": None if first is None or back is None else first == back})
    return out


# ----------------------------------------------------------------------------------------------
# a written video
# ----------------------------------------------------------------------------------------------


def judge_frames(frames: np.ndarray, prompts: list[str], switch_frames: list[int], num_latent_frames: int) -> dict:
    """The judge on decoded frames [T, H, W, 3] uint8 of an interactive video: adherence (mean over segments),
    per segment, and the consistency scores."""
    reports = detect(frames)
    segments = segment_adherence(reports, prompts, switch_frames, num_latent_frames)
    stable = consistency(reports)
    return {"adherence": float(np.mean(segments)), "per_segment": segments,
            "identity_stability": stable["identity_stability"], "attribute_stability": stable["attribute_stability"]}


def judge_video(path: str | Path) -> dict:
    """judge_frames on a written mp4 and the prompts / switch frames of its sidecar json."""
    import imageio.v3 as iio

    from rollout.video import sidecar_path

    path = Path(path)
    meta_path = sidecar_path(path)
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path} (the prompts and switch frames of {path.name}) is missing")
    meta = json.loads(meta_path.read_text())
    for prompt in meta["prompts"]:
        parse(prompt)  # a prompt outside the toy grammar is an error naming it, not a score of 0
    result = judge_frames(iio.imread(path), meta["prompts"], meta["switch_frames"], meta["num_latent_frames"])
    return {"video": str(path), **result, "prompts": meta["prompts"]}
