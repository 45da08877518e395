"""MLflow tracking for the pipeline: one parent run, a child run per stage, the rollout fleet and the sample.

Where runs go is cluster/mlflow_names.py's ``resolve_tracking_uri``. For every sqlite store the experiment's
artifact location is set explicitly next to the database, because MLflow's default is ``./mlruns`` relative to
whatever the working directory happens to be.

Tracking never takes the job down, and never gives up at the first error: run creation and look-ups retry
transient errors inline for up to a minute (then that run is skipped with one warning), and every logging call is
delivered in the background by a bounded queue that retries through server outages (cluster/delivery.py).
Logging only from rank 0 is the caller's job; ``Tracker.disabled()`` is the no-op tracker for the other ranks.

System metrics (CPU, memory, GPU through nvidia-ml-py when present) are sampled in every process that holds a
run, under its ``node_id`` (MLflow prefixes the metric names with it), so a multi-node job shows each node.

Resubmitted jobs continue their runs: ``resume_or_start`` finds a run by its (deterministic) name, tags and
parent, and the pipeline's parent run id is recorded under the storage root, so two pipelines with the same
experiment name on different roots never share runs.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import time
import warnings
from pathlib import Path
from typing import Any, Iterator, Mapping

from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from cluster.delivery import DeliveryQueue, TrackingWarning, is_transient, retry_call
from cluster.mlflow_names import (  # noqa: F401 - re-exported: the names callers use with the tracker
    _HTTP_ENV, _MAX_METRICS_PER_BATCH, _MAX_PARAM_VALUE, _MAX_PARAMS_PER_BATCH, ARTIFACT_DIR, DB_NAME, KEY_METRICS,
    METRIC_CRITIC, METRIC_DATA_WAIT, METRIC_DMD, METRIC_FRAMES_PER_S, METRIC_POLICY_LAG, METRIC_SLOT_CON,
    METRIC_SLOT_REC, TAG_EXPERIMENT, TAG_GIT_COMMIT, TAG_PARENT, TAG_POLICY_VERSION, TAG_ROUND, TAG_STAGE,
    _artifact_root, _clean_tags, _probe_http, _safe_value, _sqlite_path, _truncate, git_commit, local_storage_root,
    local_tracking_uri, mask_uri, resolve_tracking_uri, sanitize_key, stage_run_name)
from slotmem.config import StorageConfig, TrackingConfig
from slotmem.errors import InputError, JobStopped

SYNC_BUDGET_S = 60.0  # run creation and look-ups: how long to retry inline before skipping the run
CLOSE_FLUSH_S = 30.0  # how long close() waits for the queue to drain


def node_label(role: str, node: str | None = None) -> str:
    """A node id for system metrics: the process's role and its node (default: the host name), in the characters
    MLflow allows in metric names (it logs ``system/<node id>/<metric>``)."""
    return re.sub(r"[^A-Za-z0-9_.\-]", "_", f"{role}.{node or socket.gethostname()}")


class Tracker:
    """Parent/child MLflow runs for one process; every method is a no-op once disabled.

    ``start_parent`` (or ``resume_or_start``) makes a run active; ``child`` nests a run under the
    active one for the duration of a ``with`` block; ``attach`` logs into a run created elsewhere
    (the driver's child run, from a Ray Train worker). ``log_*`` and ``set_tags`` go to the
    innermost active run, ``log_metrics_to`` to a run named by id (safe from any thread).
    """

    def __init__(self, tracking_cfg: TrackingConfig, *, storage_root_local: str | None,
                 experiment: str | None = None, node_id: str | None = None):
        """`storage_root_local`: absolute local storage root for the default sqlite store (None for s3://).
        `experiment`: the one experiment name (storage.experiment), the MLflow experiment and every run's
        `experiment` tag. `node_id`: this process's name in system metrics (default: driver@host). System metrics
        follow tracking_cfg.system_metrics unless $MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING is explicitly false."""
        self.experiment = experiment or tracking_cfg.experiment or "slotmem"
        self._mlflow_experiment = tracking_cfg.experiment or self.experiment
        self._system_metrics = tracking_cfg.system_metrics and os.environ.get(
            "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "").lower() not in ("false", "0")
        self.node_id = node_id or node_label("driver")
        self._retry_s = tracking_cfg.retry_s
        self._queue_size = tracking_cfg.queue_size
        self._stack: list[str] = []
        self._monitors: dict[str, Any] = {}
        self._open: set[str] = set()
        self._warned: set[str] = set()
        self._client: MlflowClient | None = None
        self._queue: DeliveryQueue | None = None
        self._experiment_id: str | None = None
        self._git_commit: str | None = None
        self._uri = resolve_tracking_uri(tracking_cfg, storage_root_local) if tracking_cfg.enabled else None
        if not tracking_cfg.enabled:
            return
        if self._uri is None:
            self._warn("no-uri", "no tracking URI (tracking.tracking_uri, $MLFLOW_TRACKING_URI) and storage.root is "
                       "not local; MLflow tracking is off")
            return
        self._connect(storage_root_local)

    @classmethod
    def disabled(cls) -> "Tracker":
        """A tracker that does nothing (ranks other than 0, tracking.enabled = false)."""
        return cls(TrackingConfig(enabled=False), storage_root_local=None)

    @classmethod
    def from_config(cls, tracking_cfg: TrackingConfig, storage_cfg: StorageConfig, node_id: str | None = None
                    ) -> "Tracker":
        return cls(tracking_cfg, storage_root_local=local_storage_root(storage_cfg), experiment=storage_cfg.experiment,
                   node_id=node_id)

    def _connect(self, storage_root_local: str | None) -> None:
        uri = self._uri
        if uri.startswith(("http://", "https://")):
            for k, v in _HTTP_ENV.items():
                os.environ.setdefault(k, v)
        try:
            db = _sqlite_path(uri)
            if db is not None:
                db.parent.mkdir(parents=True, exist_ok=True)
            client = MlflowClient(tracking_uri=uri)
            self._client = client
            self._experiment_id = retry_call(lambda: self._get_or_create_experiment(
                _artifact_root(uri, storage_root_local)), budget_s=min(self._retry_s, SYNC_BUDGET_S))
            self._git_commit = git_commit()
            self._queue = DeliveryQueue(size=self._queue_size, retry_s=self._retry_s, describe=self._describe)
        except Exception as e:  # noqa: BLE001 - tracking must never take the job down
            self._client = None
            self._warn("connect", f"MLflow tracking at {self.display_uri} is unusable ({self._describe(e)}); "
                       "tracking is off for this process")

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
    def uri(self) -> str | None:
        """The tracking URI other processes of this job log to (unmasked: never print it, use display_uri)."""
        return self._uri if self.enabled else None

    def system_metrics_target(self, run_id: str | None) -> tuple[str, str] | None:
        """(run id, URI) for another process's system-metrics sampler, or None when they are off."""
        return (run_id, self._uri) if self.enabled and self._system_metrics and run_id else None

    @property
    def display_uri(self) -> str:
        return mask_uri(self._uri) if self._uri else "(none)"

    @property
    def experiment_id(self) -> str | None:
        return self._experiment_id

    @property
    def active_run_id(self) -> str | None:
        return self._stack[-1] if self._stack else None

    @property
    def delivery(self):
        """The background queue's counters (delivered, dropped, retried), or None when disabled."""
        return self._queue.stats if self._queue is not None else None

    def __repr__(self) -> str:
        return f"Tracker({self.display_uri!r}, enabled={self.enabled}, active={self.active_run_id})"

    def _describe(self, err: BaseException) -> str:
        text = str(err).replace(self._uri or "\0", self.display_uri)
        return f"{type(err).__name__}: {_truncate(text, 300)}"

    def _warn(self, kind: str, message: str) -> None:
        if kind not in self._warned:
            self._warned.add(kind)
            warnings.warn(message, TrackingWarning, stacklevel=3)

    def _sync(self, what: str, fn):
        """A call whose result the job needs now (creating or finding a run): retried inline, then skipped."""
        try:
            return retry_call(fn, budget_s=min(self._retry_s, SYNC_BUDGET_S))
        except Exception as e:  # noqa: BLE001 - tracking must never take the job down
            kind = "transient" if is_transient(e) else "rejected"
            self._warn(f"sync:{what}", f"MLflow {what} failed ({kind}: {self._describe(e)}); continuing without it")
            return None

    def _post(self, what: str, fn) -> None:
        if self._queue is not None:
            self._queue.put(what, fn)

    # -- tags ----------------------------------------------------------------------------------

    def standard_tags(self, *, stage: str | None = None, round_index: int | None = None,
                      policy_version: int | None = None) -> dict[str, str]:
        """experiment, stage, round, policy_version and the git commit, those that are known."""
        tags = {TAG_EXPERIMENT: self.experiment, TAG_STAGE: stage, TAG_ROUND: round_index,
                TAG_POLICY_VERSION: policy_version, TAG_GIT_COMMIT: self._git_commit}
        return {k: str(v) for k, v in tags.items() if v is not None}

    # -- runs ----------------------------------------------------------------------------------

    def run_exists(self, run_id: str) -> bool:
        if not self.enabled:
            return False

        def look_up():
            try:
                return self._client.get_run(run_id)
            except MlflowException as e:
                if e.error_code == "RESOURCE_DOES_NOT_EXIST":
                    return None
                raise

        run = self._sync(f"look-up of run {run_id}", look_up)
        return run is not None and run.info.experiment_id == self._experiment_id

    def start_parent(self, run_name: str, tags: Mapping[str, Any] | None = None, *, resume: bool = False,
                     run_id: str | None = None) -> str | None:
        """Start the pipeline's parent run: continue `run_id` if given and it exists (the id recorded under the
        storage root), else with resume=True the newest one of the same name and tags, else a new one."""
        if run_id and self.run_exists(run_id):
            return self._start(run_name, tags, parent_run_id=None, existing=run_id)
        if resume and not run_id:
            return self.resume_or_start(run_name, tags=tags, parent_run_id=None)
        return self._start(run_name, tags, parent_run_id=None, existing=None)

    def resume_or_start(self, run_name: str, *, tags: Mapping[str, Any] | None = None,
                        parent_run_id: str | None = None) -> str | None:
        """Make active the newest live run with this name, tags and parent, creating it if there is none."""
        if not self.enabled:
            return None
        if "'" in run_name and '"' in run_name:
            raise InputError(f"run name {run_name!r} must not contain both quote characters")
        existing = self._sync(f"search for run {run_name!r}",
                              lambda: self._find_run(run_name, dict(tags or {}), parent_run_id))
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
        if existing is None:
            run = self._sync(f"creation of run {run_name!r}", lambda: self._client.create_run(
                self._experiment_id, tags=all_tags, run_name=run_name))
            if run is None:
                return None
            run_id = run.info.run_id
        else:
            run_id = existing
            self._post("run status", lambda: self._client.update_run(run_id, status="RUNNING"))
            self._post_tags(run_id, all_tags)
        self._stack.append(run_id)
        self._start_system_metrics(run_id, resumed=existing is not None)
        return run_id

    def open_run(self, run_name: str, tags: Mapping[str, Any] | None = None, *, parent_run_id: str | None
                 ) -> str | None:
        """A child run that stays open beside the active one (not on the stack): the rollout fleet's thread logs
        to it with ``log_metrics_to`` while the stages run; ``finish_run`` ends it. Continued on resume."""
        if not self.enabled:
            return None
        run_id = self.resume_or_start(run_name, tags=tags, parent_run_id=parent_run_id)
        if run_id is not None and self._stack and self._stack[-1] == run_id:
            self._stack.pop()
            self._open.add(run_id)
        return run_id

    def finish_run(self, run_id: str | None, status: str = "FINISHED") -> None:
        if self.enabled and run_id is not None:
            self._open.discard(run_id)
            self._stop_system_metrics(run_id)
            self._post("run end", lambda: self._client.set_terminated(run_id, status=status))

    def end(self, status: str = "FINISHED") -> None:
        """Terminate the innermost active run (FINISHED, FAILED or KILLED)."""
        if not self._stack:
            return
        run_id = self._stack.pop()
        self._stop_system_metrics(run_id)
        self._post("run end", lambda: self._client.set_terminated(run_id, status=status))

    def flush(self, timeout_s: float = CLOSE_FLUSH_S) -> bool:
        """Wait until every call so far was delivered or dropped; False if timeout_s passed first."""
        return self._queue.flush(timeout_s) if self._queue is not None else True

    def close(self, status: str = "FINISHED") -> None:
        """End every run this tracker still holds and wait (bounded) for the queue to deliver."""
        while self._stack:
            self.end(status)
        for run_id in list(self._open):
            self.finish_run(run_id, status)
        if self._queue is not None:
            self._queue.flush(CLOSE_FLUSH_S)

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
        self._post("run status", lambda: self._client.update_run(run_id, status="RUNNING"))
        self._stack.append(run_id)
        self._start_system_metrics(run_id, resumed=True)
        status = "FINISHED"
        try:
            yield run_id
        except BaseException as e:
            status = _status_for(type(e))
            raise
        finally:
            if self._stack and self._stack[-1] == run_id:
                self.end(status)

    # -- system metrics --------------------------------------------------------------------------

    def _start_system_metrics(self, run_id: str, *, resumed: bool) -> None:
        if self._system_metrics and self.enabled:
            monitor = start_system_metrics(run_id, tracking_uri=self._uri, node_id=self.node_id, resumed=resumed)
            if monitor is None:
                self._system_metrics = False
            else:
                self._monitors[run_id] = monitor

    def _stop_system_metrics(self, run_id: str) -> None:
        monitor = self._monitors.pop(run_id, None)
        if monitor is not None:
            with contextlib.suppress(Exception):
                monitor.finish()

    # -- logging -------------------------------------------------------------------------------

    def _active(self) -> str | None:
        if not self.enabled:
            return None
        if not self._stack:
            self._warn("no-run", "MLflow logging without an active run (start_parent / child / attach first); ignored")
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

        def deliver():
            logged = self._client.get_run(run_id).data.params
            changed = sorted(k for k, v in params.items() if k in logged and logged[k] != v)
            if changed:
                self._warn(f"params:{run_id}", f"run {run_id}: params {changed[:5]} already logged with other "
                           "values; kept the first values")
            new = [Param(k, v) for k, v in params.items() if k not in logged]
            for i in range(0, len(new), _MAX_PARAMS_PER_BATCH):
                self._client.log_batch(run_id, params=new[i:i + _MAX_PARAMS_PER_BATCH])

        self._post("params", deliver)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        run_id = self._active()
        if run_id is not None:
            self.log_metrics_to(run_id, metrics, step)

    def log_metrics_to(self, run_id: str | None, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Metrics to a run by id (no active run needed: the fleet's thread logs its rounds this way)."""
        if not self.enabled or run_id is None:
            return
        now = int(time.time() * 1000)
        batch = [Metric(sanitize_key(k), float(v.item() if hasattr(v, "item") else v), now, int(step or 0))
                 for k, v in metrics.items()]

        def deliver():
            for i in range(0, len(batch), _MAX_METRICS_PER_BATCH):
                self._client.log_batch(run_id, metrics=batch[i:i + _MAX_METRICS_PER_BATCH])

        self._post("metrics", deliver)

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        """Upload a file or a whole directory to the active run's artifacts (now: the file may be temporary)."""
        run_id = self._active()
        if run_id is None:
            return

        def deliver():
            if Path(path).is_dir():
                self._client.log_artifacts(run_id, str(path), artifact_path)
            else:
                self._client.log_artifact(run_id, str(path), artifact_path)

        self._sync(f"artifact upload of {Path(path).name}", deliver)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        run_id = self._active()
        if run_id is not None:
            self._post_tags(run_id, _clean_tags(tags))

    def _post_tags(self, run_id: str, tags: dict[str, str]) -> None:
        items = [RunTag(k, v) for k, v in tags.items()]

        def deliver():
            for i in range(0, len(items), _MAX_PARAMS_PER_BATCH):
                self._client.log_batch(run_id, tags=items[i:i + _MAX_PARAMS_PER_BATCH])

        self._post("tags", deliver)


def start_system_metrics(run_id: str, *, tracking_uri: str, node_id: str, resumed: bool = True):
    """MLflow's system-metrics sampler for `run_id`, its metrics prefixed with `node_id`; None if unavailable."""
    try:
        import psutil  # noqa: F401 - mlflow's monitors need it
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
    except ImportError as e:
        warnings.warn(f"system metrics are off: {e} (install psutil)", TrackingWarning, stacklevel=3)
        return None
    try:
        monitor = SystemMetricsMonitor(run_id, resume_logging=resumed, node_id=node_id, tracking_uri=tracking_uri)
        monitor.start()
    except Exception as e:  # noqa: BLE001 - metrics about the machine are optional
        warnings.warn(f"system metrics are off: {type(e).__name__}: {e}", TrackingWarning, stacklevel=3)
        return None
    return monitor


def _status_for(exc_type) -> str:
    if exc_type is None:
        return "FINISHED"
    return "KILLED" if issubclass(exc_type, (KeyboardInterrupt, SystemExit, JobStopped)) else "FAILED"
