"""One rollout round: a worker group of rollout actors writes trajectories, the driver commits them.

    plan (driver)  ->  dispatch with back-pressure (actors)  ->  commit_round (driver, manifest last)

The driver decides every trajectory up front (``plan_round``: seed, prompts, switch frame from
(rollout.seed, round, index)), so the data of a round does not depend on which actor ran what or on
restarts. ``RolloutActorGroup`` holds one ``RolloutActor`` per bundle of the placement group made by
cluster/placement.py, with ``max_restarts`` and ``max_task_retries``: an actor that dies is restarted
by Ray and its queued and in-flight trajectories are retried there; once its restarts are used up,
the driver hands its trajectories to the other actors. Each actor has at most ``rollout.max_in_flight``
trajectories queued (back-pressure: the driver holds the rest). Only after every trajectory has
reported its shard does the driver write the manifest, so a reader never sees a partial round and a
killed actor costs at most the trajectories it had in flight.

``slotmem rollout --config X [--round K]`` runs ``main``; the pipeline's long-lived fleet (rollout/fleet.py) keeps
a group and calls ``roll_out_round`` round after round.
"""

from __future__ import annotations

import time
import uuid
from collections import deque
from dataclasses import asdict, dataclass, field

import numpy as np
import ray
from ray.exceptions import ActorDiedError, GetTimeoutError, RayActorError

from cluster.placement import RolloutPlacement, rollout_placement_group
from cluster.runtime import connect
from cluster.shape import ClusterShape
from cluster.storage import Storage, resolve_storage
from model.vae import WAN_TEMPORAL_DOWNSAMPLE
from rollout.actor import RolloutActor, TrajectorySpec
from rollout.prompts import load_training_prompts, resolve_switch_frames, sample_switch_frame
from rollout.shards import commit_round, committed_rounds, hash_config, read_manifest
from slotmem.config import Config, MemoryConfig, ModelConfig, RolloutConfig
from slotmem.errors import InputError

# The Wan2.1 VAE decodes F latent frames to stride*(F-1)+1 pixel frames (model/vae.py)
VAE_TEMPORAL_STRIDE = 2 ** sum(WAN_TEMPORAL_DOWNSAMPLE)


def num_pixel_frames(num_latent_frames: int) -> int:
    return VAE_TEMPORAL_STRIDE * (num_latent_frames - 1) + 1


# ----------------------------------------------------------------------------------------------
# planning (driver only)
# ----------------------------------------------------------------------------------------------


def plan_round(rollout_cfg: RolloutConfig, scripts: list[tuple[str, ...]], round_index: int, *,
               chunk: int) -> list[TrajectorySpec]:
    """The round's trajectories; trajectory i depends only on (rollout.seed, round_index, i).

    A prompt pair gets one switch frame from ``rollout.switch_choices`` (sample_switch_frame);
    a longer script gets the interactive defaults (``rollout.switch_frames``, resolve_switch_frames).
    """
    specs = []
    for i in range(rollout_cfg.trajectories_per_round):
        rng = np.random.default_rng([rollout_cfg.seed, round_index, i])
        prompts = tuple(scripts[int(rng.integers(len(scripts)))])
        if len(prompts) == 1:
            switches: list[int] = []
        elif len(prompts) == 2:
            switches = [sample_switch_frame(rng, rollout_cfg, chunk)]
        else:
            switches = resolve_switch_frames(len(prompts), rollout_cfg.num_frames, None,
                                             default=rollout_cfg.switch_frames, chunk=chunk,
                                             source="rollout.prompt_file")
        seed = int(rng.integers(2**63 - 1))
        specs.append(TrajectorySpec(round_index, i, prompts, tuple(switches), seed))
    return specs


# ----------------------------------------------------------------------------------------------
# the worker group
# ----------------------------------------------------------------------------------------------


