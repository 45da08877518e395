"""MLflow names and URIs shared by the tracker, the trainer, the rollout and `slotmem runs`.

Where runs go (first that applies):
  1. ``tracking.tracking_uri`` from the config;
  2. ``$MLFLOW_TRACKING_URI``;
  3. ``sqlite:///<abs storage root>/mlflow.db`` when ``storage.root`` is local (``local_tracking_uri``;
     ``slotmem runs`` reads the same file), with artifacts in ``<storage root>/mlartifacts/``.
With none of these (an s3:// storage root and no URI) tracking is off, with one warning. Credentials in URIs are
masked wherever a URI is printed or logged (``mask_uri``), and secret-looking config values are never logged.
"""

from __future__ import annotations

import os
import re
import subprocess
import urllib.parse
from pathlib import Path
from typing import Any, Mapping

from slotmem.config import StorageConfig, TrackingConfig

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
# the toy world's judge (pipeline.judge), logged by loop/pipeline.py on each stage run, the sample run and the parent
METRIC_JUDGE_ADHERENCE = "judge/adherence"
KEY_METRICS = {"dmd": METRIC_DMD, "critic": METRIC_CRITIC, "slot_con": METRIC_SLOT_CON,
               "slot_rec": METRIC_SLOT_REC, "frames_per_s": METRIC_FRAMES_PER_S, "policy_lag": METRIC_POLICY_LAG,
               "adherence": METRIC_JUDGE_ADHERENCE}

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


PARENT_RUN_ENV = "SLOTMEM_PARENT_RUN_ID"  # a standalone `slotmem train|rollout` nests its run under this run id
GIT_COMMIT_ENV = "SLOTMEM_GIT_COMMIT"  # set by `slotmem submit`: a job's working_dir carries no .git


def git_commit() -> str | None:
    """HEAD of the repository this package runs from (or of the checkout a job was submitted from)."""
    if re.fullmatch(r"[0-9a-f]{40}", os.environ.get(GIT_COMMIT_ENV, "")):
        return os.environ[GIT_COMMIT_ENV]
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


