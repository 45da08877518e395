"""Rollout shards: exact round trips, manifest commit point, Ray Data reads (local and S3), corruption."""

from __future__ import annotations

import hashlib
import uuid
import warnings

import pyarrow.parquet as pq
import pytest
import torch

from cluster.storage import resolve_storage
from rollout.shards import (
    CorruptShardWarning, ShardFile, TrajectoryRow, batch_to_torch, commit_round, committed_rounds,
    hash_config, read_manifest, read_round, read_round_dataset, round_files, row_to_torch, table_to_rows,
    write_shard,
)
from slotmem.config import StorageConfig
from slotmem.errors import InputError

FRAMES, CHANNELS, HEIGHT, WIDTH = 6, 4, 4, 4  # latents [F, C, H, W]
TEXT_LEN, TEXT_DIM = 3, 8  # text embeddings [P, Lt, D]


def make_row(actor: int, seq: int, round_index: int = 0, dtype=torch.float32) -> TrajectoryRow:
    """A deterministic trajectory: contents depend only on (actor, seq, round)."""
    g = torch.Generator().manual_seed(1000 * round_index + 100 * actor + seq)
    num_prompts = 1 + (seq % 2)  # one prompt, or a switch to a second
    latents = torch.randn(FRAMES, CHANNELS, HEIGHT, WIDTH, generator=g)
    latents[0, 0, 0, :3] = torch.tensor([float("inf"), float("-inf"), -0.0])  # special values survive too
    return TrajectoryRow(
        trajectory_id=f"r{round_index}-a{actor}-t{seq}", round=round_index, actor_id=f"a{actor}",
        policy_version=round_index + seq % 2, seed=2**40 + seq, prompts=[f"prompt {seq} {i}" for i in range(num_prompts)],
        switch_frames=[3] if num_prompts == 2 else [],
        text_embeddings=torch.randn(num_prompts, TEXT_LEN, TEXT_DIM, generator=g).to(dtype),
        latents=latents.to(dtype), timings={"generate_s": 0.25 * seq}, created_at=1.7e9 + seq)


def bits(t: torch.Tensor) -> torch.Tensor:
    """Integer view of a float tensor: equal bits <=> identical values, NaN payloads and -0.0 included."""
    return t.view({4: torch.int32, 2: torch.int16}[t.element_size()])


