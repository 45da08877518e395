"""The replay planner: which committed row each rank trains on, with bounded staleness and reuse (trainer/data.py)."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from cluster.storage import resolve_storage
from rollout.shards import TrajectoryRow, commit_round, write_shard
from slotmem.config import StorageConfig
from trainer.data import ReplayPlanner, assignment_from_wire, assignment_to_wire


def commit(storage, k: int, versions: list[int]) -> None:
    files = []
    for i, v in enumerate(versions):
        row = TrajectoryRow(trajectory_id=f"r{k}-t{i}", round=k, actor_id="a0", policy_version=v, seed=i,
                            prompts=["p"], switch_frames=[], text_embeddings=torch.zeros(1, 2, 3),
                            latents=torch.zeros(6, 2, 2, 2))
        files.append(write_shard(storage, k, "a0", i, [row]))
    commit_round(storage, k, files)


@pytest.fixture
def storage(tmp_path):
    return resolve_storage(StorageConfig(root=str(tmp_path), experiment="replay"))


def planner(storage, **kw):
    args = dict(world=2, max_policy_lag=2, max_row_reuse=2, wait_timeout_s=5.0)
    args.update(kw)
    return ReplayPlanner(storage, **args)


def test_freshest_least_used_rows_first_and_every_rank_gets_one(storage):
    commit(storage, 0, [0, 0])
    commit(storage, 1, [3, 3])
    p = planner(storage, max_row_reuse=8)
    a = p.plan(version=4)
    assert sorted(r.key for r in a.rows) == ["round_0001/part-a0-00000.parquet", "round_0001/part-a0-00001.parquet"]
    assert a.lags == [1, 1]
    # round 0 (policy 0) is 4 updates behind trainer version 4 > max_policy_lag 2: never chosen
    for _ in range(3):
        assert {r.round for r in p.plan(version=4).rows} == {1}
    assert assignment_from_wire(assignment_to_wire(a)).rows == a.rows


def test_rows_are_used_at_most_max_row_reuse_times_then_the_trainer_waits(storage):
    commit(storage, 0, [5, 5])
    p = planner(storage, wait_timeout_s=1.0)
    p.plan(version=5)
    p.plan(version=5)
    assert all(r.uses == 2 for r in p.rows.values())
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match="pipeline.data_wait_timeout_s.*pipeline.max_row_reuse=2"):
        p.plan(version=5)
    assert time.monotonic() - t0 >= 1.0


def test_the_planner_waits_for_the_fleet_and_counts_the_wait(storage):
    commit(storage, 0, [0, 0])
    p = planner(storage, max_policy_lag=1)
    threading.Timer(0.8, lambda: commit(storage, 1, [9, 9])).start()
    a = p.plan(version=10)  # nothing fresh until round 1 lands
    assert {r.round for r in a.rows} == {1} and a.waited_s >= 0.7


def test_a_rank_keeps_its_rows_and_drops_stale_ones(storage):
    commit(storage, 0, [0, 0, 0, 0])
    p = planner(storage, max_policy_lag=1, max_row_reuse=8)
    first = p.plan(version=0)
    second = p.plan(version=0)
    assert [r.key for r in second.rows] != [r.key for r in first.rows]  # unused rows before reused ones
    third = p.plan(version=0)
    assert {r.key for r in third.rows} <= {r.key for r in first.rows + second.rows}
    for rank, row in enumerate(third.rows):
        assert row.owner == rank
    commit(storage, 1, [2, 2])
    p.refresh()
    later = p.plan(version=2)  # round 0 is 2 behind > 1: every cached round-0 row is dropped
    dropped = sorted(k for keys in later.drop for k in keys)
    assert dropped == sorted(k for k in p.rows if k.startswith("round_0000"))


def test_ledger_round_trips_and_carries_uses_across_stages(storage):
    commit(storage, 0, [0, 0])
    p = planner(storage, max_row_reuse=3)
    p.plan(version=0)
    p.plan(version=0)
    q = planner(storage, max_row_reuse=3, ledger=p.state_dict()["ledger"])
    q.refresh()
    assert all(r.uses == 2 for r in q.rows.values())
    q.plan(version=0)
    with pytest.raises(TimeoutError):
        planner(storage, max_row_reuse=3, ledger=q.ledger, wait_timeout_s=0.6).plan(version=0)


def test_unbounded_planner_is_the_sequential_shape(storage):
    commit(storage, 0, [0, 0])
    p = planner(storage, enforce_lag=False, enforce_reuse=False)
    for _ in range(10):
        a = p.plan(version=100)
    assert a.lags == [100, 100] and all(r.uses == 10 for r in p.rows.values())


def test_a_rank_reads_its_row_checked_against_the_manifest(storage):
    from trainer.data import RowCache

    commit(storage, 0, [0])
    p = planner(storage, world=1)
    a = p.plan(version=0)
    cache = RowCache(storage)
    row = cache.get(a.rows[0], a.drop[0])
    assert row["latents"].shape == (1, 6, 2, 2, 2) and row["trajectory_id"] == ["r0-t0"]
    cache.get(a.rows[0], [])
    assert cache.reads == 1  # kept, not read again
    path = a.rows[0].path
    with open(path, "r+b") as f:  # flip one byte of the committed file
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(Exception, match="corrupt rollout shard.*sha256"):
        RowCache(storage).get(a.rows[0], [])
