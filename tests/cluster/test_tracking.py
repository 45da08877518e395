"""MLflow tracking: parent/child runs on sqlite, the default store, resume, a server outage, masking, `slotmem runs`."""

from __future__ import annotations

import socket
import sys
import time
import warnings
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from cluster.delivery import DeliveryQueue, TrackingWarning
from cluster.mlflow_names import (
    METRIC_CRITIC,
    METRIC_DMD,
    METRIC_FRAMES_PER_S,
    METRIC_POLICY_LAG,
    TAG_PARENT,
    local_tracking_uri,
    mask_uri,
    stage_run_name,
)
from cluster.runs import main_runs
from cluster.tracking import Tracker
from slotmem.cli import main as cli_main
from slotmem.config import TrackingConfig, load_config
from slotmem.errors import InputError
from tests.servers import MlflowServer


@pytest.fixture(autouse=True)
def _no_env_uri(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory):
    """One sqlite store for this module (overrides the per-test one): each new store costs seconds of
    schema migrations. Tests look their runs up by id, so they do not see each other."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"


def _tracker(uri: str, retry_s: float = 600.0, **kw) -> Tracker:
    return Tracker(TrackingConfig(tracking_uri=uri, experiment="exp", system_metrics=False, retry_s=retry_s),
                   storage_root_local=None, experiment="slotmem-test", **kw)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the block ends


def test_parent_and_children_are_queryable(mlflow_uri, tmp_path):
    artifact = tmp_path / "sample.txt"
    artifact.write_text("frames")
    with _tracker(mlflow_uri) as tr:
        parent = tr.start_parent("pipeline", tr.standard_tags())
        tr.log_params({"trainer.lr": 1e-5, "model.denoising_steps": [1000, 750], "long": "x" * 7000,
                       "odd key!": 1, "tracking.tracking_uri": "http://bob:hunter2@mlflow:5000"})
        with tr.child("stage1", tr.standard_tags(stage="stage1", policy_version=3)) as c1:
            for step in range(3):
                tr.log_metrics({METRIC_DMD: 1.0 / (step + 1), METRIC_CRITIC: 0.5}, step=step)
            tr.log_artifact(artifact, "videos")
            tr.set_tags({"checkpoint_uri": "s3://bucket/ckpt/step_3"})
        with pytest.raises(RuntimeError):
            with tr.child("rollout", tr.standard_tags(stage="rollout", round_index=1)) as c2:
                tr.log_metrics({METRIC_FRAMES_PER_S: 42.0}, step=0)
                raise RuntimeError("actor died")
        assert tr.active_run_id == parent

    client = MlflowClient(mlflow_uri)
    p = client.get_run(parent)
    assert p.info.status == "FINISHED" and p.data.tags["experiment"] == "slotmem-test"
    assert p.data.params["trainer.lr"] == "1e-05" and p.data.params["model.denoising_steps"] == "[1000, 750]"
    assert len(p.data.params["long"]) == 6000 and p.data.params["long"].endswith("...")
    assert p.data.params["odd key_"] == "1"
    assert "hunter2" not in p.data.params["tracking.tracking_uri"]
    kids = client.search_runs([p.info.experiment_id], f"tags.`{TAG_PARENT}` = '{parent}'")
    assert {r.info.run_id for r in kids} == {c1, c2}
    stage1, rollout = client.get_run(c1), client.get_run(c2)
    assert (stage1.info.status, rollout.info.status) == ("FINISHED", "FAILED")
    assert stage1.data.tags["stage"] == "stage1" and stage1.data.tags["policy_version"] == "3"
    assert rollout.data.tags["round"] == "1" and stage1.data.tags["checkpoint_uri"] == "s3://bucket/ckpt/step_3"
    assert [(m.step, m.value) for m in client.get_metric_history(c1, METRIC_DMD)] == [(0, 1.0), (1, 0.5), (2, 1 / 3)]
    assert [f.path for f in client.list_artifacts(c1, "videos")] == ["videos/sample.txt"]
    # Artifacts live next to the database, not in ./mlruns of the working directory.
    location = client.get_experiment(p.info.experiment_id).artifact_location
    assert location.startswith(Path(mlflow_uri[len("sqlite:///"):]).parent.as_uri())


def test_default_store_is_storage_root_mlflow_db(tmp_path, monkeypatch):
    root = tmp_path / "runs"
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    tr = Tracker(TrackingConfig(experiment="exp", system_metrics=False), storage_root_local=str(root),
                 experiment="e")
    assert tr.display_uri == local_tracking_uri(root) == f"sqlite:///{root}/mlflow.db"
    with tr:
        tr.start_parent("p")
        art = tmp_path / "a.txt"
        art.write_text("x")
        tr.log_artifact(art)
    assert (root / "mlflow.db").is_file()
    assert list((root / "mlartifacts").rglob("a.txt"))
    assert not (elsewhere / "mlruns").exists()


def test_unreachable_server_at_start_warns_once_and_does_nothing(tmp_path):
    start = time.monotonic()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tr = _tracker(f"http://alice:s3cret@127.0.0.1:{_closed_port()}", retry_s=1.0)
        assert not tr.enabled
        with tr:
            assert tr.start_parent("pipeline") is None
            with tr.child("stage1") as run_id:
                assert run_id is None
                tr.log_params({"a": 1})
                tr.log_metrics({METRIC_DMD: 1.0}, step=0)
                tr.log_artifact(tmp_path)
                tr.set_tags({"t": "v"})
    assert time.monotonic() - start < 30
    ours = [w for w in caught if issubclass(w.category, TrackingWarning)]
    assert len(ours) == 1 and "unusable" in str(ours[0].message)
    assert "s3cret" not in str(ours[0].message) and "alice:***@" in str(ours[0].message)


def test_a_rejected_call_is_dropped_with_one_warning_and_tracking_stays_on(mlflow_uri):
    tr = _tracker(mlflow_uri)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with tr.attach("0123456789abcdef0123456789abcdef"):  # no such run: MLflow rejects every call
            tr.log_metrics({METRIC_DMD: 1.0}, step=0)
            tr.log_metrics({METRIC_DMD: 2.0}, step=1)
        run_id = tr.start_parent("after-the-rejection")
        tr.log_metrics({METRIC_DMD: 3.0}, step=0)
        tr.close()
    assert tr.enabled and tr.delivery.dropped_failed >= 2
    assert len([w for w in caught if "rejected" in str(w.message)]) == 1
    assert MlflowClient(mlflow_uri).get_run(run_id).data.metrics == {METRIC_DMD: 3.0}


def test_metrics_logged_while_the_server_is_down_arrive_when_it_is_back(tmp_path):
    server = MlflowServer(tmp_path / "server").start()
    try:
        tr = _tracker(server.uri, retry_s=300.0)
        run_id = tr.start_parent("through-an-outage")
        tr.log_metrics({METRIC_DMD: 0.0}, step=0)
        assert tr.flush(60)
        server.stop()  # the outage: every call now fails with connection refused
        for step in range(1, 6):
            tr.log_metrics({METRIC_DMD: float(step)}, step=step)  # returns at once: queued
        time.sleep(2.0)
        assert tr._queue.pending() > 0 and tr.delivery.dropped_failed == 0
        server.start()
        tr.close()
        history = MlflowClient(server.uri).get_metric_history(run_id, METRIC_DMD)
        assert [(m.step, m.value) for m in history] == [(s, float(s)) for s in range(6)]  # all of them, in order
        assert MlflowClient(server.uri).get_run(run_id).info.status == "FINISHED"
        assert tr.delivery.retried > 0
    finally:
        server.stop()


def test_a_full_queue_drops_its_oldest_calls_with_one_warning():
    import threading

    gate, delivered = threading.Event(), []
    queue = DeliveryQueue(size=3, retry_s=10.0)
    queue.put("block", gate.wait)  # the delivery thread sits on this one
    time.sleep(0.2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i in range(6):
            queue.put("metrics", lambda i=i: delivered.append(i))
    gate.set()
    assert queue.flush(10)
    assert delivered == [3, 4, 5] and queue.stats.dropped_full == 3
    assert len([w for w in caught if "tracking.queue_size" in str(w.message)]) == 1
    queue.close(1)


def test_resume_or_start_returns_the_same_run(mlflow_uri):
    tags = {"stage": "stage1"}
    name = stage_run_name("slotmem-test", "stage1")
    first = _tracker(mlflow_uri)
    run_id = first.resume_or_start(name, tags=tags)
    first.log_params({"trainer.lr": 1e-5})
    first.close("FAILED")  # the job died

    again = _tracker(mlflow_uri)  # the resubmitted job
    assert again.resume_or_start(name, tags=tags) == run_id
    assert again.flush()
    assert MlflowClient(mlflow_uri).get_run(run_id).info.status == "RUNNING"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again.log_params({"trainer.lr": 1e-5, "trainer.seed": 1})  # same value: fine; new key: logged
        again.log_params({"trainer.lr": 2e-5})  # MLflow params are immutable: warned, not fatal
        assert again.flush()
    assert [str(w.message) for w in caught if "already logged" in str(w.message)]
    assert again.enabled
    again.close()
    assert MlflowClient(mlflow_uri).get_run(run_id).data.params == {"trainer.lr": "1e-05", "trainer.seed": "1"}

    other = _tracker(mlflow_uri)
    assert other.resume_or_start(name, tags={"stage": "stage2"}) != run_id
    other.close()


def test_a_parent_run_is_continued_by_its_recorded_id_never_by_name(mlflow_uri):
    first = _tracker(mlflow_uri)
    a = first.start_parent("same-name")
    first.close()
    second = _tracker(mlflow_uri)
    b = second.start_parent("same-name")  # another storage root: no id recorded there yet
    second.close()
    assert a != b
    again = _tracker(mlflow_uri)
    assert again.start_parent("same-name", run_id=a) == a  # the id recorded under the first root
    again.close()
    gone = _tracker(mlflow_uri)
    c = gone.start_parent("same-name", run_id="f" * 32)  # recorded, but not in this store: a new run
    gone.close()
    assert c not in (a, b)


def test_mask_uri():
    assert mask_uri("http://user:pass@host:5000/path") == "http://user:***@host:5000/path"
    assert mask_uri("https://tok123@host/api") == "https://***@host/api"
    assert mask_uri("https://host/x?token=abc&run=1") == "https://host/x?token=***&run=1"
    assert mask_uri("sqlite:////abs/mlflow.db") == "sqlite:////abs/mlflow.db"
    tr = Tracker.disabled()
    assert not tr.enabled and tr.start_parent("p") is None
    tr.log_metrics({"x": 1.0})  # no active run, no tracker: silently nothing


def test_system_metrics_logged_and_degrade_without_psutil(mlflow_uri, monkeypatch):
    monkeypatch.delenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", raising=False)
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    cfg = TrackingConfig(tracking_uri=mlflow_uri, experiment="exp", system_metrics=True)
    with Tracker(cfg, storage_root_local=None) as tr:
        run_id = tr.start_parent("with-system-metrics")
        time.sleep(0.8)
    metrics = MlflowClient(mlflow_uri).get_run(run_id).data.metrics
    assert any(k.startswith(f"system/{tr.node_id}/cpu_utilization") for k in metrics), sorted(metrics)

    monkeypatch.setitem(sys.modules, "psutil", None)  # `import psutil` now raises ImportError
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with Tracker(cfg, storage_root_local=None) as tr:
            run_id = tr.start_parent("without-psutil")
            tr.log_metrics({METRIC_DMD: 2.0}, step=0)
    assert any("psutil" in str(w.message) for w in caught)
    assert MlflowClient(mlflow_uri).get_run(run_id).data.metrics == {METRIC_DMD: 2.0}


def test_main_runs_prints_parents_children_and_key_metrics(tmp_path, capsys):
    root = tmp_path / "runs"
    overrides = [f"storage.root={root}", "storage.experiment=exp-runs", "tracking.system_metrics=false"]
    cfg = load_config(None, overrides)
    with pytest.raises(InputError, match="no MLflow store"):
        main_runs(None, cfg)

    with Tracker.from_config(cfg.tracking, cfg.storage) as tr:
        tr.start_parent("exp-runs-pipeline")
        with tr.child("exp-runs-rollout-round0", {"stage": "rollout", "round": 0}):
            tr.log_metrics({METRIC_FRAMES_PER_S: 12.5, METRIC_POLICY_LAG: 0}, step=0)
        with tr.child("exp-runs-stage1", {"stage": "stage1"}):
            for step, value in enumerate([0.9, 0.7, 0.25]):
                tr.log_metrics({METRIC_DMD: value, METRIC_CRITIC: 2 * value}, step=step)
    assert main_runs(None, cfg) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    header = next(line for line in lines if line.startswith("run"))
    assert header.split() == ["run", "id", "status", "stage", "round", "dmd", "critic", "slot_con", "slot_rec",
                              "frames_per_s", "policy_lag", "adherence"]
    stage1 = next(line for line in lines if "exp-runs-stage1" in line).split()
    assert stage1[2:7] == ["FINISHED", "stage1", "-", "0.25", "0.5"]  # last values
    rollout = next(line for line in lines if "exp-runs-rollout-round0" in line).split()
    assert rollout[3:5] == ["rollout", "0"] and rollout[-3:] == ["12.5", "0", "-"]
    assert "  exp-runs-stage1" in out and "1 parent run(s), 2 child run(s)" in out

    assert cli_main(["runs", *sum((["--set", o] for o in overrides), [])]) == 0
    assert "exp-runs-stage1" in capsys.readouterr().out
