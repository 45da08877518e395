"""Fault tolerance of a training stage: a Ray Train worker killed by PID mid-stage is restarted by
FailureConfig from the latest checkpoint, and the stage ends with every step run exactly once after it.

(Rollout actors killed mid-round: tests/rollout/test_round.py; a killed pipeline driver resuming:
tests/loop/test_pipeline.py; a lost rollout node: tests/loop/test_multinode.py; S3 outages retried:
tests/cluster/test_storage.py.)
"""

import os
import signal
import threading
import time
from pathlib import Path

from mlflow.tracking import MlflowClient

from cluster.storage import resolve_storage
from slotmem.config import load_config
from tests.fixtures_data import make_committed_round
from trainer.driver import run_stage


def _parent(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def _descends_from_this_test(pid: int) -> bool:
    """The session Ray cluster's processes are children of this pytest process (its raylet)."""
    while pid > 1:
        pid = _parent(pid)
        if pid == os.getpid():
            return True
    return False


def _train_worker_pids() -> list[int]:
    """PIDs of this session's Ray Train worker processes (process title ray::RayTrainWorker...)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if cmdline.startswith("ray::RayTrainWorker") and _descends_from_this_test(int(entry.name)):
                pids.append(int(entry.name))
    return pids


def test_trainer_worker_killed_mid_stage_resumes_from_latest_checkpoint(ray_cluster, tmp_path, repo_root):
    cfg = load_config(f"{repo_root}/configs/tiny-random.yaml", [
        f"storage.root={tmp_path}", f"tracking.tracking_uri=sqlite:///{tmp_path}/mlflow.db",
        "tracking.system_metrics=false", "rollout.num_frames=48", "rollout.switch_frames=[24]",
        "rollout.switch_choices=[21]", "pipeline.mode=sequential", "trainer.stage0_steps=0",
        "trainer.stage1_steps=12", "trainer.checkpoint_every=4", "cluster.max_failures=1"])
    storage = resolve_storage(cfg.storage)
    make_committed_round(cfg, storage, 0, 4, 48)
    # Ray Train's controller lists the checkpoints it has registered in this snapshot; a checkpoint
    # directory alone may not be registered yet (then a restart would rightly start from scratch).
    snapshot = Path(storage.checkpoints_dir()) / "slotmem-tiny-random-stage1" / "checkpoint_manager_snapshot.json"
    registered = lambda: snapshot.exists() and "checkpoint_step00000004" in snapshot.read_text()  # noqa: E731
    out: dict = {}
    thread = threading.Thread(target=lambda: out.setdefault("result", run_stage(cfg, 1)))
    thread.start()
    deadline = time.time() + 240
    while not registered() and thread.is_alive() and time.time() < deadline:
        time.sleep(0.1)
    assert registered(), "no checkpoint was registered"
    victims = _train_worker_pids()
    assert len(victims) == 2, victims
    os.kill(victims[0], signal.SIGKILL)  # one rank dies mid-stage
    thread.join(timeout=300)
    assert not thread.is_alive()
    result = out["result"]
    assert result.steps == 12 and [h["step"] for h in result.history] == list(range(12))
    assert all(p not in _train_worker_pids() for p in victims)
    # the restarted worker group resumed from a registered checkpoint (step 4 or later), not from scratch:
    # no step before it ran twice, and every step ran
    client = MlflowClient(cfg.tracking.tracking_uri)
    resumed_from = int(client.get_run(result.mlflow_run_id).data.tags["resumed_from_step"])
    assert 4 <= resumed_from < 12
    seen: dict[int, int] = {}
    for m in client.get_metric_history(result.mlflow_run_id, "loss/critic"):
        seen[m.step] = seen.get(m.step, 0) + 1
    assert sorted(seen) == list(range(12))
    assert all(seen[s] == 1 for s in range(resumed_from)), seen
