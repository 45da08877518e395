"""Rollout trajectories as parquet shards; a round's manifest is its commit point (DESIGN §4).

Writers (rollout actors) turn ``TrajectoryRow``s into one parquet file each call,
``{root}/{experiment}/rollouts/round_{k:04d}/part-{actor}-{seq:05d}.parquet``, written atomically
(cluster/storage.py), and hand back a ``ShardFile`` (name, rows, bytes, sha256). The rollout driver
collects those and calls ``commit_round``, which writes ``_MANIFEST.json`` last. Readers list only
rounds that have a manifest and read only the files it names, after checking size and sha256, so
a file from a killed actor (never returned to the driver) or a temp file is never seen, and a
truncated or altered shard is reported by name.

Columns of a shard (one row per trajectory):

    trajectory_id str, round int64, actor_id str, policy_version int64, seed int64,
    prompts list<str> [P], switch_frames list<int64> [P-1],
    text_embeddings binary        raw C-order bytes of the [P, Lt, D] prompt embeddings,
    text_embeddings_shape list<int64>, text_embeddings_dtype str
    latents arrow.fixed_shape_tensor[F, C, H, W]   clean latents of the whole rollout
    latents_dtype str             'float32' | 'float16' | 'bfloat16'
    timings str (JSON object of seconds), created_at float64 (unix seconds)

Why this layout: the number of prompts P differs between trajectories (one prompt, or a switch to
a second), so the text embeddings are stored as bytes + shape + dtype, which round-trips exactly
for any P and dtype. The latents have one shape per preset, so they use Arrow's canonical
fixed-shape tensor extension, which plain pyarrow and Ray Data both read back as ndarrays.
numpy has no bfloat16: bfloat16 tensors are stored bit-for-bit as their uint16 view and
reinterpreted on the way back (``latents_dtype`` says which).
"""

from __future__ import annotations

import hashlib
import json
import re
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch

from cluster.storage import Storage, is_transient
from slotmem.errors import InputError

if TYPE_CHECKING:
    import ray.data

MANIFEST = "_MANIFEST.json"
MANIFEST_FORMAT = 1
_ROUND_DIR = re.compile(r"^round_(\d{4,})$")
_ACTOR_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.]*$")

# torch dtype -> (name in the *_dtype columns, numpy dtype it is stored as)
_STORED_DTYPES = {
    torch.float32: ("float32", np.float32),
    torch.float16: ("float16", np.float16),
    torch.bfloat16: ("bfloat16", np.uint16),  # bit view: numpy has no bfloat16
}
_TORCH_BY_NAME = {name: dt for dt, (name, _) in _STORED_DTYPES.items()}


class CorruptShardWarning(UserWarning):
    """A committed shard failed its size/sha256/parquet check and was skipped."""


# -- rows ------------------------------------------------------------------------------------------


@dataclass
class TrajectoryRow:
    """One self-rollout trajectory as written by a rollout actor."""

    trajectory_id: str
    round: int
    actor_id: str
    policy_version: int
    seed: int
    prompts: list[str]
    switch_frames: list[int]
    """Latent frames where prompt i+1 takes over from prompt i (len(prompts) - 1 of them)."""
    text_embeddings: torch.Tensor
    """[P, Lt, D] text-encoder output per prompt."""
    latents: torch.Tensor
    """[F, C, H, W] clean latents of the whole rollout."""
    timings: dict[str, float] = field(default_factory=dict)
    created_at: float = field(default_factory=time.time)


@dataclass(frozen=True)
class ShardFile:
    """What a writer reports for one shard; the manifest lists these."""

    name: str
    num_rows: int
    num_bytes: int
    sha256: str
    policy_versions: tuple[int, ...]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["policy_versions"] = list(self.policy_versions)
        return d


def _tensor_to_numpy(t: torch.Tensor, what: str) -> tuple[np.ndarray, str]:
    if t.dtype not in _STORED_DTYPES:
        raise InputError(f"{what}: dtype {t.dtype} is not storable; expected one of "
                         f"{[n for n, _ in _STORED_DTYPES.values()]}")
    name, _ = _STORED_DTYPES[t.dtype]
    t = t.detach().cpu().contiguous()
    arr = t.view(torch.int16).numpy().view(np.uint16) if t.dtype == torch.bfloat16 else t.numpy()
    return arr, name


