"""The main job end to end on one node: `slotmem pipeline` (continuous loop) killed mid-run resumes where it stopped.

The first attempt runs as a separate driver process (joined to the session Ray cluster) and is killed by PID
after Stage I is recorded; the second attempt, in-process with the same experiment, must skip Stages 0 and I,
finish Stage II and the sample with the same long-lived fleet, keep every committed round, and leave one MLflow
parent run holding the stage runs, the rollout fleet's run and the sample's.
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

from cluster.storage import committed_policy_versions, resolve_storage
from loop.pipeline import STATE_FILE, run_pipeline
from rollout.shards import committed_rounds, read_manifest
from slotmem.config import ConfigError, load_config

SHORT = [  # 24-frame trajectories, 2 per round; 2 + 5 + 5 iterations
    "rollout.num_frames=24", "rollout.switch_frames=[6,9,12,15,18]", "rollout.switch_choices=[12]",
    "rollout.trajectories_per_round=2", "trainer.stage0_steps=2", "trainer.stage1_steps=5", "trainer.stage2_steps=5",
    "trainer.checkpoint_every=5", "trainer.ema_start_step=0", "trainer.publish_every=1", "pipeline.max_policy_lag=2",
    "pipeline.rows_ahead=4", "tracking.system_metrics=false",
]


def _overrides(tmp_path, address):
    return [*SHORT, f"storage.root={tmp_path}/runs", "storage.experiment=pipe",
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


def test_killed_pipeline_resumes_and_mlflow_holds_one_run_tree(ray_cluster, tmp_path, repo_root):
    address = ray_cluster.get_runtime_context().gcs_address
    overrides = _overrides(tmp_path, address)
    state_file = tmp_path / "runs" / "pipe" / STATE_FILE
    args = [sys.executable, "-m", "slotmem.cli", "pipeline", "--config", f"{repo_root}/configs/tiny-random.yaml"]
    for o in overrides:
        args += ["--set", o]
    log = open(tmp_path / "first_attempt.log", "w")
    proc = subprocess.Popen(args, cwd=repo_root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "PYTHONPATH": repo_root})
    try:
        stage1_done = _wait_for(lambda: state_file.exists() and "stage_1" in json.loads(state_file.read_text())["done"],
                                proc, timeout=280)
        assert stage1_done, (tmp_path / "first_attempt.log").read_text()[-3000:]
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the whole first driver, mid-run
        proc.wait()
    first = json.loads(state_file.read_text())["done"]
    assert set(first) == {"stage_0", "stage_1"}
    cfg = load_config(f"{repo_root}/configs/tiny-random.yaml", overrides)
    storage = resolve_storage(cfg.storage)
    rounds_before = committed_rounds(storage)
    manifests_before = {k: Path(storage.round_dir(k), "_MANIFEST.json").stat().st_mtime_ns for k in rounds_before}

    summary = run_pipeline(cfg)

    done = summary["phases"]
    assert set(done) == {"stage_0", "stage_1", "stage_2", "sample"}
    assert done["stage_1"] == first["stage_1"]  # Stage I was not retrained
    rounds = committed_rounds(storage)
    assert rounds[:len(rounds_before)] == rounds_before  # committed data survives the kill untouched
    assert all(Path(storage.round_dir(k), "_MANIFEST.json").stat().st_mtime_ns == t for k, t in manifests_before.items())
    # policy versions count updates: Stage 0's 2, then one per generator update (1 + 1)
    assert committed_policy_versions(storage)[-1] == 4 == done["stage_2"]["policy_version"]
    versions = {v for k in rounds for v in read_manifest(storage, k)["policy_versions"]}
    assert len(versions) > 1  # the fleet picked up newer policies while training ran
    assert done["sample"]["video"].startswith("file://") and done["sample"]["video"].endswith("samples/sample.mp4")
    assert Path(done["sample"]["video"][len("file://"):]).stat().st_size > 0

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.get_experiment_by_name("pipe")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1  # the second attempt continued the same parent run
    parent = parents[0]
    assert parent.info.run_id == summary["parent_run_id"]
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(children) == {"pipe-stage0", "pipe-stage1", "pipe-stage2", "pipe-rollout", "pipe-sample"}
    assert children["pipe-rollout"].data.metrics["frames_per_s"] > 0
    for stage in ("pipe-stage1", "pipe-stage2"):
        metrics = children[stage].data.metrics
        assert {"loss/critic", "loss/dmd", "policy_lag/p95", "reuse/mean"} <= set(metrics), metrics
        assert metrics["policy_lag/p95"] <= cfg.pipeline.max_policy_lag
    assert {"loss/slot_con", "loss/slot_feat", "slot/cosine"} <= set(children["pipe-stage0"].data.metrics)
    assert parent.data.params["model.dim"] == str(cfg.model.dim)
    sample_artifacts = [a.path for a in client.list_artifacts(children["pipe-sample"].info.run_id, "sample")]
    assert any(p.endswith(".mp4") for p in sample_artifacts) and any(p.endswith(".json") for p in sample_artifacts)


def test_a_lag_bound_below_the_publish_interval_is_refused(repo_root):
    with pytest.raises(ConfigError, match="pipeline.max_policy_lag .* must be at least trainer.publish_every - 1"):
        load_config(f"{repo_root}/configs/tiny-random.yaml", ["trainer.publish_every=5", "pipeline.max_policy_lag=2"])
