"""bench/memory_retention.py: its slot grouper is trained by the project's Stage 0 objective and schedule, and the
training moves it out of collapse (a broken Stage 0 objective or schedule fails here); every memory kind runs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))

import memory_retention  # noqa: E402


def test_stage0_trains_the_grouper_and_every_kind_is_measured(tmp_path):
    out = tmp_path / "retention.json"
    result = memory_retention.main(["--out", str(out), "--streams", "4", "--segments", "6",
                                    "--calibration-streams", "8", "--stage0-steps", "30"])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    stage0 = result["stage0"]
    assert stage0["steps"] == 30
    # measured: cosine 0.96 -> 0.48, coverage 0.02 -> 0.28 in 20 updates at these sizes
    assert stage0["first"]["cosine"] > 0.8 and stage0["last10"]["cosine"] < 0.6, stage0
    assert stage0["last10"]["mask_coverage"] > stage0["first"]["mask_coverage"] + 0.15, stage0
    rows = {r["name"]: r for r in result["results"]}
    assert set(rows) == {"slot_untrained", "slot", "slot_bank3", "frame_bank", "none"}
    assert rows["none"]["entity_recall"] == 0 and rows["none"]["memory_tokens_per_query"] == 0
    assert rows["slot"]["memory_tokens_per_query"] == rows["frame_bank"]["memory_tokens_per_query"] == 192
    assert all(r["events"] == rows["slot"]["events"] > 0 for r in rows.values())