class RolloutActorGroup:
    """One RolloutActor per placement-group bundle. ``async_*`` methods return ObjectRefs.

    ``live`` holds the actors still in service: one whose process died with no restarts left, or that stopped
    answering (its node is gone and Ray cannot place its restart), leaves it and its work goes to the others.
    """

    def __init__(self, placement: RolloutPlacement, storage: Storage, *, model_cfg: ModelConfig,
                 memory_cfg: MemoryConfig, rollout_cfg: RolloutConfig, init_seed: int, name: str):
        remote_cls = ray.remote(RolloutActor)
        self.placement = placement
        self.actor_ids = [f"a{i}" for i in range(placement.shape.num_rollout_actors)]
        # Named ("{name}-a{i}") so `ray list actors` shows which job and actor a process serves.
        # max_task_retries: a trajectory queued on or running in a killed actor reruns after restart.
        self.actors = [
            remote_cls.options(name=f"{name}-{actor_id}", max_restarts=rollout_cfg.max_restarts,
                               max_task_retries=rollout_cfg.max_restarts, **placement.actor_options(i)).remote(
                actor_id, storage, model_cfg=model_cfg, memory_cfg=memory_cfg, rollout_cfg=rollout_cfg,
                init_seed=init_seed)
            for i, actor_id in enumerate(self.actor_ids)]
        self.live = set(range(len(self.actors)))
        self.pids: dict[str, set[int]] = {}
        self.nodes: dict[int, str] = {}  # the Ray node each actor last ran on
        self.closing = False  # set before shutdown: a dispatch in flight abandons its round without requeueing

    def __len__(self) -> int:
        return len(self.actors)

    def async_ready(self) -> list[ray.ObjectRef]:
        return [a.ready.remote() for a in self.actors]

    def async_generate(self, index: int, spec: TrajectorySpec) -> ray.ObjectRef:
        return self.actors[index].generate_trajectory.remote(spec)

    def retire(self, index: int) -> None:
        """Take an actor out of service (dead, or unreachable past rollout.stall_timeout_s) and free its group."""
        self.live.discard(index)
        ray.kill(self.actors[index], no_restart=True)
        self.placement.release(index)

    def retire_lost(self, notice=print) -> list[int]:
        """Retire the live actors whose node is gone. Ray would restart them once their placement group fits
        again, but a group waiting to be rescheduled blocks the placement groups behind it (the trainer's next
        stage), and a fleet that is paused sees no task fail."""
        alive = {n["NodeID"] for n in ray.nodes() if n.get("Alive")}
        lost = sorted(i for i in self.live if i in self.nodes and self.nodes[i] not in alive)
        for i in lost:
            self.retire(i)
            notice(f"[rollout] actor {self.actor_ids[i]} retired: its node {self.nodes[i][:12]} is gone; "
                   f"{len(self.live)} live actor(s) left")
        return lost

    def shutdown(self) -> None:
        """Kill the actors and free their bundles (also on errors: nothing is left running)."""
        self.closing = True
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.placement.remove()


# ----------------------------------------------------------------------------------------------
# dispatch with back-pressure
# ----------------------------------------------------------------------------------------------


@dataclass
class _Dispatch:
    """What came back from the actors, in trajectory order."""

    results: list[dict]
    requeued: int


