"""Prompt scripts of the toy world and the videos that act them out.

A ``Script`` is what a user (or a prompt file) can say: background, the entities' colours and shapes,
which are visible at the start, the events, the segment prompts and the switch frames. ``Script.world``
adds what no prompt says -- each entity's size (the hidden attribute) and the motion -- so many
videos act out one script. Events start 1-4 latent frames into the segment whose prompt announces
them (the switch chunk's first frames) and complete within EVENT_FRAMES, well inside the segment.

Generators, each deterministic in its integer seed (a separate random stream per generator):
  two_prompt_script       training pairs ``prompt_a || prompt_b`` with a switch from {21, 39, ..., 201}
                          (Appendix A.1): static -> leave, static -> enter, leave -> return
  interactive_script      six prompts over 60 s, switches at Appendix A.3's 40, 80, ..., 200 rounded up to
                          chunk starts (42, 81, 120, 162, 201), at least one leave followed by its return
  memory_script           six prompts built around leave-and-return: an entity leaves and returns 30-75
                          latent frames later (far beyond the 12-frame attention window), sometimes twice
  training_script         the mixture the models train on (half two-prompt, half six-prompt)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rollout.prompts import resolve_switch_frames
from slotmem.config import INTERACTIVE_SWITCH_FRAMES, TRAIN_SWITCH_CHOICES
from toyworld.language import Kind, describe
from toyworld.palette import BACKGROUNDS, CHUNK, COLOURS, LATENT_FRAMES, SHAPES, SIZES
from toyworld.world import EVENT_FRAMES, EntitySpec, Event, WorldSpec

MAX_ENTITIES = 3  # per video, arrivals included: at most three visible at once
EVENT_OFFSET = (1, 5)  # an event starts this many latent frames (low inclusive, high exclusive) into its segment
# random stream per generator: numpy SeedSequence entropy [tag, seed]
_TAGS = {"two_prompt": 1, "interactive": 2, "memory": 3, "training": 4, "world": 5}


def _rng(tag: str, seed: int) -> np.random.Generator:
    return np.random.default_rng([_TAGS[tag], seed])


@dataclass(frozen=True)
class Script:
    background: str
    kinds: tuple[Kind, ...]  # (colour, shape) of every entity of the video
    initial: tuple[int, ...]  # entities visible at frame 0
    events: tuple[Event, ...]
    prompts: tuple[str, ...]
    switch_frames: tuple[int, ...]  # effective latent frames (chunk starts), one per prompt after the first
    num_frames: int = LATENT_FRAMES

    def segments(self) -> list[tuple[int, int]]:
        """[start, stop) latent frames of every prompt's segment."""
        edges = [0, *self.switch_frames, self.num_frames]
        return list(zip(edges, edges[1:]))

    def segment_event(self, index: int) -> Event | None:
        lo, hi = self.segments()[index]
        found = [ev for ev in self.events if lo <= ev.frame < hi]
        return found[0] if found else None

    def world(self, seed: int) -> WorldSpec:
        """One video of this script: sizes (hidden) and motion drawn from ``seed``."""
        rng = _rng("world", seed)
        sizes = [str(rng.choice(list(SIZES))) for _ in self.kinds]
        return WorldSpec(background=self.background,
                         entities=tuple(EntitySpec(c, s, z) for (c, s), z in zip(self.kinds, sizes)),
                         initial=self.initial, events=self.events, num_frames=self.num_frames,
                         motion_seed=int(rng.integers(2**31)))


# ----------------------------------------------------------------------------------------------
# building a script from a plan of events
# ----------------------------------------------------------------------------------------------


def _draw_cast(rng: np.random.Generator, count: int) -> tuple[str, tuple[Kind, ...]]:
    background = str(rng.choice(list(BACKGROUNDS)))
    colours = rng.choice(list(COLOURS), size=count, replace=False)
    return background, tuple((str(c), str(rng.choice(SHAPES))) for c in colours)


def _build(rng: np.random.Generator, background: str, kinds: tuple[Kind, ...], initial: tuple[int, ...],
           plan: list[tuple[str, int] | None], switch_frames: list[int], num_frames: int) -> Script:
    """plan[k]: the event (kind, entity) of segment k or None; prompts follow the plan."""
    edges = [0, *switch_frames, num_frames]
    visible = list(initial)
    events, prompts = [], []
    for k, step in enumerate(plan):
        if step is None:
            prompts.append(describe(background, [kinds[i] for i in visible]))
            continue
        kind, entity = step
        frame = edges[k] + int(rng.integers(*EVENT_OFFSET))
        if frame + EVENT_FRAMES > edges[k + 1]:
            raise ValueError(f"segment {k} [{edges[k]}, {edges[k + 1]}) is too short for an event")
        events.append(Event(frame=frame, kind=kind, entity=entity))
        if kind == "leave":
            visible.remove(entity)
        prompts.append(describe(background, [kinds[i] for i in visible], kind, kinds[entity]))
        if kind != "leave":
            visible.append(entity)
    return Script(background=background, kinds=kinds, initial=tuple(initial), events=tuple(events),
                  prompts=tuple(prompts), switch_frames=tuple(switch_frames), num_frames=num_frames)


