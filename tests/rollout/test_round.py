"""Rollout rounds on the session Ray cluster: planning, commit + Ray Data read (local and S3), a killed
actor, a policy published mid-round, cleanup of actors and placement groups."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import time
import uuid

import pytest
import torch

from cluster.storage import fetch_weights, publish_weights, resolve_storage
from rollout.actor import TrajectorySpec
from rollout.components import build_components
from rollout.prompts import chunk_start_at_or_after
from rollout.round import num_pixel_frames, plan_round, run_round
from rollout.shards import (
    committed_rounds, read_manifest, read_round_dataset, round_files, row_to_torch, shard_name,
)
from rollout.streaming import encode_prompts, generate
from slotmem.config import load_config, replace
from slotmem.errors import InputError

SCRIPTS = [("a fox in snow",), ("a dog runs on a beach", "the dog swims"), ("one", "two", "three")]


@pytest.fixture(scope="module")
def base_cfg(repo_root):
    return load_config(f"{repo_root}/configs/tiny-random.yaml", [
        "rollout.num_frames=48", "rollout.switch_frames=[12,24,36]", "rollout.switch_choices=[9,21,33]"])


def make_cfg(base, root, experiment=None, **rollout):
    experiment = experiment or f"t-{uuid.uuid4().hex[:8]}"
    return dataclasses.replace(base, storage=replace(base.storage, root=str(root), experiment=experiment),
                               rollout=replace(base.rollout, **rollout))


class Reference:
    """Latents of a trajectory from a generator built in the test process (not by an actor)."""

    def __init__(self, cfg, policy_path=None):
        self.cfg = cfg
        self.comps = build_components(cfg.model, cfg.memory, device="cpu", seed=cfg.trainer.seed,
                                      policy_path=policy_path)

    def latents(self, spec: TrajectorySpec) -> torch.Tensor:
        gen = self.comps.generator
        prompts = encode_prompts(self.comps.text_encoder, list(spec.prompts))
        res = generate(gen.backbone, gen.memory, self.comps.scheduler, self.cfg.model, prompts,
                       num_frames=self.cfg.rollout.num_frames, switch_frames=list(spec.switch_frames), seed=spec.seed)
        return res.latents[0]  # [F, C, h, w]


@pytest.fixture(scope="module")
def reference(base_cfg):
    return Reference(base_cfg)


def specs_of(cfg, round_index=0):
    from rollout.prompts import load_training_prompts

    return plan_round(cfg.rollout, load_training_prompts(cfg.rollout.prompt_file), round_index,
                      chunk=cfg.model.num_frame_per_block)


def rows_of(storage, round_index=0):
    """Every row of a committed round through Ray Data (read_parquet over the manifest's files)."""
    rows = [row_to_torch(r) for r in read_round_dataset(storage, round_index).take_all()]
    return sorted(rows, key=lambda r: r["trajectory_id"])


def wait_for(predicate, timeout=180.0, what="condition"):
    t0 = time.time()
    while not predicate():
        if time.time() - t0 > timeout:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


@pytest.fixture
def no_leftovers(ray_cluster):
    """After the test: every rollout actor is gone and every placement group is removed."""
    import ray
    from ray.util import placement_group_table

    before = set(placement_group_table())
    yield
    wait_for(lambda: not [n for n in ray.util.list_named_actors() if n.startswith("rollout-")], 30,
             "rollout actors to exit")
    wait_for(lambda: all(pg["state"] == "REMOVED" for pg_id, pg in placement_group_table().items()
                         if pg_id not in before), 30, "the test's placement groups to be removed")


# ----------------------------------------------------------------------------------------------
# planning (driver side, no Ray)
# ----------------------------------------------------------------------------------------------


def test_plan_depends_only_on_seed_round_and_index(base_cfg):
    six = plan_round(replace(base_cfg.rollout, trajectories_per_round=6), SCRIPTS, 2, chunk=3)
    three = plan_round(replace(base_cfg.rollout, trajectories_per_round=3), SCRIPTS, 2, chunk=3)
    assert six[:3] == three  # trajectory i does not depend on how many others there are
    assert six == plan_round(replace(base_cfg.rollout, trajectories_per_round=6), SCRIPTS, 2, chunk=3)
    assert [s.seed for s in plan_round(replace(base_cfg.rollout, trajectories_per_round=6), SCRIPTS, 3, chunk=3)] \
        != [s.seed for s in six]
    assert [s.seed for s in plan_round(replace(base_cfg.rollout, trajectories_per_round=6, seed=1), SCRIPTS, 2,
                                       chunk=3)] != [s.seed for s in six]
    assert [(s.round_index, s.traj_index, s.trajectory_id) for s in three] == [
        (2, i, f"r0002-t{i:05d}") for i in range(3)]
    assert len({s.seed for s in six}) == 6 and all(0 <= s.seed < 2**63 for s in six)


def test_plan_switch_frames_follow_the_prompt_count(base_cfg):
    rollout = replace(base_cfg.rollout, trajectories_per_round=60)
    specs = plan_round(rollout, SCRIPTS, 0, chunk=3)
    choices = {chunk_start_at_or_after(f, 3) for f in rollout.switch_choices}
    drawn = set()
    for s in specs:
        assert s.prompts in SCRIPTS
        if len(s.prompts) == 1:
            assert s.switch_frames == ()
        elif len(s.prompts) == 2:
            assert s.switch_frames[0] in choices
            drawn.add(s.switch_frames[0])
        else:  # longer scripts switch at the interactive frames (rollout.switch_frames)
            assert s.switch_frames == (12, 24)
    assert drawn == choices  # random_choice covers every candidate over 60 draws
    assert {len(s.prompts) for s in specs} == {1, 2, 3}
    fixed = plan_round(replace(rollout, switch_mode="fixed"), SCRIPTS[1:2], 0, chunk=3)
    assert {s.switch_frames for s in fixed} == {(9,)}


def test_bad_prompt_file_fails_before_any_actor_starts(base_cfg, tmp_path):
    cfg = make_cfg(base_cfg, tmp_path, prompt_file=str(tmp_path / "missing.txt"))
    with pytest.raises(InputError, match="rollout.prompt_file: prompt file .*missing.txt.* does not exist"):
        run_round(cfg, 0)


# ----------------------------------------------------------------------------------------------
# rounds on the session cluster
# ----------------------------------------------------------------------------------------------


def test_actor_that_cannot_start_is_reported_by_its_error(base_cfg, tmp_path, no_leftovers):
    cfg = make_cfg(base_cfg, tmp_path, max_restarts=0)
    cfg = dataclasses.replace(cfg, cluster=replace(cfg.cluster, num_rollout_actors=1),
                              model=replace(cfg.model, model_path=str(tmp_path / "no-such-weights.safetensors")))
    with pytest.raises(InputError, match=r"actor could not start .*no-such-weights.safetensors.* does not exist"):
        run_round(cfg, 0, progress=False)
    assert committed_rounds(resolve_storage(cfg.storage)) == []


def test_two_actors_commit_a_round_that_ray_data_reads_back(base_cfg, tmp_path, reference, no_leftovers):
    cfg = make_cfg(base_cfg, tmp_path, trajectories_per_round=4)
    storage = resolve_storage(cfg.storage)
    result = run_round(cfg, 0, progress=False)

    assert committed_rounds(storage) == [0]
    assert (result.skipped, result.num_trajectories, result.num_actors, result.policy_versions) == (False, 4, 2, [0])
    assert result.pixel_frames == num_pixel_frames(48) == 189
    assert result.trajectories_per_s > 0 and result.pixel_frames_per_s == pytest.approx(
        result.trajectories_per_s * 189)
    specs = specs_of(cfg)
    rows = rows_of(storage)
    assert [r["trajectory_id"] for r in rows] == [s.trajectory_id for s in specs]
    assert {r["actor_id"] for r in rows} == {"a0", "a1"}  # both actors got work
    for row, spec in zip(rows, specs):
        assert row["latents"].shape == (48, 16, 8, 8) and row["latents"].dtype == torch.float32
        assert torch.equal(row["latents"], reference.latents(spec))
        assert (row["seed"], row["prompts"], row["switch_frames"]) == (spec.seed, list(spec.prompts),
                                                                       list(spec.switch_frames))
        assert row["text_embeddings"].shape[0] == len(spec.prompts)
        assert row["policy_version"] == 0
    manifest = read_manifest(storage, 0)
    assert sorted(f["name"] for f in manifest["files"]) == sorted(
        shard_name(r["actor_id"], int(r["trajectory_id"][-5:])) for r in rows)

    again = run_round(cfg, 0, progress=False)  # resume: a committed round is not rolled out again
    assert again.skipped and again.num_trajectories == 4
    assert read_manifest(storage, 0) == manifest


def test_round_on_s3_through_the_cli_with_its_mlflow_run(base_cfg, s3_server, reference, no_leftovers, tmp_path,
                                                         capsys):
    from types import SimpleNamespace

    from mlflow.tracking import MlflowClient

    from rollout.round import main as rollout_main

    cfg = make_cfg(base_cfg, f"s3://{s3_server['bucket']}/rounds-{uuid.uuid4().hex[:6]}", trajectories_per_round=2)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = dataclasses.replace(cfg, storage=replace(cfg.storage, s3_endpoint=s3_server["endpoint"]),
                              tracking=replace(cfg.tracking, tracking_uri=uri, system_metrics=False))
    storage = resolve_storage(cfg.storage)
    assert rollout_main(SimpleNamespace(round_index=0), cfg) == 0  # what `slotmem rollout --round 0` runs
    assert f"committed round 0: s3://{s3_server['bucket']}/rounds-" in capsys.readouterr().out

    assert committed_rounds(storage) == [0]
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name(cfg.experiment).experiment_id])
    assert run.info.run_name == f"{cfg.experiment}-rollout-round0" and run.info.status == "FINISHED"
    assert run.data.tags["stage"] == "rollout" and run.data.tags["round"] == "0"
    assert run.data.metrics["frames_per_s"] > 0 and run.data.metrics["rollout/trajectories"] == 2
    assert run.data.params["storage.root"] == cfg.storage.root
    rows = rows_of(storage)
    for row, spec in zip(rows, specs_of(cfg)):
        assert row["trajectory_id"] == spec.trajectory_id
        assert row["latents"].shape == (48, 16, 8, 8) and row["latents"].dtype == torch.float32
        assert torch.equal(row["latents"], reference.latents(spec))


