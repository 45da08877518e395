"""`slotmem submit | status | logs`: run slotmem commands on a Ray cluster through the Jobs API.

``slotmem submit --address http://HEAD:8265 --config configs/wan2.1-1.3b.yaml -- pipeline`` uploads
the repository as the job's ``working_dir`` (without .git, runs/, .venv/, mlruns/, caches), forwards
the caller's MLflow and S3 settings as ``env_vars`` and runs ``slotmem pipeline --config
configs/wan2.1-1.3b.yaml`` on the head node. Ray puts the uploaded working_dir first on the job's
PYTHONPATH, so the cluster's installed ``slotmem`` (ray_cluster.yaml setup_commands) runs the
submitted code. Secrets are passed through but never printed: output shows variable names only,
and the equivalent ``ray job submit`` line refers to them as ``$NAME``.

The Jobs API is served by the Ray dashboard, which needs ``ray[default]`` on the head.
"""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import time
import uuid
from pathlib import Path
from typing import Any, Mapping

from slotmem.errors import InputError

# Patterns (gitignore syntax, relative to the working_dir) never uploaded with a job.
WORKING_DIR_EXCLUDES = (".git", ".venv/", "runs/", "mlruns/", "__pycache__/", "*.egg-info/", ".pytest_cache/",
                        "*.mp4")
# Environment forwarded to the job when set in the caller's environment.
FORWARDED_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
                 "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_INSECURE_TLS", "MLFLOW_S3_ENDPOINT_URL",
                 "MLFLOW_S3_IGNORE_TLS")
FORWARDED_ENV_PREFIXES = ("AWS_", "S3_")
# AWS variables that name files or profiles on the caller's machine: meaningless on the cluster,
# and forwarding them would break the nodes' own credential chain.
NOT_FORWARDED = frozenset({"AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE",
                           "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CA_BUNDLE"})
JOB_COMMANDS = ("pipeline", "rollout", "train", "generate", "config", "runs")
MASK = "***"


def repo_root() -> Path:
    """The project directory uploaded as working_dir (the one holding pyproject.toml and slotmem/)."""
    root = Path(__file__).resolve().parents[1]
    if not ((root / "pyproject.toml").is_file() and (root / "slotmem").is_dir()):
        raise InputError(f"slotmem submit must run from a source checkout (pyproject.toml + slotmem/); "
                         f"{root} is not one")
    return root


def forwarded_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The caller's MLflow / AWS / S3 variables that the job needs."""
    return {k: v for k, v in sorted(environ.items())
            if (k in FORWARDED_ENV or k.startswith(FORWARDED_ENV_PREFIXES)) and k not in NOT_FORWARDED}


def build_runtime_env(root: Path, environ: Mapping[str, str]) -> dict[str, Any]:
    """runtime_env of a submitted job: the repo as working_dir + forwarded env vars."""
    env: dict[str, Any] = {"working_dir": str(root), "excludes": list(WORKING_DIR_EXCLUDES)}
    env_vars = forwarded_env(environ)
    if env_vars:
        env["env_vars"] = env_vars
    return env


def masked(runtime_env: dict[str, Any]) -> dict[str, Any]:
    """A copy safe to print: every env var value replaced by ***."""
    out = dict(runtime_env)
    if "env_vars" in out:
        out["env_vars"] = {k: MASK for k in out["env_vars"]}
    return out


def build_entrypoint(job: list[str], config: str | None, overrides: list[str], root: Path) -> list[str]:
    """`-- SUBCOMMAND ARGS` of `slotmem submit` -> the argv run on the cluster.

    Config paths (submit's own --config, or one inside the job arguments) are rewritten relative
    to the working_dir, which is where the job starts.
    """
    tokens = list(job)
    if tokens[:1] == ["--"]:
        tokens = tokens[1:]
    if not tokens:
        raise InputError("nothing to submit: add `-- SUBCOMMAND [ARGS]`, e.g. `slotmem submit --address "
                         "http://HEAD:8265 --config configs/tiny.yaml -- pipeline`")
    if tokens[0] not in JOB_COMMANDS:
        raise InputError(f"cannot submit {tokens[0]!r}: the job must be one of the slotmem subcommands "
                         f"{list(JOB_COMMANDS)}")
    has_config = False
    for i, tok in enumerate(tokens):
        if tok in ("--config", "-c") and i + 1 < len(tokens):
            tokens[i + 1], has_config = _relative_config(tokens[i + 1], root), True
        elif tok.startswith("--config="):
            tokens[i], has_config = "--config=" + _relative_config(tok.split("=", 1)[1], root), True
    if config is not None:
        if has_config:
            raise InputError("--config given both to `slotmem submit` and inside the job arguments; give it once")
        tokens += ["--config", _relative_config(config, root)]
    for text in overrides:
        tokens += ["--set", text]
    return ["slotmem", *tokens]


