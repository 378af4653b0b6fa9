"""Detection over image files: what `ovd detect` runs (the command is a thin layer over this).

    files = expand_inputs(["photos/", "extra/*.jpg", "one.png"])
    report = detect_files(detector, files, ["red ring", "forklift"], draw_dir=Path("drawn"))
    Path("results.json").write_text(json.dumps(report))

Two output shapes: per-image JSON (the default) and COCO ("images", "categories",
"annotations" with a "score" each: load it with pycocotools' `COCO`, or take its
"annotations" as a results list for `COCO.loadRes` against a ground truth that uses the same
category ids).
"""

from __future__ import annotations

import glob
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

from .api import Detector, read_image

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def expand_inputs(patterns: Sequence[str | Path]) -> list[Path]:
    """Image files named by paths, folders (their image files, recursively) and glob patterns,
    in the given order, each file once.

    Raises:
        FileNotFoundError: a pattern that names nothing (listing every such pattern).
    """
    files: list[Path] = []
    empty = []
    for pattern in map(str, patterns):
        path = Path(pattern)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        elif path.is_file():
            found = [path]
        else:
            found = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
        if not found:
            empty.append(pattern)
        files.extend(found)
    if empty:
        raise FileNotFoundError(f"no image file found for {empty} (give files, folders or quoted "
                                f"glob patterns such as 'photos/*.jpg')")
    return list(dict.fromkeys(f.resolve() for f in files))


def detect_files(detector: Detector, files: Sequence[Path], classes: Sequence[str], *,
                 batch_size: int = 4, coco: bool = False, draw_dir: Path | None = None,
                 progress: Callable[[int], None] | None = None, **options) -> dict:
    """Run the detector over files, `batch_size` at a time.

    Args:
        detector: a loaded `Detector`.
        files: image paths (see `expand_inputs`).
        classes: class names in plain words.
        coco: COCO-style output instead of per-image JSON.
        draw_dir: where to write each image with its boxes drawn (PNG, same stem), if given.
        progress: called with the number of images finished after each batch.
        **options: `Detector.__call__`'s (threshold, max_detections, score_mode, examples, ...);
            each example label is one more category after the class names.

    Returns:
        {"model", "classes", "options", "images": [{"file", "width", "height", "detections":
        [...]}], "skipped": [{"file", "error"}]} or, with coco=True, {"images", "categories",
        "annotations"} (category id = class index + 1; skipped files under "info").

    Raises:
        ValueError: no file could be read (one unreadable file is skipped and reported).
    """
    if draw_dir is not None:
        draw_dir.mkdir(parents=True, exist_ok=True)
    examples = options.pop("examples", ())
    queries = detector.embed_examples(examples) if examples else None  # once, not once per batch
    names = [*classes, *(queries.labels if queries else ())]
    images, annotations, failed = [], [], []
    for start in range(0, len(files), batch_size):
        chunk, ids, pixels = [], [], []
        for i, f in enumerate(files[start:start + batch_size], start + 1):
            try:  # one unreadable file (truncated, not an image) must not cost the others
                pixels.append(read_image(f))
                chunk.append(f)
                ids.append(i)
            except (OSError, ValueError) as e:
                logger.error("skipped %s: %s", f, e)
                failed.append({"file": str(f), "error": str(e)})
        if not chunk:
            continue
        found = detector(pixels, classes, batch_size=batch_size, examples=queries or (), **options)
        for image_id, f, rgb, d in zip(ids, chunk, pixels, found, strict=True):
            height, width = d.image_size
            if coco:
                images.append({"id": image_id, "file_name": str(f), "width": width, "height": height})
                for a in d.to_coco(image_id):
                    annotations.append({"id": len(annotations) + 1, **a,
                                        "area": a["bbox"][2] * a["bbox"][3], "iscrowd": 0})
            else:
                images.append({"file": str(f), "width": width, "height": height, "detections": d.to_json()})
            if draw_dir is not None:
                d.draw(rgb).save(_drawn_path(draw_dir, f, files))
        if progress:
            progress(len(chunk))
    if not images and failed:
        raise ValueError(f"no input could be read ({len(failed)} files), first: {failed[0]['file']}: "
                         f"{failed[0]['error']}")
    manifest = detector.manifest
    model = {"name": manifest.get("name"), "version": manifest.get("version")}
    if examples:
        options["examples"] = [{"image": str(e.image), "box": [float(v) for v in e.box], "label": e.label}
                               for e in examples]
    if coco:
        return {"info": {"description": "ovd detect", "model": model, "options": options, "skipped": failed},
                "images": images,
                "categories": [{"id": i + 1, "name": c} for i, c in enumerate(names)],
                "annotations": annotations}
    return {"model": model, "classes": names, "options": options, "warnings": detector.warnings(classes),
            "images": images, "skipped": failed}


def _drawn_path(draw_dir: Path, file: Path, files: Sequence[Path]) -> Path:
    """draw_dir/<stem>.png, or <parent>_<stem>.png when two inputs share a stem."""
    stems = [f.stem for f in files]
    name = file.stem if stems.count(file.stem) == 1 else f"{file.parent.name}_{file.stem}"
    return draw_dir / f"{name}.png"
