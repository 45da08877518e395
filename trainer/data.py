"""Rows for the trainer: the newest committed rollout shards, with bounded staleness and bounded reuse.

The rollout fleet keeps committing small rounds (rollout/round.py) while a stage trains, so the trainer's data is
not a fixed dataset: rank 0 plans, every update, which committed row each rank trains on (``ReplayPlanner``), and
broadcasts the plan; each rank reads the rows it is given (``RowCache``: one manifest-listed shard file, checked
against the manifest's size and sha256, read with pyarrow through the same retrying ``Storage``) and keeps them
while they stay eligible. Rows arrive one round at a time, a few files at once; a Ray Data job per read costs
seconds of scheduling for one file, so Ray Data stays the reader of whole rounds (``read_round_dataset``, benches).

A row is eligible while
  * it is fresh: trainer_version - row.policy_version <= pipeline.max_policy_lag, in generator updates
    (veRL / OpenRLHF bound staleness the same way; Stage 0 only needs the frozen backbone's features of clean
    trajectories, so it does not wait for fresh rows), and
  * it was trained on fewer than pipeline.max_row_reuse times (every window drawn from it counts, across stages).
The planner prefers the least used, then the freshest rows, and among equals a rank's own cached rows. With no eligible row the
trainer waits for the fleet (``data_wait``), up to pipeline.data_wait_timeout_s. The ledger of uses is part of the
checkpoint and is handed from stage to stage.

One shard file holds one trajectory (rollout actors write one per file), so a row is named by its round and file.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

from cluster.storage import Storage
from rollout.shards import batch_to_torch, committed_rounds, read_manifest, read_shard
from slotmem.errors import InputError

# What a training window needs from a shard row (the prompt strings and timings stay on disk).
DATA_COLUMNS = ("trajectory_id", "policy_version", "switch_frames", "latents", "latents_dtype", "text_embeddings",
                "text_embeddings_shape", "text_embeddings_dtype")
REFRESH_S = 2.0  # how often rank 0 lists committed rounds while it has eligible rows (a LIST on S3)
POLL_S = 0.5  # how often it looks again while starved


@dataclass
class RowRef:
    """A committed row: where it is and what the planner knows of it."""

    key: str  # "round_0003/part-a1-00012.parquet"
    path: str  # filesystem path of the shard (storage.fs)
    round: int
    policy_version: int
    num_bytes: int
    sha256: str
    uses: int = 0
    owner: int = -1  # the rank whose cache holds it (-1: none)


@dataclass
class Assignment:
    """One update's rows: per rank the row to train on and the rows it may drop from its cache."""

    rows: list[RowRef]  # one per rank
    drop: list[list[str]]  # per rank: keys no longer eligible
    lags: list[int]  # per rank: trainer_version - row.policy_version
    waited_s: float = 0.0
    fresh_unused: int = 0  # eligible rows not trained on yet (the fleet's back-pressure signal)