def _numpy_to_tensor(arr: np.ndarray, dtype_name: str, what: str) -> torch.Tensor:
    if dtype_name not in _TORCH_BY_NAME:
        raise InputError(f"{what}: unknown stored dtype {dtype_name!r}")
    if not arr.flags.writeable or not arr.flags.c_contiguous:  # torch wants to own writable memory
        arr = np.ascontiguousarray(arr).copy()
    if dtype_name == "bfloat16":
        return torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(arr)


def _validate_row(row: TrajectoryRow) -> None:
    tid = row.trajectory_id
    if not isinstance(tid, str) or not tid:
        raise InputError(f"trajectory row: trajectory_id must be a non-empty string, got {tid!r}")
    what = f"trajectory {tid!r}"
    for name in ("round", "policy_version", "seed"):
        v = getattr(row, name)
        if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < 2**63:
            raise InputError(f"{what}: {name} must be a non-negative 64-bit integer, got {v!r}")
    if not row.prompts or not all(isinstance(p, str) for p in row.prompts):
        raise InputError(f"{what}: prompts must be a non-empty list of strings, got {row.prompts!r}")
    if row.latents.dim() != 4:
        raise InputError(f"{what}: latents must be [F, C, H, W], got shape {tuple(row.latents.shape)}")
    num_frames = row.latents.shape[0]
    sw = list(row.switch_frames)
    if len(sw) != len(row.prompts) - 1 or sw != sorted(set(sw)) or any(
            not isinstance(f, int) or not 0 < f < num_frames for f in sw):
        raise InputError(f"{what}: switch_frames must be {len(row.prompts) - 1} increasing frames in "
                         f"(0, {num_frames}) for {len(row.prompts)} prompts, got {sw!r}")
    emb = row.text_embeddings
    if emb.dim() != 3 or emb.shape[0] != len(row.prompts):
        raise InputError(f"{what}: text_embeddings must be [P={len(row.prompts)}, Lt, D], got shape "
                         f"{tuple(emb.shape)}")


def rows_to_table(rows: Sequence[TrajectoryRow]) -> pa.Table:
    """Trajectory rows -> an Arrow table with the shard schema (module docstring)."""
    if not rows:
        raise InputError("no trajectory rows to write")
    for row in rows:
        _validate_row(row)
    latents, latent_dtypes = zip(*(_tensor_to_numpy(r.latents, f"trajectory {r.trajectory_id!r} latents")
                                   for r in rows))
    shapes = {(a.shape, a.dtype) for a in latents}
    if len(shapes) != 1:
        raise InputError(f"one shard needs latents of one shape and dtype, got {sorted(map(str, shapes))}")
    embs = [_tensor_to_numpy(r.text_embeddings, f"trajectory {r.trajectory_id!r} text_embeddings") for r in rows]
    return pa.table({
        "trajectory_id": pa.array([r.trajectory_id for r in rows], pa.string()),
        "round": pa.array([r.round for r in rows], pa.int64()),
        "actor_id": pa.array([r.actor_id for r in rows], pa.string()),
        "policy_version": pa.array([r.policy_version for r in rows], pa.int64()),
        "seed": pa.array([r.seed for r in rows], pa.int64()),
        "prompts": pa.array([list(r.prompts) for r in rows], pa.list_(pa.string())),
        "switch_frames": pa.array([list(r.switch_frames) for r in rows], pa.list_(pa.int64())),
        "text_embeddings": pa.array([a.tobytes() for a, _ in embs], pa.binary()),
        "text_embeddings_shape": pa.array([list(a.shape) for a, _ in embs], pa.list_(pa.int64())),
        "text_embeddings_dtype": pa.array([name for _, name in embs], pa.string()),
        "latents": pa.FixedShapeTensorArray.from_numpy_ndarray(np.stack(latents)),  # [N, F, C, H, W]
        "latents_dtype": pa.array(latent_dtypes, pa.string()),
        "timings": pa.array([json.dumps(r.timings, sort_keys=True) for r in rows], pa.string()),
        "created_at": pa.array([float(r.created_at) for r in rows], pa.float64()),
    })


