"""bench/toy_teacher.py and the SDEdit start of toyworld.sampling.euler_sample: strength 1 is the ordinary sample,
a small strength only refines the clip it is given, and the judge's columns read a rendered clip correctly."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))

import toy_teacher  # noqa: E402
from model.wan import CausalWanModel  # noqa: E402
from toyworld.configs import Artifacts, teacher_model_config  # noqa: E402
from toyworld.data import window_prompt  # noqa: E402
from toyworld.evaluate import teacher_windows, window_clip  # noqa: E402
from toyworld.language import parse  # noqa: E402
from toyworld.sampling import euler_sample  # noqa: E402

FRAMES = 3


def _random_teacher():
    torch.manual_seed(0)
    model = CausalWanModel(teacher_model_config()).eval()
    text = torch.randn(2, 8, model.cfg.text_dim)
    return model, text, torch.zeros(1, 8, model.cfg.text_dim)


def test_strength_one_is_the_pure_noise_sample():
    model, text, uncond = _random_teacher()
    clean = torch.randn(2, FRAMES, 4, 16, 16)
    plain = euler_sample(model, text, uncond, seed=3, frames=FRAMES, steps=6, guidance=1.0)
    sdedit = euler_sample(model, text, uncond, seed=3, frames=FRAMES, steps=6, guidance=1.0, start=clean, start_sigma=1.0)
    torch.testing.assert_close(sdedit, plain)


def test_a_small_strength_only_refines_the_start():
    """From sigma 0.05 the ODE moves x by at most 0.05 x |flow| (the Euler steps' sigmas sum to 0.05), so the result
    stays near the clean clip; from pure noise it does not."""
    model, text, uncond = _random_teacher()
    clean = torch.randn(2, FRAMES, 4, 16, 16)
    near = euler_sample(model, text, uncond, seed=3, frames=FRAMES, steps=40, guidance=0.0, start=clean,
                        start_sigma=0.05)
    far = euler_sample(model, text, uncond, seed=3, frames=FRAMES, steps=40, guidance=0.0, start=clean,
                       start_sigma=1.0)
    assert (near - clean).pow(2).mean() < 0.05 * (far - clean).pow(2).mean()
    with pytest.raises(ValueError, match="start_sigma"):
        euler_sample(model, text, uncond, seed=3, frames=FRAMES, start=clean, start_sigma=0.0)


def test_read_clip_on_ground_truth_and_on_a_wrong_prompt():
    script, world, a = teacher_windows(2)[1]  # "a green square joins the blue square on the black background"
    clip = window_clip(world, a)
    prompt = window_prompt(script, a)
    right = toy_teacher.read_clip(clip, prompt)
    assert right == {"adherence": 1.0, "present": 1.0, "spurious": 0.0}
    # the same frames read against a prompt naming none of their colours: nothing prompted is present, every
    # entity on screen is spurious
    shown = {c for c, _ in parse(prompt).present}
    other = next(c for c in ("red", "green", "blue", "yellow") if c not in shown)
    background = parse(prompt).background
    wrong = toy_teacher.read_clip(clip, f"a {other} circle on a {background} background")
    assert wrong["present"] == 0 and wrong["spurious"] > 0.5


@pytest.mark.skipif(not Artifacts().teacher.is_file(), reason="no trained teacher under toyworld/weights")
def test_bench_table_has_every_cell(tmp_path, capsys):
    result = toy_teacher.main(["--clips", "1", "--guidance", "0", "--strengths", "1", "0.5", "--steps", "3",
                               "--out", str(tmp_path / "t.json")])
    assert [(r["strength"], r["guidance"]) for r in result["rows"]] == [(1.0, 0.0), (0.5, 0.0)]
    assert all(0 <= r["adherence"] <= 1 and r["spurious"] >= 0 for r in result["rows"])
    assert (tmp_path / "t.json").is_file() and "spurious" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        toy_teacher.main(["--strengths", "1.5"])
