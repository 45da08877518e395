"""`slotmem pipeline`: the main job, one on-policy loop from the first rollout to the sample video (DESIGN §6).

    fleet     one long-lived group of rollout actors for the whole job (rollout/fleet.py)
    stages    Stage 0 (slot warm-up, if trainer.stage0_steps) -> Stage I -> Stage II, one Ray Train job each
              (trainer/driver.py), each training on the newest committed rows the fleet keeps producing
    sample    an interactive 60 s video rendered by a rollout actor with the final policy, published under
              {storage.root}/{experiment}/samples/ and logged to MLflow

pipeline.mode = continuous (default): the fleet commits small rounds in the background throughout, the trainer
never trains on a row staler than pipeline.max_policy_lag generator updates or used more than
pipeline.max_row_reuse times, and the fleet pauses while pipeline.rows_ahead fresh rows wait (veRL/OpenRLHF-style
bounded staleness). pipeline.mode = sequential: one round before each stage, the stage trains on what is
committed, the fleet idles meanwhile (the old shape, for bench/loop.py).

One MLflow parent run holds a child run per stage (created by the trainer's rank 0), one for the rollout fleet and
one for the sample. Every phase records its completion in ``{root}/{experiment}/pipeline_state.json`` (written
atomically after the phase), so re-running the pipeline with the same experiment resumes: finished stages are not
retrained, an interrupted stage resumes from its latest Ray Train checkpoint (deterministic run name), committed
rounds stay, and the MLflow runs are continued rather than duplicated.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

from cluster.runtime import connect
from cluster.storage import Storage, resolve_storage
from cluster.tracking import METRIC_FRAMES_PER_S, Tracker, stage_run_name
from slotmem.config import Config, check_weights
from trainer.schedule import stage_steps

STATE_FILE = "pipeline_state.json"
# The built-in interactive sample: one entity through six prompts, switches at Appendix A.3's frames.
SAMPLE_PROMPTS = [
    "a red fox walks through a snowy pine forest",
    "the red fox stops and sniffs the snow beside a frozen stream",
    "the red fox leaps across the frozen stream",
    "the red fox trots along a ridge as snow starts to fall",
    "the red fox curls up under a pine tree in the falling snow",
    "the red fox wakes and looks at the sunrise over the forest",
]


@dataclass
class PipelineState:
    """Completed phases and what they produced; persisted after every phase."""

    done: dict[str, dict] = field(default_factory=dict)

    @classmethod
    def load(cls, storage: Storage) -> "PipelineState":
        path = storage.path(STATE_FILE)
        if not storage.exists(path):
            return cls()
        return cls(done=storage.read_json(path).get("done", {}))

    def mark(self, storage: Storage, phase: str, result: dict) -> None:
        self.done[phase] = result
        storage.write_json(storage.path(STATE_FILE), {"done": self.done})


def _stage_phase(cfg: Config, storage: Storage, state: PipelineState, stage: int, parent_run_id: str | None,
                 fleet) -> dict:
    from trainer.driver import run_stage

    phase = f"stage_{stage}"
    if phase in state.done:
        print(f"[pipeline] {phase}: already done, skipping")
        return state.done[phase]
    if cfg.pipeline.mode == "sequential":
        for r in fleet.roll_out(1):
            print(f"[pipeline] {r.summary()}")
    res = run_stage(cfg, stage, parent_run_id=parent_run_id, demand=fleet.demand)
    fleet.check()
    print(f"[pipeline] {res.summary()}")
    result = res.to_dict()
    state.mark(storage, phase, result)
    return result


def sample_script(cfg: Config) -> tuple[list[str], list[int]]:
    """The sample video's prompts (pipeline.sample_prompts, else the built-in six) and effective switch frames."""
    from rollout.prompts import load_interactive_script, resolve_switch_frames

    prompts, given = list(SAMPLE_PROMPTS), None
    if cfg.pipeline.sample_prompts:
        script = load_interactive_script(cfg.pipeline.sample_prompts)
        prompts, given = list(script.prompts), script.switch_frames
    switches = resolve_switch_frames(len(prompts), cfg.rollout.num_frames, given, default=cfg.rollout.switch_frames,
                                     chunk=cfg.model.num_frame_per_block, source="pipeline.sample_prompts")
    return prompts, switches


