"""MLflow tracking for the pipeline: one parent run, a child run per stage and per rollout round.

Where runs go (first that applies):
  1. ``tracking.tracking_uri`` from the config;
  2. ``$MLFLOW_TRACKING_URI``;
  3. ``sqlite:///<abs storage root>/mlflow.db`` when ``storage.root`` is local (``local_tracking_uri``;
     ``slotmem runs`` reads the same file), with artifacts in ``<storage root>/mlartifacts/``.
With none of these (an s3:// storage root and no URI) tracking is off, with one warning. For every
sqlite store the experiment's artifact location is set explicitly next to the database, because
MLflow's default is ``./mlruns`` relative to whatever the working directory happens to be.

Tracking never takes the job down: an unreachable server (probed once, 2 s) or any failing MLflow
call produces ONE warning and turns the tracker into a no-op. Credentials in URIs are masked
wherever a URI is printed or logged (``mask_uri``), and secret-looking config values are never
logged as params. Logging only from rank 0 is the caller's job; ``Tracker.disabled()`` is the
no-op tracker for the other ranks.

Resubmitted jobs continue their runs: ``resume_or_start`` finds a run by its (deterministic) name
and tags, so ``stage_run_name(experiment, stage)`` names the same run on every attempt.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import time
import urllib.parse
import warnings
from pathlib import Path
from typing import Any, Iterator, Mapping

from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from slotmem.config import StorageConfig, TrackingConfig
from slotmem.errors import InputError

DB_NAME = "mlflow.db"
ARTIFACT_DIR = "mlartifacts"

# Metric names shared by the trainer, the rollout and `slotmem runs`.
METRIC_DMD = "loss/dmd"
METRIC_CRITIC = "loss/critic"
METRIC_SLOT_CON = "loss/slot_con"
METRIC_SLOT_REC = "loss/slot_rec"
METRIC_FRAMES_PER_S = "frames_per_s"
METRIC_POLICY_LAG = "policy_lag"
METRIC_DATA_WAIT = "data_wait_s"
KEY_METRICS = {"dmd": METRIC_DMD, "critic": METRIC_CRITIC, "slot_con": METRIC_SLOT_CON,
               "slot_rec": METRIC_SLOT_REC, "frames_per_s": METRIC_FRAMES_PER_S, "policy_lag": METRIC_POLICY_LAG}

# Tags every run can carry, so runs of different experiments/stages/rounds compare in the UI.
TAG_EXPERIMENT = "experiment"
TAG_STAGE = "stage"
TAG_ROUND = "round"
TAG_POLICY_VERSION = "policy_version"
TAG_GIT_COMMIT = "mlflow.source.git.commit"
TAG_PARENT = "mlflow.parentRunId"

# MLflow limits (mlflow/utils/validation.py).
_MAX_KEY = 250
_MAX_PARAM_VALUE = 6000
_MAX_TAG_VALUE = 8000
_MAX_PARAMS_PER_BATCH = 100
_MAX_METRICS_PER_BATCH = 1000
# HTTP client defaults for a server that dies mid-run: bounded (~40 s) instead of MLflow's minutes
# of retries, once; the user's own settings win.
_HTTP_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
_PROBE_TIMEOUT_S = 2.0
_SECRET_WORDS = ("password", "passwd", "secret", "token", "credential", "access_key", "api_key")


class TrackingWarning(RuntimeWarning):
    """Tracking is degraded (server down, store unusable, system metrics unavailable)."""


# ----------------------------------------------------------------------------------------------
# URIs, names, values
# ----------------------------------------------------------------------------------------------


def mask_uri(uri: str) -> str:
    """The URI with userinfo credentials and secret query values replaced by '***'."""
    try:
        parts = urllib.parse.urlsplit(uri)
    except ValueError:
        return "***"
    masked = uri
    if "@" in parts.netloc:  # edit the string in place: urlunsplit would normalise sqlite:////abs
        userinfo, host = parts.netloc.rsplit("@", 1)
        user, sep, _ = userinfo.partition(":")
        hidden = f"{user}:***@{host}" if sep else f"***@{host}"  # a bare userinfo is usually a token
        masked = masked.replace(parts.netloc, hidden, 1)
    if parts.query:
        pairs = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
        query = "&".join(f"{k}={'***' if _is_secret_name(k) else v}" for k, v in pairs)
        masked = masked.replace("?" + parts.query, "?" + query, 1)
    return masked


def _is_secret_name(name: str) -> bool:
    return any(w in name.lower() for w in _SECRET_WORDS)


def local_tracking_uri(storage_root_local: str | os.PathLike) -> str:
    """The default store: sqlite:///<abs storage root>/mlflow.db."""
    return f"sqlite:///{Path(storage_root_local).expanduser().absolute() / DB_NAME}"


