"""Prompt scripts and switch frames (DESIGN §4, Appendix A.3; LongLive/MemFlow formats).

Two inputs:
- an interactive script for ``slotmem generate --prompts FILE``: JSONL with one ``{"prompt": ...}``
  per line (optionally ``"switch_frame": N`` on every line after the first), or MemFlow's
  ``interactive_benchmark.jsonl`` format, one ``{"prompts": [...]}`` script per line (optionally
  ``"switch_frames": [...]``), of which one is chosen by index;
- the training prompt file (``rollout.prompt_file``): per line ``prompt``, ``prompt_a || prompt_b``
  or a JSONL ``{"prompts": [...]}``; blank lines and ``#`` comments are skipped; '' = a built-in list.

Switch frames are latent frame indices where the next prompt takes over. Generation runs in chunks
of ``num_frame_per_block`` (3) frames and, as in LongLive, a switch happens at the first chunk whose
start is >= the switch frame. ``resolve_switch_frames`` therefore rounds every switch frame *up* to
the next chunk start and returns those effective frames (the paper's 40, 80, 120, 160, 200 act at
42, 81, 120, 162, 201), so what is recorded is what was generated.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from slotmem.config import INTERACTIVE_SWITCH_FRAMES, RolloutConfig
from slotmem.errors import InputError

# Built-in training prompt pairs: the second prompt keeps the first one's subject and setting and adds
# one event, like the LongLive/MemFlow switch prompts, so memory has entities to carry across the switch.
BUILTIN_PROMPT_PAIRS: tuple[tuple[str, str], ...] = (
    ("a red fox walks through deep snow in a pine forest",
     "the red fox leaps over a frozen stream in the pine forest"),
    ("an old fisherman in a yellow raincoat rows a wooden boat across a foggy lake",
     "the old fisherman in the yellow raincoat pulls a silver fish into the wooden boat"),
    ("a girl with a blue umbrella walks down a rainy city street at night",
     "the girl with the blue umbrella stops under a neon sign and looks up at the rain"),
    ("a golden retriever runs along a sandy beach at sunset",
     "the golden retriever splashes into the waves and fetches a stick"),
    ("a wizard in a purple robe stands on a stone tower under a stormy sky",
     "the wizard in the purple robe raises his staff as a dragon circles the stone tower"),
    ("a chef in a white hat chops vegetables in a busy restaurant kitchen",
     "the chef in the white hat flips vegetables in a flaming pan in the restaurant kitchen"),
    ("a small green robot rolls across a cluttered workshop table",
     "the small green robot picks up a screwdriver and tightens a bolt on the workshop table"),
    ("a hot air balloon with red and white stripes floats over green hills",
     "the red and white hot air balloon drifts above a river winding through the green hills"),
    ("an astronaut in a white suit walks on the grey surface of the moon",
     "the astronaut in the white suit plants a flag beside a crater on the moon"),
    ("a black cat sits on a windowsill watching snow fall outside",
     "the black cat jumps from the windowsill onto a bookshelf as snow keeps falling"),
    ("a skateboarder in a green hoodie rides down an empty parking garage ramp",
     "the skateboarder in the green hoodie jumps over a traffic cone in the parking garage"),
    ("two children build a sandcastle on a sunny beach",
     "the two children decorate their sandcastle with shells as the tide comes in"),
)


@dataclass(frozen=True)
class PromptScript:
    """Prompts of one interactive video and, if the file gave them, their switch frames."""

    prompts: tuple[str, ...]
    switch_frames: tuple[int, ...] | None = None


# ----------------------------------------------------------------------------------------------
# reading files
# ----------------------------------------------------------------------------------------------


def _read_lines(path: str | Path, field: str) -> list[tuple[int, str]]:
    """(line number, stripped text) of the non-blank lines; a missing file names ``field``."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{field}: prompt file {str(p)!r} does not exist")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{field}: cannot read prompt file {str(p)!r}: {e}") from e
    return [(n, line.strip()) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]


def _json_object(where: str, line: str) -> dict:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise InputError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from e
    if not isinstance(obj, dict):
        raise InputError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    return obj


