"""`ovd serve` in a subprocess on a free loopback port: the server `ovd demo` queries.

    with ServerProcess("artifacts/default") as server:
        httpx.post(f"{server.url}/v1/detect", ...)

It waits until /readyz answers 200, and on exit stops the server the way an orchestrator does:
SIGTERM (in-flight requests finish), then SIGKILL after a grace period. The end-to-end tests
and the load benchmark start their servers with it too.
"""

from __future__ import annotations

import os
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


class ServerProcess:
    """`ovd serve` in a subprocess on 127.0.0.1.

    Args:
        model_dir: export folder to serve.
        env: extra environment variables (OVD_* settings), on top of this process's environment.
        python: the interpreter whose `ovd` serves (default: this one; e.g. another venv's).

    Attributes:
        url: "http://127.0.0.1:<port>".
        log_path: file receiving the server's stdout and stderr.
    """

    READY_TIMEOUT_S = 120.0  # how long start() waits for /readyz
    STOP_TIMEOUT_S = 30.0  # how long stop() waits after SIGTERM before SIGKILL

    def __init__(self, model_dir: str | Path, *, env: dict[str, str] | None = None,
                 python: str | Path = sys.executable):
        self.model_dir = Path(model_dir)
        self.python = str(python)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, **(env or {})}
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
        cmd = [self.python, "-m", "ovd", "serve", "--host", "127.0.0.1",
               "--port", str(self.port), "--model-dir", str(self.model_dir)]
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                            cwd=Path(__file__).resolve().parents[1])
        deadline = time.monotonic() + self.READY_TIMEOUT_S
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
        raise RuntimeError(f"ovd serve was not ready after {self.READY_TIMEOUT_S:.0f} s:\n{self.log()[-4000:]}")

    def stop(self) -> int | None:
        """SIGTERM, wait up to STOP_TIMEOUT_S, then SIGKILL; returns the exit code."""
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(self.STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