def dispatch(group: RolloutActorGroup, specs: list[TrajectorySpec], rollout_cfg: RolloutConfig, *,
             log=None, notice=print) -> _Dispatch:
    """Run every spec on the group's live actors, at most rollout.max_in_flight queued per actor.

    A trajectory whose actor dies (no restarts left) or does not answer within rollout.stall_timeout_s is run
    again elsewhere, with the same spec and so the same content; `log(line)` reports each trajectory, `notice(line)`
    each lost actor and requeued trajectory (always worth an operator's attention).
    """
    pending = deque(specs)
    in_flight: dict[ray.ObjectRef, tuple[int, TrajectorySpec, float]] = {}
    queued = [0] * len(group)
    results: dict[int, dict] = {}
    failures = [0] * len(specs)
    while pending or in_flight:
        while pending and (free := [i for i in sorted(group.live) if queued[i] < rollout_cfg.max_in_flight]):
            index = min(free, key=lambda i: queued[i])  # least loaded first: round-robin at the start
            spec = pending.popleft()
            in_flight[group.async_generate(index, spec)] = (index, spec, time.perf_counter())
            queued[index] += 1
        if not group.live:
            raise RuntimeError(f"rollout round {specs[0].round_index}: no rollout actor is left "
                               f"(rollout.max_restarts={rollout_cfg.max_restarts})")
        done, _ = ray.wait(list(in_flight), num_returns=1, timeout=min(10.0, rollout_cfg.stall_timeout_s))
        if group.closing:  # the fleet is stopping: nothing new starts, the running trajectories finish (an actor
            pending.clear()  # killed mid-task makes Ray print a retry notice), the round is never committed
        now = time.perf_counter()
        for ref, (index, spec, started) in list(in_flight.items()):
            if ref not in done and now - started > rollout_cfg.stall_timeout_s:  # its node is gone, say
                del in_flight[ref]
                queued[index] -= 1
                group.retire(index)
                _requeue(spec, failures, pending, group, rollout_cfg, notice,
                         f"actor {group.actor_ids[index]} retired: no answer for {rollout_cfg.stall_timeout_s:g} s "
                         "(rollout.stall_timeout_s)")
        for ref in done:
            if ref not in in_flight:
                continue
            index, spec, _ = in_flight.pop(ref)
            queued[index] -= 1
            try:
                out = ray.get(ref)
            except RayActorError as e:
                if group.closing:
                    continue  # shut down under it: nothing to requeue
                # Ray already retried it on the restarted actor; what arrives here has no retries
                # left on this actor, so another actor runs it (same spec, same content).
                if isinstance(e, ActorDiedError):
                    group.retire(index)
                else:  # unavailable: restarting, or its node is lost
                    group.retire_lost(notice)
                first_line = str(e).strip().splitlines()[0] if str(e).strip() else ""
                _requeue(spec, failures, pending, group, rollout_cfg, notice,
                         f"actor {group.actor_ids[index]} lost ({type(e).__name__}: {first_line[:120]})")
                continue
            results[spec.traj_index] = out
            group.pids.setdefault(out["actor_id"], set()).add(out["pid"])
            group.nodes[index] = out["node"]
            if log is not None:
                t = out["timings"]
                log(f"[rollout] round {spec.round_index} {len(results)}/{len(specs)} {spec.trajectory_id} actor "
                    f"{out['actor_id']} policy v{out['policy_version']}: {t['total_s']:.2f} s (generate "
                    f"{t['generate_s']:.2f} s, write {t['write_s']:.2f} s) switch {list(spec.switch_frames)}")
    if group.closing:
        raise RoundAbandoned(f"rollout round {specs[0].round_index} abandoned: the fleet is stopping")
    return _Dispatch([results[s.traj_index] for s in specs], sum(failures))


class RoundAbandoned(RuntimeError):
    """A round given up because its actor group is shutting down."""


def _requeue(spec, failures, pending, group, rollout_cfg, log, why: str) -> None:
    failures[spec.traj_index] += 1
    if not group.live or failures[spec.traj_index] > len(group) * (rollout_cfg.max_restarts + 1):
        raise RuntimeError(f"rollout round {spec.round_index}: {spec.trajectory_id} failed "
                           f"{failures[spec.traj_index]} time(s), {len(group.live)} rollout actor(s) alive "
                           f"(rollout.max_restarts={rollout_cfg.max_restarts}); last: {why}")
    pending.appendleft(spec)
    if log is not None:
        log(f"[rollout] {spec.trajectory_id}: {why}; requeued on the {len(group.live)} live actor(s)")


# ----------------------------------------------------------------------------------------------
# a round
# ----------------------------------------------------------------------------------------------