def table_to_rows(table: pa.Table) -> list[TrajectoryRow]:
    """The inverse of rows_to_table (all columns needed)."""
    latents = table.column("latents").combine_chunks().to_numpy_ndarray()  # [N, F, C, H, W]
    cols = {name: table.column(name).to_pylist() for name in table.column_names if name != "latents"}
    rows = []
    for i in range(table.num_rows):
        tid = cols["trajectory_id"][i]
        rows.append(TrajectoryRow(
            trajectory_id=tid, round=cols["round"][i], actor_id=cols["actor_id"][i],
            policy_version=cols["policy_version"][i], seed=cols["seed"][i], prompts=cols["prompts"][i],
            switch_frames=cols["switch_frames"][i],
            text_embeddings=_embedding_from_bytes(cols["text_embeddings"][i], cols["text_embeddings_shape"][i],
                                                  cols["text_embeddings_dtype"][i], f"trajectory {tid!r}"),
            latents=_numpy_to_tensor(latents[i], cols["latents_dtype"][i], f"trajectory {tid!r}"),
            timings=json.loads(cols["timings"][i]), created_at=cols["created_at"][i]))
    return rows


def _embedding_from_bytes(data: bytes, shape: Iterable[int], dtype_name: str, what: str) -> torch.Tensor:
    if dtype_name not in _TORCH_BY_NAME:
        raise InputError(f"{what}: unknown stored dtype {dtype_name!r}; expected one of {sorted(_TORCH_BY_NAME)}")
    emb = np.frombuffer(data, dtype=_STORED_DTYPES[_TORCH_BY_NAME[dtype_name]][1])
    emb = emb.reshape([int(s) for s in shape])  # [P, Lt, D]
    return _numpy_to_tensor(emb, dtype_name, what)


# -- Ray Data rows/batches -> torch ----------------------------------------------------------------


def row_to_torch(row: dict[str, Any]) -> dict[str, Any]:
    """A Ray Data row (``take``/``iter_rows``) -> tensors: latents [F, C, H, W] and
    text_embeddings [P, Lt, D] in their written dtypes; timings as a dict; the rest as Python values."""
    out = {k: v for k, v in row.items() if not k.startswith(("latents", "text_embeddings"))}
    tid = row.get("trajectory_id", "?")
    if "latents" in row:
        out["latents"] = _numpy_to_tensor(np.asarray(row["latents"]), row["latents_dtype"], f"trajectory {tid!r}")
    if "text_embeddings" in row:
        out["text_embeddings"] = _embedding_from_bytes(row["text_embeddings"], row["text_embeddings_shape"],
                                                       row["text_embeddings_dtype"], f"trajectory {tid!r}")
    for k in ("prompts", "switch_frames"):
        if k in out:
            out[k] = _py_list(out[k])
    if "timings" in out:
        out["timings"] = json.loads(out["timings"])
    return out


def _py_list(values) -> list:
    """A list column cell (list or numpy array) -> a list of Python scalars."""
    return [v.item() if isinstance(v, np.generic) else v for v in values]


def batch_to_torch(batch: dict[str, np.ndarray]) -> dict[str, Any]:
    """A Ray Data numpy batch (``iter_batches(batch_format='numpy')``) -> tensors.

    latents -> [B, F, C, H, W] in the written dtype; text_embeddings -> list of [P_b, Lt, D]
    (P differs per row); round/policy_version/seed -> int64 [B]; timings -> dicts; the rest -> lists.
    """
    out: dict[str, Any] = {}
    if "latents" in batch:
        names = set(batch["latents_dtype"].tolist())
        if len(names) != 1:
            raise InputError(f"one batch holds latents of several dtypes {sorted(names)}; read rounds separately")
        out["latents"] = _numpy_to_tensor(batch["latents"], names.pop(), "latents batch")
    if "text_embeddings" in batch:
        out["text_embeddings"] = [
            _embedding_from_bytes(data, shape, name, "text_embeddings batch")
            for data, shape, name in zip(batch["text_embeddings"], batch["text_embeddings_shape"],
                                         batch["text_embeddings_dtype"])]
    for k, v in batch.items():
        if k.startswith(("latents", "text_embeddings")):
            continue
        if k in ("round", "policy_version", "seed"):
            out[k] = torch.from_numpy(np.asarray(v, dtype=np.int64).copy())
        elif k in ("prompts", "switch_frames"):
            out[k] = [_py_list(item) for item in v]
        elif k == "timings":
            out[k] = [json.loads(t) for t in v]
        else:
            out[k] = v.tolist()
    return out


