"""`slotmem status | logs | stop`: watch and stop a submitted job through the Ray Jobs API.

    status  the job's Ray status and, read from its log, where it is: the phase, iteration/total, the last losses
            and policy lag of the training stage, rollout rounds so far (the console lines of loop/, trainer/ and
            rollout/ have a fixed shape, parsed by ``progress_from_log``)
    logs    the job's log; ``--follow`` streams it until the job ends
    stop    a clean stop: a two-line job on the cluster asks the job's control actor to stop (cluster/control.py);
            the stage checkpoints, MLflow runs end as KILLED, the fleet and resource requests are released, and
            the job then gets ``ray job stop`` (status STOPPED). A job that cannot stop cleanly in ``--timeout``
            seconds, or has no control actor yet, is stopped hard. A resubmission resumes it.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from dataclasses import dataclass, field

from slotmem.errors import InputError

STOP_TIMEOUT_S = 900.0
AGENT_WAIT_S = 120.0  # how long a call waits for a starting head's job agent
_STAGE_LINE = re.compile(r"^\[train (?P<stage>stage\d)\] step (?P<step>\d+)/(?P<total>\d+) (?P<rest>.*)$")
_STAGE_START = re.compile(r"^\[train (?P<stage>stage\d)\] (?:starting|resuming) at step (?P<step>\d+)/(?P<total>\d+)")
_PAIR = re.compile(r"(?P<key>[a-z_/0-9]+)=(?P<value>[-+.\deE/naif]+)")
_ROLLOUT = re.compile(r"^\[rollout\] (?P<rounds>\d+) rounds, (?P<trajectories>\d+) trajectories")
_PHASE = re.compile(r"^\[(?P<tag>pipeline|rollout|train stage\d|sample)\]")


class JobsClient:
    """JobSubmissionClient with one-line errors for unreachable heads, token auth and unknown jobs."""

    def __init__(self, address: str):
        from cluster.runtime import auth_error_message, use_token_auth_if_given

        use_token_auth_if_given()  # before Ray is imported: it reads the mode once
        from ray.job_submission import JobSubmissionClient

        # the SDK logs every packaging step at INFO on the console ("Ignoring upload ...", "Uploading package ...")
        logging.getLogger("ray").setLevel(logging.WARNING)

        if not address.startswith(("http://", "https://")):
            raise InputError(f"--address {address!r}: expected the dashboard URL, e.g. http://HEAD:8265")
        self.address = address
        self._auth_message = auth_error_message
        try:
            self.client = JobSubmissionClient(address)
        except Exception as e:  # noqa: BLE001 - sorted into one line below
            raise InputError(self._describe(e, "cannot reach the Ray Jobs API at " + address +
                                            " (is the head's dashboard up, with ray[default] installed?)")) from None

    def _describe(self, err: BaseException, what: str) -> str:
        import ray.exceptions

        if isinstance(err, ray.exceptions.AuthenticationError):
            return self._auth_message(self.address, err)
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return f"{what}: {first}"

    def call(self, what: str, fn):
        """fn(client), retried while the head's job agent is still starting (a fresh `ray start` answers
        500 'No available agent' for seconds to a minute on a busy machine), else one line."""
        deadline = time.monotonic() + AGENT_WAIT_S
        while True:
            try:
                return fn(self.client)
            except Exception as e:  # noqa: BLE001 - the SDK raises RuntimeError for HTTP errors, e.g. 404 unknown job
                if "No available agent" in str(e) and time.monotonic() < deadline:
                    time.sleep(2.0)
                    continue
                raise InputError(self._describe(e, what)) from None


def client_for(address: str) -> JobsClient:
    return JobsClient(address)


# ----------------------------------------------------------------------------------------------
# status
# ----------------------------------------------------------------------------------------------


@dataclass
class Progress:
    """Where a job is, from its log."""

    phase: str = ""
    stage: str = ""
    step: int | None = None
    total: int | None = None
    values: dict[str, str] = field(default_factory=dict)
    rollout_rounds: int | None = None
    rollout_trajectories: int | None = None
    last_line: str = ""

    def lines(self) -> list[str]:
        out = []
        if self.phase:
            out.append(f"  phase:    {self.phase}")
        if self.stage and self.step is not None:
            shown = " ".join(f"{k}={v}" for k, v in self.values.items())
            out.append(f"  training: {self.stage} iteration {self.step}/{self.total}" + (f"  {shown}" if shown else ""))
        if self.rollout_rounds is not None:
            out.append(f"  rollout:  {self.rollout_rounds} rounds, {self.rollout_trajectories} trajectories committed")
        if self.last_line:
            out.append(f"  last:     {self.last_line}")
        return out


def progress_from_log(log: str) -> Progress:
    p = Progress()
    for line in log.splitlines():
        line = line.strip()
        if m := _STAGE_START.match(line):
            p.stage, p.step, p.total, p.values = m["stage"], int(m["step"]), int(m["total"]), {}
        elif m := _STAGE_LINE.match(line):
            p.stage, p.step, p.total = m["stage"], int(m["step"]), int(m["total"])
            rest, lag = m["rest"], re.search(r"lag p50/p95=(\S+)", m["rest"])
            p.values = dict(_PAIR.findall(rest[:lag.start()] if lag else rest))
            if lag:
                p.values["lag_p50/p95"] = lag[1]
        elif m := _ROLLOUT.match(line):
            p.rollout_rounds, p.rollout_trajectories = int(m["rounds"]), int(m["trajectories"])
        if m := _PHASE.match(line):
            tag = m["tag"]
            if tag.startswith("train "):
                p.phase = tag[len("train "):]
            elif tag == "pipeline" and ("stopped" in line or "sample" in line):
                p.phase = "stopped" if "stopped" in line else "sample"
            p.phase = p.phase or tag
            p.last_line = line[:160]
    return p


def main_status(args, cfg) -> int:
    client = client_for(args.address)
    info = client.call(f"job {args.job_id}", lambda c: c.get_job_info(args.job_id))
    print(f"{args.job_id}: {info.status.value}")
    if info.message and info.status.is_terminal():
        print(f"  {info.message.strip().splitlines()[0]}")
    print(f"  entrypoint: {info.entrypoint}")
    log = client.call(f"logs of job {args.job_id}", lambda c: c.get_job_logs(args.job_id))
    for line in progress_from_log(log).lines():
        print(line)
    return 0


# ----------------------------------------------------------------------------------------------
# logs
# ----------------------------------------------------------------------------------------------


def main_logs(args, cfg) -> int:
    client = client_for(args.address)
    if getattr(args, "follow", False):
        client.call(f"job {args.job_id}", lambda c: c.get_job_info(args.job_id))  # unknown job: one line
        return follow(client, args.job_id)
    print(client.call(f"job {args.job_id}", lambda c: c.get_job_logs(args.job_id)), end="")
    return 0


def follow(client: JobsClient, job_id: str) -> int:
    """Stream the job's log until it ends; exit code 0 if it SUCCEEDED. Ctrl-C stops following, not the job."""
    from ray.job_submission import JobStatus

    async def tail():
        async for lines in client.client.tail_job_logs(job_id):
            print(lines, end="", flush=True)

    try:
        asyncio.run(tail())
        status = client.client.get_job_status(job_id)
        while not status.is_terminal():  # the log stream can close a moment before the status flips
            time.sleep(0.5)
            status = client.client.get_job_status(job_id)
    except KeyboardInterrupt:
        print(f"\nstopped following; job {job_id} keeps running. `slotmem status {job_id} --address "
              f"{client.address}`, `slotmem stop {job_id} --address {client.address}`")
        return 130
    message = (client.client.get_job_info(job_id).message or "").strip()
    reason = ""
    if status != JobStatus.SUCCEEDED and message:
        # the message goes on with the log tail, which was just printed
        reason = ": " + message.splitlines()[0].split(", last available logs")[0]
    print(f"job {job_id} {status.value}{reason}")
    return 0 if status == JobStatus.SUCCEEDED else 1


