"""The old sequential loop vs the continuous one, side by side in one run, for the same number of updates.

    python bench/loop.py [--config configs/tiny-random-60s.yaml] [--set section.field=value ...] [--out bench/results/loop.json]

Both runs are `slotmem pipeline` (loop/pipeline.py) on one local Ray cluster, each with its own experiment under a
temporary storage root and a sqlite MLflow store, the sample video off:

    sequential  pipeline.mode=sequential: one round is rolled out before each stage, the stage trains on what is
                committed, the fleet idles while training runs (the shape before issue 13)
    continuous  pipeline.mode=continuous: the fleet commits rounds all the time; rows older than
                pipeline.max_policy_lag generator updates are never trained on

Measured per run, from the stage runs' MLflow metrics (every iteration) and the rollout run:
  data wait   share of training wall time spent waiting for rows (sum data_wait_s / sum 1/steps_per_s)
  actor idle  share of rollout-actor time not spent on trajectories (rollout/idle_fraction)
  lag         policy lag of the rows trained on, in generator updates: p50 and p95 over the stage's rows
  reuse       mean number of times a row trained on had been used
  wall        seconds for the whole pipeline (Stage 0 + I + II), the same number of updates in both
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")

from slotmem.config import load_config  # noqa: E402

MODES = ("sequential", "continuous")


def _metric_series(client, run_id: str, key: str) -> list[float]:
    return [m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


def measure(cfg, summary: dict) -> dict:
    """The figures of one pipeline run, read back from its MLflow store."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(summary["tracking_uri"])
    exp = client.get_experiment_by_name(cfg.experiment)
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    wait = busy = 0.0
    p50, p95, reuse = [], [], []
    for stage in ("stage1", "stage2"):
        run = runs.get(f"{cfg.experiment}-{stage}")
        if run is None:
            continue
        rid = run.info.run_id
        waits = _metric_series(client, rid, "data_wait_s")
        rates = _metric_series(client, rid, "steps_per_s")
        wait += sum(waits)
        busy += sum(1.0 / r for r in rates if r > 0)
        p50.append(run.data.metrics.get("policy_lag/p50", 0.0))
        p95.append(run.data.metrics.get("policy_lag/p95", 0.0))
        reuse.append(run.data.metrics.get("reuse/mean", 0.0))
    rollout = runs[f"{cfg.experiment}-rollout"].data.metrics
    return {"data_wait_fraction": wait / busy if busy else 0.0,
            "actor_idle_fraction": rollout.get("rollout/idle_fraction", 0.0),
            "lag_p50": max(p50 or [0.0]), "lag_p95": max(p95 or [0.0]), "reuse_mean": max(reuse or [0.0]),
            "rounds": summary["fleet"]["rounds"], "trajectories": summary["fleet"]["trajectories"],
            "wall_s": summary["seconds"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "tiny-random-60s.yaml"))
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "loop.json"))
    args = parser.parse_args()

    from loop.pipeline import run_pipeline

    root = tempfile.mkdtemp(prefix="slotmem-bench-loop-")
    results = {}
    for mode in MODES:
        overrides = [*args.overrides, f"pipeline.mode={mode}", f"storage.root={root}",
                     f"storage.experiment=bench-loop-{mode}", "pipeline.sample_video=false",
                     "tracking.system_metrics=false"]
        cfg = load_config(args.config, overrides)
        print(f"[bench] {mode}: running the pipeline ({cfg.trainer.stage0_steps}/{cfg.trainer.stage1_steps}/"
              f"{cfg.trainer.stage2_steps} iterations)", flush=True)
        t0 = time.perf_counter()
        summary = run_pipeline(cfg)
        results[mode] = measure(cfg, summary)
        print(f"[bench] {mode}: done in {time.perf_counter() - t0:.0f} s", flush=True)

    seq, con = results["sequential"], results["continuous"]
    rows = [("trainer data-wait fraction", "data_wait_fraction", "{:.3f}"),
            ("rollout-actor idle fraction", "actor_idle_fraction", "{:.3f}"),
            ("policy lag p50 (updates)", "lag_p50", "{:.1f}"), ("policy lag p95 (updates)", "lag_p95", "{:.1f}"),
            ("mean reuse per row", "reuse_mean", "{:.2f}"), ("rounds committed", "rounds", "{:d}"),
            ("wall time (s)", "wall_s", "{:.0f}")]
    print()
    print(f"{'':30s} {'sequential':>12s} {'continuous':>12s} {'cont/seq':>9s}")
    for label, key, fmt in rows:
        ratio = con[key] / seq[key] if seq[key] else float("nan")
        print(f"{label:30s} {fmt.format(seq[key]):>12s} {fmt.format(con[key]):>12s} {ratio:>9.2f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"config": args.config, "overrides": args.overrides, "machine": platform.platform(),
                               "cpus": os.cpu_count(), "results": results}, indent=2) + "\n")
    print(f"\nwritten {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
