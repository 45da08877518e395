"""Deliver tracking calls in the background, retrying through outages of the tracking server.

A training job must never wait for, nor die of, its tracking server. Every logging call (metrics, params, tags,
artifacts, a run's end) becomes an item on a bounded queue that one daemon thread delivers in order. A transient
failure (connection refused or reset, a timeout, a 5xx answer, a locked sqlite store) keeps the item at the head
and retries it with exponential backoff (0.5 s doubling to 8 s) for up to ``tracking.retry_s``, after which it is
dropped; a permanent failure (a rejected value) drops it at once. A full queue drops its oldest item. Drops are
counted and reported by one warning per kind, never by an exception in the job. ``flush`` waits (bounded) for the
queue to drain, e.g. when a stage ends.
"""

from __future__ import annotations

import collections
import re
import threading
import time
import warnings
from dataclasses import dataclass
from typing import Callable

_TRANSIENT = re.compile(
    r"Max retries exceeded|Connection (refused|reset|aborted)|RemoteDisconnected|timed? ?out|Read timed out"
    r"|TEMPORARILY_UNAVAILABLE|status code:? 5\d\d|\b50[0234]\b|database is locked|Errno 111|Errno 104",
    re.IGNORECASE)
BACKOFF_S = (0.5, 8.0)


class TrackingWarning(RuntimeWarning):
    """Tracking is degraded (server down, store unusable, system metrics unavailable)."""


def is_transient(err: BaseException) -> bool:
    """A tracking error that a later attempt can fix."""
    try:
        import requests

        if isinstance(err, (requests.ConnectionError, requests.Timeout)):
            return True
    except ImportError:  # pragma: no cover - requests comes with mlflow
        pass
    return isinstance(err, (ConnectionError, TimeoutError)) or bool(_TRANSIENT.search(f"{type(err).__name__}: {err}"))


def retry_call(fn: Callable[[], object], *, budget_s: float, stop: threading.Event | None = None):
    """Call fn, retrying transient errors with backoff for up to budget_s; re-raises the last error."""
    start, delay = time.monotonic(), BACKOFF_S[0]
    while True:
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - classified below
            if not is_transient(e) or time.monotonic() - start + delay > budget_s or (stop and stop.is_set()):
                raise
            time.sleep(delay)
            delay = min(2 * delay, BACKOFF_S[1])


@dataclass
class DeliveryStats:
    delivered: int = 0
    dropped_full: int = 0
    dropped_failed: int = 0
    retried: int = 0


class DeliveryQueue:
    def __init__(self, *, size: int, retry_s: float, describe: Callable[[BaseException], str] = str):
        self.size = size
        self.retry_s = retry_s
        self.describe = describe
        self.stats = DeliveryStats()
        self._items: collections.deque[tuple[str, Callable[[], object]]] = collections.deque()
        self._cond = threading.Condition()
        self._busy = False
        self._warned: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tracking-delivery", daemon=True)
        self._thread.start()

    def put(self, what: str, fn: Callable[[], object]) -> None:
        with self._cond:
            if len(self._items) >= self.size:
                self._items.popleft()
                self.stats.dropped_full += 1
                self._warn_once("full", f"the tracking queue is full ({self.size} calls, tracking.queue_size): "
                                        "dropping the oldest while the server is unreachable")
            self._items.append((what, fn))
            self._cond.notify()

    def flush(self, timeout_s: float) -> bool:
        """Wait until every queued call was delivered or dropped; False if timeout_s passed first."""
        end = time.monotonic() + timeout_s
        with self._cond:
            while self._items or self._busy:
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(timeout=min(left, 0.2))
        return True

    def pending(self) -> int:
        with self._cond:
            return len(self._items) + int(self._busy)

    def close(self, timeout_s: float) -> None:
        self.flush(timeout_s)
        self._stop.set()
        with self._cond:
            self._cond.notify_all()

    def _warn_once(self, kind: str, message: str) -> None:
        if kind not in self._warned:
            self._warned.add(kind)
            warnings.warn(message, TrackingWarning, stacklevel=3)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._items and not self._stop.is_set():
                    self._cond.wait()
                if not self._items:
                    return
                what, fn = self._items.popleft()
                self._busy = True
            try:
                retried = [0]

                def attempt():
                    retried[0] += 1
                    return fn()

                retry_call(attempt, budget_s=self.retry_s, stop=self._stop)
                self.stats.delivered += 1
                self.stats.retried += retried[0] - 1
            except Exception as e:  # noqa: BLE001 - tracking never takes the job down
                self.stats.dropped_failed += 1
                kind = "transient" if is_transient(e) else "rejected"
                self._warn_once(kind, f"MLflow {what} was dropped after {self.retry_s:g} s of retries "
                                      f"(tracking.retry_s): {self.describe(e)}" if is_transient(e) else
                                      f"MLflow {what} was rejected and dropped: {self.describe(e)} (further "
                                      "rejected calls are counted, not reported)")
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()
