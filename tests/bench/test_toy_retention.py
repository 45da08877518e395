"""bench/toy_retention.py (memory_retention.py --policy): token labels from the world's own geometry, every memory
token read traced back to the token it copies, and a published policy's memory tensors loaded for the slot row."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))

import toy_retention  # noqa: E402
from toyworld.configs import Artifacts  # noqa: E402
from toyworld.palette import BACKGROUNDS, COLOURS  # noqa: E402
from toyworld.sampling import student_generator  # noqa: E402
from toyworld.scripts import memory_script  # noqa: E402
from toyworld.world import render, simulate  # noqa: E402

needs_weights = pytest.mark.skipif(not Artifacts().causal_base.is_file(),
                                   reason="no trained artifacts under toyworld/weights (run `make toyworld`)")


def test_token_labels_agree_with_the_rendered_pixels():
    """Independent of the geometry: render() blends each entity over the background as bg (1 - c) + colour c, so a
    pixel's coverage by entity e is its projection on the background -> colour line; a token's coverage is the mean
    over its 16x16 pixels and its latent frame's 4 pixel frames."""
    spec = memory_script(5).world(5)
    trace = simulate(spec)
    frames = render(spec, trace=trace).astype(np.float64)  # [T, 64, 64, 3]
    bg = np.array(BACKGROUNDS[spec.background], dtype=np.float64)
    labels = toy_retention.token_labels(spec, trace, 40, grid=4)  # [40, 16]
    agree, labelled = [], 0
    for f in range(1, 40):  # latent f holds pixel frames 4f-3 .. 4f
        clip = frames[4 * f - 3:4 * f + 1]  # [4, 64, 64, 3]
        cover = []
        for e in spec.entities:
            line = np.array(COLOURS[e.colour]) - bg
            alpha = np.clip((clip - bg) @ line / (line @ line), 0, 1)  # [4, 64, 64]
            cover.append(alpha.mean(0).reshape(4, 16, 4, 16).mean((1, 3)).reshape(-1))  # [16] tokens
        cover = np.stack(cover)  # [E, 16]
        expect = np.where(cover.max(0) >= toy_retention.LABEL_COVERAGE, cover.argmax(0), -1)
        clear = np.abs(cover.max(0) - toy_retention.LABEL_COVERAGE) > 0.02  # not on the threshold (uint8 rounding)
        agree += list((expect == labels[f])[clear])
        labelled += int((labels[f] >= 0).sum())
    assert labelled > 20 and np.mean(agree) > 0.98, (labelled, np.mean(agree))


def test_policy_memory_tensors_are_loaded_and_the_backbone_kept(tmp_path):
    if not Artifacts().causal_base.is_file():
        pytest.skip("no trained artifacts")
    base = student_generator(Artifacts().causal_base)
    state = {k: (v + 1.0 if k.startswith("memory.") else v - 1.0) for k, v in base.state_dict().items()}
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "model.safetensors")
    loaded = student_generator(Artifacts().causal_base, policy=tmp_path / "model.safetensors").state_dict()
    for k, v in base.state_dict().items():
        assert torch.equal(loaded[k], state[k] if k.startswith("memory.") else v), k


@needs_weights
def test_every_kind_reads_copies_of_labelled_tokens():
    # three prompts of one script: one scripted return; KeyLog raises KeyError on a memory token it never saw written
    rows = {r["name"]: r for r in toy_retention.toy_retention(None, scripts=1, segments=3)}
    assert list(rows) == ["none", "frame_bank", "slot"]
    assert rows["none"]["memory_tokens_per_read"] == 0 and rows["none"]["entity_recall"] in (0.0, None)
    # equal memory budgets: 3 frames x 16 tokens, 12 items x 4 tokens (configs/tiny.yaml)
    assert rows["frame_bank"]["memory_tokens_per_read"] == rows["slot"]["memory_tokens_per_read"] == 48
    assert all(r["returns"] == rows["slot"]["returns"] for r in rows.values())
    for r in rows.values():
        assert 0 <= r["entity_share"] <= 1 and r["s_per_chunk"] > 0
        if r["entity_recall"] is not None:
            assert r["interval_95"][0] <= r["entity_recall"] <= r["interval_95"][1]
