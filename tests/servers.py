"""Real servers for tests, each in its own process group on free loopback ports: `mlflow server` and a
Ray head (`ray start --head --block`). Other Ray instances may run on the same machine, so every port
is chosen free and nothing is stopped with `ray stop`."""

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

import pytest

# `mlflow server` (without its job runner) answered in 8-80 s here, depending on what else used the CPUs
SERVER_START_TIMEOUT_S = float(os.environ.get("KDRAY_TEST_MLFLOW_START_TIMEOUT", "300"))
BIN = Path(sys.executable).parent


def subprocess_env() -> dict[str, str]:
    """The environment of child processes: offline hub, no Ray auth token, this interpreter first on
    PATH (a Ray job's `python` resolves through the head's PATH)."""
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "RAY_AUTH_MODE": "disabled",
        "PYTHONUNBUFFERED": "1",
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class MlflowServer:
    """`mlflow server` on a fixed port and store; its own process group, since workers outlive the parent."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        mlflow_cli = BIN / "mlflow"
        cmd = [str(mlflow_cli), "server", "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}"]
        cmd += ["--default-artifact-root", str(self.root / "artifacts"), "--host", "127.0.0.1"]
        cmd += ["--port", str(self.port), "--workers", "1"]  # one uvicorn worker starts fastest
        log = open(self.root / "server.log", "ab")  # noqa: SIM115 - handed to the child process
        # no GenAI job runner: one process less to start, and nothing here submits jobs
        env = {
            **os.environ,
            "MLFLOW_DISABLE_TELEMETRY": "true",
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        }
        start = time.monotonic()
        self.proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env
        )
        log.close()
        while time.monotonic() - start < SERVER_START_TIMEOUT_S:
            if self.proc.poll() is not None:
                pytest.fail(f"mlflow server exited with {self.proc.returncode}: {self._log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        self.stop()
        pytest.fail(f"mlflow server not answering after {SERVER_START_TIMEOUT_S:.0f}s: {self._log_tail()}")

    def stop(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=15)
        with contextlib.suppress(ProcessLookupError):  # whatever of the group is still there
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        self.proc = None

    def _log_tail(self) -> str:
        return (self.root / "server.log").read_text(errors="replace")[-2000:]


class RayHead:
    """`ray start --head --block` in its own process group, every port chosen free (other Ray instances
    may run on the machine), stopped with the whole group."""

    def __init__(self, temp_dir: Path) -> None:
        self.dashboard = free_port()
        ports = {
            "port": free_port(), "dashboard-port": self.dashboard, "dashboard-agent-listen-port": free_port(),
            "dashboard-agent-grpc-port": free_port(), "metrics-export-port": free_port(),
            "runtime-env-agent-port": free_port(), "ray-client-server-port": free_port(),
        }  # fmt: skip
        cmd = [str(BIN / "ray"), "start", "--head", "--block", "--num-cpus=2",
               "--dashboard-host=127.0.0.1", "--include-dashboard=true", "--disable-usage-stats",
               f"--temp-dir={temp_dir}", *(f"--{k}={v}" for k, v in ports.items())]  # fmt: skip
        self.proc = subprocess.Popen(cmd, env=subprocess_env(), start_new_session=True,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.dashboard}"

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=20)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)


def submit(
    head: RayHead, working_dir: Path, entrypoint: list[str], timeout: float
) -> subprocess.CompletedProcess:
    """`ray job submit`, retried while the head's job agent is still starting."""
    cmd = [str(BIN / "ray"), "job", "submit", "--address", head.address,
           "--working-dir", str(working_dir), "--", *entrypoint]  # fmt: skip
    deadline = time.time() + 90
    while True:
        proc = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=timeout)
        starting = any(m in proc.stdout + proc.stderr for m in ("No available agent", "Failed to connect"))
        if not starting or time.time() > deadline:
            return proc
        time.sleep(2)


def load_workflow(name: str):
    """A script of `workflows/` as a module (that directory is not a package)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "workflows" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"workflow_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
