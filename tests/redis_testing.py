"""A throwaway redis-server on a free loopback port, for tests and benchmarks/load_service.py.

    with redis_process() as (url, proc):   # FileNotFoundError without redis-server
        ...
    with redis_process_or_skip() as (url, proc):   # in a test: skipped without redis-server
        ...
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
import time

from ovd.service.launch import free_port


@contextlib.contextmanager
def redis_process():
    """redis-server on 127.0.0.1, no persistence; yields (url, Popen) and terminates it after.

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


@contextlib.contextmanager
def redis_process_or_skip():
    """`redis_process()`, skipping the calling test where redis-server is not installed."""
    import pytest

    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (scripts/install.sh installs it)")
    with redis_process() as server:
        yield server
