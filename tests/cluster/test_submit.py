"""`slotmem submit/status/logs`: runtime_env and entrypoint building, then real jobs on a real Ray head.

The head is a separate `ray start --head --block` process with its own temp dir and ports, so it
never meets the session `ray_cluster` (which may live in this pytest process): the CLI runs as a
subprocess too and talks to the head only through the Jobs HTTP API. Teardown stops exactly the
processes of that head (its process group, then anything still naming its temp dir), never
`ray stop`, which would kill every Ray instance of the user.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from cluster.submit import (
    WORKING_DIR_EXCLUDES, build_entrypoint, build_runtime_env, masked, ray_job_submit_command,
)
from cluster.submit import repo_root as submit_root
from slotmem.errors import InputError

BIN = Path(sys.executable).parent
SECRET = "s3cr3t-VALUE-never-printed"


# ----------------------------------------------------------------------------------------------
# pure helpers
# ----------------------------------------------------------------------------------------------


def test_runtime_env_excludes_and_forwards_only_the_right_vars(repo_root):
    environ = {"MLFLOW_TRACKING_URI": "http://mlflow:5000", "MLFLOW_TRACKING_PASSWORD": SECRET,
               "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_ACCESS_KEY_ID": "AKID", "AWS_ENDPOINT_URL": "http://minio:9000",
               "S3_BUCKET": "b", "AWS_PROFILE": "laptop-profile", "HOME": "/home/me", "GITHUB_TOKEN": SECRET}
    env = build_runtime_env(Path(repo_root), environ)
    assert env["working_dir"] == repo_root
    for pattern in (".git", "runs/", ".venv/", "mlruns/", "__pycache__/"):
        assert pattern in env["excludes"]
    assert env["env_vars"] == {k: environ[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_ENDPOINT_URL", "AWS_SECRET_ACCESS_KEY",
                                                       "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_URI", "S3_BUCKET")}
    shown = json.dumps(masked(env))
    assert SECRET not in shown and "AKID" not in shown and '"AWS_SECRET_ACCESS_KEY": "***"' in shown
    assert "env_vars" not in build_runtime_env(Path(repo_root), {"HOME": "/x"})


def test_equivalent_ray_command_expands_secrets_only_in_the_shell(repo_root):
    env = build_runtime_env(Path(repo_root), {"AWS_SECRET_ACCESS_KEY": SECRET, "MLFLOW_TRACKING_URI": "sqlite:///m.db"})
    cmd = ray_job_submit_command("http://head:8265", "slotmem-x", env, ["slotmem", "pipeline", "--config", "c.yaml"])
    assert SECRET not in cmd and "$AWS_SECRET_ACCESS_KEY" in cmd
    assert cmd.startswith("ray job submit ") and cmd.endswith(" -- slotmem pipeline --config c.yaml")
    # run the printed line through bash with `printf` in place of `ray`: the shell expands the values
    line = "printf '%s\\n'" + cmd[len("ray job submit"):]
    out = subprocess.run(["bash", "-c", line], env={"AWS_SECRET_ACCESS_KEY": SECRET, "MLFLOW_TRACKING_URI": "sqlite:///m.db",
                                                    "PATH": os.environ["PATH"]},
                         capture_output=True, text=True, check=True).stdout.splitlines()
    given = json.loads(out[out.index("--runtime-env-json") + 1])
    assert given["env_vars"] == {"AWS_SECRET_ACCESS_KEY": SECRET, "MLFLOW_TRACKING_URI": "sqlite:///m.db"}
    assert given["excludes"] == list(WORKING_DIR_EXCLUDES)
    assert out[out.index("--working-dir") + 1] == repo_root


def test_entrypoint_building(repo_root, tmp_path, monkeypatch):
    root = Path(repo_root)
    monkeypatch.chdir(root / "configs")  # config paths are resolved from the caller's cwd ...
    assert build_entrypoint(["--", "pipeline"], "tiny.yaml", ["trainer.lr=1e-4"], root) == [
        "slotmem", "pipeline", "--config", "configs/tiny.yaml", "--set", "trainer.lr=1e-4"]  # ... and sent relative
    assert build_entrypoint(["config", "show", "--config", str(root / "configs/tiny.yaml")], None, [], root) == [
        "slotmem", "config", "show", "--config", "configs/tiny.yaml"]
    assert build_entrypoint(["train", "--stage", "1", f"--config={root}/configs/tiny.yaml"], None, [], root)[-1] == (
        "--config=configs/tiny.yaml")
    with pytest.raises(InputError, match="nothing to submit"):
        build_entrypoint(["--"], None, [], root)
    with pytest.raises(InputError, match="cannot submit 'submit'"):
        build_entrypoint(["submit", "--address", "x"], None, [], root)
    with pytest.raises(InputError, match="give it once"):
        build_entrypoint(["pipeline", "--config", "tiny.yaml"], "tiny.yaml", [], root)
    outside = tmp_path / "mine.yaml"
    outside.write_text("{}\n")
    with pytest.raises(InputError, match="outside the uploaded working_dir"):
        build_entrypoint(["pipeline"], str(outside), [], root)
    with pytest.raises(InputError, match="does not exist"):
        build_entrypoint(["pipeline"], "missing.yaml", [], root)
    assert submit_root() == root  # the checkout that `slotmem submit` uploads


# ----------------------------------------------------------------------------------------------
# a real Ray head in a subprocess
# ----------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pids_mentioning(text: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if text.encode() in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


@pytest.fixture(scope="module")
def ray_head():
    # A short temp dir of its own: Ray's unix socket paths live under it and must stay < 108 chars.
    temp_dir = tempfile.mkdtemp(prefix="slotmem-head-", dir="/tmp")
    dashboard = _free_port()
    ports = {"--port": _free_port(), "--dashboard-port": dashboard, "--ray-client-server-port": _free_port(),
             "--dashboard-agent-listen-port": _free_port(), "--dashboard-agent-grpc-port": _free_port(),
             "--runtime-env-agent-port": _free_port(), "--metrics-export-port": _free_port(),
             "--node-manager-port": _free_port(), "--object-manager-port": _free_port()}
    env = {**os.environ, "PATH": f"{BIN}:{os.environ.get('PATH', '')}", "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    cmd = [str(BIN / "ray"), "start", "--head", "--block", "--num-cpus", "1", "--include-dashboard", "true",
           "--dashboard-host", "127.0.0.1", "--temp-dir", temp_dir, "--disable-usage-stats",
           *[str(x) for kv in ports.items() for x in kv]]
    log = open(Path(temp_dir) / "ray-start.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{address}/api/version", timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"ray head did not come up:\n{(Path(temp_dir) / 'ray-start.log').read_text()[-3000:]}")
                time.sleep(0.3)
        yield address
    finally:
        proc.send_signal(signal.SIGTERM)  # `ray start --block` stops its own processes on SIGTERM
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pass
        for sig_target in ([proc.pid] if proc.poll() is None else []):
            os.killpg(sig_target, signal.SIGKILL)
        time.sleep(1)
        for pid in _pids_mentioning(temp_dir):  # stragglers of this head only
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _slotmem(*args, env_extra=None, timeout=120) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env_extra or {}), "PATH": f"{BIN}:{os.environ.get('PATH', '')}",
           "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([str(BIN / "slotmem"), *args], cwd=submit_root(), env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_submit_follow_status_logs_on_a_real_head(ray_head):
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(ray_head)

    # 1. submit and follow: the job prints the resolved tiny config; secrets pass through unseen
    done = _slotmem("submit", "--address", ray_head, "--config", "configs/tiny.yaml", "--", "config", "show",
                    env_extra={"AWS_SECRET_ACCESS_KEY": SECRET, "MLFLOW_TRACKING_PASSWORD": SECRET})
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert SECRET not in out
    assert "AWS_SECRET_ACCESS_KEY=***" in out and "MLFLOW_TRACKING_PASSWORD=***" in out
    assert "experiment: slotmem-tiny" in done.stdout  # the config, dumped by the job on the cluster
    assert "equivalent: ray job submit" in done.stdout and "$AWS_SECRET_ACCESS_KEY" in done.stdout
    job_id = done.stdout.split("submitted job ", 1)[1].split()[0]
    info = client.get_job_info(job_id)
    assert info.status == JobStatus.SUCCEEDED
    assert info.entrypoint == "slotmem config show --config configs/tiny.yaml"
    assert info.runtime_env["env_vars"]["AWS_SECRET_ACCESS_KEY"] == SECRET  # passed through to the job

    # 2. a job that fails on the cluster makes `submit` exit non-zero
    failed = _slotmem("submit", "--address", ray_head, "--", "config", "show", "--config", "configs/tiny.yaml",
                      "--set", "model.dim=7")
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert "FAILED" in failed.stdout and "model.dim" in failed.stdout

    # 3. --no-wait returns at once; status and logs find the job afterwards
    quick = _slotmem("submit", "--no-wait", "--address", ray_head, "--config", "configs/tiny.yaml", "--",
                     "config", "show")
    assert quick.returncode == 0, quick.stdout + quick.stderr
    job_id = quick.stdout.split("submitted job ", 1)[1].split()[0]
    deadline = time.monotonic() + 60
    while not client.get_job_status(job_id).is_terminal() and time.monotonic() < deadline:
        time.sleep(0.5)
    status = _slotmem("status", job_id, "--address", ray_head)
    assert status.returncode == 0 and f"{job_id}: SUCCEEDED" in status.stdout
    logs = _slotmem("logs", job_id, "--address", ray_head)
    assert logs.returncode == 0 and "experiment: slotmem-tiny" in logs.stdout

    # 4. bad addresses and ids are one clear error, not a traceback
    missing = _slotmem("status", "raysubmit_doesnotexist", "--address", ray_head)
    assert missing.returncode == 2 and "raysubmit_doesnotexist" in missing.stderr and "Traceback" not in missing.stderr
    nowhere = _slotmem("logs", "x", "--address", f"http://127.0.0.1:{_free_port()}")
    assert nowhere.returncode == 2 and "cannot reach the Ray Jobs API" in nowhere.stderr