def _random_plan(rng: np.random.Generator, num_entities: int, initial: list[int], num_segments: int):
    """Segment 0 static, then per segment one of: nothing, leave, return, enter."""
    visible, gone, unseen = list(initial), [], [i for i in range(num_entities) if i not in initial]
    plan: list[tuple[str, int] | None] = [None]
    for _ in range(1, num_segments):
        options: list[tuple[float, tuple[str, int] | None]] = [(1.0, None)]
        options += [(1.5 / len(visible), ("leave", i)) for i in visible]
        options += [(2.5 / len(gone), ("return", i)) for i in gone]
        options += [(1.5 / len(unseen), ("enter", i)) for i in unseen]
        weights = np.array([w for w, _ in options])
        step = options[int(rng.choice(len(options), p=weights / weights.sum()))][1]
        plan.append(step)
        if step is not None:
            kind, i = step
            (visible if kind == "leave" else gone if kind == "return" else unseen).remove(i)
            (gone if kind == "leave" else visible).append(i)
    return plan


def _has_leave_and_return(plan) -> bool:
    left = {s[1] for s in plan if s is not None and s[0] == "leave"}
    return any(s is not None and s[0] == "return" and s[1] in left for s in plan)


def interactive_switch_frames(num_prompts: int = 6, num_frames: int = LATENT_FRAMES) -> list[int]:
    """Appendix A.3's switches rounded up to chunk starts as the rollout does: [42, 81, 120, 162, 201]."""
    return resolve_switch_frames(num_prompts, num_frames, default=INTERACTIVE_SWITCH_FRAMES, chunk=CHUNK)


# ----------------------------------------------------------------------------------------------
# the generators
# ----------------------------------------------------------------------------------------------


def two_prompt_script(seed: int, num_frames: int = LATENT_FRAMES) -> Script:
    """A training pair: static -> leave, static -> enter, or leave -> return, with its switch frame."""
    rng = _rng("two_prompt", seed)
    form = str(rng.choice(["leave", "enter", "leave_return"]))
    choices = [f for f in TRAIN_SWITCH_CHOICES if f + EVENT_FRAMES < num_frames]
    if form == "leave_return":  # away >= 40 latent frames: the switch is at least 57
        choices = [f for f in choices if f >= 57]
    switch = resolve_switch_frames(2, num_frames, [int(rng.choice(choices))], chunk=CHUNK)
    count = int(rng.integers(2 if form == "enter" else 1, MAX_ENTITIES + 1))
    background, kinds = _draw_cast(rng, count)
    if form == "enter":
        initial, plan = list(range(count - 1)), [None, ("enter", count - 1)]
    else:
        subject = int(rng.integers(count))
        initial = list(range(count))
        plan = [None, ("leave", subject)] if form == "leave" else [("leave", subject), ("return", subject)]
    return _build(rng, background, kinds, tuple(initial), plan, switch, num_frames)


def interactive_script(seed: int, num_frames: int = LATENT_FRAMES) -> Script:
    """Six prompts over 60 s with random events, at least one leave and its return."""
    rng = _rng("interactive", seed)
    switches = interactive_switch_frames(6, num_frames)
    while True:  # rejection keeps the script a function of the seed alone
        count = int(rng.integers(1, MAX_ENTITIES + 1))
        n_initial = int(rng.integers(1, count + 1))
        plan = _random_plan(rng, count, list(range(n_initial)), 6)
        if _has_leave_and_return(plan):
            break
    background, kinds = _draw_cast(rng, count)
    return _build(rng, background, kinds, tuple(range(n_initial)), plan, switches, num_frames)


# leave-and-return plans over six segments (A, B: entities 0 and 1); the away time is one or two segments
MEMORY_PLANS = (
    [None, ("leave", 0), ("return", 0), ("leave", 1), ("return", 1), None],
    [None, ("leave", 0), None, ("return", 0), None, None],
    [None, ("leave", 0), None, ("return", 0), ("leave", 1), ("return", 1)],
)


def memory_script(seed: int, num_frames: int = LATENT_FRAMES) -> Script:
    """Six prompts built around an entity leaving and coming back (the entity-memory benchmark)."""
    rng = _rng("memory", seed)
    plan = MEMORY_PLANS[int(rng.integers(len(MEMORY_PLANS)))]
    count = int(rng.integers(2, MAX_ENTITIES + 1))
    background, kinds = _draw_cast(rng, count)
    return _build(rng, background, kinds, tuple(range(count)), list(plan), interactive_switch_frames(6, num_frames),
                  num_frames)


def training_script(seed: int, num_frames: int = LATENT_FRAMES) -> Script:
    """The models' training mixture: half two-prompt pairs, half six-prompt interactive scripts."""
    rng = _rng("training", seed)
    sub = int(rng.integers(2**31))
    return two_prompt_script(sub, num_frames) if rng.random() < 0.5 else interactive_script(sub, num_frames)
