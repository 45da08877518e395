"""`slotmem pipeline`: the main job, one on-policy loop from the first rollout to the sample video (DESIGN §6).

    fleet     one long-lived group of rollout actors for the whole job (rollout/fleet.py)
    stages    Stage 0 (slot warm-up, if trainer.stage0_steps) -> Stage I -> Stage II, one Ray Train job each
              (trainer/driver.py), each training on the newest committed rows the fleet keeps producing
    sample    an interactive 60 s video rendered by a rollout actor with the final policy, published under
              {storage.root}/{experiment}/samples/ and logged to MLflow
    judge     pipeline.judge = toyworld: the same script rendered with the base policy and after every stage but
              the last, each video judged by toyworld/judge.py (so is the sample); judge/* metrics per stage run
              and on the parent run at step 0 (base), 1, ... (after each stage)

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

from cluster.control import STOPPED_LINE, Control
from cluster.preflight import preflight
from cluster.runtime import connect
from cluster.storage import Storage, resolve_storage
from cluster.mlflow_names import METRIC_FRAMES_PER_S, METRIC_JUDGE_ADHERENCE, resolve_tracking_uri, stage_run_name
from cluster.tracking import Tracker
from slotmem.config import Config, check_weights
from slotmem.errors import InputError, JobStopped
from trainer.schedule import stage_steps

STATE_FILE = "pipeline_state.json"
JUDGE_KEYS = ("adherence", "per_segment", "identity_stability", "attribute_stability")
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
    """Completed phases and what they produced, and the MLflow parent run; persisted after every change.

    The parent run id lives here, under the storage root, rather than being looked up by name: two pipelines with
    the same experiment name on different roots (or a rerun after deleting the root) never share a run tree."""

    done: dict[str, dict] = field(default_factory=dict)
    parent_run_id: str | None = None

    @classmethod
    def load(cls, storage: Storage) -> "PipelineState":
        path = storage.path(STATE_FILE)
        if not storage.exists(path):
            return cls()
        data = storage.read_json(path)
        return cls(done=data.get("done", {}), parent_run_id=data.get("parent_run_id"))

    def mark(self, storage: Storage, phase: str, result: dict) -> None:
        self.done[phase] = result
        self._save(storage)

    def set_parent(self, storage: Storage, run_id: str | None) -> None:
        if run_id is not None and run_id != self.parent_run_id:
            self.parent_run_id = run_id
            self._save(storage)

    def _save(self, storage: Storage) -> None:
        storage.write_json(storage.path(STATE_FILE), {"done": self.done, "parent_run_id": self.parent_run_id})


def _stage_phase(cfg: Config, storage: Storage, state: PipelineState, stage: int, parent_run_id: str | None,
                 fleet, control: Control) -> dict:
    from trainer.driver import run_stage

    phase = f"stage_{stage}"
    if phase in state.done:
        print(f"[pipeline] {phase}: already done, skipping")
        return state.done[phase]
    if cfg.pipeline.mode == "sequential":
        for r in fleet.roll_out(1):
            print(f"[pipeline] {r.summary()}")
    fleet.check()
    res = run_stage(cfg, stage, parent_run_id=parent_run_id, demand=fleet.demand, control=control.actor,
                    preflight_job=False)
    fleet.check()
    print(f"[pipeline] {res.summary()}")
    if res.stopped:
        raise JobStopped(f"stage {stage} stopped at iteration {res.steps}/{res.total_steps}; its checkpoint "
                         f"{res.checkpoint_uri} is where a resubmission resumes")
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


def check_judge(cfg: Config) -> None:
    """pipeline.judge = toyworld reads the sample script's prompts with the toy grammar: fail before anything starts
    when one is outside it (the built-in fox prompts are)."""
    if cfg.pipeline.judge != "toyworld":
        return
    from toyworld.language import parse

    for prompt in sample_script(cfg)[0]:
        try:
            parse(prompt)
        except ValueError as e:
            source = cfg.pipeline.sample_prompts or "the built-in sample prompts (pipeline.sample_prompts is '')"
            raise InputError(f"pipeline.judge=toyworld: {source}: {e}") from None


def _render(cfg: Config, storage: Storage, tracker: Tracker, fleet, name: str) -> tuple[dict, dict]:
    """Render the sample script on a rollout actor with the newest policy, log its files to the active run and
    judge them when pipeline.judge is set; returns (result for the pipeline state, metrics to log)."""
    import tempfile
    from pathlib import Path

    prompts, switches = sample_script(cfg)
    out = fleet.render(prompts=prompts, switch_frames=switches, num_frames=cfg.rollout.num_frames,
                       seed=cfg.rollout.seed, name=name)
    timings = out["meta"]["timings"]
    metrics = {"sample/generated_pixel_frames_per_s": timings["generated_pixel_frames_per_s"],
               "sample/generate_s": timings["generate_s"], "policy_version": out["policy_version"]}
    result = {"video": out["uris"]["mp4"], "sidecar": out["uris"]["json"], "policy_version": out["policy_version"]}
    with tempfile.TemporaryDirectory(prefix="slotmem-sample-") as d:
        local = {}
        for kind, uri in out["uris"].items():
            local[kind] = Path(d) / Path(uri).name
            storage.copy_to_local(uri.split("://", 1)[1], local[kind])
            tracker.log_artifact(local[kind], "sample")
        if cfg.pipeline.judge == "toyworld":
            from toyworld.judge import judge_video

            scores = judge_video(local["mp4"])
            result["judge"] = {k: scores[k] for k in JUDGE_KEYS}
            metrics[METRIC_JUDGE_ADHERENCE] = scores["adherence"]
            metrics.update({f"judge/{k}": scores[k] for k in ("identity_stability", "attribute_stability")
                            if scores[k] is not None})
            metrics.update({f"judge/segment_{i}": v for i, v in enumerate(scores["per_segment"])})
    return result, metrics


def _judge_phase(cfg: Config, storage: Storage, tracker: Tracker, state: PipelineState, fleet, *, after: str,
                 run_id: str | None, step: int) -> dict | None:
    """The judge's reading of the policy before training (after='base') or after a stage: the sample script
    rendered and judged, into that stage's MLflow run and, as judge/* at this step, the parent run."""
    phase = f"judge_{after}"
    if cfg.pipeline.judge == "none":
        return None
    if phase in state.done:
        return state.done[phase]
    if run_id:  # the stage's own run gets the video and every metric
        with tracker.attach(run_id):
            result, metrics = _render(cfg, storage, tracker, fleet, name=f"sample_{after}")
            tracker.log_metrics(metrics)
    else:  # before training: the parent run
        result, metrics = _render(cfg, storage, tracker, fleet, name=f"sample_{after}")
    _log_judged(tracker, state, after, result, metrics, step)
    state.mark(storage, phase, result)
    return result