def _sample_phase(cfg: Config, storage: Storage, tracker: Tracker, state: PipelineState, fleet) -> dict:
    import tempfile
    from pathlib import Path

    if "sample" in state.done:
        print("[pipeline] sample: already done, skipping")
        return state.done["sample"]
    prompts, switches = sample_script(cfg)
    with tracker.child(stage_run_name(cfg.experiment, "sample"), resume=True,
                       tags=tracker.standard_tags(stage="sample")):
        out = fleet.render(prompts=prompts, switch_frames=switches, num_frames=cfg.rollout.num_frames,
                           seed=cfg.rollout.seed, name="sample")
        timings = out["meta"]["timings"]
        tracker.log_metrics({"sample/generated_pixel_frames_per_s": timings["generated_pixel_frames_per_s"],
                             "sample/generate_s": timings["generate_s"], "policy_version": out["policy_version"]})
        with tempfile.TemporaryDirectory(prefix="slotmem-sample-") as d:
            for kind, uri in out["uris"].items():
                local = Path(d) / Path(uri).name
                storage.copy_to_local(uri.split("://", 1)[1], local)
                tracker.log_artifact(local, "sample")
    result = {"video": out["uris"]["mp4"], "sidecar": out["uris"]["json"], "policy_version": out["policy_version"]}
    state.mark(storage, "sample", result)
    return result


def run_pipeline(cfg: Config) -> dict:
    from rollout.fleet import RolloutFleet

    check_weights(cfg, "pipeline")
    t0 = time.perf_counter()
    connect(cfg.cluster)
    storage = resolve_storage(cfg.storage)
    state = PipelineState.load(storage)
    if state.done:
        print(f"[pipeline] resuming experiment {cfg.experiment!r}: done so far {sorted(state.done)}")
    tracker = Tracker.from_config(cfg.tracking, cfg.storage)
    stages = [s for s in (0, 1, 2) if stage_steps(s, cfg.trainer) > 0]
    fleet = RolloutFleet(cfg, storage).start()
    try:
        with tracker:
            parent = tracker.start_parent(stage_run_name(cfg.experiment, "pipeline"), resume=True,
                                          tags=tracker.standard_tags(stage="pipeline"))
            tracker.log_params(cfg.flat())
            if cfg.pipeline.mode == "continuous":
                fleet.start_continuous()
            for stage in stages:
                _stage_phase(cfg, storage, state, stage, parent, fleet)
            fleet.check()
            _log_fleet(cfg, tracker, fleet)
            sample = _sample_phase(cfg, storage, tracker, state, fleet) if cfg.pipeline.sample_video else None
    finally:
        fleet.stop()
    return {"experiment": cfg.experiment, "storage": storage.uri(storage.path()), "tracking_uri": tracker.display_uri,
            "parent_run_id": parent, "phases": state.done, "sample_video": sample["video"] if sample else None,
            "fleet": {"rounds": fleet.stats.rounds, "trajectories": fleet.stats.trajectories},
            "seconds": round(time.perf_counter() - t0, 1)}


def _log_fleet(cfg: Config, tracker: Tracker, fleet) -> None:
    """The fleet's rounds as the rollout child run (step = round index)."""
    with tracker.child(stage_run_name(cfg.experiment, "rollout"), resume=True,
                       tags=tracker.standard_tags(stage="rollout")):
        for r in fleet.stats.results:
            tracker.log_metrics({METRIC_FRAMES_PER_S: r.pixel_frames_per_s, "rollout/seconds": r.rollout_s,
                                 "rollout/policy_version": max(r.policy_versions or [0]),
                                 "rollout/requeued": r.requeued}, step=r.round)
        live = len(fleet.group.live) if fleet.group is not None else 0
        tracker.log_metrics({"rollout/idle_fraction": fleet.stats.idle_fraction(live),
                             "rollout/trajectories": fleet.stats.trajectories, "rollout/rounds": fleet.stats.rounds})


def main(args, cfg: Config) -> int:
    summary = run_pipeline(cfg)
    print()
    print(f"pipeline {summary['experiment']!r} finished in {summary['seconds']} s "
          f"({summary['fleet']['rounds']} rollout rounds, {summary['fleet']['trajectories']} trajectories)")
    print(f"  storage:       {summary['storage']}")
    if summary["sample_video"]:
        print(f"  sample video:  {summary['sample_video']}")
    print(f"  MLflow:        {summary['tracking_uri']} (parent run {summary['parent_run_id']})")
    if summary["tracking_uri"] and summary["tracking_uri"].startswith("sqlite:"):
        print(f"  open the UI:   MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false mlflow ui --backend-store-uri "
              f"{summary['tracking_uri']} --host 127.0.0.1 --port 5000 --workers 1")
    print(json.dumps({k: v for k, v in summary.items() if k != "phases"}))
    return 0
