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
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from cluster.jobs import progress_from_log
from cluster.submit import (
    WORKING_DIR_EXCLUDES, build_entrypoint, build_runtime_env, check_storage_root, forwarded_settings,
    ray_job_submit_command, withheld_secrets,
)
from cluster.submit import repo_root as submit_root
from slotmem.config import load_config
from slotmem.errors import InputError
from tests.servers import free_port, pids_mentioning

BIN = Path(sys.executable).parent
SECRET = "s3cr3t-VALUE-never-printed"
TOKEN = "0123456789abcdef" * 4  # the test head's Ray auth token


# ----------------------------------------------------------------------------------------------
# pure helpers
# ----------------------------------------------------------------------------------------------


def test_runtime_env_carries_the_commit_and_no_secret(repo_root):
    env = build_runtime_env(Path(repo_root), "a" * 40)
    assert env["working_dir"] == repo_root
    for pattern in (".git", "runs/", ".venv/", "mlruns/", "__pycache__/"):
        assert pattern in env["excludes"]
    assert env["env_vars"] == {"SLOTMEM_GIT_COMMIT": "a" * 40}
    assert "env_vars" not in build_runtime_env(Path(repo_root), None)


def test_settings_are_forwarded_as_overrides_and_secrets_are_withheld(repo_root):
    environ = {"MLFLOW_TRACKING_URI": "http://mlflow:5000", "MLFLOW_TRACKING_PASSWORD": SECRET,
               "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_ACCESS_KEY_ID": "AKID", "AWS_SESSION_TOKEN": SECRET,
               "AWS_ENDPOINT_URL": "http://minio:9000", "AWS_REGION": "us-east-1", "HOME": "/home/me",
               "RAY_AUTH_TOKEN": SECRET, "AWS_SHARED_CREDENTIALS_FILE": "/var/run/secrets/aws"}
    cfg = load_config(f"{repo_root}/configs/tiny.yaml", [])
    assert forwarded_settings(environ, cfg) == ["tracking.tracking_uri=http://mlflow:5000",
                                                "storage.s3_endpoint=http://minio:9000"]
    pinned = load_config(f"{repo_root}/configs/tiny.yaml", ["tracking.tracking_uri=http://other:5000"])
    assert forwarded_settings(environ, pinned) == ["storage.s3_endpoint=http://minio:9000"]  # the config wins
    assert withheld_secrets(environ) == ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                                         "MLFLOW_TRACKING_PASSWORD", "RAY_AUTH_TOKEN"]
    with pytest.raises(InputError, match="carries credentials") as e:
        forwarded_settings({"MLFLOW_TRACKING_URI": f"http://bob:{SECRET}@mlflow:5000"}, cfg)
    assert SECRET not in str(e.value)


def test_the_working_dir_notice_filter_is_installed_once_and_drops_only_that_notice():
    import logging

    from cluster.submit import _NotDefaultExcludeNotice, _quiet_exclude_notice

    logger = logging.getLogger("ray._private.runtime_env.working_dir")
    for _ in range(3):  # one process submitting three jobs
        _quiet_exclude_notice()
    filters = [f for f in logger.filters if isinstance(f, _NotDefaultExcludeNotice)]
    assert len(filters) == 1

    def record(msg):
        return logging.LogRecord(logger.name, logging.WARNING, __file__, 1, msg, None, None)

    assert not filters[0].filter(record("Directory .venv is now ignored by default when packaging the working dir"))
    assert filters[0].filter(record("Uploading package gcs://_ray_pkg_x.zip"))


def test_equivalent_ray_command_parses_back_to_the_same_job(repo_root):
    env = build_runtime_env(Path(repo_root), "b" * 40)
    cmd = ray_job_submit_command("http://head:8265", "slotmem-x", env, ["slotmem", "pipeline", "--config", "c.yaml"])
    assert cmd.startswith("ray job submit ") and cmd.endswith(" -- slotmem pipeline --config c.yaml")
    line = "printf '%s\\n'" + cmd[len("ray job submit"):]  # bash with `printf` in place of `ray`
    out = subprocess.run(["bash", "-c", line], env={"PATH": os.environ["PATH"]}, capture_output=True, text=True,
                         check=True).stdout.splitlines()
    given = json.loads(out[out.index("--runtime-env-json") + 1])
    assert given == {"excludes": list(WORKING_DIR_EXCLUDES), "env_vars": {"SLOTMEM_GIT_COMMIT": "b" * 40}}
    assert out[out.index("--working-dir") + 1] == repo_root


