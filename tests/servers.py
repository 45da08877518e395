"""Real server processes for tests: an `mlflow server` (sqlite backend, proxied artifacts) started and stopped
by PID, never by name, so nothing the test did not start is touched."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """`mlflow server` on 127.0.0.1:port; artifacts are proxied (clients upload through the server, so nodes
    need no access to its disk). ``stop`` kills the process group it started; ``start`` again reuses the port
    and the store, like a server that comes back after an outage."""

    def __init__(self, directory: Path, port: int | None = None):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 120.0) -> "MlflowServer":
        cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
               "--backend-store-uri", f"sqlite:///{self.directory}/mlflow.db",
               "--artifacts-destination", str(self.directory / "artifacts"), "--workers", "1"]
        log = open(self.directory / "server.log", "ab")
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {(self.directory / 'server.log').read_text()[-2000:]}")
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"mlflow server on port {self.port} did not come up in {timeout_s:.0f} s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)  # its own session: the gunicorn/uvicorn workers too
            self.proc.wait(timeout=30)
        self.proc = None


def pids_mentioning(text: str) -> list[int]:
    """PIDs whose command line contains `text` (e.g. a temp dir only our processes use)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if text.encode() in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


def children_of(pid: int) -> list[int]:
    """Every descendant PID of `pid`."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            parents.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


class RayProcessCluster:
    """A real multi-node Ray cluster on 127.0.0.1: one `ray start --block` process per node, each with its own
    resources, all under one temp dir of their own (so they never meet another Ray instance of the machine).
    Nodes are stopped by their PIDs, never by `ray stop`."""

    def __init__(self, directory: Path, env: dict[str, str]):
        import tempfile

        self.temp_dir = tempfile.mkdtemp(prefix="slotmem-mn-", dir="/tmp")  # unix socket paths must stay short
        self.directory = Path(directory)
        # a loaded 2-core machine starts a raylet slowly: more than Ray's 30 s default to register
        self.env = {**env, "PATH": f"{Path(sys.executable).parent}:{env.get('PATH', '')}",
                    "RAY_raylet_start_wait_time_s": "180"}
        self.env.pop("RAY_ADDRESS", None)
        self.port = free_port()
        self.nodes: dict[str, subprocess.Popen] = {}

    @property
    def address(self) -> str:
        """The head's GCS address (Ray's own node IP of this machine: every node registers under it)."""
        from ray._private.services import get_node_ip_address

        return f"{get_node_ip_address()}:{self.port}"

    def _start(self, name: str, args: list[str]) -> None:
        log = open(self.directory / f"node-{name}.log", "ab")
        cmd = [str(Path(sys.executable).parent / "ray"), "start", "--block", "--disable-usage-stats", *args]
        self.nodes[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                            start_new_session=True)

    def start_head(self, *, num_cpus: float = 0) -> None:
        self._start("head", ["--head", "--port", str(self.port),
                             "--num-cpus", str(num_cpus), "--num-gpus", "0", "--include-dashboard", "false",
                             "--temp-dir", self.temp_dir])

    def add_node(self, name: str, *, num_cpus: float, resources: dict[str, float]) -> None:
        import json

        self._start(name, ["--address", self.address, "--num-cpus", str(num_cpus),
                           "--num-gpus", "0", "--resources", json.dumps(resources)])

    def wait_for_nodes(self, count: int, timeout_s: float = 180.0) -> None:
        """Until `count` nodes are alive (asked from a separate process: this one may hold another Ray)."""
        probe = ("import ray, sys; ray.init(address=sys.argv[1], logging_level='ERROR', log_to_driver=False); "
                 "print(sum(n['Alive'] for n in ray.nodes()))")
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            for name, proc in self.nodes.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"ray node {name} exited: "
                                       f"{(self.directory / f'node-{name}.log').read_text()[-2000:]}")
            out = subprocess.run([sys.executable, "-c", probe, self.address], env=self.env, capture_output=True,
                                 text=True, timeout=120)
            if out.returncode == 0 and out.stdout.strip().splitlines()[-1:] == [str(count)]:
                return
            time.sleep(1.0)
        raise TimeoutError(f"{count} ray nodes did not come up in {timeout_s:.0f} s")

    def kill_raylet(self, name: str) -> int:
        """SIGKILL the raylet of node `name` (the node is lost as on a machine failure); returns its PID."""
        for pid in children_of(self.nodes[name].pid):
            try:
                cmdline = (Path("/proc") / str(pid) / "cmdline").read_bytes()
            except OSError:
                continue
            if b"raylet/raylet" in cmdline:
                os.kill(pid, signal.SIGKILL)
                return pid
        raise RuntimeError(f"no raylet under node {name}")

    def stop(self) -> None:
        for proc in self.nodes.values():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        for pid in {*pids_mentioning(self.temp_dir), *[c for p in self.nodes.values() for c in children_of(p.pid)]}:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        for proc in self.nodes.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
        import shutil

        shutil.rmtree(self.temp_dir, ignore_errors=True)
