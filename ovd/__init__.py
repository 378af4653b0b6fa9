"""ovd: open-vocabulary object detection. Name classes in plain words, get boxes back.

    import ovd

    detector = ovd.Detector.load("default")          # or the folder of an `ovd export`
    found = detector("photo.jpg", ["red ring", "blue star"])
    print(found.to_json())

Subpackages: `ovd.models` (CLIP, the detector, runtimes, exports), `ovd.training` (the
pipeline's stages and the `ovd` command line), `ovd.service` (the FastAPI detection service).
The names below are imported on first use, so `import ovd` does not load torch.
"""

from __future__ import annotations

from importlib import import_module

__version__ = "0.1.0"

_LAZY = {
    "Detector": "ovd.models.api",
    "Example": "ovd.models.api",
    "ExampleQueries": "ovd.models.api",
    "Detections": "ovd.models.detections",
    "Preprocessing": "ovd.models.runtime",
    "Runtime": "ovd.models.runtime",
    "load_runtime": "ovd.models.runtime",
    "read_image": "ovd.models.api",
    "UnknownWordWarning": "ovd.models.api",
}
__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'ovd' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