def test_a_relative_storage_root_is_refused_for_jobs_that_write(repo_root):
    root = Path(repo_root)
    job = ["slotmem", "pipeline", "--config", "configs/tiny-random.yaml"]
    with pytest.raises(InputError, match="storage.root 'runs' is relative: a submitted job runs in a temporary copy"):
        check_storage_root(job, root)
    check_storage_root([*job, "--set", "storage.root=s3://bucket/prefix"], root)
    check_storage_root([*job, "--set", "storage.root=/shared/runs"], root)
    check_storage_root(["slotmem", "config", "show", "--config", "configs/tiny-random.yaml"], root)  # writes nothing


def test_status_reads_the_phase_iteration_losses_and_lag_from_the_log():
    log = "\n".join([
        "[pipeline] resuming experiment 'slotmem-tiny': done so far ['stage_0']",
        "[rollout] fleet of 2 actor(s) up in 12.0 s (a0@h:cpu, a1@h:cpu)",
        "[train stage1] starting at step 0/40, 1 workers, ZeRO-2, device cpu",
        "[rollout] 6 rounds, 24 trajectories so far (round 5: policy v[3], 2 live actors), actors idle 10%",
        "[train stage1] step 20/40 critic=0.5123 dmd=0.01234 lag p50/p95=2/5 0.41 steps/s",
    ])
    p = progress_from_log(log)
    assert (p.phase, p.stage, p.step, p.total) == ("stage1", "stage1", 20, 40)
    assert p.values == {"critic": "0.5123", "dmd": "0.01234", "lag_p50/p95": "2/5"}
    assert (p.rollout_rounds, p.rollout_trajectories) == (6, 24)
    stopped = progress_from_log(log + "\n[pipeline] stopped on request: stage 1 stopped at iteration 21/40")
    assert stopped.phase == "stopped" and stopped.step == 20


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