# -- writing and committing ------------------------------------------------------------------------


def shard_name(actor_id: str, seq: int) -> str:
    return f"part-{actor_id}-{seq:05d}.parquet"


def write_shard(storage: Storage, round_index: int, actor_id: str, seq: int,
                rows: Sequence[TrajectoryRow]) -> ShardFile:
    """Write rows as `part-{actor_id}-{seq:05d}.parquet` in round `round_index`'s directory.

    `seq` must be unique per (round, actor): the driver passes the trajectory index, so an actor
    restarted by Ray that redoes a trajectory overwrites only a file nobody has committed.
    """
    if not isinstance(actor_id, str) or not _ACTOR_ID.match(actor_id):
        raise InputError(f"actor_id must match {_ACTOR_ID.pattern} (it is part of a file name), got {actor_id!r}")
    if not isinstance(seq, int) or seq < 0:
        raise InputError(f"shard seq must be a non-negative integer, got {seq!r}")
    for row in rows:
        if row.round != round_index or row.actor_id != actor_id:
            raise InputError(f"trajectory {row.trajectory_id!r} says round {row.round} / actor {row.actor_id!r}, "
                             f"but is written to round {round_index} by actor {actor_id!r}")
    table = rows_to_table(rows)
    sink = pa.BufferOutputStream()
    # Dictionary encoding only wastes time on tensors and unique ids.
    pq.write_table(table, sink, use_dictionary=False)
    buf = sink.getvalue()
    name = shard_name(actor_id, seq)
    storage.write_bytes(f"{storage.round_dir(round_index)}/{name}", buf)
    return ShardFile(name=name, num_rows=table.num_rows, num_bytes=buf.size,
                     sha256=hashlib.sha256(memoryview(buf)).hexdigest(),
                     policy_versions=tuple(sorted({r.policy_version for r in rows})))


def hash_config(config_dict: dict[str, Any]) -> str:
    """Short stable hash of a JSON-able config (e.g. ``Config.to_dict()``) for the manifest."""
    return hashlib.sha256(json.dumps(config_dict, sort_keys=True, default=str).encode()).hexdigest()[:16]


