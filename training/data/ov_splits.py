"""Open-vocabulary splits of the real benchmarks: OV-COCO (48 base / 17 novel) and OV-LVIS.

Both builders read the official annotation file and write a COCO-format json whose categories
are tagged ``"split": "base" | "novel"``. A ``train`` json keeps every category of the benchmark
but only base-class annotations (images are all kept, including those that only show novel
objects, as in the OV-COCO convention); a ``val`` json keeps the annotations of every class.
Keeping all categories in both files gives the two splits one contiguous id space.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

from ovd.training.data.coco_format import SPLIT_KEY, DatasetFormatError, load_coco_json

logger = logging.getLogger(__name__)

__all__ = [
    "LVIS_BASE_FREQUENCIES",
    "OV_COCO_BASE",
    "OV_COCO_NOVEL",
    "OV_COCO_UNUSED",
    "SPLITS",
    "build_ov_coco",
    "build_ov_lvis",
    "build_split_cli",
    "output_path",
    "write_json_atomic",
]

Split = Literal["train", "val"]
SPLITS: tuple[str, ...] = ("train", "val")

# The 48/17 split of Bansal et al. (2018), used by OVR-CNN, ViLD, Detic, ...; names as in
# COCO 2017's instances_*2017.json.
OV_COCO_BASE: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "train", "truck", "boat", "bench", "bird",
    "horse", "sheep", "bear", "zebra", "giraffe", "backpack", "handbag", "suitcase", "frisbee",
    "skis", "kite", "surfboard", "bottle", "fork", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "pizza", "donut", "chair", "bed", "toilet",
    "tv", "laptop", "mouse", "remote", "microwave", "oven", "toaster", "refrigerator", "book",
    "clock", "vase", "toothbrush",
)  # fmt: skip
OV_COCO_NOVEL: tuple[str, ...] = (
    "airplane", "bus", "cat", "dog", "cow", "elephant", "umbrella", "tie", "snowboard",
    "skateboard", "cup", "knife", "cake", "couch", "keyboard", "sink", "scissors",
)  # fmt: skip
# The other 15 COCO classes: in neither split, dropped from categories and annotations.
OV_COCO_UNUSED: tuple[str, ...] = (
    "traffic light", "fire hydrant", "stop sign", "parking meter", "sports ball",
    "baseball bat", "baseball glove", "tennis racket", "wine glass", "hot dog", "potted plant",
    "dining table", "cell phone", "teddy bear", "hair drier",
)  # fmt: skip

# LVIS frequency groups by number of training images: rare 1-5, common 6-10, frequent > 10.
# Base = f + c, novel = r (the usual OV-LVIS protocol).
LVIS_BASE_FREQUENCIES = frozenset({"f", "c"})
_LVIS_FREQUENCIES = ("f", "c", "r")


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")


def output_path(kind: str, out_dir: str | os.PathLike[str], split: str) -> Path:
    """Where a builder writes its json: ``out_dir / f"{kind}_{split}.json"``.

    Args:
        kind: ``"ov_coco"`` or ``"ov_lvis"``.
        out_dir: Output directory.
        split: ``"train"`` or ``"val"``.
    """
    return Path(out_dir) / f"{kind}_{split}.json"


def write_json_atomic(obj: Any, path: str | os.PathLike[str]) -> Path:
    """Writes ``obj`` as json so that ``path`` is either the old file or the complete new one.

    The data goes to a temporary file in the same directory (same filesystem, so the rename is
    atomic), is fsynced, then ``os.replace``-d onto ``path``. The temporary file is removed on
    any failure.

    Args:
        obj: JSON-serialisable object.
        path: Destination; its parent directory is created if needed.

    Returns:
        ``path`` as a Path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, separators=(",", ":"))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def _complete_annotation(ann: dict) -> dict:
    """Adds ``iscrowd`` and ``area`` if absent: pycocotools' COCOeval indexes both."""
    if "iscrowd" in ann and "area" in ann:
        return ann
    ann = dict(ann)
    ann.setdefault("iscrowd", 0)
    ann.setdefault("area", float(ann["bbox"][2]) * float(ann["bbox"][3]))
    return ann