def local_storage_root(storage_cfg: StorageConfig) -> str | None:
    """Absolute local directory of storage.root, or None for s3://."""
    from cluster.storage import resolve_storage

    storage = resolve_storage(storage_cfg)
    return storage.root if storage.is_local else None


def resolve_tracking_uri(tracking_cfg: TrackingConfig, storage_root_local: str | None) -> str | None:
    """Config URI, else $MLFLOW_TRACKING_URI, else the local sqlite store; None if there is none."""
    if tracking_cfg.tracking_uri:
        return tracking_cfg.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    if storage_root_local:
        return local_tracking_uri(storage_root_local)
    return None


def _sqlite_path(uri: str) -> Path | None:
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri[len("sqlite:///"):]).absolute()


def _artifact_root(uri: str, storage_root_local: str | None) -> Path | None:
    """Where a new experiment's artifacts go when the client, not a server, decides."""
    db = _sqlite_path(uri)
    if db is not None:
        return db.parent / ARTIFACT_DIR
    if uri.startswith(("http://", "https://", "databricks", "file:")) or "://" not in uri:
        return None  # a server decides; a file store keeps artifacts inside itself
    return Path(storage_root_local) / ARTIFACT_DIR if storage_root_local else None  # e.g. postgresql://


def _clean_tags(tags: Mapping[str, Any]) -> dict[str, str]:
    return {k if k.startswith("mlflow.") else sanitize_key(k): _safe_value(k, v, _MAX_TAG_VALUE)
            for k, v in tags.items() if v is not None}


def stage_run_name(experiment: str, stage: str, round_index: int | None = None) -> str:
    """Deterministic run name per (experiment, stage[, round]) so a resubmitted job finds its run."""
    return f"{experiment}-{stage}" if round_index is None else f"{experiment}-{stage}-round{round_index}"


def sanitize_key(key: str) -> str:
    """An MLflow-valid param/metric key: allowed characters only, no empty or '.'/'..' path segments."""
    key = re.sub(r"[^/\w.\- :]", "_", str(key))
    segments = [s for s in key.split("/") if s not in ("", ".", "..")]
    return ("/".join(segments) or "_")[:_MAX_KEY]


def _truncate(value: str, limit: int) -> str:
    return value if len(value) <= limit else value[: limit - 3] + "..."


def _safe_value(key: str, value: Any, limit: int) -> str:
    if _is_secret_name(key) and value not in ("", None):
        return "***"
    text = str(value)
    if "://" in text:
        text = re.sub(r"[A-Za-z][A-Za-z0-9+.-]*://\S+", lambda m: mask_uri(m.group(0)), text)
    return _truncate(text, limit)


