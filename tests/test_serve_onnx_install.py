"""The serve-onnx install: a fresh venv made by `scripts/install.sh --serve-onnx` (no torch, no
Detectron2) serves /v1/detect from an ONNX export through a real `ovd serve`, answers like the
full install's onnxruntime backend, and names the fix when asked for what needs the full install."""

from __future__ import annotations

import base64
import io
import os
import subprocess
from pathlib import Path

import httpx
import numpy as np
import pytest
from detector_testing import same_detections
from PIL import Image

from ovd.models.api import Detector
from ovd.service.launch import ServerProcess

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def slim_venv(tmp_path_factory) -> Path:
    venv = tmp_path_factory.mktemp("serve-onnx") / "venv"
    out = subprocess.run(["bash", "scripts/install.sh", "--serve-onnx", "--no-redis"], cwd=ROOT,
                         env={**os.environ, "OVD_VENV": str(venv)}, capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    assert "ready (serve-onnx)" in out.stdout and "no torch" in out.stdout
    return venv


def _python(venv: Path) -> str:
    return str(venv / "bin" / "python")


def test_the_slim_venv_has_neither_torch_nor_detectron2(slim_venv):
    code = ("import importlib.util as u; "
            "print([m for m in ('torch', 'torchvision', 'detectron2', 'open_clip') if u.find_spec(m)])")
    out = subprocess.run([_python(slim_venv), "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_slim_venv_serves_detect_like_the_full_install(slim_venv, onnx_export):
    image = np.zeros((96, 128, 3), np.uint8)
    image[20:60, 30:80] = (220, 40, 40)
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "PNG")
    names = ["red ring", "blue star"]
    body = {"image": base64.b64encode(buf.getvalue()).decode(), "classes": names, "score_threshold": 0.0}
    env = {"OVD_BACKEND": "onnx", "OVD_REDIS_URL": ""}
    with ServerProcess(onnx_export, env=env, python=_python(slim_venv)) as server:
        r = httpx.post(f"{server.url}/v1/detect", json=body, timeout=60)
    assert r.status_code == 200, r.text
    want = Detector.load(onnx_export, backend="onnx")(image, names, threshold=0.0).to_json()
    assert want and same_detections(r.json()["detections"], want)


def test_full_install_commands_name_the_fix(slim_venv, onnx_export):
    ovd = str(slim_venv / "bin" / "ovd")
    out = subprocess.run([ovd, "train"], capture_output=True, text=True)
    assert out.returncode == 2 and "needs torch, which the full install provides" in out.stderr
    assert "Traceback" not in out.stderr
    out = subprocess.run([ovd, "serve", "--model-dir", str(onnx_export)], capture_output=True, text=True,
                         env={**os.environ, "OVD_BACKEND": "torch"})
    assert out.returncode == 2 and "set OVD_BACKEND=onnx" in out.stderr
