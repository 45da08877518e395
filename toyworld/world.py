"""The toy world's physics and renderer: 64x64 RGB videos of 1-3 entities bouncing on a background.

A ``WorldSpec`` fixes everything about one video: background, entities (colour, shape and the hidden
size), which entities are visible at frame 0, the leave / return / enter events (at latent frames) and
the motion seed. ``simulate`` steps the entities once per pixel frame (16 fps):

    in        moves and bounces off the four walls (WALL_MARGIN inside the border)
    leaving   (a ``leave`` event) turns towards the nearest wall at LEAVE_SPEED and exits, no bouncing
    out       invisible; nothing moves
    entering  (``return`` / ``enter``) starts just outside a random wall and moves inwards at ENTER_SPEED,
              bouncing only on the axis it is already inside; 'in' once wholly inside

Every event completes within EVENT_FRAMES latent frames, so a prompt that announces an event in its
first few frames describes the end state of its segment. ``render`` draws the entities in index order
(later ones occlude earlier ones) with 2x2 supersampling, so edges blend like a camera's would.
Everything is deterministic in the spec.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from toyworld.palette import BACKGROUNDS, COLOURS, FRAME_SIZE, SHAPES, SIZES, first_pixel_frame, pixel_frames

INIT_SPEED = (0.5, 1.0)  # px per pixel frame: a 21-latent-frame clip (81 px frames) crosses 40-80 px
LEAVE_SPEED = 1.5  # px per pixel frame along the exit normal: out of the frame in <= 27 px frames
ENTER_SPEED = 1.0  # px per pixel frame
ENTER_MAX_ANGLE = math.radians(50)  # entering direction within +-50 deg of the inward normal
EVENT_FRAMES = 10  # latent frames within which every leave / return / enter has completed
EVENT_KINDS = ("leave", "return", "enter")
WALL_MARGIN = 1.0  # px: bouncing entities keep this gap to the border, so touching it means leaving/entering
SUPERSAMPLE = 2  # samples per pixel and axis

_IN, _LEAVING, _OUT, _ENTERING = range(4)


@dataclass(frozen=True)
class EntitySpec:
    colour: str
    shape: str
    size: str  # the hidden attribute: 'small' or 'large'

    @property
    def kind(self) -> tuple[str, str]:
        """What a prompt can say about it: (colour, shape)."""
        return self.colour, self.shape


@dataclass(frozen=True)
class Event:
    frame: int  # latent frame at which the event starts
    kind: str  # 'leave', 'return' or 'enter'
    entity: int  # index into WorldSpec.entities


@dataclass(frozen=True)
class WorldSpec:
    background: str
    entities: tuple[EntitySpec, ...]
    initial: tuple[int, ...]  # entities visible at frame 0
    events: tuple[Event, ...]  # sorted by frame
    num_frames: int  # latent frames
    motion_seed: int

    def __post_init__(self):
        if self.background not in BACKGROUNDS:
            raise ValueError(f"WorldSpec.background must be one of {sorted(BACKGROUNDS)}, got {self.background!r}")
        for e in self.entities:
            if e.colour not in COLOURS or e.shape not in SHAPES or e.size not in SIZES:
                raise ValueError(f"WorldSpec.entities: unknown colour/shape/size in {e}")
        colours = [e.colour for e in self.entities]
        if len(set(colours)) != len(colours):
            raise ValueError(f"WorldSpec.entities: colours must be distinct within a video, got {colours}")
        if self.num_frames < 1:
            raise ValueError(f"WorldSpec.num_frames must be >= 1, got {self.num_frames}")
        frames = [ev.frame for ev in self.events]
        if frames != sorted(frames) or any(not 0 < f < self.num_frames for f in frames):
            raise ValueError(f"WorldSpec.events must be sorted and inside (0, {self.num_frames}), got {frames}")
        # an entity's life: never seen -> (enter) -> in -> (leave) -> out -> (return) -> in ...
        state = {i: ("in" if i in self.initial else "unseen") for i in range(len(self.entities))}
        allowed = {"leave": "in", "return": "out", "enter": "unseen"}
        for ev in self.events:
            if ev.kind not in EVENT_KINDS or not 0 <= ev.entity < len(self.entities):
                raise ValueError(f"WorldSpec.events: bad event {ev}")
            if state[ev.entity] != allowed[ev.kind]:
                raise ValueError(f"WorldSpec.events: {ev.kind} of entity {ev.entity} while it is {state[ev.entity]}")
            state[ev.entity] = "out" if ev.kind == "leave" else "in"
        for a, b in zip(self.events, self.events[1:]):
            if b.frame - a.frame < EVENT_FRAMES:
                raise ValueError(f"WorldSpec.events: {a} and {b} are closer than EVENT_FRAMES={EVENT_FRAMES} "
                                 f"latent frames (an event must complete before the next starts)")

    @property
    def num_pixel_frames(self) -> int:
        return pixel_frames(self.num_frames)


@dataclass
class Trace:
    """Ground truth of a simulated video, per pixel frame T and entity E."""

    centre: np.ndarray  # [T, E, 2] float (x, y) in pixels, origin at the top-left corner
    visible: np.ndarray  # [T, E] bool: some part of the entity is inside the frame
    full: np.ndarray  # [T, E] bool: the whole entity is inside the frame, WALL_MARGIN from the border


# ----------------------------------------------------------------------------------------------
# physics
# ----------------------------------------------------------------------------------------------


def _bounce(pos: np.ndarray, vel: np.ndarray, half: float, axes) -> None:
    """Reflect pos/vel in place off the walls of the given axes."""
    for a in axes:
        lo, hi = half + WALL_MARGIN, FRAME_SIZE - half - WALL_MARGIN
        if pos[a] < lo:
            pos[a], vel[a] = 2 * lo - pos[a], abs(vel[a])
        elif pos[a] > hi:
            pos[a], vel[a] = 2 * hi - pos[a], -abs(vel[a])


def _inside_axes(pos: np.ndarray, half: float) -> list[int]:
    return [a for a in (0, 1) if half + WALL_MARGIN <= pos[a] <= FRAME_SIZE - half - WALL_MARGIN]


def _start_leaving(pos: np.ndarray, vel: np.ndarray) -> np.ndarray:
    # nearest wall: axis a, side s (-1 = low wall, +1 = high wall)
    dists = [(pos[0], 0, -1), (FRAME_SIZE - pos[0], 0, 1), (pos[1], 1, -1), (FRAME_SIZE - pos[1], 1, 1)]
    _, axis, side = min(dists)
    new = vel.copy()
    new[axis] = side * LEAVE_SPEED
    return new


def _start_entering(rng: np.random.Generator, half: float) -> tuple[np.ndarray, np.ndarray]:
    wall = int(rng.integers(4))  # 0 left, 1 right, 2 top, 3 bottom
    axis, side = wall // 2, (-1 if wall % 2 == 0 else 1)
    along = rng.uniform(half + 2, FRAME_SIZE - half - 2)
    angle = rng.uniform(-ENTER_MAX_ANGLE, ENTER_MAX_ANGLE)
    pos, vel = np.zeros(2), np.zeros(2)
    pos[axis] = -half if side < 0 else FRAME_SIZE + half  # just outside that wall
    pos[1 - axis] = along
    vel[axis] = -side * ENTER_SPEED * math.cos(angle)  # inwards
    vel[1 - axis] = ENTER_SPEED * math.sin(angle)
    return pos, vel


def simulate(spec: WorldSpec) -> Trace:
    """Step every entity through all pixel frames of the video."""
    rng = np.random.default_rng(spec.motion_seed)
    T, E = spec.num_pixel_frames, len(spec.entities)
    halves = [SIZES[e.size] / 2 for e in spec.entities]
    pos, vel = np.zeros((E, 2)), np.zeros((E, 2))
    mode = [_OUT] * E
    for i in spec.initial:
        pos[i] = rng.uniform(halves[i] + WALL_MARGIN, FRAME_SIZE - halves[i] - WALL_MARGIN, size=2)
        angle, speed = rng.uniform(0, 2 * math.pi), rng.uniform(*INIT_SPEED)
        vel[i] = speed * np.array([math.cos(angle), math.sin(angle)])
        mode[i] = _IN
    starts: dict[int, list[Event]] = {}
    for ev in spec.events:
        starts.setdefault(first_pixel_frame(ev.frame), []).append(ev)

    centre = np.zeros((T, E, 2))
    visible = np.zeros((T, E), dtype=bool)
    full = np.zeros((T, E), dtype=bool)
    for p in range(T):
        for ev in starts.get(p, ()):
            i = ev.entity
            if ev.kind == "leave":
                vel[i], mode[i] = _start_leaving(pos[i], vel[i]), _LEAVING
            else:
                (pos[i], vel[i]), mode[i] = _start_entering(rng, halves[i]), _ENTERING
        for i in range(E):
            if mode[i] == _OUT:
                continue
            h = halves[i]
            centre[p, i] = pos[i]
            visible[p, i] = all(-h < pos[i][a] < FRAME_SIZE + h for a in (0, 1))
            full[p, i] = len(_inside_axes(pos[i], h)) == 2
            # advance to the next frame
            inside_before = _inside_axes(pos[i], h)
            pos[i] += vel[i]
            if mode[i] == _IN:
                _bounce(pos[i], vel[i], h, (0, 1))
            elif mode[i] == _ENTERING:
                _bounce(pos[i], vel[i], h, inside_before)  # not on the axis it is still coming in along
                if len(_inside_axes(pos[i], h)) == 2:
                    mode[i] = _IN
            elif not all(-h < pos[i][a] < FRAME_SIZE + h for a in (0, 1)):  # leaving: gone once wholly outside
                mode[i] = _OUT
    return Trace(centre=centre, visible=visible, full=full)


# ----------------------------------------------------------------------------------------------
# rendering
# ----------------------------------------------------------------------------------------------

_SAMPLES = (np.arange(FRAME_SIZE * SUPERSAMPLE) + 0.5) / SUPERSAMPLE  # sample coordinates along an axis


def shape_coverage(shape: str, x: float, y: float, size: int) -> np.ndarray:
    """Fraction [H, W] of each pixel covered by the shape centred at (x, y) with the given extent."""
    h = size / 2
    sy, sx = _SAMPLES[:, None], _SAMPLES[None, :]
    if shape == "circle":
        inside = (sx - x) ** 2 + (sy - y) ** 2 <= h * h
    elif shape == "square":
        inside = (np.abs(sx - x) <= h) & (np.abs(sy - y) <= h)
    elif shape == "triangle":  # apex up, base at the bottom, as wide as it is tall
        f = (sy - (y - h)) / size  # 0 at the apex, 1 at the base
        inside = (f >= 0) & (f <= 1) & (np.abs(sx - x) <= f * h)
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")
    s = SUPERSAMPLE
    return inside.reshape(FRAME_SIZE, s, FRAME_SIZE, s).mean(axis=(1, 3))  # [H*s, W*s] -> [H, W]


def render(spec: WorldSpec, start: int = 0, stop: int | None = None, trace: Trace | None = None) -> np.ndarray:
    """Pixel frames [start, stop) of the video as uint8 [T, 64, 64, 3]."""
    trace = simulate(spec) if trace is None else trace
    stop = spec.num_pixel_frames if stop is None else stop
    if not 0 <= start < stop <= spec.num_pixel_frames:
        raise ValueError(f"render: frames [{start}, {stop}) outside the video's {spec.num_pixel_frames} pixel frames")
    bg = np.array(BACKGROUNDS[spec.background], dtype=np.float32)
    out = np.empty((stop - start, FRAME_SIZE, FRAME_SIZE, 3), dtype=np.uint8)
    for p in range(start, stop):
        img = np.broadcast_to(bg, (FRAME_SIZE, FRAME_SIZE, 3)).copy()
        for i, e in enumerate(spec.entities):
            if not trace.visible[p, i]:
                continue
            cov = shape_coverage(e.shape, *trace.centre[p, i], SIZES[e.size])[..., None].astype(np.float32)
            img = img * (1 - cov) + np.array(COLOURS[e.colour], dtype=np.float32) * cov
        out[p - start] = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    return out
