"""`slotmem submit`: run a slotmem command on a Ray cluster through the Jobs API.

``slotmem submit --address http://HEAD:8265 --config configs/wan2.1-1.3b.yaml -- pipeline`` uploads
the repository as the job's ``working_dir`` (without .git, runs/, .venv/, mlruns/, caches) and runs
``slotmem pipeline --config configs/wan2.1-1.3b.yaml`` on the head node. Ray puts the uploaded working_dir first
on the job's PYTHONPATH, so the cluster's installed ``slotmem`` (the image, or ray_cluster.yaml's setup commands)
runs the submitted code.

No secret leaves the caller's machine: a runtime_env is visible to anyone with dashboard access and is stored in
the GCS, and the caller's STS tokens would expire mid-run anyway. The cluster's nodes find their own credentials
(instance profile, IRSA, mounted secrets: the AWS and MLflow default chains). What is forwarded is
configuration, as ``--set`` overrides on the entrypoint: the caller's ``$MLFLOW_TRACKING_URI`` (refused when it
embeds credentials) and ``$AWS_ENDPOINT_URL`` unless the config or --set already sets them, and the git commit of
the checkout (``SLOTMEM_GIT_COMMIT``, the one env var, since the uploaded working_dir has no .git). Secret-looking
variables in the caller's environment are named in one line as not forwarded.

The Jobs API is served by the Ray dashboard, which needs ``ray[default]`` on the head. With Ray's token
authentication on, export the head's token first (``RAY_AUTH_TOKEN``, see cluster/runtime.py).
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import time
import uuid
from pathlib import Path
from typing import Any, Mapping

from cluster.mlflow_names import GIT_COMMIT_ENV, git_commit
from slotmem.errors import InputError

# Patterns (gitignore syntax, relative to the working_dir) never uploaded with a job.
WORKING_DIR_EXCLUDES = (".git", ".venv/", "runs/", "mlruns/", "__pycache__/", "*.egg-info/", ".pytest_cache/",
                        "*.mp4")
# Caller settings forwarded as config overrides when the config does not set the field: (env var, field).
FORWARDED_SETTINGS = (("MLFLOW_TRACKING_URI", "tracking.tracking_uri"), ("AWS_ENDPOINT_URL", "storage.s3_endpoint"),
                      ("AWS_ENDPOINT_URL_S3", "storage.s3_endpoint"))
# Caller variables that are credentials: never forwarded, named in the "not forwarded" line.
SECRET_ENV_PREFIXES = ("AWS_", "MLFLOW_TRACKING_", "S3_", "RAY_AUTH_TOKEN")
SECRET_WORDS = ("SECRET", "TOKEN", "PASSWORD", "KEY", "SESSION", "CREDENTIAL")
JOB_COMMANDS = ("pipeline", "rollout", "train", "generate", "config", "runs")


def repo_root() -> Path:
    """The project directory uploaded as working_dir (the one holding pyproject.toml and slotmem/)."""
    root = Path(__file__).resolve().parents[1]
    if not ((root / "pyproject.toml").is_file() and (root / "slotmem").is_dir()):
        raise InputError(f"slotmem submit must run from a source checkout (pyproject.toml + slotmem/); "
                         f"{root} is not one")
    return root


def forwarded_settings(environ: Mapping[str, str], cfg) -> list[str]:
    """`--set` overrides for the caller's tracking URI and S3 endpoint, where the config leaves them empty."""
    from cluster.mlflow_names import mask_uri

    out, done = [], set()
    for var, field in FORWARDED_SETTINGS:
        value = environ.get(var, "")
        section, name = field.split(".")
        if not value or field in done or (cfg is not None and getattr(getattr(cfg, section), name)):
            continue
        if var == "MLFLOW_TRACKING_URI" and mask_uri(value) != value:
            raise InputError(f"$MLFLOW_TRACKING_URI {mask_uri(value)} carries credentials, which `slotmem submit` "
                             "never sends to a cluster: give the nodes MLFLOW_TRACKING_USERNAME/PASSWORD (or a token) "
                             "as mounted secrets and use a URI without them")
        out.append(f"{field}={value}")
        done.add(field)
    return out


def withheld_secrets(environ: Mapping[str, str]) -> list[str]:
    """Names of the caller's credential variables (they stay on this machine)."""
    return sorted(k for k in environ if k.startswith(SECRET_ENV_PREFIXES) and any(w in k for w in SECRET_WORDS)
                  and not k.endswith(("_FILE", "_PATH")))