def _tagged(cat: dict, split: str) -> dict:
    out = copy.deepcopy(cat)
    out[SPLIT_KEY] = split
    return out


def _assemble(
    coco: dict,
    categories: list[dict],
    keep_category_ids: Iterable[int],
    images: list[dict],
) -> dict:
    """A COCO dict with ``coco``'s extra top-level keys, new categories and filtered annotations."""
    keep = set(keep_category_ids)
    out = {k: v for k, v in coco.items() if k not in ("images", "annotations", "categories")}
    out["images"] = images
    out["annotations"] = [
        _complete_annotation(a) for a in coco["annotations"] if a["category_id"] in keep
    ]
    out["categories"] = sorted(categories, key=lambda c: c["id"])
    return out


def _log_summary(kind: str, split: str, out: dict, path: Path, n_in: int) -> None:
    n_novel = sum(c[SPLIT_KEY] == "novel" for c in out["categories"])
    logger.info(
        "%s %s: %d categories (%d base, %d novel), %d images, %d/%d annotations kept -> %s",
        kind,
        split,
        len(out["categories"]),
        len(out["categories"]) - n_novel,
        n_novel,
        len(out["images"]),
        len(out["annotations"]),
        n_in,
        path,
    )


def build_ov_coco(
    instances_json: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    split: Split,
) -> Path:
    """Builds an OV-COCO 48/17 split from an official COCO 2017 instances json.

    Output categories: the 65 OV-COCO classes with their original COCO ids, tagged base or
    novel; the other 15 classes and their annotations are dropped. ``train`` keeps only base
    annotations, ``val`` those of all 65 classes. All images are kept in both. Crowd
    annotations are kept with ``iscrowd=1`` (the COCO evaluator ignores them, Detectron2's
    training mapper filters them). The two train2017 boxes with zero height are dropped.

    Args:
        instances_json: E.g. ``instances_train2017.json`` for ``train``,
            ``instances_val2017.json`` for ``val``.
        out_dir: Output directory; the file is ``out_dir/ov_coco_{split}.json``.
        split: ``"train"`` or ``"val"``.

    Returns:
        Path of the written json.

    Raises:
        DatasetFormatError: If the input is invalid or lacks any of the 65 category names.
        ValueError: If ``split`` is not ``"train"`` or ``"val"``.
    """
    _check_split(split)
    coco = load_coco_json(instances_json, drop_degenerate_boxes=True)
    by_name = {c["name"]: c for c in coco["categories"]}
    wanted = OV_COCO_BASE + OV_COCO_NOVEL
    missing = [n for n in wanted if n not in by_name]
    if missing:
        raise DatasetFormatError(
            f"{instances_json}: missing {len(missing)} OV-COCO categor"
            f"{'y' if len(missing) == 1 else 'ies'} {missing}; expected COCO 2017 category names"
        )

    categories = [_tagged(by_name[n], "base") for n in OV_COCO_BASE]
    categories += [_tagged(by_name[n], "novel") for n in OV_COCO_NOVEL]
    names = OV_COCO_BASE if split == "train" else wanted
    out = _assemble(coco, categories, (by_name[n]["id"] for n in names), coco["images"])

    path = write_json_atomic(out, output_path("ov_coco", out_dir, split))
    _log_summary("OV-COCO", split, out, path, len(coco["annotations"]))
    return path


