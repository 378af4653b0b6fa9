"""Fixtures of the service tests: a tiny random export, real redis-server processes, apps.

The export is a randomly initialised synthetic R18-FPN detector at 64-96 px with a score
threshold of 0, so every image gets detections; the tests compare the service's answers with
the model's own `model(inputs, text=T)`, never with stored numbers.
"""

from __future__ import annotations

import pytest
from redis_testing import redis_process_or_skip

from ovd.service.launch import ServerProcess


@pytest.fixture(scope="session")
def export_dir(tmp_path_factory):
    """A verified export folder of a random tiny detector (read-only for tests)."""
    from detector_testing import write_tiny_export

    return write_tiny_export(tmp_path_factory.mktemp("export"), ["MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.0])


@pytest.fixture(scope="session")
def detector(export_dir):
    """The export's PyTorch runtime, loaded once for all in-process apps."""
    from ovd.models.exported import load_export
    from ovd.models.runtime import TorchRuntime

    return TorchRuntime(load_export(export_dir))


@pytest.fixture(scope="session")
def redis_url():
    """URL of a redis-server shared by the session's tests (use distinct key prefixes)."""
    with redis_process_or_skip() as (url, _):
        yield url


@pytest.fixture(scope="session")
def server(export_dir, redis_url):
    """A real `ovd serve` process with Redis, shared by end-to-end, fuzz and browser tests."""
    # A 50 ms batching window: concurrent test requests meet in one batch. No bound on the
    # classification candidates: answers are compared with the model's own (unbounded)
    # inference, and this random model scores 80 COCO names x 1000 proposals near 1.0 (the bound
    # is tested in test_service_cost.py).
    with ServerProcess(export_dir, env={"OVD_REDIS_URL": redis_url, "OVD_REDIS_PREFIX": "e2e",
                                        "OVD_MAX_BODY_BYTES": str(2 * 2**20),
                                        "OVD_MAX_BATCH_WAIT_MS": "50",
                                        "OVD_MAX_CLASSIFY_CANDIDATES": str(10**8)}) as s:
        yield s
