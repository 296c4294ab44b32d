"""Start and stop a real ``bentoml serve`` process (used by the tests and the benchmarks)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

PROJECT_ROOT = Path(__file__).resolve().parents[1]


# Environment of a test server whose model stays put: no update runs by itself, and a loaded
# 2-core CI machine queues backbone batches instead of refusing them.
STILL_MODEL_ENV = {"INFANTINO_UPDATE_MIN_ITEMS": "100000", "INFANTINO_UPDATE_INTERVAL_S": "100000",
                   "INFANTINO_BATCH_MAX_LATENCY_MS": "60000"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A server started in its own process group (``proc``): stopped with its children, as a context manager."""

    proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 180) -> "ServerProcess":
        raise NotImplementedError

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class BentoServer(ServerProcess):
    """``bentoml serve service.api:InfantinO`` on a free port, with extra environment."""

    def __init__(self, env: dict[str, str] | None = None, port: int | None = None, log_path: str | Path | None = None,
                 target: str = "service.api:InfantinO"):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, **(env or {})}
        # Tests and benchmarks stream feedback from one address, far past the per-client limit of a
        # real deployment; those about the limit set it (tests/test_security.py).
        self.env.setdefault("INFANTINO_FEEDBACK_RATE_PER_MIN", "0")
        bin_dir = str(Path(sys.executable).parent)
        self.env["PATH"] = bin_dir + os.pathsep + self.env.get("PATH", "")
        self.log_path = Path(log_path) if log_path else None
        self.target = target
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 180) -> "BentoServer":
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bentoml", "serve", self.target, "--host", "127.0.0.1", "--port", str(self.port)],
            cwd=PROJECT_ROOT, env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
        self.wait_ready(timeout_s)
        return self

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"bentoml serve exited with {self.proc.returncode}; see {self.log_path}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"server not ready after {timeout_s}s; see {self.log_path}")