def assert_same_row(a: TrajectoryRow, b: TrajectoryRow):
    for name in ("trajectory_id", "round", "actor_id", "policy_version", "seed", "prompts", "switch_frames",
                 "timings", "created_at"):
        assert getattr(a, name) == getattr(b, name), name
    for name in ("latents", "text_embeddings"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and x.shape == y.shape, name
        assert torch.equal(bits(x), bits(y)), name


def local_storage(tmp_path):
    return resolve_storage(StorageConfig(root=str(tmp_path / "runs"), experiment="exp"))


def write_two_actors(storage, round_index=0, dtype=torch.float32, per_actor=3) -> list[ShardFile]:
    """Two writers: actor a0 one file per trajectory, actor a1 one file for its whole batch."""
    files = [write_shard(storage, round_index, "a0", seq, [make_row(0, seq, round_index, dtype)])
             for seq in range(per_actor)]
    files.append(write_shard(storage, round_index, "a1", 0,
                             [make_row(1, seq, round_index, dtype) for seq in range(per_actor)]))
    return files


def expected_rows(round_index=0, dtype=torch.float32, per_actor=3) -> dict[str, TrajectoryRow]:
    rows = [make_row(a, s, round_index, dtype) for a in (0, 1) for s in range(per_actor)]
    return {r.trajectory_id: r for r in rows}


# ----------------------------------------------------------------------------------------------
# exact round trips and the commit point
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_rows_round_trip_bit_exactly(tmp_path, dtype):
    st = local_storage(tmp_path)
    files = write_two_actors(st, dtype=dtype)
    assert [f.name for f in files] == ["part-a0-00000.parquet", "part-a0-00001.parquet", "part-a0-00002.parquet",
                                       "part-a1-00000.parquet"]
    manifest = commit_round(st, 0, files, config_hash=hash_config({"model": {"dim": 64}}))
    assert manifest["num_rows"] == 6 and manifest["policy_versions"] == [0, 1]
    assert manifest["config_hash"] == hash_config({"model": {"dim": 64}}) != hash_config({"model": {"dim": 65}})
    for entry in manifest["files"]:  # sizes and hashes recomputed from the files on disk
        data = (tmp_path / "runs" / "exp" / "rollouts" / "round_0000" / entry["name"]).read_bytes()
        assert (len(data), hashlib.sha256(data).hexdigest()) == (entry["num_bytes"], entry["sha256"])
        assert entry["num_rows"] == (3 if entry["name"].startswith("part-a1") else 1)

    back = {r.trajectory_id: r for r in table_to_rows(read_round(st, 0))}
    want = expected_rows(dtype=dtype)
    assert back.keys() == want.keys()
    for tid, row in want.items():
        assert_same_row(row, back[tid])

    # plain pyarrow (no Ray) sees the latents as the canonical fixed-shape tensor extension
    table = pq.read_table(f"{st.round_dir(0)}/part-a1-00000.parquet")
    assert table.schema.field("latents").type.extension_name == "arrow.fixed_shape_tensor"
    assert table.schema.field("latents").type.shape == [FRAMES, CHANNELS, HEIGHT, WIDTH]


def test_manifest_is_the_commit_point(tmp_path):
    st = local_storage(tmp_path)
    files = write_two_actors(st, round_index=0)
    write_two_actors(st, round_index=1)  # written, never committed (driver died before commit)
    assert committed_rounds(st) == []
    commit_round(st, 0, files)
    assert committed_rounds(st) == [0]
    with pytest.raises(InputError, match=r"round 1 is not committed"):
        read_round(st, 1)

    # strays: a killed actor's finished file that never reached the driver, and a half-written temp file
    write_shard(st, 0, "a9", 0, [make_row(9, 0)])
    (tmp_path / "runs" / "exp" / "rollouts" / "round_0000" / ".part-a0-00003.parquet.tmp-deadbeef").write_bytes(b"PAR1")
    assert sorted(p.rsplit("/", 1)[1] for p in round_files(st, 0)) == sorted(f.name for f in files)
    assert {r.trajectory_id for r in table_to_rows(read_round(st, 0))} == set(expected_rows())

    # committing the same files again is a no-op; a different set is refused
    assert commit_round(st, 0, files)["files"] == read_manifest(st, 0)["files"]
    with pytest.raises(InputError, match="already committed"):
        commit_round(st, 0, files[:2])


def test_commit_checks_what_the_writers_reported(tmp_path):
    st = local_storage(tmp_path)
    files = write_two_actors(st)
    with pytest.raises(InputError, match="no shard files"):
        commit_round(st, 0, [])
    with pytest.raises(InputError, match="listed twice"):
        commit_round(st, 0, [files[0], files[0]])
    ghost = ShardFile(name="part-a7-00000.parquet", num_rows=1, num_bytes=10, sha256="0" * 64, policy_versions=(0,))
    with pytest.raises(InputError, match="part-a7-00000.parquet.*missing"):
        commit_round(st, 0, [*files, ghost])
    lying = ShardFile(**{**files[0].to_dict(), "num_bytes": files[0].num_bytes + 1, "policy_versions": (0,)})
    with pytest.raises(InputError, match=r"part-a0-00000.parquet has \d+ bytes"):
        commit_round(st, 0, [lying])
    assert committed_rounds(st) == []
    # dicts (as they come back from Ray actors after to_dict) are accepted too
    commit_round(st, 0, [f.to_dict() for f in files])
    assert committed_rounds(st) == [0]


def test_bad_rows_are_rejected_with_the_trajectory_named(tmp_path):
    st = local_storage(tmp_path)
    bad = make_row(0, 1)
    bad.switch_frames = []  # two prompts need one switch frame
    with pytest.raises(InputError, match=r"'r0-a0-t1'.*switch_frames"):
        write_shard(st, 0, "a0", 0, [bad])
    other = make_row(0, 2)
    other.latents = other.latents[:3]
    with pytest.raises(InputError, match="one shape"):
        write_shard(st, 0, "a0", 0, [make_row(0, 0), other])
    with pytest.raises(InputError, match="actor_id"):
        write_shard(st, 0, "a/0", 0, [make_row(0, 0)])
    with pytest.raises(InputError, match="round 0"):
        write_shard(st, 1, "a0", 0, [make_row(0, 0)])
    wrong = make_row(0, 0)
    wrong.latents = wrong.latents.to(torch.int32)
    with pytest.raises(InputError, match="not storable"):
        write_shard(st, 0, "a0", 0, [wrong])


# ----------------------------------------------------------------------------------------------
# corrupt shards
# ----------------------------------------------------------------------------------------------


def test_corrupt_or_truncated_shards_are_reported_by_name(tmp_path):
    st = local_storage(tmp_path)
    files = write_two_actors(st)
    # a shard whose sha256 matches but which is not parquet: caught by the parquet reader
    garbage = b"not a parquet file at all"
    st.write_bytes(f"{st.round_dir(0)}/part-a2-00000.parquet", garbage)
    files.append(ShardFile("part-a2-00000.parquet", 1, len(garbage), hashlib.sha256(garbage).hexdigest(), (0,)))
    commit_round(st, 0, files)
    rdir = tmp_path / "runs" / "exp" / "rollouts" / "round_0000"
    truncated = rdir / "part-a0-00001.parquet"
    truncated.write_bytes(truncated.read_bytes()[:-100])
    flipped = rdir / "part-a1-00000.parquet"
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, different bytes
    flipped.write_bytes(bytes(data))

    for reader in (lambda: read_round(st, 0), lambda: round_files(st, 0)):
        with pytest.raises(InputError, match=r"part-a0-00001\.parquet.*truncated"):
            reader()
    with pytest.raises(InputError, match=r"part-a0-00001\.parquet"):
        round_files(st, 0, verify="footer")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        table = read_round(st, 0, on_corrupt="skip")
    messages = [str(w.message) for w in caught if issubclass(w.category, CorruptShardWarning)]
    assert len(messages) == 3
    assert any("part-a0-00001.parquet" in m and "truncated" in m for m in messages)
    assert any("part-a1-00000.parquet" in m and "sha256" in m for m in messages)
    assert any("part-a2-00000.parquet" in m and "unreadable parquet" in m for m in messages)
    assert sorted(table.column("trajectory_id").to_pylist()) == ["r0-a0-t0", "r0-a0-t2"]

    with pytest.warns(CorruptShardWarning):
        kept = round_files(st, 0, on_corrupt="skip")
    assert sorted(p.rsplit("/", 1)[1] for p in kept) == ["part-a0-00000.parquet", "part-a0-00002.parquet"]


# ----------------------------------------------------------------------------------------------
# Ray Data: two writer actors, then read_parquet over the manifest (local and S3)
# ----------------------------------------------------------------------------------------------


def _check_dataset_rows(ds, want: dict[str, TrajectoryRow]):
    ds = ds.materialize()  # execute the read once; rows and batches below come from the object store
    rows = [row_to_torch(r) for r in ds.take_all()]
    assert sorted(r["trajectory_id"] for r in rows) == sorted(want)
    for r in rows:
        w = want[r["trajectory_id"]]
        assert r["latents"].dtype == w.latents.dtype and torch.equal(bits(r["latents"]), bits(w.latents))
        assert torch.equal(bits(r["text_embeddings"]), bits(w.text_embeddings))
        assert (r["prompts"], r["switch_frames"], r["seed"], r["policy_version"], r["timings"]) == (
            w.prompts, w.switch_frames, w.seed, w.policy_version, w.timings)

    seen = []
    for batch in ds.iter_batches(batch_size=4, batch_format="numpy"):
        b = batch_to_torch(batch)
        assert b["latents"].shape[1:] == (FRAMES, CHANNELS, HEIGHT, WIDTH)  # [B, F, C, H, W]
        assert b["seed"].dtype == torch.int64
        for i, tid in enumerate(b["trajectory_id"]):
            w = want[tid]
            assert torch.equal(bits(b["latents"][i]), bits(w.latents))
            assert torch.equal(bits(b["text_embeddings"][i]), bits(w.text_embeddings))
            assert b["prompts"][i] == w.prompts and b["switch_frames"][i] == w.switch_frames
            assert b["timings"][i] == w.timings and b["policy_version"][i].item() == w.policy_version
            seen.append(tid)
    assert sorted(seen) == sorted(want)


def test_two_writer_actors_then_ray_data_reads_every_row(tmp_path, ray_cluster):
    ray = ray_cluster

    @ray.remote(num_cpus=0.5)
    class Writer:
        def __init__(self, storage_cfg, actor: int):
            self.storage, self.actor = resolve_storage(storage_cfg), actor

        def write(self, round_index: int, seq: int, dtype_name: str) -> dict:
            row = make_row(self.actor, seq, round_index, getattr(torch, dtype_name))
            return write_shard(self.storage, round_index, f"a{self.actor}", seq, [row]).to_dict()

    storage_cfg = StorageConfig(root=str(tmp_path / "runs"), experiment="exp")
    st = resolve_storage(storage_cfg)
    writers = [Writer.remote(storage_cfg, a) for a in (0, 1)]
    for round_index in (0, 1):
        written = ray.get([w.write.remote(round_index, seq, "float16") for w in writers for seq in range(3)])
        commit_round(st, round_index, written)
    assert committed_rounds(st) == [0, 1]

    want = {f"r0-a{a}-t{s}": make_row(a, s, 0, torch.float16) for a in (0, 1) for s in range(3)}
    _check_dataset_rows(read_round_dataset(st, 0), want)

    # several rounds at once, with column projection
    rows = read_round_dataset(st, [0, 1], columns=["trajectory_id", "policy_version"]).take_all()
    assert all(sorted(r) == ["policy_version", "trajectory_id"] for r in rows)
    assert sorted((r["trajectory_id"], r["policy_version"]) for r in rows) == sorted(
        (f"r{k}-a{a}-t{s}", k + s % 2) for k in (0, 1) for a in (0, 1) for s in range(3))


def test_s3_shards_through_ray_data(s3_server, ray_cluster, tmp_path):
    st = resolve_storage(StorageConfig(root=f"s3://{s3_server['bucket']}/shards-{uuid.uuid4().hex[:8]}",
                                       experiment="exp", s3_endpoint=s3_server["endpoint"]))
    files = write_two_actors(st, dtype=torch.bfloat16)
    write_two_actors(st, round_index=1)  # uncommitted
    write_shard(st, 0, "a9", 0, [make_row(9, 0)])  # stray, not in the manifest
    commit_round(st, 0, files)
    assert committed_rounds(st) == [0]
    _check_dataset_rows(read_round_dataset(st, 0, verify="footer"), expected_rows(dtype=torch.bfloat16))
    with pytest.raises(InputError, match="not committed"):
        read_round_dataset(st, 1)

    # a truncated object on S3 is caught before Ray Data sees it
    name = files[0].name
    st.write_bytes(f"{st.round_dir(0)}/{name}", st.read_bytes(f"{st.round_dir(0)}/{name}")[:-50])
    with pytest.raises(InputError, match=name):
        read_round_dataset(st, 0)
    with pytest.warns(CorruptShardWarning, match=name):
        ds = read_round_dataset(st, 0, on_corrupt="skip")
    assert ds.count() == 5
