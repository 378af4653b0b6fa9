"""The slim image built and run for real (docker/docker_test.py --images onnx): compose up with
Redis, healthy, a /v1/detect answered like the host answers, a tampered or empty model refused,
`stop` drains an in-flight request. Needs a container engine: podman (which `make docker-test`
installs on Debian) or a running Docker; the full CPU image is left to `make docker-test`."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def engine_available() -> bool:
    if shutil.which("podman") and shutil.which("podman-compose"):
        return True
    docker = shutil.which("docker")
    return bool(docker) and subprocess.run([docker, "info"], capture_output=True, timeout=30).returncode == 0


@pytest.mark.skipif(not engine_available(), reason="no container engine (make docker-test installs podman)")
@pytest.mark.timeout(1800)
def test_the_slim_image_serves_from_compose_and_refuses_bad_models(tmp_path):
    out = tmp_path / "docker_test.json"
    proc = subprocess.run([sys.executable, "docker/docker_test.py", "--images", "onnx", "--requests", "3",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    figures = json.loads(out.read_text())["images"]["onnx"]
    assert figures["same_answer_as_host"] and figures["novel_found"]
    assert figures["refuses"] == {"tampered_exit": 2, "empty_exit": 78, "unreadable_exit": 78}
    assert figures["stop_drains"]["exit_code"] == 0
    assert figures["image_bytes"] < 1e9  # no torch in it
