"""A running job's control channel: progress lines up to the driver, a stop request down to the workers.

One ``JobControl`` actor per job, named after the job (``slotmem-control:<submission id>`` for a submitted job,
``slotmem-control:local-<pid>`` otherwise) in the ``slotmem`` namespace, so a separate process can find it:

    progress  Ray workers' stdout goes to the session's log files (``log_to_driver=False``: no duplicated or
              interleaved worker lines on the console). A worker that has something for the operator (the
              trainer's rank 0 every few iterations) ``post``s the line; the driver's relay thread prints it, so it
              is on the console and in the job's logs, where ``slotmem status`` reads it.
    stop      ``slotmem stop JOB`` runs a two-line job on the cluster that calls ``request_stop``. The trainer's
              rank 0 checks the flag after every iteration and all ranks agree on it by one all-reduce; the stage
              then checkpoints and returns, the pipeline ends its MLflow runs as KILLED, frees the rollout fleet
              and its resource requests, prints ``STOPPED_LINE`` and waits for ``ray job stop`` (so the job's
              final status reads STOPPED). SIGTERM and the first Ctrl-C of a local run request the same stop.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import threading
import time
from typing import Callable

import ray

NAMESPACE = "slotmem"
STOPPED_LINE = "[pipeline] stopped on request"
RELAY_EVERY_S = 0.5
_MAX_LINES = 10000


@ray.remote(num_cpus=0, max_concurrency=4)
class JobControl:
    def __init__(self):
        self.lines: list[str] = []
        self.first = 0  # index of lines[0] in the whole stream (old lines are dropped beyond _MAX_LINES)
        self.stop = ""

    def post(self, line: str) -> None:
        self.lines.append(line)
        if len(self.lines) > _MAX_LINES:
            drop = len(self.lines) - _MAX_LINES
            self.lines, self.first = self.lines[drop:], self.first + drop

    def drain(self, start: int) -> tuple[list[str], int]:
        """Lines from stream position `start` on, and the next position."""
        begin = max(start - self.first, 0)
        return self.lines[begin:], self.first + len(self.lines)

    def request_stop(self, reason: str) -> bool:
        """Ask the job to stop at the next iteration boundary; False if a stop was already requested."""
        first = not self.stop
        self.stop = self.stop or reason or "requested"
        return first

    def stop_requested(self) -> str:
        return self.stop


def on_this_node():
    """Scheduling for the job's control-plane actors: the driver's own node (the head, for a submitted job), so
    losing a worker node never takes them down with it."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)


def submission_id() -> str | None:
    """The Ray Jobs submission id of this driver, when it was started by `ray job submit` / `slotmem submit`."""
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return None
    try:
        return json.loads(raw).get("metadata", {}).get("job_submission_id")
    except ValueError:
        return None


def actor_name(job: str) -> str:
    return f"slotmem-control:{job}"


class Control:
    """The driver's side: owns the actor, relays posted lines to the console, turns signals into a stop request."""

    def __init__(self, *, log: Callable[[str], None] = print):
        self.job = submission_id() or f"local-{os.getpid()}"
        self.log = log
        self.actor = JobControl.options(name=actor_name(self.job), namespace=NAMESPACE, get_if_exists=True,
                                        scheduling_strategy=on_this_node()).remote()
        self._position = 0
        self._done = threading.Event()
        self._relay = threading.Thread(target=self._run_relay, name="progress-relay", daemon=True)
        self._relay.start()
        self._old_handlers: dict[int, object] = {}
        self._local_stop = ""

    # -- stop ---------------------------------------------------------------------------------

    def install_signal_handlers(self) -> None:
        """SIGTERM (`ray job stop`, a pod's termination) and the first Ctrl-C request a clean stop."""
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old_handlers[sig] = signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self._local_stop:  # the second signal: abort now
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            raise SystemExit(143)
        self._local_stop = name
        self.log(f"[pipeline] {name}: stopping after the current iteration (checkpointed; "
                 f"{'Ctrl-C again' if signum == signal.SIGINT else 'a second signal'} aborts)")
        self.actor.request_stop.remote(name)

    def stop_reason(self) -> str:
        """Why the job was asked to stop ('' if it was not)."""
        if self._local_stop:
            return self._local_stop
        try:
            return ray.get(self.actor.stop_requested.remote(), timeout=30)
        except Exception:  # noqa: BLE001 - an unanswering control actor is not a stop request
            return ""

    @staticmethod
    def wait_for_kill_if_submitted(timeout_s: float = 120.0) -> None:
        """A submitted job that stopped on request waits (default signal handlers back) for `slotmem stop`'s
        `ray job stop`, so its status reads STOPPED rather than FAILED; a local run returns at once."""
        if submission_id() is None:
            return
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            time.sleep(0.5)

    # -- progress -------------------------------------------------------------------------------

    def _run_relay(self) -> None:
        while not self._done.is_set():
            self._flush_lines()
            self._done.wait(RELAY_EVERY_S)

    def _flush_lines(self) -> None:
        try:
            lines, self._position = ray.get(self.actor.drain.remote(self._position), timeout=30)
        except Exception:  # noqa: BLE001 - progress lines are best effort
            return
        for line in lines:
            self.log(line)

    def close(self) -> None:
        self._done.set()
        self._relay.join(timeout=5)
        self._flush_lines()
        for sig, handler in self._old_handlers.items():
            signal.signal(sig, handler)
        try:
            ray.kill(self.actor)
        except Exception:  # noqa: BLE001 - already gone with the cluster
            pass


def signal_stop_entrypoint(job: str) -> str:
    """The entrypoint of the tiny job `slotmem stop` submits: find `job`'s control actor and request a stop.
    Exit 3 when the job has no control actor (not started yet, or not a slotmem pipeline/train job)."""
    script = (
        "import ray, sys\n"
        "ray.init(address='auto', logging_level='ERROR', log_to_driver=False)\n"
        "try:\n"
        f"    actor = ray.get_actor({actor_name(job)!r}, namespace={NAMESPACE!r})\n"
        "except ValueError:\n"
        "    print('no control actor'); sys.exit(3)\n"
        "print('stop requested' if ray.get(actor.request_stop.remote('slotmem stop')) else 'already stopping')\n"
    )
    return f"python -c {shlex.quote(script)}"
