"""Fixtures of the service tests: a tiny random export, real redis-server processes, apps.

The export is a randomly initialised synthetic R18-FPN detector at 64-96 px with a score
threshold of 0, so every image gets detections; the tests compare the service's answers with
the model's own `model(inputs, text=T)`, never with stored numbers.
"""

from __future__ import annotations

import contextlib
import shutil

import pytest
import torch
import torch.nn.functional as F

from ovd.service import launch
from ovd.service.launch import ServerProcess

CATEGORIES = [{"name": "red ring", "split": "novel"}, {"name": "blue disk", "split": "base"},
              {"name": "green cross", "split": "novel"}]


@pytest.fixture(scope="session")
def export_dir(tmp_path_factory):
    """A verified export folder of a random tiny detector (read-only for tests)."""
    from detectron2.modeling import build_model

    from ovd.models.clip.model import architecture_config, load_clip
    from ovd.models.exported import write_export
    from ovd.training.train_detector import build_config

    torch.manual_seed(0)
    arch = "ovd-vit-tiny-64"
    clip = load_clip(arch)
    cfg = build_config("configs/detector/synthetic_r18_fpn.yaml", [
        "MODEL.OVD.EMBED_DIM", clip.embed_dim, "MODEL.ROI_HEADS.NUM_CLASSES", len(CATEGORIES),
        "MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.0, "INPUT.MIN_SIZE_TEST", 64, "INPUT.MAX_SIZE_TEST", 96])
    model = build_model(cfg).eval()
    model.train_text = F.normalize(torch.randn(len(CATEGORIES), clip.embed_dim), dim=1)
    out = tmp_path_factory.mktemp("export")
    write_export(out, model=model, cfg=cfg, clip=clip, clip_arch=architecture_config(arch),
                 manifest_fields={"name": "ovd-test", "version": "0.0.1", "categories": CATEGORIES,
                                  "metrics": {}})
    return out


@pytest.fixture(scope="session")
def detector(export_dir):
    """The export's PyTorch runtime, loaded once for all in-process apps."""
    from ovd.models.exported import load_export
    from ovd.models.runtime import TorchRuntime

    return TorchRuntime(load_export(export_dir))


@contextlib.contextmanager
def redis_process():
    """ovd.service.launch.redis_process, skipping the test where redis-server is not installed."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (scripts/install.sh installs it)")
    with launch.redis_process() as server:
        yield server


@pytest.fixture(scope="session")
def redis_url():
    """URL of a redis-server shared by the session's tests (use distinct key prefixes)."""
    with redis_process() as (url, _):
        yield url


@pytest.fixture(scope="session")
def server(export_dir, redis_url):
    """A real `ovd serve` process with Redis, shared by end-to-end, fuzz and browser tests."""
    # A 50 ms batching window: concurrent test requests meet in one batch.
    with ServerProcess(export_dir, env={"OVD_REDIS_URL": redis_url, "OVD_REDIS_PREFIX": "e2e",
                                        "OVD_MAX_BODY_BYTES": str(2 * 2**20),
                                        "OVD_MAX_BATCH_WAIT_MS": "50"}) as s:
        yield s