def _lvis_file_name(img: dict, source: str, index: int) -> str:
    """``file_name`` of an LVIS image relative to the COCO root, e.g. ``train2017/0001.jpg``."""
    if isinstance(img.get("file_name"), str) and img["file_name"]:
        return img["file_name"]
    url = img.get("coco_url")
    if not isinstance(url, str) or url.count("/") < 1:
        raise DatasetFormatError(
            f"{source}: images[{index}] (id={img.get('id')!r}): needs 'file_name' or a "
            f"'coco_url' like http://images.cocodataset.org/train2017/000000000009.jpg"
        )
    # LVIS v1 images come from both COCO train2017 and val2017; the folder is in the URL.
    folder, name = url.rstrip("/").split("/")[-2:]
    return f"{folder}/{name}"


def build_ov_lvis(
    lvis_json: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    split: Split,
) -> Path:
    """Builds an OV-LVIS split: base = frequent + common categories, novel = rare.

    All categories are kept and tagged. ``train`` keeps only base annotations, ``val`` all.
    Images keep every key (``not_exhaustive_category_ids``, ``neg_category_ids``, ...). Raw
    LVIS v1 images have no ``file_name``; it is derived from ``coco_url`` as
    ``"{train2017|val2017}/{name}.jpg"``, so register the output with the COCO root directory as
    ``image_root``. Annotations get ``iscrowd=0`` (LVIS has no crowd boxes) so the COCO
    evaluator can read them.

    Args:
        lvis_json: E.g. ``lvis_v1_train.json`` or ``lvis_v1_val.json``.
        out_dir: Output directory; the file is ``out_dir/ov_lvis_{split}.json``.
        split: ``"train"`` or ``"val"``.

    Returns:
        Path of the written json.

    Raises:
        DatasetFormatError: If the input is invalid or a category lacks a valid ``frequency``.
        ValueError: If ``split`` is not ``"train"`` or ``"val"``.
    """
    _check_split(split)
    lvis = load_coco_json(lvis_json, require_file_name=False, drop_degenerate_boxes=True)

    categories: list[dict] = []
    for i, cat in enumerate(lvis["categories"]):
        freq = cat.get("frequency")
        if freq not in _LVIS_FREQUENCIES:
            problem = "has no 'frequency'" if "frequency" not in cat else f"has frequency {freq!r}"
            raise DatasetFormatError(
                f"{lvis_json}: categories[{i}] (id={cat['id']!r}, {cat['name']!r}) {problem}; "
                f"LVIS categories need 'frequency' in {list(_LVIS_FREQUENCIES)}"
            )
        categories.append(_tagged(cat, "base" if freq in LVIS_BASE_FREQUENCIES else "novel"))

    images = []
    for i, img in enumerate(lvis["images"]):
        file_name = _lvis_file_name(img, str(lvis_json), i)
        images.append(img if img.get("file_name") == file_name else {**img, "file_name": file_name})

    keep = (c["id"] for c in categories if split == "val" or c[SPLIT_KEY] == "base")
    out = _assemble(lvis, categories, keep, images)

    path = write_json_atomic(out, output_path("ov_lvis", out_dir, split))
    _log_summary("OV-LVIS", split, out, path, len(lvis["annotations"]))
    return path


_BUILDERS = {"ov-coco": build_ov_coco, "ov-lvis": build_ov_lvis}


def build_split_cli(
    kind: str,
    input: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    split: str,
) -> Path:
    """Entry point for ``ovd data ov-coco|ov-lvis --input ... --out ... --split ...``.

    Args:
        kind: ``"ov-coco"`` or ``"ov-lvis"``.
        input: Official annotation json (COCO 2017 instances or LVIS v1).
        out_dir: Output directory.
        split: ``"train"`` or ``"val"``.

    Returns:
        Path of the written json.

    Raises:
        ValueError: If ``kind`` or ``split`` is unknown.
        DatasetFormatError: If the input file is invalid.
    """
    builder = _BUILDERS.get(kind)
    if builder is None:
        raise ValueError(f"unknown split kind {kind!r}, expected one of {sorted(_BUILDERS)}")
    _check_split(split)
    return builder(input, out_dir, split=split)