def _log_judged(tracker: Tracker, state: PipelineState, after: str, result: dict, metrics: dict, step: int) -> None:
    if "judge" not in result:
        return
    tracker.log_metrics_to(state.parent_run_id, {k: v for k, v in metrics.items() if k.startswith("judge/")}, step)
    j = result["judge"]
    segments = " ".join(f"{v:.2f}" for v in j["per_segment"])
    print(f"[pipeline] judge {after}: adherence {j['adherence']:.3f} (segments {segments}), policy "
          f"v{result['policy_version']}")


def _sample_phase(cfg: Config, storage: Storage, tracker: Tracker, state: PipelineState, fleet, step: int) -> dict:
    if "sample" in state.done:
        print("[pipeline] sample: already done, skipping")
        return state.done["sample"]
    with tracker.child(stage_run_name(cfg.experiment, "sample"), resume=True,
                       tags=tracker.standard_tags(stage="sample")):
        result, metrics = _render(cfg, storage, tracker, fleet, name="sample")
        tracker.log_metrics(metrics)
    _log_judged(tracker, state, "sample", result, metrics, step)
    state.mark(storage, "sample", result)
    return result


def _judge_trail(state: PipelineState) -> str | None:
    """'base 0.12 -> stage_0 0.12 -> ... -> sample 0.16' from the judged phases, in order."""
    trail = [(name.removeprefix("judge_"), r["judge"]["adherence"]) for name, r in state.done.items()
             if (name.startswith("judge_") or name == "sample") and "judge" in r]
    return " -> ".join(f"{name} {value:.3f}" for name, value in trail) or None


