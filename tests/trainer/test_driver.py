"""A training stage as a Ray Train + DeepSpeed job on the tiny random-weight preset with 2 CPU workers.

Two TorchTrainer fits: a ZeRO-2 Stage I one of whose workers is SIGKILLed by PID mid-stage, which FailureConfig
restarts from the latest checkpoint (also the checkpoint, MLflow and publishing checks), then Stage II starting from
it. The committed round is fixed and the replay planner unbounded (the sequential pipeline's shape), so the rows each
update takes are the same on every attempt. (A resubmitted job resuming from its checkpoint: the README's cluster
walk-through, tests/test_readme.py; actors killed mid-round: tests/rollout/test_round.py; a lost rollout node:
tests/loop/test_multinode.py; S3 outages retried: tests/cluster/test_storage.py.)
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from cluster.storage import committed_policy_versions, fetch_weights, policy_meta, resolve_storage
from cluster.tracking import Tracker, sanitize_key
from slotmem.config import load_config
from tests.fixtures_data import make_committed_round
from tests.servers import children_of
from trainer.checkpoint import read_stage_final, stage_final_record
from trainer.driver import read_state, run_stage

NUM_FRAMES = 48
CHECKPOINT = 5  # checkpoints after iterations 5 and 10 (checkpoint_every=5); the kill lands between them
EXPERIMENT = "slotmem-tiny-random"


def make_cfg(root: Path, *extra: str):
    return load_config("configs/tiny-random.yaml", [
        f"storage.root={root}", f"tracking.tracking_uri=sqlite:///{root}/mlflow.db", "tracking.system_metrics=false",
        f"rollout.num_frames={NUM_FRAMES}", "rollout.switch_frames=[24]", "rollout.switch_choices=[21]",
        "pipeline.mode=sequential", "trainer.stage0_steps=0", "trainer.stage1_steps=10", "trainer.stage2_steps=5",
        f"trainer.checkpoint_every={CHECKPOINT}", "trainer.publish_every=1", "trainer.critic_lr=1e-3", *extra])


def first_vs_last(history: list[dict], key: str, n: int = 3) -> tuple[float, float]:
    values = [h[key] for h in history if key in h]
    return float(np.mean(values[:n])), float(np.mean(values[-n:]))


def train_worker_pids() -> list[int]:
    """This session's Ray Train worker processes (process title ray::RayTrainWorker), children of its raylet."""
    pids = []
    for pid in children_of(os.getpid()):
        try:
            if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::RayTrainWorker"):
                pids.append(pid)
        except OSError:
            pass
    return pids


@pytest.fixture(scope="module")
def stage1(tmp_path_factory, ray_cluster):
    """ZeRO-2 Stage I; once checkpoint 5 is registered, one of its two workers is SIGKILLed and FailureConfig
    (cluster.max_failures=1) restarts the worker group from that checkpoint."""
    root = tmp_path_factory.mktemp("stage1")
    cfg = make_cfg(root, "cluster.max_failures=1")
    storage = resolve_storage(cfg.storage)
    make_committed_round(cfg, storage, 0, 4, NUM_FRAMES)
    tracker = Tracker(cfg.tracking, storage_root_local=str(root), experiment=EXPERIMENT)
    parent = tracker.start_parent("pipeline-under-test")
    # Ray Train's controller lists the checkpoints it has registered in this snapshot; a checkpoint directory alone
    # may not be registered yet (a restart would then rightly start from scratch)
    snapshot = Path(storage.checkpoints_dir()) / f"{EXPERIMENT}-stage1" / "checkpoint_manager_snapshot.json"
    registered = lambda: snapshot.exists() and f"checkpoint_step{CHECKPOINT:08d}" in snapshot.read_text()  # noqa: E731
    out: dict = {}

    def fit():
        try:
            out["result"] = run_stage(cfg, 1, parent_run_id=parent)
        except BaseException as e:  # noqa: BLE001 - reported below
            out["error"] = e

    thread = threading.Thread(target=fit)
    thread.start()
    deadline = time.time() + 240
    while not registered() and thread.is_alive() and time.time() < deadline:
        time.sleep(0.1)
    assert registered(), f"no checkpoint was registered: {out.get('error')!r}"
    victims = train_worker_pids()
    assert len(victims) == 2, victims
    os.kill(victims[0], signal.SIGKILL)  # one rank dies mid-stage
    thread.join(timeout=300)
    assert not thread.is_alive() and "error" not in out, out.get("error")
    assert all(p not in train_worker_pids() for p in victims)
    tracker.close()
    return {"cfg": cfg, "storage": storage, "result": out["result"], "parent": parent, "root": root,
            "client": MlflowClient(cfg.tracking.tracking_uri)}


