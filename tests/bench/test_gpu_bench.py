"""bench/gpu.sh + bench/gpu_bench.py in their shrunk CPU mode, so that the first GPU run is not their first run.

The script is run as the GPU machine runs it (bash bench/gpu.sh), with the tiny preset cut to one block; the
checks recompute its derived numbers from the per-chunk times it reports.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_gpu_bench_shrunk_mode_runs_and_reports(tmp_path):
    out = tmp_path / "gpu_bench.json"
    env = {**os.environ, "PYTHON": sys.executable, "SLOTMEM_BENCH_OUT": str(out), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu.sh"), "--shrink", "--set", "model.num_layers=1",
                           "--set", "teacher.num_layers=1"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "shrunk CPU mode" in proc.stdout
    result = json.loads(out.read_text())
    assert result["shrink"] and result["dtype"] == "torch.float32"

    for kind in ("none", "slot"):
        r = result["rollout"][kind]
        chunk_s = r["chunk_s"]
        assert len(chunk_s) == result["num_frames"] // 3 == 27 and all(s > 0 for s in chunk_s)
        late, early = statistics.mean(chunk_s[-10:]), statistics.mean(chunk_s[5:15])
        assert abs(r["flat"] - late / early) < 1e-9
        assert abs(r["steady_pixel_fps"] - 12 / late) < 1e-6
        assert r["peak_bytes"] is None  # no CUDA here

    train = result["training"]["full"]
    assert len(train["generator_update_s"]) == len(train["critic_update_s"]) == 2
    assert train["out_of_memory_before"] == [] and train["teacher"].startswith("1 layers")
    assert train["gradient_checkpointing"]  # the setting the GPU run tries first

    # slot attends its retrieved memory keys on top of none's window: more FLOPs per late chunk
    assert result["flops"]["slot"]["late_chunk_flops"] > result["flops"]["none"]["late_chunk_flops"] > 0
    assert "ms" in result["sdpa"]["streaming chunk"]["MATH"]
    assert "steady px FPS" in proc.stdout  # the table was printed
