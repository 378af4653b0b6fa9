"""Real service (and Redis) processes on free loopback ports: for tests, demos and benchmarks.

    with ServerProcess("artifacts/default") as server:
        httpx.post(f"{server.url}/v1/detect", ...)

It runs `ovd serve` (uvicorn) as a subprocess, waits until /readyz answers 200, and on exit
stops it the way an orchestrator does: SIGTERM (in-flight requests finish), then SIGKILL
after a grace period.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def redis_process():
    """A throwaway redis-server on a free loopback port, no persistence; yields (url, Popen).

    Raises:
        FileNotFoundError: redis-server is not installed.
        RuntimeError: it did not answer PING within 5 s.
    """
    import redis

    exe = shutil.which("redis-server")
    if exe is None:
        raise FileNotFoundError("redis-server is not installed (scripts/install.sh installs it)")
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    with tempfile.TemporaryDirectory(prefix="ovd-redis-") as workdir:
        proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                 "--appendonly", "no", "--protected-mode", "yes", "--dir", workdir],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis.from_url(url, socket_timeout=0.5)
        try:
            for _ in range(100):
                with contextlib.suppress(redis.ConnectionError):
                    if client.ping():
                        break
                time.sleep(0.05)
            else:
                raise RuntimeError(f"redis-server on port {port} did not answer PING")
            yield url, proc
        finally:
            client.close()
            proc.terminate()
            proc.wait(10)


class ServerProcess:
    """`ovd serve` in a subprocess.

    Args:
        model_dir: export folder to serve.
        port: TCP port on 127.0.0.1 (default: a free one).
        env: extra environment variables (OVD_* settings), on top of this process's environment.
        ready_timeout_s: how long start() waits for /readyz.
        stop_timeout_s: how long stop() waits after SIGTERM before SIGKILL.

    Attributes:
        url: "http://127.0.0.1:<port>".
        log_path: file receiving the server's stdout and stderr.
    """

    def __init__(self, model_dir: str | Path, *, port: int | None = None, env: dict[str, str] | None = None,
                 ready_timeout_s: float = 120.0, stop_timeout_s: float = 30.0):
        self.model_dir = Path(model_dir)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, **(env or {})}
        self.ready_timeout_s = ready_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.process: subprocess.Popen | None = None
        self.log_path = Path(tempfile.mkstemp(prefix="ovd-serve-", suffix=".log")[1])

    def log(self) -> str:
        """The server's output so far."""
        return self.log_path.read_text(errors="replace")

    def start(self) -> ServerProcess:
        """Start the process and wait for /readyz == 200.

        Raises:
            RuntimeError: the process exited or was not ready in time (with its log).
        """
        cmd = [sys.executable, "-m", "ovd.training.cli", "serve", "--host", "127.0.0.1",
               "--port", str(self.port), "--model-dir", str(self.model_dir)]
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                            cwd=Path(__file__).resolve().parents[1])
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ovd serve exited with {self.process.returncode}:\n{self.log()[-4000:]}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"ovd serve was not ready after {self.ready_timeout_s:.0f} s:\n{self.log()[-4000:]}")

    def stop(self) -> int | None:
        """SIGTERM, wait up to stop_timeout_s, then SIGKILL; returns the exit code."""
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(self.stop_timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
