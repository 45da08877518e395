"""The Ray Train + DeepSpeed stage job on the tiny preset with 2 CPU workers.

Four TorchTrainer fits in all: a ZeRO-2 Stage I that is killed by an injected fault and resubmitted
(the resumed run is also the ZeRO-2 training, MLflow and publishing check), a ZeRO-3 Stage I, and a
Stage II that starts from the ZeRO-2 Stage I.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from cluster.storage import fetch_weights, policy_meta, resolve_storage
from cluster.tracking import Tracker, sanitize_key
from rollout.components import build_generator
from slotmem.config import ClusterConfig, load_config
from slotmem.errors import InputError
from tests.fixtures_data import make_committed_round
from trainer.checkpoint import read_stage_final
from trainer.job import FAULT_ENV, RowStream, _check_trainer_fits, run_stage

NUM_FRAMES = 48
FAULT_STEP = 7  # checkpoints after steps 4 and 9 (checkpoint_every=1 generator update = 5 steps)
EXPERIMENT = "slotmem-tiny"


def make_cfg(root: Path, zero_stage: int, *extra: str):
    return load_config("configs/tiny.yaml", [
        f"storage.root={root}", f"tracking.tracking_uri=sqlite:///{root}/mlflow.db", "tracking.system_metrics=false",
        f"rollout.num_frames={NUM_FRAMES}", "rollout.switch_frames=[24]", "rollout.switch_choices=[21]",
        f"trainer.zero_stage={zero_stage}", "trainer.stage1_steps=2", "trainer.stage2_steps=1",
        "trainer.checkpoint_every=1", "trainer.critic_lr=1e-3", *extra])


def first_vs_last(history: list[dict], key: str, n: int = 3) -> tuple[float, float]:
    values = [h[key] for h in history if key in h]
    return float(np.mean(values[:n])), float(np.mean(values[-n:]))


@pytest.fixture(scope="module")
def stage1(tmp_path_factory, ray_cluster):
    """ZeRO-2 Stage I: killed at step FAULT_STEP (no retries), then resubmitted under the same run name."""
    root = tmp_path_factory.mktemp("stage1-zero2")
    cfg = make_cfg(root, 2, "cluster.max_failures=0")  # the kill ends the job; the test resubmits it
    storage = resolve_storage(cfg.storage)
    make_committed_round(cfg, storage, 0, 4, NUM_FRAMES)
    tracker = Tracker(cfg.tracking, storage_root_local=str(root), experiment=EXPERIMENT)
    parent = tracker.start_parent("pipeline-under-test")
    os.environ[FAULT_ENV] = str(FAULT_STEP)
    try:
        with pytest.raises(Exception, match="fault injected at training step 7"):
            run_stage(cfg, 1, round_indices=[0], parent_run_id=parent)
    finally:
        del os.environ[FAULT_ENV]
    result = run_stage(cfg, 1, round_indices=[0], parent_run_id=parent)
    tracker.close()
    return {"cfg": cfg, "storage": storage, "result": result, "parent": parent, "root": root,
            "client": MlflowClient(cfg.tracking.tracking_uri)}


def test_killed_run_resumes_from_its_checkpoint_with_identical_losses(stage1):
    result, client = stage1["result"], stage1["client"]
    assert result.steps == 10 and result.generator_updates == 2
    assert [h["step"] for h in result.history] == list(range(10))
    for key in ("loss/critic", "loss/dmd", "rows_consumed"):
        by_step: dict[int, list[float]] = {}
        for m in sorted(client.get_metric_history(result.mlflow_run_id, key), key=lambda m: m.timestamp):
            by_step.setdefault(m.step, []).append(m.value)
        # steps 5 and 6 ran before the kill and again after resuming from the step-4 checkpoint: same values;
        # nothing before the checkpoint was replayed, nothing after it skipped
        replayed = {s for s, v in by_step.items() if len(v) > 1}
        expected_steps = {5} if key == "loss/dmd" else {5, 6}  # the generator updates at steps 0 and 5
        assert replayed == expected_steps, key
        for s in replayed:
            assert by_step[s][0] == by_step[s][1], (key, s)
    critic = {m.step: m.value for m in client.get_metric_history(result.mlflow_run_id, "loss/critic")}
    assert [critic[s] for s in range(10)] == [h["critic"] for h in result.history]
    # each rank took one row per update: 10 critic + 2 generator updates
    rows = {m.step: m.value for m in client.get_metric_history(result.mlflow_run_id, "rows_consumed")}
    assert rows[9] == 12


def test_zero2_stage1_learns_checkpoints_and_publishes(stage1):
    result, storage = stage1["result"], stage1["storage"]
    first, last = first_vs_last(result.history, "critic")
    assert last < first, [h["critic"] for h in result.history]
    assert all(np.isfinite(h[k]) for h in result.history for k in ("critic", "policy_lag"))
    assert all(h["policy_lag"] == 0 for h in result.history)  # round 0 rows are policy v0, the trainer starts at v0
    run_dir = Path(storage.checkpoints_dir()) / f"{EXPERIMENT}-stage1"
    for step in (5, 10):
        ckpt = run_dir / f"checkpoint_step{step:08d}"
        assert (ckpt / "trainer_state.json").is_file()
        assert {"rng_rank0000.pt", "rng_rank0001.pt"} <= {p.name for p in ckpt.iterdir()}
        for engine in ("generator", "critic"):  # every rank wrote its ZeRO partition
            optim = sorted(p.name for p in (ckpt / engine / f"step{step - 1:08d}").glob("*optim_states.pt"))
            assert len(optim) == 2, optim
    assert result.checkpoint_uri == storage.uri(str(run_dir / "checkpoint_step00000010"))
    assert policy_meta(storage, 1)["meta"]["stage"] == 1 and result.policy_version == 1
    published = load_file(fetch_weights(storage, 1, stage1["root"] / "fetched"))
    final = read_stage_final(storage, 1)["generator"]  # EMA starts at update 2: not active in 2 updates
    assert published.keys() == final.keys() and all(torch.equal(published[k], final[k]) for k in final)


def test_mlflow_holds_the_stage_run_under_the_parent(stage1):
    cfg, result, client, parent = stage1["cfg"], stage1["result"], stage1["client"], stage1["parent"]
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    runs = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent}'")
    assert [r.info.run_name for r in runs] == [f"{EXPERIMENT}-stage1"]  # one child, kept across the restart
    run = runs[0]
    assert run.info.run_id == result.mlflow_run_id and run.info.status == "FINISHED"
    params = run.data.params
    for key, value in cfg.flat().items():
        if "token" not in key and "tracking_uri" not in key:  # the tracker masks secret-looking names
            assert params[sanitize_key(key)] == str(value), key
    assert params["train.stage"] == "1" and params["train.world_size"] == "2"
    metrics = set(run.data.metrics)
    assert {"loss/dmd", "loss/critic", "loss/slot_con", "loss/slot_rec", "loss/slot", "grad_norm/generator",
            "grad_norm/critic", "lr/generator", "lr/critic", "policy_lag", "data_wait_s", "data_wait_fraction",
            "steps_per_s", "zero/generator_param_elements"} <= metrics
    assert run.data.metrics["lr/critic"] == pytest.approx(1e-3)
    assert run.data.tags["checkpoint_uri"].endswith(f"{EXPERIMENT}-stage1/checkpoint_step00000010")
    assert run.data.tags["stage"] == "stage1" and run.data.tags["policy_version"] == "1"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "samples")}
    assert artifacts == {"samples/stage1_sample.mp4", "samples/stage1_slots.png"}


def test_zero3_stage1_partitions_learns_and_checkpoints(tmp_path, ray_cluster):
    cfg = make_cfg(tmp_path, 3)
    storage = resolve_storage(cfg.storage)
    make_committed_round(cfg, storage, 0, 4, NUM_FRAMES)
    result = run_stage(cfg, 1, round_indices=[0])
    first, last = first_vs_last(result.history, "critic")
    assert last < first, [h["critic"] for h in result.history]
    assert (Path(storage.checkpoints_dir()) / f"{EXPERIMENT}-stage1" / "checkpoint_step00000010").is_dir()
    run = MlflowClient(cfg.tracking.tracking_uri).get_run(result.mlflow_run_id)
    assert run.data.tags.get("mlflow.parentRunId") is None  # alone: a run of its own
    for model in ("generator", "critic"):  # every parameter is split over the 2 ranks (threshold 0)
        local = run.data.metrics[f"zero/{model}_param_elements"]
        total = run.data.metrics[f"zero/{model}_param_elements_total"]
        assert total / 2 <= local < total / 2 + 2 * 500, (model, local, total)  # at most one padding per tensor
    assert policy_meta(storage, 1)["version"] == 1


def test_stage2_starts_from_stage1_and_unfreezes_the_grouper(stage1):
    cfg, storage = stage1["cfg"], stage1["storage"]
    make_committed_round(cfg, storage, 1, 4, NUM_FRAMES, policy_version=1)
    result = run_stage(cfg, 2, round_indices=[1], parent_run_id=stage1["parent"])
    assert result.policy_version == 2 and result.steps == 5 and all(h["policy_lag"] == 0 for h in result.history)
    initial = build_generator(cfg.model, cfg.memory, seed=cfg.trainer.seed).state_dict()
    s1, s2 = read_stage_final(storage, 1)["generator"], read_stage_final(storage, 2)["generator"]
    grouper = [k for k in s1 if k.startswith("memory.writer.grouper.")]
    adapters = [k for k in s1 if k.startswith("memory.writer.adapters.")]
    assert grouper and adapters
    assert all(torch.equal(s1[k], initial[k]) for k in grouper)  # frozen in Stage I
    assert not all(torch.equal(s1[k], initial[k]) for k in adapters)
    assert not all(torch.equal(s2[k], s1[k]) for k in grouper)  # trained in Stage II
    # Stage II continued from Stage I: its single AdamW step (beta1 = 0, a fresh optimizer) moves every
    # weight by at most lr, while Stage I's two steps moved some weights by more than that
    lr = cfg.trainer.lr
    backbone = [k for k in s1 if k.startswith("backbone.blocks.")]
    assert max(float((s2[k] - s1[k]).abs().max()) for k in backbone) <= lr * 1.02
    assert max(float((s1[k] - initial[k]).abs().max()) for k in backbone) > lr * 1.5
    client = stage1["client"]
    runs = client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment).experiment_id],
                              f"tags.`mlflow.parentRunId` = '{stage1['parent']}'")
    assert sorted(r.info.run_name for r in runs) == [f"{EXPERIMENT}-stage1", f"{EXPERIMENT}-stage2"]


# ----------------------------------------------------------------------------------------------
# pieces that need no fit
# ----------------------------------------------------------------------------------------------


def test_row_stream_resumes_inside_an_epoch_and_checks_epoch_length(ray_cluster):
    import ray.data

    ds = ray.data.from_items([{"trajectory_id": f"t{i}", "latents": np.full((3, 1, 1, 1), i, np.float32),
                               "latents_dtype": "float32"} for i in range(3)], override_num_blocks=1)
    ds.context.execution_options.preserve_order = True
    stream = RowStream(ds.iterator(), rows_per_epoch=3, consumed=4)  # epoch 1, offset 1
    ids = [stream.next()["trajectory_id"][0] for _ in range(5)]
    assert ids == ["t1", "t2", "t0", "t1", "t2"] and stream.consumed == 9
    with pytest.raises(RuntimeError, match="had 3 rows, expected 4"):
        bad = RowStream(ds.iterator(), rows_per_epoch=4, consumed=0)
        for _ in range(4):
            bad.next()


def test_trainer_workers_must_leave_a_cpu_for_ray_data(tmp_path):
    cfg = make_cfg(tmp_path, 2)
    _check_trainer_fits(cfg, {"CPU": 4.0})
    with pytest.raises(InputError, match="Ray Data needs at least one free CPU"):
        _check_trainer_fits(cfg, {"CPU": 2.0})
    gpu = replace(cfg, cluster=ClusterConfig(num_trainer_workers=2, gpus_per_worker=1, cpus_per_worker=1))
    with pytest.raises(InputError, match="cluster too small for 2 trainer workers"):
        _check_trainer_fits(gpu, {"CPU": 8.0, "GPU": 1.0})


def test_bad_inputs_are_reported_before_anything_starts(tmp_path):
    cfg = make_cfg(tmp_path, 2)
    with pytest.raises(InputError, match="stage must be 1 or 2"):
        run_stage(cfg, 3, round_indices=[0])
    with pytest.raises(InputError, match="rollout round 0 is not committed"):
        run_stage(cfg, 1, round_indices=[0])
    storage = resolve_storage(cfg.storage)
    make_committed_round(cfg, storage, 0, 1, 24)
    with pytest.raises(InputError, match="fewer than the 2 trainer workers"):
        run_stage(cfg, 1, round_indices=[0])
    make_committed_round(cfg, storage, 1, 2, 24)
    with pytest.raises(InputError, match="stage 1 has not finished"):
        run_stage(cfg, 2, round_indices=[1])
    lagging = replace(cfg, pipeline=replace(cfg.pipeline, max_policy_lag=0))
    with pytest.raises(InputError, match="more than pipeline.max_policy_lag=0 behind"):
        run_stage(lagging, 2, round_indices=[1])