def test_killed_actor_leaves_no_partial_round_and_the_round_completes(base_cfg, tmp_path, reference, no_leftovers):
    import ray

    cfg = make_cfg(base_cfg, tmp_path, trajectories_per_round=10, max_restarts=2)
    storage = resolve_storage(cfg.storage)
    rdir = storage.round_dir(0)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        future = pool.submit(run_round, cfg, 0, progress=False)
        wait_for(lambda: any(i.base_name.startswith("part-a0-") for i in storage.list_dir(rdir)),
                 what="actor a0's first shard")
        # mid-round: shards exist, but nothing is committed or readable
        assert committed_rounds(storage) == []
        with pytest.raises(InputError, match="not committed"):
            read_round_dataset(storage, 0)
        # what a writer killed mid-file could leave behind: never listed by a reader
        storage.write_bytes(f"{rdir}/part-a0-09999.parquet", b"PAR1 truncated")
        storage.write_bytes(f"{rdir}/.part-a1-00004.parquet.tmp-0123456789ab", b"PAR1")
        name = next(n for n in ray.util.list_named_actors() if n.startswith(f"rollout-{cfg.storage.experiment}-")
                    and n.endswith("-a0"))
        ray.kill(ray.get_actor(name), no_restart=False)  # Ray restarts it (max_restarts)
        result = future.result(timeout=240)

    assert result.actor_restarts >= 1  # a0 came back as a new process and finished trajectories
    assert committed_rounds(storage) == [0]
    specs = specs_of(cfg)
    rows = rows_of(storage)
    assert [r["trajectory_id"] for r in rows] == [s.trajectory_id for s in specs]  # each exactly once
    for row, spec in zip(rows, specs):
        assert torch.equal(row["latents"], reference.latents(spec))  # retried trajectories are identical
    listed = {p.rsplit("/", 1)[1] for p in round_files(storage, 0)}
    assert "part-a0-09999.parquet" not in listed and len(listed) == 10