@dataclass
class RoundResult:
    round: int
    uri: str
    """Where the round's shards and manifest are."""
    skipped: bool
    """True when the round was already committed and nothing ran."""
    num_trajectories: int
    num_actors: int = 0
    latent_frames: int = 0
    """Latent frames per trajectory."""
    policy_versions: list[int] = field(default_factory=list)
    startup_s: float = 0.0
    """Placement group + actor construction (model build)."""
    rollout_s: float = 0.0
    """First dispatch to last trajectory back: the throughput denominator."""
    commit_s: float = 0.0
    actor_restarts: int = 0
    requeued: int = 0
    """Trajectory attempts lost with their actor after Ray's own retries, then dispatched again."""
    busy_s: float = 0.0
    """Actor-seconds spent on the round's trajectories (for the fleet's idle fraction)."""

    @property
    def pixel_frames(self) -> int:
        return num_pixel_frames(self.latent_frames) if self.latent_frames else 0

    def rate(self, count: float) -> float:
        return count / self.rollout_s if self.rollout_s > 0 else 0.0

    @property
    def trajectories_per_s(self) -> float:
        return self.rate(self.num_trajectories)

    @property
    def latent_frames_per_s(self) -> float:
        return self.rate(self.num_trajectories * self.latent_frames)

    @property
    def pixel_frames_per_s(self) -> float:
        return self.rate(self.num_trajectories * self.pixel_frames)

    def to_dict(self) -> dict:
        return {**asdict(self), "pixel_frames": self.pixel_frames, "trajectories_per_s": self.trajectories_per_s,
                "latent_frames_per_s": self.latent_frames_per_s, "pixel_frames_per_s": self.pixel_frames_per_s}

    def summary(self) -> str:
        if self.skipped:
            return (f"round {self.round} already committed at {self.uri} ({self.num_trajectories} trajectories, "
                    f"policy versions {self.policy_versions}); skipped")
        return (f"round {self.round}: {self.num_trajectories} trajectories × {self.latent_frames} latent frames "
                f"({self.pixel_frames} pixel frames) on {self.num_actors} actor(s) in {self.rollout_s:.2f} s: "
                f"{self.trajectories_per_s:.3f} trajectories/s, {self.pixel_frames_per_s:.1f} pixel frames/s, "
                f"{self.latent_frames_per_s:.1f} latent frames/s (startup {self.startup_s:.1f} s, commit "
                f"{self.commit_s:.2f} s, restarts {self.actor_restarts}, requeued {self.requeued}, "
                f"policy versions {self.policy_versions})")


def _wait_ready(group: RolloutActorGroup, rollout_cfg: RolloutConfig) -> list[dict]:
    """Wait for every actor's model; a failed start is reported by its last error line, not a Ray traceback."""
    try:
        return ray.get(group.async_ready(), timeout=rollout_cfg.stall_timeout_s)
    except GetTimeoutError:
        raise TimeoutError(f"rollout actors did not start within {rollout_cfg.stall_timeout_s:g} s "
                           f"(rollout.stall_timeout_s)") from None
    except RayActorError as e:
        lines = [line.strip() for line in str(getattr(e, "error_msg", "") or e).splitlines() if line.strip()]
        cause = lines[-1] if lines else type(e).__name__
        msg = f"a rollout actor could not start (rollout.max_restarts={rollout_cfg.max_restarts}): {cause}"
        if cause.startswith(("slotmem.errors.InputError", "slotmem.errors.ConfigError")):
            raise InputError(msg) from None
        raise RuntimeError(msg) from None


def start_group(cfg: Config, storage: Storage, name: str) -> tuple[RolloutActorGroup, list[dict], float]:
    """Place and start the rollout actors; returns the group, each actor's identity and the seconds it took."""
    connect(cfg.cluster)
    t0 = time.perf_counter()
    placement = rollout_placement_group(ClusterShape.from_config(cfg.cluster, cfg.trainer))
    try:
        group = RolloutActorGroup(placement, storage, model_cfg=cfg.model, memory_cfg=cfg.memory,
                                  rollout_cfg=cfg.rollout, init_seed=cfg.trainer.seed,
                                  name=f"rollout-{cfg.experiment}-{name}-{uuid.uuid4().hex[:6]}")
    except BaseException:
        placement.remove()
        raise
    try:
        ready = _wait_ready(group, cfg.rollout)
    except BaseException:
        group.shutdown()
        raise
    group.pids = {info["actor_id"]: {info["pid"]} for info in ready}
    group.nodes = {group.actor_ids.index(info["actor_id"]): info["node"] for info in ready}
    return group, ready, time.perf_counter() - t0