@dataclass
class ReplayPlanner:
    """Rank 0's view of the committed rows and their uses."""

    storage: Storage
    world: int
    max_policy_lag: int
    max_row_reuse: int
    enforce_lag: bool = True
    enforce_reuse: bool = True
    wait_timeout_s: float = 3600.0
    rows: dict[str, RowRef] = field(default_factory=dict)
    ledger: dict[str, int] = field(default_factory=dict)  # uses of every row ever trained on (across stages)
    _seen_rounds: set[int] = field(default_factory=set)
    _last_refresh: float = 0.0

    def refresh(self) -> int:
        """Add the rows of rounds committed since the last look; returns how many were added."""
        added = 0
        for k in committed_rounds(self.storage):
            if k in self._seen_rounds:
                continue
            manifest = read_manifest(self.storage, k)
            for entry in manifest["files"]:
                versions = entry.get("policy_versions") or [0]
                key = f"round_{k:04d}/{entry['name']}"
                self.rows[key] = RowRef(key=key, path=f"{self.storage.round_dir(k)}/{entry['name']}", round=k,
                                        policy_version=min(versions), num_bytes=entry["num_bytes"],
                                        sha256=entry["sha256"], uses=self.ledger.get(key, 0))
                added += 1
            self._seen_rounds.add(k)
        self._last_refresh = time.monotonic()
        return added

    def _eligible(self, version: int) -> list[RowRef]:
        fresh = [r for r in self.rows.values() if (not self.enforce_reuse or r.uses < self.max_row_reuse)
                 and (not self.enforce_lag or version - r.policy_version <= self.max_policy_lag)]
        return sorted(fresh, key=lambda r: (r.uses, -r.policy_version, -r.round, r.key))

    def plan(self, version: int) -> Assignment:
        """Rows for the next update at trainer version `version` (waits for the fleet when none is eligible)."""
        t0 = time.monotonic()
        if time.monotonic() - self._last_refresh > REFRESH_S:
            self.refresh()
        eligible = self._eligible(version)
        while not eligible:
            if time.monotonic() - t0 > self.wait_timeout_s:
                raise TimeoutError(
                    f"no eligible rollout row for {self.wait_timeout_s:g} s (pipeline.data_wait_timeout_s): trainer "
                    f"version {version}, pipeline.max_policy_lag={self.max_policy_lag}, pipeline.max_row_reuse="
                    f"{self.max_row_reuse}, {len(self.rows)} committed rows, newest policy version "
                    f"{max((r.policy_version for r in self.rows.values()), default=None)}; is the rollout fleet "
                    "running?")
            time.sleep(POLL_S)
            self.refresh()
            eligible = self._eligible(version)
        chosen: list[RowRef] = []
        free = list(eligible)
        for rank in range(self.world):
            if not free:  # fewer eligible rows than ranks: the best ones are used twice in this update
                chosen.append(eligible[rank % len(eligible)])
                continue
            # the best row; among rows as unused and as fresh as it, this rank's own cached one (no read)
            tier = (free[0].uses, free[0].policy_version)
            own = next((r for r in free if r.owner == rank and (r.uses, r.policy_version) == tier), free[0])
            chosen.append(own)
            free.remove(own)
        drop: list[list[str]] = [[] for _ in range(self.world)]
        for rank, row in enumerate(chosen):
            if row.owner not in (-1, rank):
                drop[row.owner].append(row.key)
            row.owner = rank
            row.uses += 1
            self.ledger[row.key] = row.uses
        still = {r.key for r in self._eligible(version)}
        for row in self.rows.values():
            if row.owner >= 0 and row.key not in still and all(row is not c for c in chosen):
                drop[row.owner].append(row.key)
                row.owner = -1
        unused = sum(1 for r in self._eligible(version) if r.uses == 0)
        return Assignment(rows=list(chosen), drop=drop, lags=[version - r.policy_version for r in chosen],
                          waited_s=time.monotonic() - t0, fresh_unused=unused)

    def state_dict(self) -> dict[str, Any]:
        return {"ledger": dict(self.ledger)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ledger = dict(state.get("ledger", {}))
        for key, row in self.rows.items():
            row.uses = self.ledger.get(key, 0)


class RowCache:
    """A rank's rows, read once each and kept while the planner says they are eligible."""

    def __init__(self, storage: Storage):
        self.storage = storage
        self.rows: dict[str, dict[str, Any]] = {}
        self.reads = 0

    def get(self, ref: RowRef, drop: list[str]) -> dict[str, Any]:
        """The row of `ref` as a ``batch_to_torch`` batch of one trajectory."""
        for key in drop:
            self.rows.pop(key, None)
        if ref.key not in self.rows:
            self.rows[ref.key] = self._read(ref)
            self.reads += 1
        return self.rows[ref.key]

    def _read(self, ref: RowRef) -> dict[str, Any]:
        table = read_shard(self.storage, ref.path, {"num_bytes": ref.num_bytes, "sha256": ref.sha256},
                           columns=DATA_COLUMNS)
        if table.num_rows != 1:
            raise InputError(f"rollout shard {self.storage.uri(ref.path)} must hold exactly one trajectory row")
        return batch_to_torch({name: table.column(name).combine_chunks().to_numpy(zero_copy_only=False)
                               if name != "latents" else table.column(name).combine_chunks().to_numpy_ndarray()
                               for name in table.column_names})


def assignment_to_wire(a: Assignment) -> dict[str, Any]:
    return {"rows": [asdict(r) for r in a.rows], "drop": a.drop, "lags": a.lags, "waited_s": a.waited_s,
            "fresh_unused": a.fresh_unused}


def assignment_from_wire(d: dict[str, Any]) -> Assignment:
    return Assignment(rows=[RowRef(**r) for r in d["rows"]], drop=d["drop"], lags=d["lags"], waited_s=d["waited_s"],
                      fresh_unused=d["fresh_unused"])