# ----------------------------------------------------------------------------------------------
# stop
# ----------------------------------------------------------------------------------------------


def main_stop(args, cfg) -> int:
    from cluster.control import STOPPED_LINE, signal_stop_entrypoint

    client = client_for(args.address)
    job = args.job_id
    info = client.call(f"job {job}", lambda c: c.get_job_info(job))
    if info.status.is_terminal():
        print(f"{job} already ended: {info.status.value}")
        return 0
    signal_id = f"slotmem-stop-{uuid.uuid4().hex[:8]}"
    client.call("submit the stop request", lambda c: c.submit_job(entrypoint=signal_stop_entrypoint(job),
                                                                  submission_id=signal_id))
    outcome = _wait_terminal(client, signal_id, 120.0)
    answer = client.call("the stop request's log", lambda c: c.get_job_logs(signal_id)).strip().splitlines()
    if outcome != "SUCCEEDED":
        print(f"{job} has no control actor ({answer[-1] if answer else outcome}): stopping it hard")
        return _hard_stop(client, job)
    print(f"{job}: {answer[-1] if answer else 'stop requested'}; waiting up to {args.timeout:.0f} s for it to "
          "checkpoint and release its resources")
    end = time.monotonic() + args.timeout
    while time.monotonic() < end:
        status = client.client.get_job_status(job)
        if status.is_terminal():
            print(f"{job} ended: {status.value}")
            return 0
        if STOPPED_LINE in client.call(f"logs of job {job}", lambda c: c.get_job_logs(job)):
            client.call(f"stop job {job}", lambda c: c.stop_job(job))
            _wait_terminal(client, job, 60.0)
            print(f"{job} stopped cleanly (checkpointed, MLflow runs KILLED): "
                  f"{client.client.get_job_status(job).value}; submit the same command again to resume")
            return 0
        time.sleep(2.0)
    print(f"{job} did not stop cleanly in {args.timeout:.0f} s (--timeout): stopping it hard")
    return _hard_stop(client, job)


def _hard_stop(client: JobsClient, job: str) -> int:
    client.call(f"stop job {job}", lambda c: c.stop_job(job))
    status = _wait_terminal(client, job, 60.0)
    print(f"{job}: {status} (ray job stop; the stage resumes from its last periodic checkpoint)")
    return 0


def _wait_terminal(client: JobsClient, job: str, timeout_s: float) -> str:
    end = time.monotonic() + timeout_s
    status = client.client.get_job_status(job)
    while not status.is_terminal() and time.monotonic() < end:
        time.sleep(0.5)
        status = client.client.get_job_status(job)
    return status.value