def git_commit() -> str | None:
    """HEAD of the repository this package runs from, if it is a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    sha = out.stdout.strip()
    return sha if out.returncode == 0 and re.fullmatch(r"[0-9a-f]{40}", sha) else None


def _probe_http(uri: str) -> str | None:
    """None if the server answers at all within the probe timeout, else the reason."""
    import requests

    try:
        requests.get(uri.rstrip("/") + "/health", timeout=_PROBE_TIMEOUT_S)
        return None
    except requests.RequestException as e:
        return type(e).__name__


# ----------------------------------------------------------------------------------------------
# the tracker
# ----------------------------------------------------------------------------------------------


class Tracker:
    """Parent/child MLflow runs for one process; every method is a no-op once disabled.

    ``start_parent`` (or ``resume_or_start``) makes a run active; ``child`` nests a run under the
    active one for the duration of a ``with`` block; ``attach`` logs into a run created elsewhere
    (the driver's child run, from a Ray Train worker). ``log_*`` and ``set_tags`` go to the
    innermost active run.
    """

    def __init__(self, tracking_cfg: TrackingConfig, *, storage_root_local: str | None,
                 experiment: str | None = None):
        """`storage_root_local`: absolute local storage root for the default sqlite store (None for
        s3://). `experiment`: the pipeline's experiment name (storage.experiment), written as the
        `experiment` tag of every run; the MLflow experiment is tracking_cfg.experiment. System
        metrics follow tracking_cfg.system_metrics unless $MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING is
        explicitly false (the test suite sets that)."""
        self.experiment = experiment or tracking_cfg.experiment or "slotmem"
        self._mlflow_experiment = tracking_cfg.experiment or self.experiment
        self._system_metrics = tracking_cfg.system_metrics and os.environ.get(
            "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "").lower() not in ("false", "0")
        self._stack: list[str] = []
        self._monitors: dict[str, Any] = {}
        self._warned = False
        self._client: MlflowClient | None = None
        self._experiment_id: str | None = None
        self._git_commit: str | None = None
        self._uri = resolve_tracking_uri(tracking_cfg, storage_root_local) if tracking_cfg.enabled else None
        if not tracking_cfg.enabled:
            return
        if self._uri is None:
            self._warn("no tracking URI (tracking.tracking_uri, $MLFLOW_TRACKING_URI) and storage.root is not "
                       "local; MLflow tracking is off")
            return
        self._connect(storage_root_local)

    @classmethod
    def disabled(cls) -> "Tracker":
        """A tracker that does nothing (ranks other than 0, tracking.enabled = false)."""
        return cls(TrackingConfig(enabled=False), storage_root_local=None)

    @classmethod
    def from_config(cls, tracking_cfg: TrackingConfig, storage_cfg: StorageConfig) -> "Tracker":
        return cls(tracking_cfg, storage_root_local=local_storage_root(storage_cfg), experiment=storage_cfg.experiment)

    def _connect(self, storage_root_local: str | None) -> None:
        uri = self._uri
        if uri.startswith(("http://", "https://")):
            for k, v in _HTTP_ENV.items():
                os.environ.setdefault(k, v)
            reason = _probe_http(uri)
            if reason is not None:
                self._warn(f"MLflow server {mask_uri(uri)} is unreachable ({reason}); tracking is off for this job")
                return
        try:
            db = _sqlite_path(uri)
            if db is not None:
                db.parent.mkdir(parents=True, exist_ok=True)
            self._client = MlflowClient(tracking_uri=uri)
            self._experiment_id = self._get_or_create_experiment(_artifact_root(uri, storage_root_local))
            self._git_commit = git_commit()
        except Exception as e:  # noqa: BLE001 - tracking must never take the job down
            self._fail(e)

    def _get_or_create_experiment(self, artifact_root: Path | None) -> str:
        name = self._mlflow_experiment
        exp = self._client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        location = (artifact_root / sanitize_key(name).replace("/", "_")).as_uri() if artifact_root else None
        try:
            return self._client.create_experiment(name, artifact_location=location)
        except MlflowException:  # created concurrently by another process
            exp = self._client.get_experiment_by_name(name)
            if exp is None:
                raise
            return exp.experiment_id

    # -- state ---------------------------------------------------------------------------------

    @property
    def enabled(self) -> bool:
        return self._client is not None

    @property
    def display_uri(self) -> str:
        return mask_uri(self._uri) if self._uri else "(none)"

    @property
    def experiment_id(self) -> str | None:
        return self._experiment_id

    @property
    def active_run_id(self) -> str | None:
        return self._stack[-1] if self._stack else None

    def __repr__(self) -> str:
        return f"Tracker({self.display_uri!r}, enabled={self.enabled}, active={self.active_run_id})"

    def _warn(self, message: str) -> None:
        if not self._warned:
            self._warned = True
            warnings.warn(message, TrackingWarning, stacklevel=3)

    def _fail(self, err: BaseException) -> None:
        """First MLflow failure: warn once, stop system metrics, and become a no-op."""
        text = str(err).replace(self._uri or "\0", self.display_uri)
        self._warn(f"MLflow tracking at {self.display_uri} failed ({type(err).__name__}: {_truncate(text, 300)}); "
                   "tracking is off for the rest of this job")
        self._client = None
        for monitor in self._monitors.values():
            with contextlib.suppress(Exception):
                monitor.finish()
        self._monitors.clear()

    @contextlib.contextmanager
    def _guard(self) -> Iterator[None]:
        try:
            yield
        except Exception as e:  # noqa: BLE001 - tracking must never take the job down
            self._fail(e)

    # -- tags ----------------------------------------------------------------------------------

    def standard_tags(self, *, stage: str | None = None, round_index: int | None = None,
                      policy_version: int | None = None) -> dict[str, str]:
        """experiment, stage, round, policy_version and the git commit, those that are known."""
        tags = {TAG_EXPERIMENT: self.experiment, TAG_STAGE: stage, TAG_ROUND: round_index,
                TAG_POLICY_VERSION: policy_version, TAG_GIT_COMMIT: self._git_commit}
        return {k: str(v) for k, v in tags.items() if v is not None}

    # -- runs ----------------------------------------------------------------------------------

    def start_parent(self, run_name: str, tags: Mapping[str, Any] | None = None, *, resume: bool = False) -> str | None:
        """Start the pipeline's parent run (or, with resume=True, continue the one of the same name/tags)."""
        if resume:
            return self.resume_or_start(run_name, tags=tags, parent_run_id=None)
        return self._start(run_name, tags, parent_run_id=None, existing=None)

    def resume_or_start(self, run_name: str, *, tags: Mapping[str, Any] | None = None,
                        parent_run_id: str | None = None) -> str | None:
        """Make active the newest live run with this name, tags and parent, creating it if there is none."""
        if not self.enabled:
            return None
        if "'" in run_name and '"' in run_name:
            raise InputError(f"run name {run_name!r} must not contain both quote characters")
        existing = None
        with self._guard():
            existing = self._find_run(run_name, dict(tags or {}), parent_run_id)
        return self._start(run_name, tags, parent_run_id=parent_run_id, existing=existing)

    def _find_run(self, run_name: str, tags: dict[str, Any], parent_run_id: str | None) -> str | None:
        quote = "'" if "'" not in run_name else '"'
        wanted = _clean_tags(tags)
        if parent_run_id:
            wanted[TAG_PARENT] = parent_run_id
        runs = self._client.search_runs([self._experiment_id], f"attributes.run_name = {quote}{run_name}{quote}",
                                        order_by=["attributes.start_time DESC"], max_results=100)
        for run in runs:
            if all(run.data.tags.get(k) == v for k, v in wanted.items()):
                return run.info.run_id
        return None

    def _start(self, run_name: str, tags: Mapping[str, Any] | None, *, parent_run_id: str | None,
               existing: str | None) -> str | None:
        if not self.enabled:
            return None
        all_tags = _clean_tags({**self.standard_tags(), **(tags or {}),
                                **({TAG_PARENT: parent_run_id} if parent_run_id else {})})
        with self._guard():
            if existing is None:
                run_id = self._client.create_run(self._experiment_id, tags=all_tags, run_name=run_name).info.run_id
            else:
                run_id = existing
                self._client.update_run(run_id, status="RUNNING")
                self._set_tags_of(run_id, all_tags)
            self._stack.append(run_id)
            self._start_system_metrics(run_id, resumed=existing is not None)
            return run_id
        return None

    def end(self, status: str = "FINISHED") -> None:
        """Terminate the innermost active run (FINISHED, FAILED or KILLED)."""
        if not self._stack:
            return
        run_id = self._stack.pop()
        monitor = self._monitors.pop(run_id, None)
        if monitor is not None:
            with contextlib.suppress(Exception):
                monitor.finish()
        if self.enabled:
            with self._guard():
                self._client.set_terminated(run_id, status=status)

    def close(self, status: str = "FINISHED") -> None:
        """End every run this tracker still holds."""
        while self._stack:
            self.end(status)

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(_status_for(exc_type))

    @contextlib.contextmanager
    def child(self, run_name: str, tags: Mapping[str, Any] | None = None, *, parent_run_id: str | None = None,
              resume: bool = False) -> Iterator[str | None]:
        """A run nested under the active run (or `parent_run_id`) for the duration of the block."""
        parent = parent_run_id or self.active_run_id
        if resume:
            run_id = self.resume_or_start(run_name, tags=tags, parent_run_id=parent)
        else:
            run_id = self._start(run_name, tags, parent_run_id=parent, existing=None)
        status = "FINISHED"
        try:
            yield run_id
        except BaseException as e:
            status = _status_for(type(e))
            raise
        finally:
            if run_id is not None and self._stack and self._stack[-1] == run_id:
                self.end(status)

    @contextlib.contextmanager
    def attach(self, run_id: str) -> Iterator[str | None]:
        """Log into an existing run (created by another process) for the duration of the block."""
        if not self.enabled:
            yield None
            return
        with self._guard():
            self._client.update_run(run_id, status="RUNNING")
            self._stack.append(run_id)
            self._start_system_metrics(run_id, resumed=True)
        status = "FINISHED"
        try:
            yield run_id if self.enabled else None
        except BaseException as e:
            status = _status_for(type(e))
            raise
        finally:
            if self._stack and self._stack[-1] == run_id:
                self.end(status)

    def _start_system_metrics(self, run_id: str, *, resumed: bool) -> None:
        if not self._system_metrics:
            return
        try:
            import psutil  # noqa: F401 - mlflow's monitors need it
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
        except ImportError as e:
            self._system_metrics = False
            warnings.warn(f"system metrics are off: {e} (install psutil)", TrackingWarning, stacklevel=3)
            return
        try:
            monitor = SystemMetricsMonitor(run_id, resume_logging=resumed, tracking_uri=self._uri)
            monitor.start()
        except Exception as e:  # noqa: BLE001 - metrics about the machine are optional
            self._system_metrics = False
            warnings.warn(f"system metrics are off: {type(e).__name__}: {e}", TrackingWarning, stacklevel=3)
            return
        self._monitors[run_id] = monitor

    # -- logging -------------------------------------------------------------------------------

    def _active(self) -> str | None:
        if not self.enabled:
            return None
        if not self._stack:
            self._warn("MLflow logging without an active run (start_parent / child / attach first); ignored")
            return None
        return self._stack[-1]

    def log_params(self, flat_config: Mapping[str, Any]) -> None:
        """Log 'section.field' -> value params; long values truncated, secrets masked.

        MLflow params are immutable: on a resumed run, keys already logged keep their first value
        (a changed value is reported once and skipped).
        """
        run_id = self._active()
        if run_id is None:
            return
        params = {sanitize_key(k): _safe_value(k, v, _MAX_PARAM_VALUE) for k, v in flat_config.items()}
        with self._guard():
            logged = self._client.get_run(run_id).data.params
            changed = sorted(k for k, v in params.items() if k in logged and logged[k] != v)
            if changed:
                warnings.warn(f"run {run_id}: params {changed[:5]} already logged with other values; kept the "
                              "first values", TrackingWarning, stacklevel=2)
            new = [Param(k, v) for k, v in params.items() if k not in logged]
            for i in range(0, len(new), _MAX_PARAMS_PER_BATCH):
                self._client.log_batch(run_id, params=new[i:i + _MAX_PARAMS_PER_BATCH])

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        run_id = self._active()
        if run_id is None:
            return
        now = int(time.time() * 1000)
        batch = []
        for k, v in metrics.items():
            value = float(v.item() if hasattr(v, "item") else v)
            batch.append(Metric(sanitize_key(k), value, now, int(step or 0)))
        with self._guard():
            for i in range(0, len(batch), _MAX_METRICS_PER_BATCH):
                self._client.log_batch(run_id, metrics=batch[i:i + _MAX_METRICS_PER_BATCH])

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        """Upload a file or a whole directory to the active run's artifacts."""
        run_id = self._active()
        if run_id is None:
            return
        with self._guard():
            if Path(path).is_dir():
                self._client.log_artifacts(run_id, str(path), artifact_path)
            else:
                self._client.log_artifact(run_id, str(path), artifact_path)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        run_id = self._active()
        if run_id is None:
            return
        with self._guard():
            self._set_tags_of(run_id, _clean_tags(tags))

    def _set_tags_of(self, run_id: str, tags: dict[str, str]) -> None:
        items = [RunTag(k, v) for k, v in tags.items()]
        for i in range(0, len(items), _MAX_PARAMS_PER_BATCH):
            self._client.log_batch(run_id, tags=items[i:i + _MAX_PARAMS_PER_BATCH])


def _status_for(exc_type) -> str:
    if exc_type is None:
        return "FINISHED"
    return "KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED"


# ----------------------------------------------------------------------------------------------
# `slotmem runs`
# ----------------------------------------------------------------------------------------------


def main_runs(args, cfg) -> int:
    """`slotmem runs --config X`: the pipeline's parent runs, their child runs and key metrics."""
    uri = resolve_tracking_uri(cfg.tracking, local_storage_root(cfg.storage))
    if uri is None:
        raise InputError("no MLflow store: set tracking.tracking_uri or $MLFLOW_TRACKING_URI "
                         f"(storage.root {cfg.storage.root!r} is not local)")
    db = _sqlite_path(uri)
    if db is not None and not db.is_file():
        raise InputError(f"no MLflow store at {db} (run `slotmem pipeline` first, or set tracking.tracking_uri)")
    if uri.startswith(("http://", "https://")) and (reason := _probe_http(uri)) is not None:
        raise InputError(f"MLflow server {mask_uri(uri)} is unreachable ({reason})")
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    print(f"MLflow experiment {cfg.tracking.experiment!r} at {mask_uri(uri)}")
    runs = _all_runs(client, exp.experiment_id) if exp is not None else []
    if not runs:
        print("no runs")
        return 0
    ids = {r.info.run_id for r in runs}
    parents = [r for r in runs if r.data.tags.get(TAG_PARENT) not in ids]
    children: dict[str, list] = {}
    for r in runs:
        if r.data.tags.get(TAG_PARENT) in ids:
            children.setdefault(r.data.tags[TAG_PARENT], []).append(r)
    rows = []
    for parent in parents:
        rows.append(_row(parent, depth=0))
        rows.extend(_row(c, depth=1) for c in children.get(parent.info.run_id, []))
    print(_format_table(["run", "id", "status", "stage", "round", *KEY_METRICS], rows))
    print(f"{len(parents)} parent run(s), {len(runs) - len(parents)} child run(s)")
    return 0


def _all_runs(client: MlflowClient, experiment_id: str) -> list:
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], order_by=["attributes.start_time ASC"], max_results=1000,
                                  page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _row(run, *, depth: int) -> list[str]:
    tags, metrics = run.data.tags, run.data.metrics  # run.data.metrics holds each metric's last value
    name = ("  " * depth) + (run.info.run_name or run.info.run_id)
    cells = [name, run.info.run_id[:8], run.info.status, tags.get(TAG_STAGE, "-"), tags.get(TAG_ROUND, "-")]
    return cells + [_fmt(metrics.get(key)) for key in KEY_METRICS.values()]


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def _format_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip() for line in [header, *rows]]
    return "\n".join(lines)
