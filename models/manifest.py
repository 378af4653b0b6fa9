"""An export folder's manifest and file list, checked without torch or Detectron2: what the
onnxruntime-only runtime (models/onnx_runtime.py) and every loader verify first.

An export folder holds the files of FILES (always) and of ONNX_FILES (after `ovd export
--onnx`), each listed in manifest.json with its sha256; see models/exported.py for what each
file is.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

EXPORT_FORMAT = "ovd-detector/1"
FILES = {
    "detector": "detector.safetensors",
    "config": "detector.yaml",
    "text_encoder": "text_encoder.safetensors",
    "text_config": "text_encoder.json",
}
# Optional: written by `ovd export --onnx`, verified like the others when the manifest lists them.
ONNX_FILES = {
    "onnx_detector": "detector.onnx",
    "onnx_encode": "detector_encode.onnx",
    "onnx_classify": "detector_classify.onnx",
}
# Optional too (newer `ovd export --onnx`): the text tower, so onnxruntime alone serves requests.
ONNX_TEXT_FILES = {
    "onnx_text": "text_encoder.onnx",
    "tokenizer": "tokenizer.json",
}
# Optional (since 2026-12-04): models/portable.py, a client's input transform, tokenizer and box
# mapping in one file that imports nothing from this project.
ONNX_CLIENT_FILES = {"portable": "portable.py"}


class ExportError(ValueError):
    """An export folder that is missing files, malformed, or fails its manifest's hashes."""


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def strict_json(obj, **kwargs) -> str:
    """JSON that every parser reads: NaN and infinities (an empty group's AP, a gate with
    nothing to measure) are written as null, where Python's json would write bare NaN."""
    def clean(x):
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, list | tuple):
            return [clean(v) for v in x]
        return x

    return json.dumps(clean(obj), allow_nan=False, **kwargs)


def atomic_write(path: Path, data: bytes) -> None:
    """Write a file under a temporary name and rename it: a killed write leaves no half file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def verify_export(folder: str | Path) -> dict:
    """Check an export folder against its manifest; returns the manifest.

    Raises:
        ExportError: missing manifest or file, unknown format, or a sha256 mismatch.
    """
    folder = Path(folder)
    path = folder / "manifest.json"
    if not path.is_file():
        raise ExportError(f"{folder} is not a detector export (missing manifest.json)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ExportError(f"{path} is not valid JSON: {e}") from e
    if manifest.get("format") != EXPORT_FORMAT:
        raise ExportError(f"{path}: format {manifest.get('format')!r}, expected {EXPORT_FORMAT!r}")
    for name, entry in manifest.get("files", {}).items():
        f = folder / entry["file"]
        if not f.is_file():
            raise ExportError(f"{folder}: missing {entry['file']} ({name})")
        actual = sha256_file(f)
        if actual != entry["sha256"]:
            raise ExportError(f"{f} has sha256 {actual}, but the manifest says {entry['sha256']}")
    listed = set(manifest.get("files", {}))
    optional = {**ONNX_FILES, **ONNX_TEXT_FILES, **ONNX_CLIENT_FILES}
    if not set(FILES) <= listed or listed - set(FILES) - set(optional):
        raise ExportError(f"{path}: files {sorted(listed)}, expected {sorted(FILES)} "
                          f"(and optionally {sorted(optional)})")
    known = {**FILES, **optional}
    if any(entry["file"] != known[name] for name, entry in manifest["files"].items()):
        raise ExportError(f"{path}: unexpected file names {manifest['files']}")
    return manifest