def roll_out_round(group: RolloutActorGroup, cfg: Config, storage: Storage, round_index: int,
                   specs: list[TrajectorySpec] | None = None, *, log=None, notice=print) -> RoundResult:
    """Roll out round `round_index` on a running group and commit it (the manifest last)."""
    specs = specs or plan_round(cfg.rollout, load_training_prompts(cfg.rollout.prompt_file), round_index,
                                chunk=cfg.model.num_frame_per_block)
    restarts_before = sum(len(p) - 1 for p in group.pids.values())
    t1 = time.perf_counter()
    sent = dispatch(group, specs, cfg.rollout, log=log, notice=notice)
    t2 = time.perf_counter()
    versions = sorted({r["policy_version"] for r in sent.results})
    commit_round(storage, round_index, [r["shard"] for r in sent.results], config_hash=hash_config(cfg.to_dict()),
                 meta={"num_actors": len(group.live), "rollout_s": round(t2 - t1, 3),
                       "trajectory_ids": [s.trajectory_id for s in specs],
                       "generate_s": round(sum(r["timings"]["generate_s"] for r in sent.results), 3)})
    return RoundResult(round=round_index, uri=storage.uri(storage.round_dir(round_index)), skipped=False,
                       num_trajectories=len(specs), num_actors=len(group.live), latent_frames=cfg.rollout.num_frames,
                       policy_versions=versions, rollout_s=t2 - t1, commit_s=time.perf_counter() - t2,
                       actor_restarts=sum(len(p) - 1 for p in group.pids.values()) - restarts_before,
                       requeued=sent.requeued, busy_s=sum(r["timings"]["total_s"] for r in sent.results))


def run_round(cfg: Config, round_index: int, *, storage: Storage | None = None, progress: bool = True) -> RoundResult:
    """`slotmem rollout`: start actors, roll out and commit one round, stop them (a committed round is skipped)."""
    storage = storage or resolve_storage(cfg.storage)
    uri = storage.uri(storage.round_dir(round_index))
    if round_index in committed_rounds(storage):
        manifest = read_manifest(storage, round_index)
        return RoundResult(round=round_index, uri=uri, skipped=True, num_trajectories=manifest["num_rows"],
                           policy_versions=manifest["policy_versions"])
    # Bad prompt files and switch choices fail here, before any actor starts.
    specs = plan_round(cfg.rollout, load_training_prompts(cfg.rollout.prompt_file), round_index,
                       chunk=cfg.model.num_frame_per_block)
    connect(cfg.cluster)
    from cluster.preflight import preflight

    preflight(cfg, storage, job="rollout")
    group, ready, startup_s = start_group(cfg, storage, f"r{round_index:04d}")
    try:
        if progress:
            where = ", ".join(f"{r['actor_id']}@{r['host']}:{r['device']}" for r in ready)
            print(f"[rollout] round {round_index}: {len(specs)} trajectories on {len(group)} actor(s) ({where}) "
                  f"-> {uri}", flush=True)
        result = roll_out_round(group, cfg, storage, round_index, specs,
                                log=(lambda line: print(line, flush=True)) if progress else None)
    finally:
        group.shutdown()
    result.startup_s = startup_s
    return result


def main(args, cfg: Config) -> int:
    """`slotmem rollout --round K`: one round, tracked as its own MLflow run (`<experiment>-rollout-round<K>`,
    nested under $SLOTMEM_PARENT_RUN_ID when set), continued rather than duplicated when the round is rerun."""
    import os

    from cluster.mlflow_names import METRIC_FRAMES_PER_S, PARENT_RUN_ENV, stage_run_name
    from cluster.tracking import Tracker
    from slotmem.config import check_weights

    check_weights(cfg, "rollout")
    connect(cfg.cluster)  # first: it routes MLflow's own INFO lines (schema setup, system metrics) to the log file
    tracker = Tracker.from_config(cfg.tracking, cfg.storage)
    with tracker:
        tracker.resume_or_start(stage_run_name(cfg.experiment, "rollout", args.round_index),
                                tags=tracker.standard_tags(stage="rollout", round_index=args.round_index),
                                parent_run_id=os.environ.get(PARENT_RUN_ENV) or None)
        tracker.log_params(cfg.flat())
        result = run_round(cfg, args.round_index)
        if not result.skipped:
            tracker.log_metrics({METRIC_FRAMES_PER_S: result.pixel_frames_per_s, "rollout/seconds": result.rollout_s,
                                 "rollout/startup_s": result.startup_s, "rollout/commit_s": result.commit_s,
                                 "rollout/trajectories": result.num_trajectories, "rollout/requeued": result.requeued,
                                 "rollout/actor_restarts": result.actor_restarts,
                                 "rollout/policy_version": max(result.policy_versions or [0])})
            tracker.set_tags({"round_uri": result.uri})
    print(result.summary())
    if not result.skipped:
        print(f"committed round {result.round}: {result.uri}")
    print(f"MLflow: {tracker.display_uri} (run {stage_run_name(cfg.experiment, 'rollout', args.round_index)})")
    return 0