def _relative_config(path: str, root: Path) -> str:
    p = Path(path).expanduser().resolve()
    if not p.is_file():
        raise InputError(f"config file {path!r} does not exist")
    try:
        return p.relative_to(root).as_posix()
    except ValueError:
        raise InputError(f"config file {path!r} is outside the uploaded working_dir {root}; copy it under "
                         f"{root} (e.g. configs/) so the job can read it") from None


def ray_job_submit_command(address: str, submission_id: str, runtime_env: dict[str, Any],
                           entrypoint: list[str]) -> str:
    """The equivalent `ray job submit` line; env values appear as $NAME for the shell to expand."""
    env = {k: v for k, v in runtime_env.items() if k != "working_dir"}
    if "env_vars" in env:
        env["env_vars"] = {k: f"${k}" for k in env["env_vars"]}
    env_json = json.dumps(env, separators=(",", ":")).replace('"', '\\"')
    return (f"ray job submit --address {shlex.quote(address)} --submission-id {shlex.quote(submission_id)} "
            f"--working-dir {shlex.quote(runtime_env['working_dir'])} --runtime-env-json \"{env_json}\" -- "
            f"{shlex.join(entrypoint)}")


# ----------------------------------------------------------------------------------------------
# Jobs API client
# ----------------------------------------------------------------------------------------------


def _client(address: str):
    from ray.job_submission import JobSubmissionClient

    if not address.startswith(("http://", "https://")):
        raise InputError(f"--address {address!r}: expected the dashboard URL, e.g. http://HEAD:8265")
    try:
        return JobSubmissionClient(address)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise InputError(f"cannot reach the Ray Jobs API at {address} (is the head's dashboard up, with "
                         f"ray[default] installed?): {e}") from None


def _call(what: str, fn):
    try:
        return fn()
    except RuntimeError as e:  # the SDK raises RuntimeError for HTTP errors, e.g. 404 unknown job
        raise InputError(f"{what}: {e}") from None


def main_submit(args, cfg) -> int:
    """Submit `args.job` as a Ray job; follow its logs unless --no-wait. Exit code mirrors the job."""
    root = repo_root()
    entrypoint = build_entrypoint(args.job, args.config, args.overrides, root)
    runtime_env = build_runtime_env(root, os.environ)
    submission_id = f"slotmem-{entrypoint[1]}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    client = _client(args.address)
    job_id = _call("submit", lambda: client.submit_job(entrypoint=shlex.join(entrypoint), runtime_env=runtime_env,
                                                       submission_id=submission_id))
    names = ", ".join(f"{k}={MASK}" for k in runtime_env.get("env_vars", {})) or "none"
    print(f"submitted job {job_id} to {args.address}")
    print(f"  entrypoint: {shlex.join(entrypoint)}")
    print(f"  working_dir: {root} (excludes {', '.join(WORKING_DIR_EXCLUDES)})")
    print(f"  env vars passed (values masked): {names}")
    print(f"  equivalent: {ray_job_submit_command(args.address, job_id, runtime_env, entrypoint)}")
    if args.no_wait:
        print(f"follow it with: slotmem logs {job_id} --address {args.address}")
        return 0
    return _follow(client, job_id, args.address)


def _follow(client, job_id: str, address: str) -> int:
    from ray.job_submission import JobStatus

    async def tail():
        async for lines in client.tail_job_logs(job_id):
            print(lines, end="", flush=True)

    try:
        asyncio.run(tail())
        status = client.get_job_status(job_id)
        while not status.is_terminal():  # the log stream can close a moment before the status flips
            time.sleep(0.5)
            status = client.get_job_status(job_id)
    except KeyboardInterrupt:
        print(f"\nstopped following; job {job_id} keeps running. `slotmem status {job_id} --address {address}`")
        return 130
    message = (client.get_job_info(job_id).message or "").strip()
    reason = ""
    if status != JobStatus.SUCCEEDED and message:
        # the message goes on with the log tail, which was just printed
        reason = ": " + message.splitlines()[0].split(", last available logs")[0]
    print(f"job {job_id} {status.value}{reason}")
    return 0 if status == JobStatus.SUCCEEDED else 1


def main_status(args, cfg) -> int:
    client = _client(args.address)
    info = _call(f"job {args.job_id}", lambda: client.get_job_info(args.job_id))
    print(f"{args.job_id}: {info.status.value}")
    if info.message:
        print(f"  {info.message}")
    print(f"  entrypoint: {info.entrypoint}")
    return 0


def main_logs(args, cfg) -> int:
    client = _client(args.address)
    print(_call(f"job {args.job_id}", lambda: client.get_job_logs(args.job_id)), end="")
    return 0