def test_trajectories_of_an_actor_out_of_restarts_move_to_the_others(base_cfg, tmp_path, reference, no_leftovers):
    import ray

    cfg = make_cfg(base_cfg, tmp_path, trajectories_per_round=6, max_restarts=0)
    storage = resolve_storage(cfg.storage)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        future = pool.submit(run_round, cfg, 0, progress=False)
        wait_for(lambda: any(i.base_name.startswith("part-a0-") for i in storage.list_dir(storage.round_dir(0))),
                 what="actor a0's first shard")
        name = next(n for n in ray.util.list_named_actors() if n.startswith(f"rollout-{cfg.storage.experiment}-")
                    and n.endswith("-a0"))
        ray.kill(ray.get_actor(name), no_restart=False)  # max_restarts=0: a0 is gone for good
        result = future.result(timeout=240)

    assert result.requeued >= 1 and result.actor_restarts == 0
    rows = rows_of(storage)
    specs = specs_of(cfg)
    assert [r["trajectory_id"] for r in rows] == [s.trajectory_id for s in specs]  # each exactly once
    for row, spec in zip(rows, specs):
        assert torch.equal(row["latents"], reference.latents(spec))


def test_actors_pick_up_a_policy_published_mid_round(base_cfg, tmp_path, reference, no_leftovers):
    cfg = make_cfg(base_cfg, tmp_path, trajectories_per_round=8)
    storage = resolve_storage(cfg.storage)
    g = torch.Generator().manual_seed(0)
    trained = {k: v + 0.05 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
               for k, v in reference.comps.generator.state_dict().items()}
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        future = pool.submit(run_round, cfg, 0, progress=False)
        wait_for(lambda: any(i.base_name.startswith("part-") for i in storage.list_dir(storage.round_dir(0))),
                 what="the first shard")
        publish_weights(storage, 1, trained)
        result = future.result(timeout=240)

    assert result.policy_versions == [0, 1] == read_manifest(storage, 0)["policy_versions"]
    new_policy = Reference(cfg, policy_path=fetch_weights(storage, 1, tmp_path / "ref"))
    by_version = {0: reference, 1: new_policy}
    for row, spec in zip(rows_of(storage), specs_of(cfg)):
        assert torch.equal(row["latents"], by_version[row["policy_version"]].latents(spec))