def build_runtime_env(root: Path, commit: str | None) -> dict[str, Any]:
    """runtime_env of a submitted job: the repo as working_dir, and the commit it was submitted from."""
    env: dict[str, Any] = {"working_dir": str(root), "excludes": list(WORKING_DIR_EXCLUDES)}
    if commit:
        env["env_vars"] = {GIT_COMMIT_ENV: commit}
    return env


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


def check_storage_root(entrypoint: list[str], root: Path) -> None:
    """A submitted job runs in a temporary copy of the working_dir: a relative storage root would put its shards,
    checkpoints and sample there (and a resubmission would not find them). One line instead."""
    from slotmem.config import load_config

    if entrypoint[1] not in ("pipeline", "rollout", "train"):
        return
    config, sets = None, []
    for i, tok in enumerate(entrypoint):
        if tok in ("--config", "-c") and i + 1 < len(entrypoint):
            config = str(root / entrypoint[i + 1])
        elif tok.startswith("--config="):
            config = str(root / tok.split("=", 1)[1])
        elif tok == "--set" and i + 1 < len(entrypoint):
            sets.append(entrypoint[i + 1])
    cfg = load_config(config, sets)
    value = cfg.storage.root
    if "://" not in value and not Path(value).is_absolute():
        raise InputError(f"storage.root {value!r} is relative: a submitted job runs in a temporary copy of the "
                         "working_dir, so its outputs would land there and a resubmission would not find them; "
                         "use s3://bucket/prefix (or an absolute path every node shares)")


def ray_job_submit_command(address: str, submission_id: str, runtime_env: dict[str, Any],
                           entrypoint: list[str]) -> str:
    """The equivalent `ray job submit` line (nothing in it is secret)."""
    env = {k: v for k, v in runtime_env.items() if k != "working_dir"}
    return (f"ray job submit --address {shlex.quote(address)} --submission-id {shlex.quote(submission_id)} "
            f"--working-dir {shlex.quote(runtime_env['working_dir'])} --runtime-env-json "
            f"{shlex.quote(json.dumps(env, separators=(',', ':')))} -- {shlex.join(entrypoint)}")


class _NotDefaultExcludeNotice(logging.Filter):
    """Ray 2.60 warns per directory that it now skips .git and .venv when packaging a working_dir: we exclude
    them ourselves (WORKING_DIR_EXCLUDES, printed with the submission), so the notice is noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "is now ignored by default when packaging" not in record.getMessage()


def _quiet_exclude_notice() -> None:
    """Install the filter once per process (a process that submits many jobs keeps one filter)."""
    logger = logging.getLogger("ray._private.runtime_env.working_dir")
    if not any(isinstance(f, _NotDefaultExcludeNotice) for f in logger.filters):
        logger.addFilter(_NotDefaultExcludeNotice())


def main_submit(args, cfg) -> int:
    """Submit `args.job` as a Ray job; follow its logs unless --no-wait. Exit code mirrors the job."""
    from cluster.jobs import client_for, follow

    root = repo_root()
    overrides = list(args.overrides)
    given = {o.split("=", 1)[0] for o in overrides}
    overrides += [o for o in forwarded_settings(os.environ, cfg) if o.split("=", 1)[0] not in given]
    entrypoint = build_entrypoint(args.job, args.config, overrides, root)
    check_storage_root(entrypoint, root)
    runtime_env = build_runtime_env(root, git_commit())
    submission_id = args.submission_id or (
        f"slotmem-{entrypoint[1]}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}")
    client = client_for(args.address)
    _quiet_exclude_notice()
    job_id = client.call("submit", lambda c: c.submit_job(entrypoint=shlex.join(entrypoint), runtime_env=runtime_env,
                                                          submission_id=submission_id))
    print(f"submitted job {job_id} to {args.address}")
    print(f"  entrypoint: {shlex.join(entrypoint)}")
    print(f"  working_dir: {root} (excludes {', '.join(WORKING_DIR_EXCLUDES)})")
    withheld = withheld_secrets(os.environ)
    if withheld:
        print(f"  not forwarded (the cluster uses its own credentials): {', '.join(withheld)}")
    print(f"  equivalent: {ray_job_submit_command(args.address, job_id, runtime_env, entrypoint)}")
    if args.no_wait:
        print(f"watch it:  slotmem status {job_id} --address {args.address}   "
              f"(logs: slotmem logs {job_id} --address {args.address} --follow)")
        print(f"stop it:   slotmem stop {job_id} --address {args.address}")
        return 0
    return follow(client, job_id)
