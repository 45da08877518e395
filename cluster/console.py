"""The operator's console: our progress lines only; library logging goes to a file in the Ray session's logs.

Ray (its driver-side Train and Data loggers), MLflow, botocore, urllib3 and alembic log at INFO and WARNING from
the driver process (system-metrics start/stop, schema migrations, connection retries). After ``ray.init`` their
handlers are replaced by one file handler on ``<session dir>/logs/slotmem-driver.log``; warnings of our own
(``TrackingWarning``, shown once each) and errors still reach the console.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

LIBRARY_LOGGERS = ("ray", "mlflow", "urllib3", "botocore", "boto3", "s3transfer", "alembic", "filelock",
                   "deepspeed", "fsspec", "py4j")
LOG_NAME = "slotmem-driver.log"
_state: dict[str, str] = {}


def route_library_logs(directory: str | os.PathLike) -> str:
    """Send the library loggers to `directory`/slotmem-driver.log (group-readable); returns the path."""
    path = Path(directory) / LOG_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for name in LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.propagate = False
        logger.setLevel(logging.INFO)
    os.chmod(path, 0o640)
    _state["path"] = str(path)
    return str(path)


def driver_log_path() -> str | None:
    """Where route_library_logs sent the library logs of this process, if it did."""
    return _state.get("path")


def route_to_session_logs() -> str | None:
    """route_library_logs into the Ray session's log directory (after ray.init)."""
    import ray

    try:
        session = ray._private.worker._global_node.get_session_dir_path()  # noqa: SLF001 - no public accessor
    except AttributeError:
        return None
    return route_library_logs(Path(session) / "logs")
