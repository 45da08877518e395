"""The main job end to end: `slotmem pipeline` killed mid-run resumes where it stopped.

The first attempt runs as a separate driver process (joined to the session Ray cluster) and is
killed by PID after Stage I is recorded; the second attempt, in-process with the same experiment
name, must skip round 0 and Stage I, finish the rest, and leave one MLflow parent run holding a
child run per rollout round, per stage and for the sample video.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from cluster.pipeline import STATE_FILE, run_pipeline
from cluster.storage import committed_policy_versions, resolve_storage
from rollout.shards import committed_rounds
from slotmem.config import load_config

SHORT = [  # 24-frame trajectories, 2 per round, one generator update per stage
    "rollout.num_frames=24", "rollout.switch_frames=[6,9,12,15,18]", "rollout.switch_choices=[12]",
    "rollout.trajectories_per_round=2", "trainer.stage1_steps=1", "trainer.stage2_steps=1",
    "trainer.checkpoint_every=1", "trainer.ema_start_step=1", "tracking.system_metrics=false",
]


def _overrides(tmp_path, address):
    return [*SHORT, f"storage.root={tmp_path}/runs", "storage.experiment=pipe", "tracking.experiment=pipe",
            f"tracking.tracking_uri=sqlite:///{tmp_path}/mlflow.db", f"cluster.address={address}"]


def _wait_for(predicate, proc, timeout):
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.5)
    return False


def test_killed_pipeline_resumes_and_mlflow_holds_every_stage(ray_cluster, tmp_path, repo_root):
    address = ray_cluster.get_runtime_context().gcs_address
    overrides = _overrides(tmp_path, address)
    state_file = tmp_path / "runs" / "pipe" / STATE_FILE
    args = [sys.executable, "-m", "slotmem.cli", "pipeline", "--config", f"{repo_root}/configs/tiny.yaml"]
    for o in overrides:
        args += ["--set", o]
    log = open(tmp_path / "first_attempt.log", "w")
    proc = subprocess.Popen(args, cwd=repo_root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "PYTHONPATH": repo_root})
    try:
        stage1_done = _wait_for(lambda: state_file.exists() and "stage_1" in json.loads(state_file.read_text())["done"],
                                proc, timeout=240)
        assert stage1_done, (tmp_path / "first_attempt.log").read_text()[-3000:]
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the whole first driver, mid-run
        proc.wait()
    first = json.loads(state_file.read_text())["done"]
    assert "sample" not in first
    cfg = load_config(f"{repo_root}/configs/tiny.yaml", overrides)
    storage = resolve_storage(cfg.storage)
    manifest0 = Path(storage.round_dir(0), "_MANIFEST.json").stat().st_mtime_ns

    summary = run_pipeline(cfg)

    done = summary["phases"]
    assert set(done) == {"round_0", "stage_1", "round_1", "stage_2", "sample"}
    assert done["stage_1"] == first["stage_1"]  # Stage I was not retrained
    assert Path(storage.round_dir(0), "_MANIFEST.json").stat().st_mtime_ns == manifest0  # round 0 not redone
    assert committed_rounds(storage) == [0, 1]
    assert committed_policy_versions(storage) == [1, 2]
    assert Path(summary["sample_video"]).stat().st_size > 0

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.get_experiment_by_name("pipe")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1  # the second attempt continued the same parent run
    parent = parents[0]
    assert parent.info.run_id == summary["parent_run_id"]
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert {"pipe-rollout-round0", "pipe-rollout-round1", "pipe-stage1", "pipe-stage2", "pipe-sample"} <= set(children)
    assert children["pipe-rollout-round1"].data.metrics["frames_per_s"] > 0
    for stage in ("pipe-stage1", "pipe-stage2"):
        metrics = children[stage].data.metrics
        assert {"loss/critic", "loss/dmd"} <= set(metrics), metrics
    assert parent.data.params["model.dim"] == str(cfg.model.dim)
    sample_artifacts = [a.path for a in client.list_artifacts(children["pipe-sample"].info.run_id, "sample")]
    assert any(p.endswith(".mp4") for p in sample_artifacts)


def test_overlap_needs_a_policy_lag_budget(repo_root):
    cfg = load_config(f"{repo_root}/configs/tiny.yaml", ["pipeline.overlap=true", "pipeline.max_policy_lag=0"])
    with pytest.raises(ValueError, match="pipeline.max_policy_lag must be >= 1"):
        run_pipeline(cfg)
