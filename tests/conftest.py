"""Shared fixtures: tiny synthetic worlds, generated once per session and configuration."""

from __future__ import annotations

from pathlib import Path

import pytest

# Small enough to render in well under a second on a busy 2-core CPU.
TINY_WORLD = {
    "num_train": 4,
    "num_val": 3,
    "num_test": 2,
    "num_captions": 40,
    "num_caption_eval": 16,
    "image_size": 96,
    "object_size": (10, 32),
}


@pytest.fixture(scope="session")
def make_world(tmp_path_factory):
    """`make_world(**overrides) -> Path`: a generated world for TINY_WORLD updated by overrides.

    Worlds are cached per configuration (and worker count), so tests that ask for the same
    configuration share one folder; treat it as read-only.
    """
    from ovd.training.data.synthetic import WorldConfig, generate_world

    cache: dict[tuple, Path] = {}

    def make(*, workers: int = 1, **overrides) -> Path:
        params = {**TINY_WORLD, **overrides}
        key = (workers, tuple(sorted(params.items())))
        if key not in cache:
            out = tmp_path_factory.mktemp("world")
            generate_world(out, WorldConfig.from_dict(params), workers=workers)
            cache[key] = out
        return cache[key]

    return make


# A random tiny detector export, torch-only and with ONNX graphs (the ONNX and API tests).


@pytest.fixture(scope="session")
def plain_export(tmp_path_factory):
    """A torch-only export of a random tiny detector whose outputs do not hinge on float noise:
    its RPN keeps every proposal (no top-k cut), neither the RPN nor the box head suppresses
    (NMS IoU 1), and its classifier runs at tau = 4 instead of 100. A random detector's
    objectness and (at tau 100, saturated) class scores tie to the last bit, and which of two
    tied overlapping boxes an NMS keeps then depends on rounding (it changed with the images of
    world v2). A trained model has no such ties; the export's own validation still compares
    every detection, and the top-k cut at the end is handled there."""
    from detector_testing import write_tiny_export

    return write_tiny_export(tmp_path_factory.mktemp("plain"), [
        "MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.05, "MODEL.RPN.PRE_NMS_TOPK_TEST", 2000,
        "MODEL.RPN.POST_NMS_TOPK_TEST", 2000, "MODEL.RPN.NMS_THRESH", 1.0,
        "MODEL.ROI_HEADS.NMS_THRESH_TEST", 1.0], temperature=4.0)


@pytest.fixture(scope="session")
def onnx_export(plain_export, tmp_path_factory):
    """`ovd export --onnx --from-export PLAIN --out DIR` (validated inside the command)."""
    from ovd.training.cli import main as ovd

    out = tmp_path_factory.mktemp("onnx")
    assert ovd(["export", "--onnx", "--from-export", str(plain_export), "--out", str(out)]) == 0
    return out
