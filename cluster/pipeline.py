"""`slotmem pipeline`: the main job (DESIGN §6).

    rollout round 0 (initial policy) -> Stage I -> rollout round 1 (Stage I policy) -> Stage II
    -> an interactive 60 s sample video with the final policy

One MLflow parent run holds a child run per rollout round, per training stage and for the sample.
Every phase records its completion in ``{root}/{experiment}/pipeline_state.json`` (written
atomically after the phase), so re-running the pipeline with the same experiment name resumes
where it stopped: committed rounds are not rolled out again, finished stages are not retrained, and
a stage that was interrupted resumes from its latest Ray Train checkpoint (deterministic run name).

With ``pipeline.overlap=true`` round 1 is rolled out with the initial policy while Stage I trains
(bounded staleness: its rows are one version behind Stage II's trainer, which must be allowed by
``pipeline.max_policy_lag``).
"""

from __future__ import annotations

import concurrent.futures
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from cluster.runtime import connect
from cluster.storage import Storage, resolve_storage
from cluster.tracking import METRIC_FRAMES_PER_S, Tracker, stage_run_name
from slotmem.config import Config, ConfigError

STATE_FILE = "pipeline_state.json"
# The interactive sample: one entity through six prompts, switches at Appendix A.3's frames.
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


def _round_phase(cfg: Config, storage: Storage, tracker: Tracker, state: PipelineState, k: int) -> dict:
    from rollout.round import run_round

    phase = f"round_{k}"
    if phase in state.done:
        print(f"[pipeline] {phase}: already done, skipping")
        return state.done[phase]
    with tracker.child(stage_run_name(cfg.storage.experiment, "rollout", k), resume=True,
                       tags=tracker.standard_tags(stage="rollout", round_index=k)):
        res = run_round(cfg, k, storage=storage)  # a committed round is skipped, not rolled out again
        print(f"[pipeline] {phase}: {res.summary()}")
        result = res.to_dict()
        if not res.skipped:
            tracker.log_metrics({METRIC_FRAMES_PER_S: res.pixel_frames_per_s,
                                 **{f"rollout/{m}": float(v) for m, v in result.items()
                                    if isinstance(v, (int, float)) and not isinstance(v, bool)}})
    state.mark(storage, phase, result)
    return result


def _stage_phase(cfg: Config, storage: Storage, tracker: Tracker, state: PipelineState, stage: int,
                 rounds: list[int], parent_run_id: str | None) -> dict:
    from trainer.job import run_stage

    phase = f"stage_{stage}"
    if phase in state.done:
        print(f"[pipeline] {phase}: already done, skipping")
        return state.done[phase]
    res = run_stage(cfg, stage, round_indices=rounds, parent_run_id=parent_run_id)
    result = res.to_dict()
    state.mark(storage, phase, result)
    return result


def _sample_phase(cfg: Config, storage: Storage, tracker: Tracker, state: PipelineState, out_dir: Path) -> dict:
    from cluster.storage import fetch_weights, latest_policy_version
    from rollout.generate import render_video
    from rollout.prompts import resolve_switch_frames

    if "sample" in state.done and Path(state.done["sample"]["video"]).exists():
        print("[pipeline] sample: already done, skipping")
        return state.done["sample"]
    version = latest_policy_version(storage)
    policy = str(fetch_weights(storage, version, out_dir / "weights")) if version is not None else None
    switches = resolve_switch_frames(len(SAMPLE_PROMPTS), cfg.rollout.num_frames, None,
                                     default=cfg.rollout.switch_frames, chunk=cfg.model.num_frame_per_block)
    video = out_dir / f"sample_policy_v{version or 0}.mp4"
    with tracker.child(stage_run_name(cfg.storage.experiment, "sample"), resume=True,
                       tags=tracker.standard_tags(stage="sample", policy_version=version or 0)):
        meta = render_video(cfg, prompts=SAMPLE_PROMPTS, switch_frames=switches, num_frames=cfg.rollout.num_frames,
                            seed=cfg.rollout.seed, output=video, policy_path=policy,
                            extra_meta={"policy_version": version or 0})
        tracker.log_metrics({"sample/generated_pixel_frames_per_s": meta["timings"]["generated_pixel_frames_per_s"],
                             "sample/generate_s": meta["timings"]["generate_s"]})
        tracker.log_artifact(video, "sample")
        tracker.log_artifact(video.with_suffix(".json"), "sample")
    result = {"video": str(video), "policy_version": version or 0}
    state.mark(storage, "sample", result)
    return result


def run_pipeline(cfg: Config) -> dict:
    if cfg.pipeline.overlap and cfg.pipeline.max_policy_lag < 1:
        raise ConfigError("pipeline.overlap=true rolls out round 1 with the initial policy while Stage I trains, so "
                          f"pipeline.max_policy_lag must be >= 1 (got {cfg.pipeline.max_policy_lag})")
    t0 = time.perf_counter()
    connect(cfg.cluster)
    storage = resolve_storage(cfg.storage)
    # The sample video is written locally: next to the shards for a local root, under ./runs for s3 roots.
    out_dir = Path(storage.base, "samples") if storage.is_local else Path("runs", cfg.storage.experiment)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = PipelineState.load(storage)
    if state.done:
        print(f"[pipeline] resuming experiment {cfg.storage.experiment!r}: done so far {sorted(state.done)}")
    tracker = Tracker.from_config(cfg.tracking, cfg.storage)
    with tracker:
        parent = tracker.start_parent(stage_run_name(cfg.storage.experiment, "pipeline"), resume=True,
                                      tags=tracker.standard_tags(stage="pipeline"))
        tracker.log_params(cfg.flat())
        _round_phase(cfg, storage, tracker, state, 0)
        if cfg.pipeline.overlap:
            with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
                rollout = pool.submit(_round_phase, cfg, storage, tracker, state, 1)
                _stage_phase(cfg, storage, tracker, state, 1, [0], parent)
                rollout.result()
        else:
            _stage_phase(cfg, storage, tracker, state, 1, [0], parent)
            _round_phase(cfg, storage, tracker, state, 1)
        _stage_phase(cfg, storage, tracker, state, 2, [1], parent)
        sample = _sample_phase(cfg, storage, tracker, state, out_dir) if cfg.pipeline.sample_video else None
        summary = {"experiment": cfg.storage.experiment, "storage": storage.uri(storage.path()),
                   "tracking_uri": tracker.display_uri, "parent_run_id": parent, "phases": state.done,
                   "sample_video": sample["video"] if sample else None, "seconds": round(time.perf_counter() - t0, 1)}
    return summary


def main(args, cfg: Config) -> int:
    summary = run_pipeline(cfg)
    print()
    print(f"pipeline {summary['experiment']!r} finished in {summary['seconds']} s")
    print(f"  rollout shards + checkpoints + weights: {summary['storage']}")
    if summary["sample_video"]:
        print(f"  sample video:  {summary['sample_video']}")
    print(f"  MLflow:        {summary['tracking_uri']} (parent run {summary['parent_run_id']})")
    if summary["tracking_uri"] and summary["tracking_uri"].startswith("sqlite:"):
        print(f"  open the UI:   mlflow ui --backend-store-uri {summary['tracking_uri']} --host 127.0.0.1 --port 5000")
    print(json.dumps({k: v for k, v in summary.items() if k != "phases"}))
    return 0