@pytest.fixture(scope="module")
def ray_head():
    # A short temp dir of its own: Ray's unix socket paths live under it and must stay < 108 chars.
    temp_dir = tempfile.mkdtemp(prefix="slotmem-head-", dir="/tmp")
    dashboard = free_port()
    ports = {"--port": free_port(), "--dashboard-port": dashboard, "--ray-client-server-port": free_port(),
             "--dashboard-agent-listen-port": free_port(), "--dashboard-agent-grpc-port": free_port(),
             "--runtime-env-agent-port": free_port(), "--metrics-export-port": free_port(),
             "--node-manager-port": free_port(), "--object-manager-port": free_port()}
    env = {**os.environ, "PATH": f"{BIN}:{os.environ.get('PATH', '')}", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": TOKEN}  # Ray's token auth on, as a real head should run
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
                request = urllib.request.Request(f"{address}/api/version",
                                                 headers={"Authorization": f"Bearer {TOKEN}"})
                urllib.request.urlopen(request, timeout=2)
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
        for pid in pids_mentioning(temp_dir):  # stragglers of this head only
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _slotmem(*args, env_extra=None, timeout=120, token=TOKEN) -> subprocess.CompletedProcess:
    """The CLI as a user runs it: only the token exported (slotmem turns token auth on for it)."""
    env = {**os.environ, **(env_extra or {}), "PATH": f"{BIN}:{os.environ.get('PATH', '')}",
           "HOME": tempfile.mkdtemp(prefix="slotmem-home-")}  # no ~/.ray/auth_token to fall back on
    for k in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN"):
        env.pop(k, None)
    if token:
        env["RAY_AUTH_TOKEN"] = token
    return subprocess.run([str(BIN / "slotmem"), *args], cwd=submit_root(), env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_submit_follow_status_logs_on_a_real_head(ray_head):
    from ray.job_submission import JobStatus, JobSubmissionClient

    # this process's Ray has token auth off (conftest): the test's own client sends the header itself
    client = JobSubmissionClient(ray_head, headers={"Authorization": f"Bearer {TOKEN}"})

    # 1. submit and follow: the job prints the resolved tiny config; no secret is sent, the tracking URI is
    done = _slotmem("submit", "--address", ray_head, "--config", "configs/tiny.yaml", "--", "config", "show",
                    env_extra={"AWS_SECRET_ACCESS_KEY": SECRET, "MLFLOW_TRACKING_PASSWORD": SECRET,
                               "MLFLOW_TRACKING_URI": "http://127.0.0.1:5999"})
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert SECRET not in out
    withheld = next(line for line in out.splitlines() if "not forwarded (the cluster uses its own credentials)" in line)
    assert "AWS_SECRET_ACCESS_KEY" in withheld and "MLFLOW_TRACKING_PASSWORD" in withheld
    assert "experiment: slotmem-tiny" in done.stdout  # the config, dumped by the job on the cluster
    dumped = done.stdout.split("  equivalent: ", 1)[1].split("\n", 1)[1]  # what the job printed
    assert "http://127.0.0.1:5999" in dumped  # forwarded as an override: the job's config has it
    job_id = done.stdout.split("submitted job ", 1)[1].split()[0]
    info = client.get_job_info(job_id)
    assert info.status == JobStatus.SUCCEEDED
    assert info.entrypoint == ("slotmem config show --config configs/tiny.yaml --set "
                               "tracking.tracking_uri=http://127.0.0.1:5999")
    assert SECRET not in json.dumps(info.runtime_env) and set(info.runtime_env.get("env_vars", {})) <= {
        "SLOTMEM_GIT_COMMIT"}

    # 2. a job that fails on the cluster makes `submit` exit non-zero
    failed = _slotmem("submit", "--address", ray_head, "--", "config", "show", "--config", "configs/tiny.yaml",
                      "--set", "model.dim=7")
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert "FAILED" in failed.stdout and "model.dim" in failed.stdout

    # 3. --no-wait returns at once; status, logs and logs --follow find the job afterwards
    quick = _slotmem("submit", "--no-wait", "--address", ray_head, "--config", "configs/tiny.yaml", "--",
                     "config", "show")
    assert quick.returncode == 0, quick.stdout + quick.stderr
    job_id = quick.stdout.split("submitted job ", 1)[1].split()[0]
    assert f"slotmem stop {job_id}" in quick.stdout
    followed = _slotmem("logs", job_id, "--address", ray_head, "--follow")
    assert followed.returncode == 0 and "experiment: slotmem-tiny" in followed.stdout
    assert f"job {job_id} SUCCEEDED" in followed.stdout
    status = _slotmem("status", job_id, "--address", ray_head)
    assert status.returncode == 0 and f"{job_id}: SUCCEEDED" in status.stdout
    logs = _slotmem("logs", job_id, "--address", ray_head)
    assert logs.returncode == 0 and "experiment: slotmem-tiny" in logs.stdout
    ended = _slotmem("stop", job_id, "--address", ray_head)
    assert ended.returncode == 0 and "already ended: SUCCEEDED" in ended.stdout

    # 4. a missing or wrong token, bad addresses and ids: one clear line each, not a traceback
    for token, why in ((None, "needs a token"), ("f" * 64, "refused the token")):
        refused = _slotmem("status", job_id, "--address", ray_head, token=token)
        assert refused.returncode == 2 and why in refused.stderr and "ray get-auth-token" in refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    missing = _slotmem("status", "raysubmit_doesnotexist", "--address", ray_head)
    assert missing.returncode == 2 and "raysubmit_doesnotexist" in missing.stderr and "Traceback" not in missing.stderr
    nowhere = _slotmem("logs", "x", "--address", f"http://127.0.0.1:{free_port()}")
    assert nowhere.returncode == 2 and "cannot reach the Ray Jobs API" in nowhere.stderr
