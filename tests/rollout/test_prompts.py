"""Prompt scripts, training prompt files and switch frames: formats, defaults and every error path."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from rollout.prompts import (
    BUILTIN_PROMPT_PAIRS,
    PromptScript,
    load_interactive_script,
    load_training_prompts,
    resolve_switch_frames,
    sample_switch_frame,
)
from slotmem.config import RolloutConfig
from slotmem.errors import InputError


def _write(tmp_path, name, lines):
    p = tmp_path / name
    p.write_text("\n".join(lines) + "\n")
    return p


# ----------------------------------------------------------------------------------------------
# interactive scripts
# ----------------------------------------------------------------------------------------------


def test_one_prompt_per_line(tmp_path):
    p = _write(tmp_path, "s.jsonl", [json.dumps({"prompt": "a fox"}), "", json.dumps({"prompt": " the fox jumps "})])
    assert load_interactive_script(p) == PromptScript(("a fox", "the fox jumps"), None)


def test_one_prompt_per_line_with_switch_frames(tmp_path):
    p = _write(tmp_path, "s.jsonl", [json.dumps({"prompt": "a", "switch_frame": 0}),
                                     json.dumps({"prompt": "b", "switch_frame": 60}),
                                     json.dumps({"prompt": "c", "switch_frame": 150})])
    assert load_interactive_script(p) == PromptScript(("a", "b", "c"), (60, 150))


def test_memflow_script_lines_and_index(tmp_path):
    scripts = [[f"s{i} p{j}" for j in range(6)] for i in range(3)]
    p = _write(tmp_path, "bench.jsonl", [json.dumps({"prompts": s}) for s in scripts])
    assert load_interactive_script(p).prompts == tuple(scripts[0])
    assert load_interactive_script(p, index=2).prompts == tuple(scripts[2])
    with pytest.raises(InputError, match=r"holds 3 script\(s\); index 3 is out of range"):
        load_interactive_script(p, index=3)
    q = _write(tmp_path, "with_frames.jsonl", [json.dumps({"prompts": ["a", "b"], "switch_frames": [30]})])
    assert load_interactive_script(q) == PromptScript(("a", "b"), (30,))


@pytest.mark.parametrize(
    "lines, message",
    [
        ([], "is empty"),
        (['{"prompt": "a"', ], r"s.jsonl:1: invalid JSON"),
        (['["a", "b"]'], r"s.jsonl:1: expected a JSON object, got list"),
        (['{"prompt": "a"}', '{"text": "b"}'], r"s.jsonl:2: expected \{\"prompt\""),
        (['{"prompt": "a"}', '{"prompt": ""}'], r"s.jsonl:2: 'prompt' must be a non-empty string"),
        (['{"prompt": "a"}', '{"prompt": "b", "switch_frames": 3}'],
         r"s.jsonl:2: unknown key\(s\) \['switch_frames'\]"),
        (['{"prompt": "a", "switch_frame": 9}', '{"prompt": "b"}'], r"s.jsonl:1: the first prompt starts at frame 0"),
        (['{"prompt": "a"}', '{"prompt": "b", "switch_frame": 30}', '{"prompt": "c"}'],
         r"s.jsonl:3: 'switch_frame' is missing"),
        (['{"prompt": "a"}', '{"prompt": "b", "switch_frame": "30"}'], r"s.jsonl:2: 'switch_frame' must be an integer"),
        (['{"prompts": ["a", "b"]}', '{"prompt": "c"}'], r"s.jsonl:2: expected \{\"prompts\".*do not mix"),
        (['{"prompts": []}'], r"s.jsonl:1: 'prompts' must be a non-empty list"),
        (['{"prompts": ["a", 3]}'], r"s.jsonl:1: 'prompts\[\]' must be a non-empty string"),
        (['{"prompts": ["a"], "switch_frames": 4}'], r"s.jsonl:1: 'switch_frames' must be a list"),
    ],
)
def test_interactive_script_errors_name_file_and_line(tmp_path, lines, message):
    p = tmp_path / "s.jsonl"
    p.write_text("\n".join(lines))
    with pytest.raises(InputError, match=message):
        load_interactive_script(p)


def test_interactive_missing_file_and_misplaced_index(tmp_path):
    with pytest.raises(InputError, match="--prompts: prompt file .* does not exist"):
        load_interactive_script(tmp_path / "nope.jsonl")
    p = _write(tmp_path, "s.jsonl", ['{"prompt": "a"}'])
    with pytest.raises(InputError, match="index .* applies only to"):
        load_interactive_script(p, index=1)


# ----------------------------------------------------------------------------------------------
# training prompt file
# ----------------------------------------------------------------------------------------------


def test_training_prompt_file_formats(tmp_path):
    p = _write(tmp_path, "train.txt", ["# comment", "a cat sleeps", "", "a dog runs || the dog swims",
                                       json.dumps({"prompts": ["x", "y", "z"]})])
    assert load_training_prompts(p) == [("a cat sleeps",), ("a dog runs", "the dog swims"), ("x", "y", "z")]


def test_builtin_prompts_are_pairs_sharing_their_subject():
    scripts = load_training_prompts("")
    assert scripts == [tuple(p) for p in BUILTIN_PROMPT_PAIRS] and len(scripts) >= 10
    assert len({a for a, _ in scripts}) == len(scripts)
    for a, b in scripts:
        # the follow-up prompt reuses content words of the first (same entity, new event)
        words = lambda s: {w for w in s.split() if len(w) > 3}  # noqa: E731
        assert len(words(a) & words(b)) >= 2, (a, b)


@pytest.mark.parametrize(
    "lines, message",
    [
        (["a || "], r"train.txt:1: empty prompt around '\|\|'"),
        (["ok", '{"prompt": "a"}'], r"train.txt:2: a JSON line must be \{\"prompts\""),
        (['{"prompts": "a"}'], r"train.txt:1: 'prompts' must be a non-empty list"),
        (["{bad json"], r"train.txt:1: invalid JSON"),
        (["# only a comment"], r"rollout.prompt_file: .* contains no prompts"),
    ],
)
def test_training_prompt_file_errors(tmp_path, lines, message):
    p = _write(tmp_path, "train.txt", lines)
    with pytest.raises(InputError, match=message):
        load_training_prompts(p)


def test_training_prompt_file_missing(tmp_path):
    with pytest.raises(InputError, match="rollout.prompt_file: prompt file .* does not exist"):
        load_training_prompts(tmp_path / "nope.txt")


# ----------------------------------------------------------------------------------------------
# switch frames
# ----------------------------------------------------------------------------------------------


def test_default_switch_frames_round_up_to_chunk_starts():
    # Appendix A.3 defaults 40, 80, 120, 160, 200 act at the first 3-frame chunk starting at or after them
    assert resolve_switch_frames(6, 240) == [42, 81, 120, 162, 201]
    assert resolve_switch_frames(3, 240) == [42, 81]  # first num_prompts - 1 defaults
    assert resolve_switch_frames(1, 120) == []
    assert resolve_switch_frames(3, 240, chunk=1) == [40, 80]


def test_more_prompts_than_defaults_spread_evenly():
    frames = resolve_switch_frames(8, 240)  # 80 chunks shared by 8 prompts: every 10 chunks
    assert frames == [30, 60, 90, 120, 150, 180, 210]
    # defaults that do not fit the video also fall back to the even spread (20 chunks / 3 prompts)
    assert resolve_switch_frames(3, 60) == [21, 39]
    with pytest.raises(InputError, match="5 prompts do not fit in 9 latent frames"):
        resolve_switch_frames(5, 9)


def test_given_switch_frames_are_validated_and_rounded():
    assert resolve_switch_frames(3, 240, [21, 100]) == [21, 102]
    with pytest.raises(InputError, match="unsorted"):
        resolve_switch_frames(3, 240, [120, 60])
    with pytest.raises(InputError, match="unsorted"):
        resolve_switch_frames(3, 240, [60, 60])
    with pytest.raises(InputError, match="out of range"):
        resolve_switch_frames(2, 240, [0])
    with pytest.raises(InputError, match="out of range .*beyond the video"):
        resolve_switch_frames(2, 240, [240])
    with pytest.raises(InputError, match="3 prompts need 2 switch frames, got 1"):
        resolve_switch_frames(3, 240, [60])
    with pytest.raises(InputError, match="3 prompts need 2 switch frames, got 3"):
        resolve_switch_frames(3, 240, [60, 90, 120])
    with pytest.raises(InputError, match="must be integers"):
        resolve_switch_frames(2, 240, [60.0])
    with pytest.raises(InputError, match="at least one prompt"):
        resolve_switch_frames(0, 240)


def test_rounding_that_leaves_the_video_or_merges_switches_is_rejected():
    with pytest.raises(InputError, match="switch frame 239 acts at chunk start 240, beyond the video"):
        resolve_switch_frames(2, 240, [239])
    with pytest.raises(InputError, match="switch frames 40 and 41 fall in the same 3-frame chunk"):
        resolve_switch_frames(3, 240, [40, 41])
    with pytest.raises(InputError, match="^prompts.jsonl: "):
        resolve_switch_frames(2, 240, [0], source="prompts.jsonl")


def test_sample_switch_frame_modes_and_generators():
    cfg = RolloutConfig()
    choices = set(cfg.switch_choices)  # 21, 39, ..., 201 (Appendix A.1), all chunk starts
    for rng in (random.Random(0), np.random.default_rng(0), torch.Generator().manual_seed(0)):
        drawn = {sample_switch_frame(rng, cfg) for _ in range(200)}
        assert drawn == choices  # 200 draws over 11 choices hit every one (p(miss) < 1e-8)
    assert sample_switch_frame(random.Random(5), RolloutConfig(switch_mode="fixed")) == cfg.switch_choices[0]
    # the same seed gives the same draw (trajectory seeds are reproducible)
    assert sample_switch_frame(random.Random(3), cfg) == sample_switch_frame(random.Random(3), cfg)
    # a choice between chunk starts acts at the next chunk start
    assert sample_switch_frame(random.Random(0), RolloutConfig(switch_mode="fixed", switch_choices=(40,))) == 42