def run_pipeline(cfg: Config) -> dict:
    """Run (or resume) the whole pipeline; raises JobStopped when the operator stopped it (everything cleaned up)."""
    from rollout.fleet import RolloutFleet

    check_weights(cfg, "pipeline")
    check_judge(cfg)
    t0 = time.perf_counter()
    connect(cfg.cluster)
    storage = resolve_storage(cfg.storage)
    preflight(cfg, storage, job="pipeline",
              tracking_uri=resolve_tracking_uri(cfg.tracking, storage.root if storage.is_local else None))
    state = PipelineState.load(storage)
    if state.done:
        print(f"[pipeline] resuming experiment {cfg.experiment!r}: done so far {sorted(state.done)}")
    tracker = Tracker.from_config(cfg.tracking, cfg.storage)
    stages = [s for s in (0, 1, 2) if stage_steps(s, cfg.trainer) > 0]
    control = Control()
    control.install_signal_handlers()
    fleet = None
    try:
        with tracker:
            parent = tracker.start_parent(stage_run_name(cfg.experiment, "pipeline"), run_id=state.parent_run_id,
                                          tags=tracker.standard_tags(stage="pipeline"))
            state.set_parent(storage, parent)
            tracker.log_params(cfg.flat())
            rollout_run = tracker.open_run(stage_run_name(cfg.experiment, "rollout"), parent_run_id=parent,
                                           tags=tracker.standard_tags(stage="rollout"))
            fleet = RolloutFleet(cfg, storage, on_round=lambda r: _log_round(tracker, rollout_run, r),
                                 system_metrics=tracker.system_metrics_target(rollout_run)).start()
            if cfg.pipeline.mode == "continuous":
                fleet.start_continuous()
            _judge_phase(cfg, storage, tracker, state, fleet, after="base", run_id=None, step=0)
            for k, stage in enumerate(stages):
                res = _stage_phase(cfg, storage, state, stage, parent, fleet, control)
                _check_stop(control, f"after stage {stage}")
                if k < len(stages) - 1:  # after the last stage the sample is the judged video
                    _judge_phase(cfg, storage, tracker, state, fleet, after=f"stage_{stage}",
                                 run_id=res.get("mlflow_run_id"), step=k + 1)
            fleet.check()
            fleet.halt()  # training is over: no more rounds, so the totals logged are the rounds on storage
            _log_fleet(tracker, rollout_run, fleet)
            sample = (_sample_phase(cfg, storage, tracker, state, fleet, step=len(stages))
                      if cfg.pipeline.sample_video else None)
    finally:
        if fleet is not None:
            fleet.stop()
        control.close()
    return {"experiment": cfg.experiment, "storage": storage.uri(storage.path()), "tracking_uri": tracker.display_uri,
            "parent_run_id": parent, "phases": state.done, "sample_video": sample["video"] if sample else None,
            "judge_adherence": _judge_trail(state),
            "fleet": {"rounds": fleet.stats.rounds, "trajectories": fleet.stats.trajectories},
            "seconds": round(time.perf_counter() - t0, 1)}


def _check_stop(control: Control, where: str) -> None:
    reason = control.stop_reason()
    if reason:
        raise JobStopped(f"stopped {where} ({reason})")


def _log_round(tracker: Tracker, run_id: str | None, r) -> None:
    """One committed round into the rollout run (step = round index), as it is committed."""
    tracker.log_metrics_to(run_id, {METRIC_FRAMES_PER_S: r.pixel_frames_per_s, "rollout/seconds": r.rollout_s,
                                    "rollout/policy_version": max(r.policy_versions or [0]),
                                    "rollout/requeued": r.requeued}, step=r.round)


def _log_fleet(tracker: Tracker, run_id: str | None, fleet) -> None:
    """The fleet's totals; the rollout run ends here (the sample is a run of its own)."""
    live = len(fleet.group.live) if fleet.group is not None else 0
    tracker.log_metrics_to(run_id, {"rollout/idle_fraction": fleet.stats.idle_fraction(live),
                                    "rollout/trajectories": fleet.stats.trajectories,
                                    "rollout/rounds": fleet.stats.rounds})
    tracker.finish_run(run_id)


def main(args, cfg: Config) -> int:
    try:
        summary = run_pipeline(cfg)
    except JobStopped as e:
        print(f"{STOPPED_LINE}: {e}")
        print("  MLflow runs ended as KILLED, the rollout fleet and its resources released; committed rounds, "
              "finished stages and the latest checkpoint are kept: run the same command (or submit it) again to "
              "resume")
        Control.wait_for_kill_if_submitted()
        return 130
    print()
    print(f"pipeline {summary['experiment']!r} finished in {summary['seconds']} s "
          f"({summary['fleet']['rounds']} rollout rounds, {summary['fleet']['trajectories']} trajectories)")
    print(f"  storage:       {summary['storage']}")
    if summary["sample_video"]:
        print(f"  sample video:  {summary['sample_video']}")
    if summary["judge_adherence"]:
        print(f"  judge:         adherence {summary['judge_adherence']}")
    print(f"  MLflow:        {summary['tracking_uri']} (parent run {summary['parent_run_id']})")
    if summary["tracking_uri"] and summary["tracking_uri"].startswith("sqlite:"):
        print(f"  open the UI:   MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false mlflow ui --backend-store-uri "
              f"{summary['tracking_uri']} --host 127.0.0.1 --port 5000 --workers 1")
    print(json.dumps({k: v for k, v in summary.items() if k != "phases"}))
    return 0