def _prompt_text(where: str, value, key: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise InputError(f"{where}: {key!r} must be a non-empty string, got {value!r}")
    return value.strip()


def _prompt_list(where: str, value) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise InputError(f"{where}: 'prompts' must be a non-empty list of strings, got {value!r}")
    return tuple(_prompt_text(where, v, "prompts[]") for v in value)


def _frame_value(where: str, value, key: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise InputError(f"{where}: {key!r} must be an integer latent frame, got {value!r}")
    return value


def _check_keys(where: str, obj: dict, allowed: tuple[str, ...]) -> None:
    unknown = sorted(set(obj) - set(allowed))
    if unknown:
        raise InputError(f"{where}: unknown key(s) {unknown}; allowed: {list(allowed)}")


def load_interactive_script(path: str | Path, index: int = 0) -> PromptScript:
    """Read an interactive script (module docstring); ``index`` picks one line of a ``{"prompts"}`` file."""
    lines = _read_lines(path, "--prompts")
    if not lines:
        raise InputError(f"--prompts: prompt file {str(path)!r} is empty")
    objects = [(f"{path}:{n}", _json_object(f"{path}:{n}", line)) for n, line in lines]

    if "prompts" in objects[0][1]:  # MemFlow: one script per line
        scripts = []
        for where, obj in objects:
            if "prompts" not in obj:
                raise InputError(f"{where}: expected {{\"prompts\": [...]}} like line {lines[0][0]} "
                                 f"(do not mix the two script formats)")
            _check_keys(where, obj, ("prompts", "switch_frames"))
            frames = obj.get("switch_frames")
            if frames is not None:
                if not isinstance(frames, list):
                    raise InputError(f"{where}: 'switch_frames' must be a list of integers, got {frames!r}")
                frames = tuple(_frame_value(where, f, "switch_frames[]") for f in frames)
            scripts.append(PromptScript(_prompt_list(where, obj["prompts"]), frames))
        if not isinstance(index, int) or not 0 <= index < len(scripts):
            raise InputError(f"--prompts: {str(path)!r} holds {len(scripts)} script(s); index {index!r} is out "
                             f"of range [0, {len(scripts) - 1}]")
        return scripts[index]

    # one {"prompt": ...} per line, in order
    if index != 0:
        raise InputError(f"--prompts: {str(path)!r} is one script ({{\"prompt\": ...}} per line); a script "
                         f"index ({index!r}) applies only to {{\"prompts\": [...]}} files")
    prompts, frames = [], []
    for i, (where, obj) in enumerate(objects):
        if "prompt" not in obj:
            raise InputError(f"{where}: expected {{\"prompt\": \"...\"}} (optionally with \"switch_frame\"), "
                             f"got keys {sorted(obj)}")
        _check_keys(where, obj, ("prompt", "switch_frame"))
        prompts.append(_prompt_text(where, obj["prompt"], "prompt"))
        frame = obj.get("switch_frame")
        if i == 0:
            if frame not in (None, 0):
                raise InputError(f"{where}: the first prompt starts at frame 0; 'switch_frame' {frame!r} belongs "
                                 f"on the lines of the later prompts")
        else:
            frames.append(None if frame is None else _frame_value(where, frame, "switch_frame"))
    given = [f for f in frames if f is not None]
    if given and len(given) != len(frames):
        missing = objects[1 + frames.index(None)][0]
        raise InputError(f"{missing}: 'switch_frame' is missing; give it on every prompt after the first or on "
                         f"none of them")
    return PromptScript(tuple(prompts), tuple(frames) if given else None)


def load_training_prompts(path: str | Path | None) -> list[tuple[str, ...]]:
    """Prompt scripts for training rollouts from ``rollout.prompt_file`` ('' -> BUILTIN_PROMPT_PAIRS)."""
    if not path:
        return [tuple(pair) for pair in BUILTIN_PROMPT_PAIRS]
    scripts = []
    for n, line in _read_lines(path, "rollout.prompt_file"):
        where = f"{path}:{n}"
        if line.startswith("#"):
            continue
        if line.startswith("{"):
            obj = _json_object(where, line)
            if "prompts" not in obj:
                raise InputError(f"{where}: a JSON line must be {{\"prompts\": [...]}}, got keys {sorted(obj)}")
            _check_keys(where, obj, ("prompts",))
            scripts.append(_prompt_list(where, obj["prompts"]))
        else:
            parts = tuple(part.strip() for part in line.split("||"))
            if not all(parts):
                raise InputError(f"{where}: empty prompt around '||' in {line!r}")
            scripts.append(parts)
    if not scripts:
        raise InputError(f"rollout.prompt_file: {str(path)!r} contains no prompts")
    return scripts


# ----------------------------------------------------------------------------------------------
# switch frames
# ----------------------------------------------------------------------------------------------


def chunk_start_at_or_after(frame: int, chunk: int) -> int:
    """LongLive's switch rule: the first chunk whose start is >= ``frame``."""
    return -(-frame // chunk) * chunk


def _spread(num_prompts: int, num_frames: int, chunk: int) -> list[int]:
    """num_prompts - 1 switches at (rounded) equal shares of the video's chunks."""
    num_chunks = -(-num_frames // chunk)
    return [((k * num_chunks + num_prompts // 2) // num_prompts) * chunk for k in range(1, num_prompts)]


def resolve_switch_frames(num_prompts: int, num_frames: int, given: Sequence[int] | None = None,
                          default: Sequence[int] = INTERACTIVE_SWITCH_FRAMES, chunk: int = 3,
                          source: str = "switch frames") -> list[int]:
    """Validated effective switch frames (rounded up to chunk starts) for ``num_prompts`` prompts.

    ``given`` None: the first num_prompts-1 of ``default`` (Appendix A.3: 40, 80, ..., 200) when they
    fit in the video, else the video's chunks shared evenly among the prompts.
    """
    if not isinstance(num_prompts, int) or num_prompts < 1:
        raise InputError(f"{source}: need at least one prompt, got {num_prompts!r}")
    need = num_prompts - 1
    if given is None:
        defaults = list(default[:need])
        fits = len(defaults) == need and all(chunk_start_at_or_after(f, chunk) < num_frames for f in defaults)
        frames = defaults if fits else _spread(num_prompts, num_frames, chunk)
        if len(set(frames)) != len(frames) or (frames and (frames[0] <= 0 or frames[-1] >= num_frames)):
            raise InputError(f"{source}: {num_prompts} prompts do not fit in {num_frames} latent frames "
                             f"(one prompt per {chunk}-frame chunk at most)")
        given = frames

    frames = list(given)
    for f in frames:
        if not isinstance(f, int) or isinstance(f, bool):
            raise InputError(f"{source}: switch frames must be integers, got {f!r}")
    if len(frames) != need:
        raise InputError(f"{source}: {num_prompts} prompts need {need} switch frames, got {len(frames)} "
                         f"({frames})")
    for f in frames:
        if f <= 0:
            raise InputError(f"{source}: switch frame {f} is out of range (0, {num_frames}): the first prompt "
                             f"starts at frame 0")
        if f >= num_frames:
            raise InputError(f"{source}: switch frame {f} is out of range (0, {num_frames}): beyond the video "
                             f"({num_frames} latent frames)")
    if any(b <= a for a, b in zip(frames, frames[1:])):
        raise InputError(f"{source}: switch frames are unsorted (must be strictly increasing): {frames}")

    effective = [chunk_start_at_or_after(f, chunk) for f in frames]
    for f, e in zip(frames, effective):
        if e >= num_frames:
            raise InputError(f"{source}: switch frame {f} acts at chunk start {e}, beyond the video "
                             f"({num_frames} latent frames)")
    for (a, ea), (b, eb) in zip(zip(frames, effective), zip(frames[1:], effective[1:])):
        if ea == eb:
            raise InputError(f"{source}: switch frames {a} and {b} fall in the same {chunk}-frame chunk "
                             f"(both act at frame {ea})")
    return effective


def sample_switch_frame(rng, rollout_cfg: RolloutConfig, chunk: int = 3) -> int:
    """Training rollout switch frame: ``rollout.switch_choices`` at random (LongLive random_choice) or the first.

    ``rng`` is a ``random.Random``, a ``numpy.random.Generator`` or a ``torch.Generator``.
    """
    choices = list(rollout_cfg.switch_choices)
    if rollout_cfg.switch_mode == "fixed":
        frame = choices[0]
    elif hasattr(rng, "choice"):
        frame = int(rng.choice(choices))
    else:
        import torch

        frame = choices[int(torch.randint(len(choices), (1,), generator=rng))]
    return resolve_switch_frames(2, rollout_cfg.num_frames, [frame], chunk=chunk,
                                 source="rollout.switch_choices")[0]
