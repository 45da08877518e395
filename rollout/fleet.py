"""The long-lived rollout fleet of a pipeline: one actor group from the first stage to the sample video.

    continuous  a background thread commits small rounds one after the other (rollout/round.py
                roll_out_round) while the trainer runs; actors load the newest published policy between
                trajectories, so every round is near on-policy. Back-pressure (OpenRLHF's async queue): the
                trainer's rank 0 reports to ``ReplayDemand`` how many fresh rows it has not trained on yet, and the
                fleet pauses while that reaches pipeline.rows_ahead.
    sequential  ``roll_out(n)`` commits n rounds in the caller's thread; the actors idle while training runs
                (the pipeline's old shape, kept for bench/loop.py).

Actors that die or stop answering (a lost node) leave the group and their trajectories run on the others
(rollout/round.py dispatch); committed rounds are never touched again. The fleet's own numbers (rounds,
trajectories, the share of actor time spent idle) are logged once per ``LOG_EVERY_S`` and in ``stats``.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import ray

from cluster.control import on_this_node
from cluster.storage import Storage
from rollout.round import RolloutActorGroup, RoundResult, roll_out_round, start_group
from rollout.shards import committed_rounds
from slotmem.config import Config

LOG_EVERY_S = 60.0
PAUSE_S = 0.25
DRAIN_S = 60.0  # how long a stopping fleet waits for its running trajectories before killing the actors
NODE_CHECK_S = 5.0  # how often the continuous loop retires actors of lost nodes (rollout/round.py retire_lost)


@ray.remote(num_cpus=0)
class ReplayDemand:
    """Fresh rows not trained on yet, for back-pressure: the trainer's rank 0 planner reports its count at every
    update, the fleet adds the rows it commits after that report (between stages nobody reports, and a stale count
    alone would let the fleet run ahead without bound)."""

    def __init__(self):
        self.reported = 0
        self.since = 0

    def report(self, fresh_unused: int) -> None:
        self.reported, self.since = int(fresh_unused), 0

    def committed(self, rows: int) -> None:
        self.since += int(rows)

    def waiting(self) -> int:
        return self.reported + self.since


@dataclass
class FleetStats:
    rounds: int = 0
    trajectories: int = 0
    busy_s: float = 0.0
    paused_s: float = 0.0
    started: float = field(default_factory=time.perf_counter)
    results: list[RoundResult] = field(default_factory=list)

    def idle_fraction(self, num_actors: int) -> float:
        wall = (time.perf_counter() - self.started) * max(num_actors, 1)
        return max(0.0, 1.0 - self.busy_s / wall) if wall > 0 else 0.0


class RolloutFleet:
    def __init__(self, cfg: Config, storage: Storage, *, log=print,
                 on_round: Callable[[RoundResult], None] | None = None,
                 system_metrics: tuple[str, str] | None = None):
        """`on_round`: called with every committed round, from the committing thread (the pipeline logs it to
        MLflow as it happens). `system_metrics`: (run id, tracking URI) that one actor per node samples its node's
        CPU/memory/GPU metrics into."""
        self.cfg = cfg
        self.storage = storage
        self.log = log
        self.on_round = on_round
        self.system_metrics = system_metrics
        self.group: RolloutActorGroup | None = None
        self.stats = FleetStats()
        self.demand = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.error: BaseException | None = None
        self._next_round = 0

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> "RolloutFleet":
        self.group, ready, startup_s = start_group(self.cfg, self.storage, "fleet")
        where = ", ".join(f"{r['actor_id']}@{r['host']}:{r['device']}" for r in ready)
        self.log(f"[rollout] fleet of {len(self.group)} actor(s) up in {startup_s:.1f} s ({where})")
        if self.system_metrics is not None:
            first_per_node = {r["node"]: r["actor_id"] for r in reversed(ready)}
            ray.get([self.group.actors[self.group.actor_ids.index(a)].track_system.remote(*self.system_metrics)
                     for a in first_per_node.values()])
        done = committed_rounds(self.storage)
        self._next_round = done[-1] + 1 if done else 0
        self.stats = FleetStats()
        return self

    def start_continuous(self) -> "RolloutFleet":
        """Commit rounds in the background until ``stop``; the trainer's demand paces it."""
        self.demand = ReplayDemand.options(scheduling_strategy=on_this_node()).remote()
        self._thread = threading.Thread(target=self._loop, name="rollout-fleet", daemon=True)
        self._thread.start()
        return self

    def halt(self) -> None:
        """Stop committing rounds (an in-flight round is abandoned: it was never committed); the actors stay up
        for the sample, and the totals in ``stats`` are final from here on."""
        self._stop.set()
        if self._thread is None or not self._thread.is_alive():
            return
        if self.group is not None:
            self.group.closing = True  # a dispatch in flight lets its running trajectories finish, then returns
        self._thread.join(timeout=DRAIN_S)
        if self.group is not None and not self._thread.is_alive():
            self.group.closing = False

    def stop(self) -> None:
        """Halt the rounds and free the actors."""
        self.halt()
        if self.group is not None:
            self.group.shutdown()  # sets closing first: a dispatch still in flight returns without requeueing
        if self._thread is not None:
            self._thread.join(timeout=60)
        self.group = None

    def check(self) -> None:
        """Raise the background loop's error, if it failed; retire actors of lost nodes (before a stage starts,
        so their placement groups cannot hold up the trainer's)."""
        if self.error is not None:
            raise RuntimeError(f"the rollout fleet stopped: {self.error}") from self.error
        if self.group is not None:
            self.group.retire_lost(self.log)

    # -- rounds -------------------------------------------------------------------------------

    def roll_out(self, num_rounds: int) -> list[RoundResult]:
        """Commit `num_rounds` rounds now, in this thread (sequential mode)."""
        return [self._one_round() for _ in range(num_rounds)]

    def _one_round(self) -> RoundResult:
        k = self._next_round
        result = roll_out_round(self.group, self.cfg, self.storage, k, notice=self.log)
        self._next_round = k + 1
        self.stats.rounds += 1
        self.stats.trajectories += result.num_trajectories
        self.stats.busy_s += result.busy_s
        self.stats.results.append(result)
        if self.demand is not None:
            self.demand.committed.remote(result.num_trajectories)
        if self.on_round is not None:
            self.on_round(result)
        return result

    def _wanted(self) -> bool:
        """Back-pressure: roll out while fewer than pipeline.rows_ahead fresh rows wait for the trainer."""
        ahead = self.cfg.pipeline.rows_ahead
        if not ahead or self.demand is None:
            return True
        return ray.get(self.demand.waiting.remote()) < ahead

    def _loop(self) -> None:
        last_log = last_check = time.perf_counter()
        try:
            while not self._stop.is_set():
                if time.perf_counter() - last_check > NODE_CHECK_S:
                    last_check = time.perf_counter()
                    self.group.retire_lost(self.log)
                if not self._wanted():
                    time.sleep(PAUSE_S)
                    self.stats.paused_s += PAUSE_S
                    continue
                result = self._one_round()
                if time.perf_counter() - last_log > LOG_EVERY_S:
                    last_log = time.perf_counter()
                    self.log(f"[rollout] {self.stats.rounds} rounds, {self.stats.trajectories} trajectories so far "
                             f"(round {result.round}: policy v{result.policy_versions}, {len(self.group.live)} live "
                             f"actors), actors idle {100 * self.stats.idle_fraction(len(self.group.live)):.0f}%")
        except BaseException as e:  # noqa: BLE001 - reported to the pipeline through check()
            if not self._stop.is_set():
                self.error = e

    # -- the sample video ------------------------------------------------------------------------

    def render(self, *, prompts: list[str], switch_frames: list[int], num_frames: int, seed: int, name: str) -> dict:
        """Render a sample on a live rollout actor with the newest policy; returns its sidecar and URIs."""
        index = min(self.group.live)
        return ray.get(self.group.actors[index].render_sample.remote(
            self.cfg.to_dict(), prompts=prompts, switch_frames=switch_frames, num_frames=num_frames, seed=seed,
            name=name))