def test_killed_worker_resumes_from_its_checkpoint_with_identical_losses(stage1):
    result, client = stage1["result"], stage1["client"]
    assert result.steps == 10 and result.generator_updates == 2
    assert [h["step"] for h in result.history] == list(range(10))
    assert client.get_run(result.mlflow_run_id).data.tags["resumed_from_step"] == str(CHECKPOINT)
    for key in ("loss/critic", "loss/dmd", "policy_version"):
        by_step: dict[int, list[float]] = {}
        for m in sorted(client.get_metric_history(result.mlflow_run_id, key), key=lambda m: m.timestamp):
            by_step.setdefault(m.step, []).append(m.value)
        # the iterations after checkpoint 5 that ran before the kill ran again after the restart, with the same
        # values; nothing before the checkpoint was replayed, nothing after it skipped
        assert sorted(by_step) == ([0, 5] if key == "loss/dmd" else list(range(10))), key  # generator: 0 and 5
        replayed = {s for s, v in by_step.items() if len(v) > 1}
        assert replayed <= set(range(CHECKPOINT, 10)) and all(len(v) <= 2 for v in by_step.values()), key
        for s in replayed:
            assert by_step[s][0] == by_step[s][1], (key, s)
    critic = {m.step: m.value for m in client.get_metric_history(result.mlflow_run_id, "loss/critic")}
    assert [critic[s] for s in range(10)] == [h["critic"] for h in result.history]
    # each rank took one row per update (10 critic + 2 generator updates): the replay ledger counts them once
    ledger = stage_final_record(stage1["storage"], 1)["meta"]["ledger"]
    assert sum(ledger.values()) == 2 * 12 and len(ledger) == 4


def test_zero2_stage1_learns_checkpoints_and_publishes_every_update(stage1):
    result, storage = stage1["result"], stage1["storage"]
    first, last = first_vs_last(result.history, "critic")
    assert last < first, [h["critic"] for h in result.history]
    assert all(np.isfinite(h[k]) for h in result.history for k in ("critic",))
    run_dir = Path(storage.checkpoints_dir()) / f"{EXPERIMENT}-stage1"
    for step in (5, 10):
        ckpt = run_dir / f"checkpoint_step{step:08d}"
        assert (ckpt / "trainer_state.json").is_file()
        assert {"rng_rank0000.pt", "rng_rank0001.pt"} <= {p.name for p in ckpt.iterdir()}
        for engine in ("generator", "critic"):  # every rank wrote its ZeRO partition
            optim = sorted(p.name for p in (ckpt / engine / f"step{step - 1:08d}").glob("*optim_states.pt"))
            assert len(optim) == 2, optim
    assert result.checkpoint_uri == storage.uri(str(run_dir / "checkpoint_step00000010"))
    # policy versions count generator updates (publish_every=1): v1 after the first, v2 at the end
    assert committed_policy_versions(storage) == [1, 2] and result.policy_version == 2
    assert policy_meta(storage, 2)["meta"]["ema"]  # EMA from iteration 5 (tiny preset): the final version is EMA
    assert not policy_meta(storage, 1)["meta"]["ema"]
    published = load_file(fetch_weights(storage, 1, stage1["root"] / "fetched"))
    assert all(v.dtype == torch.float32 for v in published.values())  # the tiny preset computes in fp32
    final = read_stage_final(storage, 1)["generator"]
    assert published.keys() == final.keys()
    state = read_state(type("C", (), {"filesystem": storage.fs, "path": str(run_dir / "checkpoint_step00000010")})())
    assert state.step == 10


def test_mlflow_holds_the_stage_run_under_the_parent(stage1):
    cfg, result, client, parent = stage1["cfg"], stage1["result"], stage1["client"], stage1["parent"]
    exp = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent}'")
    assert [r.info.run_name for r in runs] == [f"{EXPERIMENT}-stage1"]  # one child, kept across the restart
    run = runs[0]
    assert run.info.run_id == result.mlflow_run_id and run.info.status == "FINISHED"
    params = run.data.params
    for key, value in cfg.flat().items():
        if "token" not in key and "tracking_uri" not in key and "negative_prompt" not in key:
            assert params[sanitize_key(key)] == str(value), key
    metrics = run.data.metrics
    for key in ("loss/dmd", "loss/critic", "loss/slot_con", "slot/cosine", "slot/mask_coverage", "policy_lag/p50",
                "policy_lag/p95", "reuse/mean", "data_wait_fraction", "grad_norm/generator"):
        assert key in metrics, key
    assert run.data.tags["stage"] == "stage1" and run.data.tags["resumed_from_step"] == "5"
    arts = {a.path for a in client.list_artifacts(run.info.run_id, "samples")}
    assert {"samples/stage1_sample.mp4", "samples/stage1_slots.png"} <= arts


def test_stage2_starts_from_stage1(stage1):
    cfg, storage = stage1["cfg"], stage1["storage"]
    result = run_stage(cfg, 2)
    assert result.steps == 5 and result.generator_updates == 1
    assert result.policy_version == 3 and committed_policy_versions(storage) == [1, 2, 3]
    assert all("slot_rec" in h for h in result.history if "dmd" in h)
    # the replay ledger continued: Stage II's uses are on top of Stage I's
    ledger = stage_final_record(storage, 2)["meta"]["ledger"]
    assert sum(ledger.values()) == 2 * 12 + 2 * 6
