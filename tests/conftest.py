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
    from training.data.synthetic import WorldConfig, generate_world

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