def commit_round(storage: Storage, round_index: int, written_files: Iterable[ShardFile | dict],
                 config_hash: str = "", meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write round `round_index`'s `_MANIFEST.json` (the commit point) listing `written_files`.

    Every listed file must exist with its reported size. Committing the same files again is a
    no-op; committing a different set to an already committed round is an error.
    """
    files = [f if isinstance(f, ShardFile) else ShardFile(**{**f, "policy_versions": tuple(f["policy_versions"])})
             for f in written_files]
    rdir = storage.round_dir(round_index)
    if not files:
        raise InputError(f"round {round_index}: no shard files to commit")
    names = [f.name for f in files]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise InputError(f"round {round_index}: shard file(s) listed twice: {dupes}")
    infos = storage.retry(f"stat shards of {storage.uri(rdir)}",
                          lambda: storage.fs.get_file_info([f"{rdir}/{n}" for n in names]))
    for f, info in zip(files, infos):
        if info.type != pafs.FileType.File:
            raise InputError(f"round {round_index}: shard {f.name} was reported written but is missing "
                             f"from {storage.uri(rdir)}")
        if info.size != f.num_bytes:
            raise InputError(f"round {round_index}: shard {f.name} has {info.size} bytes, its writer "
                             f"reported {f.num_bytes}")
    entries = sorted((f.to_dict() for f in files), key=lambda d: d["name"])
    manifest_path = f"{rdir}/{MANIFEST}"
    if storage.exists(manifest_path):
        existing = read_manifest(storage, round_index)
        if [(e["name"], e["sha256"]) for e in existing["files"]] == [(e["name"], e["sha256"]) for e in entries]:
            return existing
        raise InputError(f"round {round_index} is already committed with other files ({storage.uri(manifest_path)})")
    manifest = {
        "format": MANIFEST_FORMAT,
        "experiment": storage.experiment,
        "round": round_index,
        "files": entries,
        "num_rows": sum(f.num_rows for f in files),
        "num_bytes": sum(f.num_bytes for f in files),
        "policy_versions": sorted({v for f in files for v in f.policy_versions}),
        "config_hash": config_hash,
        "committed_at": time.time(),
        "meta": meta or {},
    }
    storage.write_json(manifest_path, manifest)
    return manifest


# -- reading committed rounds ----------------------------------------------------------------------


def committed_rounds(storage: Storage) -> list[int]:
    """Rounds whose manifest exists, ascending. Rounds still being written are not listed."""
    candidates = []
    for info in storage.list_dir(storage.rollouts_dir()):
        m = _ROUND_DIR.match(info.base_name)
        if m and info.type == pafs.FileType.Directory:
            candidates.append(int(m.group(1)))
    if not candidates:
        return []
    markers = [f"{storage.round_dir(k)}/{MANIFEST}" for k in candidates]
    infos = storage.retry("stat round manifests", lambda: storage.fs.get_file_info(markers))
    return sorted(k for k, i in zip(candidates, infos) if i.type == pafs.FileType.File)


def read_manifest(storage: Storage, round_index: int) -> dict[str, Any]:
    """The manifest of a committed round (InputError if the round is not committed or the file is bad)."""
    path = f"{storage.round_dir(round_index)}/{MANIFEST}"
    if not storage.exists(path):
        raise InputError(f"rollout round {round_index} is not committed (no {storage.uri(path)}); "
                         f"committed rounds: {committed_rounds(storage)}")
    manifest = storage.read_json(path)
    ok = (isinstance(manifest, dict) and manifest.get("round") == round_index
          and isinstance(manifest.get("files"), list)
          and all(isinstance(f, dict) and {"name", "num_rows", "num_bytes", "sha256"} <= set(f)
                  for f in manifest["files"]))
    if not ok:
        raise InputError(f"{storage.uri(path)} is not a manifest of round {round_index} (expected 'round' and "
                         f"'files' entries with name/num_rows/num_bytes/sha256)")
    return manifest


def _corrupt(storage: Storage, path: str, problem: str, on_corrupt: str) -> None:
    msg = f"corrupt rollout shard {storage.uri(path)}: {problem}"
    if on_corrupt == "raise":
        raise InputError(msg)
    warnings.warn(msg + " (skipped)", CorruptShardWarning, stacklevel=3)


def _verify_bytes(data: bytes, entry: dict[str, Any]) -> str | None:
    if len(data) != entry["num_bytes"]:
        return f"{len(data)} bytes, manifest says {entry['num_bytes']} (truncated or rewritten)"
    sha = hashlib.sha256(data).hexdigest()
    if sha != entry["sha256"]:
        return f"sha256 {sha[:12]}… does not match the manifest's {entry['sha256'][:12]}…"
    return None


def _verify_footer(metadata: pq.FileMetaData, entry: dict[str, Any]) -> str | None:
    if metadata.num_rows != entry["num_rows"]:
        return f"{metadata.num_rows} rows, manifest says {entry['num_rows']}"
    return None


def _checked(storage: Storage, round_index: int, on_corrupt: str, check) -> list:
    """Run ``check(path, entry) -> (problem | None, value)`` on every file of a round's manifest.

    Returns the values of the files without a problem; a problem file is reported by name and raises or is
    skipped (``on_corrupt``). A transient storage error is re-raised: an outage must never skip data.
    """
    if on_corrupt not in ("raise", "skip"):
        raise InputError(f"on_corrupt must be 'raise' or 'skip', got {on_corrupt!r}")
    rdir = storage.round_dir(round_index)
    values = []
    for entry in read_manifest(storage, round_index)["files"]:
        path = f"{rdir}/{entry['name']}"
        value = None
        try:
            problem, value = check(path, entry)
        except FileNotFoundError:
            problem = "listed in the manifest but missing"
        except (pa.ArrowException, OSError, ValueError) as e:
            if is_transient(e):
                raise
            problem = f"unreadable parquet ({e})"
        if problem:
            _corrupt(storage, path, problem, on_corrupt)
        else:
            values.append(value)
    if not values:
        raise InputError(f"rollout round {round_index}: no readable shard left in {storage.uri(rdir)}")
    return values


def round_files(storage: Storage, round_index: int, on_corrupt: str = "raise", verify: str = "sha256") -> list[str]:
    """Filesystem paths of a committed round's shards, each checked against the manifest.

    verify='sha256' reads every file and compares size, hash and the parquet footer's row count
    (catches any change); verify='footer' compares the size and reads only the footer, which is
    cheap on S3 but misses a byte flipped inside a page; verify='none' trusts the manifest.
    """
    if verify not in ("sha256", "footer", "none"):
        raise InputError(f"verify must be 'sha256', 'footer' or 'none', got {verify!r}")

    def check(path: str, entry: dict[str, Any]) -> tuple[str | None, str]:
        if verify == "sha256":
            data = storage.read_bytes(path)
            return _verify_bytes(data, entry) or _verify_footer(pq.read_metadata(pa.BufferReader(data)), entry), path
        if verify == "footer":
            info = storage.info(path)
            if info.size != entry["num_bytes"]:
                return f"{info.size} bytes, manifest says {entry['num_bytes']} (truncated or rewritten)", path
            footer = storage.retry(f"read footer {storage.uri(path)}",
                                   lambda: pq.read_metadata(path, filesystem=storage.fs))
            return _verify_footer(footer, entry), path
        return None, path

    return _checked(storage, round_index, on_corrupt, check)


def read_round(storage: Storage, round_index: int, columns: Sequence[str] | None = None,
               on_corrupt: str = "raise") -> pa.Table:
    """All rows of a committed round as one Arrow table (in-process; checks every file's sha256)."""

    def check(path: str, entry: dict[str, Any]) -> tuple[str | None, pa.Table | None]:
        data = storage.read_bytes(path)
        problem = _verify_bytes(data, entry)
        if problem:
            return problem, None
        table = pq.read_table(pa.BufferReader(data), columns=list(columns) if columns else None)
        if table.num_rows != entry["num_rows"]:
            return f"{table.num_rows} rows, manifest says {entry['num_rows']}", None
        return None, table

    return pa.concat_tables(_checked(storage, round_index, on_corrupt, check))


def read_shard(storage: Storage, path: str, entry: dict[str, Any], columns: Sequence[str] | None = None) -> pa.Table:
    """One shard file, checked against its manifest entry's size and sha256 (a trainer's row)."""
    data = storage.read_bytes(path)
    problem = _verify_bytes(data, entry)
    if problem:
        raise InputError(f"corrupt rollout shard {storage.uri(path)}: {problem}")
    return pq.read_table(pa.BufferReader(data), columns=list(columns) if columns else None)


def read_round_dataset(storage: Storage, rounds: int | Sequence[int], columns: Sequence[str] | None = None,
                       on_corrupt: str = "raise", verify: str = "sha256") -> "ray.data.Dataset":
    """A Ray Dataset over the manifest-listed shards of committed round(s) (lazy, streaming)."""
    import ray.data

    rounds = [rounds] if isinstance(rounds, int) else list(rounds)
    if not rounds:
        raise InputError("read_round_dataset: no rounds given")
    paths = [p for k in rounds for p in round_files(storage, k, on_corrupt=on_corrupt, verify=verify)]
    return ray.data.read_parquet(paths, filesystem=storage.fs, columns=list(columns) if columns else None)
