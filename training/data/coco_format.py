"""COCO-format dataset loading, validation and Detectron2 registration.

Every dataset this project trains or evaluates on is a COCO instances json. Categories may carry
an extra key ``"split": "base" | "novel"``; a category without it counts as base, so plain user
datasets work unchanged. Open-vocabulary training jsons keep *all* categories in ``categories``
but only base-class annotations, so the contiguous id space is identical between the training
and the validation split of one benchmark.

Detectron2 is imported lazily: validation and the split builders work without it.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

__all__ = [
    "SPLIT_KEY",
    "SPLIT_VALUES",
    "DatasetFormatError",
    "category_split",
    "load_coco_json",
    "parse_dataset_spec",
    "read_dataset_image",
    "register_from_spec",
    "register_ov_dataset",
    "validate_coco_dict",
]

SPLIT_KEY = "split"
SPLIT_VALUES = ("base", "novel")
_REQUIRED_TOP_LEVEL = ("images", "annotations", "categories")


class DatasetFormatError(ValueError):
    """A dataset file is missing, unreadable or not a valid COCO instances file.

    The message always names the file and, where there is one, the first offending entry.
    """


def _is_int(value: Any) -> bool:
    # bool is a subclass of int, but `true` is never a meaningful id or size.
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _describe(section: str, index: int, entry: Any) -> str:
    if isinstance(entry, Mapping) and "id" in entry:
        return f"{section}[{index}] (id={entry['id']!r})"
    return f"{section}[{index}]"


def _bbox_problem(bbox: Any) -> str | None:
    """Returns why ``bbox`` is not a usable XYWH box, or None if it is."""
    if not isinstance(bbox, Sequence) or isinstance(bbox, str) or len(bbox) != 4:
        return f"bbox must be a list of 4 numbers [x, y, w, h], got {bbox!r}"
    if not all(_is_number(v) and math.isfinite(v) for v in bbox):
        return f"bbox must contain 4 finite numbers, got {bbox!r}"
    if bbox[2] <= 0 or bbox[3] <= 0:
        return f"bbox width and height must be > 0, got {list(bbox)!r}"
    return None


def _is_degenerate_box(bbox: Any) -> bool:
    """True for a well-formed box of 4 finite numbers whose width or height is <= 0."""
    return (
        isinstance(bbox, Sequence)
        and not isinstance(bbox, str)
        and len(bbox) == 4
        and all(_is_number(v) and math.isfinite(v) for v in bbox)
        and (bbox[2] <= 0 or bbox[3] <= 0)
    )


def validate_coco_dict(
    coco: Any,
    source: str | os.PathLike[str],
    *,
    require_file_name: bool = True,
    drop_degenerate_boxes: bool = False,
) -> dict:
    """Validates an already parsed COCO instances dict.

    Args:
        coco: The parsed json document.
        source: File name used in error messages.
        require_file_name: Whether every image needs ``file_name`` (Detectron2 needs it; raw
            LVIS files carry ``coco_url`` instead).
        drop_degenerate_boxes: Drop annotations whose box is finite but has width or height
            <= 0 instead of raising. The official COCO train2017 file has two such boxes.
            Malformed boxes (wrong length, non-numeric, non-finite) still raise.

    Returns:
        ``coco`` itself, with degenerate annotations removed if ``drop_degenerate_boxes``.

    Raises:
        DatasetFormatError: On the first problem found, naming ``source`` and the entry.
    """
    src = str(source)

    def fail(msg: str) -> DatasetFormatError:
        return DatasetFormatError(f"{src}: {msg}")

    if not isinstance(coco, dict):
        raise fail(f"top level must be a JSON object, got {type(coco).__name__}")
    missing = [k for k in _REQUIRED_TOP_LEVEL if k not in coco]
    if missing:
        raise fail(
            f"missing top-level key(s) {missing}; a COCO instances file needs {list(_REQUIRED_TOP_LEVEL)}"
        )
    for key in _REQUIRED_TOP_LEVEL:
        if not isinstance(coco[key], list):
            raise fail(f"top-level {key!r} must be a list, got {type(coco[key]).__name__}")
    if not coco["categories"]:
        raise fail("'categories' is empty")

    category_ids: set[int] = set()
    category_names: set[str] = set()
    for i, cat in enumerate(coco["categories"]):
        where = _describe("categories", i, cat)
        if not isinstance(cat, dict):
            raise fail(f"{where}: must be an object")
        if not _is_int(cat.get("id")):
            raise fail(f"{where}: 'id' must be an integer")
        name = cat.get("name")
        if not isinstance(name, str) or not name:
            raise fail(f"{where}: 'name' must be a non-empty string")
        if cat["id"] in category_ids:
            raise fail(f"{where}: duplicate category id {cat['id']}")
        if name in category_names:
            raise fail(f"{where}: duplicate category name {name!r}")
        if SPLIT_KEY in cat and cat[SPLIT_KEY] not in SPLIT_VALUES:
            raise fail(
                f"{where} ({name!r}): unknown split {cat[SPLIT_KEY]!r}, expected one of {list(SPLIT_VALUES)}"
            )
        category_ids.add(cat["id"])
        category_names.add(name)

    image_ids: set[int] = set()
    for i, img in enumerate(coco["images"]):
        where = _describe("images", i, img)
        if not isinstance(img, dict):
            raise fail(f"{where}: must be an object")
        if not _is_int(img.get("id")):
            raise fail(f"{where}: 'id' must be an integer")
        if img["id"] in image_ids:
            raise fail(f"{where}: duplicate image id {img['id']}")
        for key in ("height", "width"):
            if not _is_int(img.get(key)) or img[key] <= 0:
                raise fail(
                    f"{where}: {key!r} must be a positive integer (pixels), got {img.get(key)!r}"
                )
        if require_file_name:
            file_name = img.get("file_name")
            if not isinstance(file_name, str) or not file_name:
                raise fail(f"{where}: 'file_name' must be a non-empty string")
        image_ids.add(img["id"])

    annotation_ids: set[int] = set()
    dropped: list[Any] = []
    kept: list[dict] = []
    for i, ann in enumerate(coco["annotations"]):
        where = _describe("annotations", i, ann)
        if not isinstance(ann, dict):
            raise fail(f"{where}: must be an object")
        if not _is_int(ann.get("id")):
            raise fail(f"{where}: 'id' must be an integer")
        if ann["id"] in annotation_ids:
            raise fail(f"{where}: duplicate annotation id {ann['id']}")
        annotation_ids.add(ann["id"])
        if ann.get("image_id") not in image_ids:
            raise fail(f"{where}: references unknown image_id {ann.get('image_id')!r}")
        if ann.get("category_id") not in category_ids:
            raise fail(f"{where}: references unknown category_id {ann.get('category_id')!r}")
        if ann.get("iscrowd", 0) not in (0, 1):
            raise fail(f"{where}: 'iscrowd' must be 0 or 1, got {ann['iscrowd']!r}")
        if ann.get("ignore", 0):
            raise fail(f"{where}: a non-zero 'ignore' flag is not supported; use 'iscrowd' instead")
        bbox = ann.get("bbox")
        if drop_degenerate_boxes and _is_degenerate_box(bbox):
            dropped.append(ann["id"])
            continue
        problem = _bbox_problem(bbox)
        if problem is not None:
            raise fail(f"{where}: {problem}")
        kept.append(ann)

    if dropped:
        logger.warning(
            "%s: dropped %d annotation(s) with a zero or negative box width/height (first id %r)",
            src,
            len(dropped),
            dropped[0],
        )
        coco["annotations"] = kept
    return coco


def load_coco_json(
    path: str | os.PathLike[str],
    *,
    require_file_name: bool = True,
    drop_degenerate_boxes: bool = False,
) -> dict:
    """Reads and validates a COCO instances json.

    Checks: the file exists and parses; ``images``, ``annotations`` and ``categories`` are
    present; image, category and annotation ids are unique integers; every annotation refers
    to a known image and category; every ``bbox`` is 4 finite numbers ``[x, y, w, h]`` in
    pixels with ``w > 0`` and ``h > 0``; a category ``split`` is ``"base"`` or ``"novel"``.

    Args:
        path: Path to the json file.
        require_file_name: See :func:`validate_coco_dict`.
        drop_degenerate_boxes: See :func:`validate_coco_dict`.

    Returns:
        The parsed dict.

    Raises:
        DatasetFormatError: Naming the file and the first offending entry.
    """
    path = Path(path)
    if not path.is_file():
        what = "is a directory, not a file" if path.is_dir() else "does not exist"
        raise DatasetFormatError(f"{path}: dataset json {what}")
    try:
        with path.open("r", encoding="utf-8") as f:
            coco = json.load(f)
    except json.JSONDecodeError as e:
        raise DatasetFormatError(
            f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}"
        ) from e
    except UnicodeDecodeError as e:
        raise DatasetFormatError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from e
    return validate_coco_dict(
        coco,
        path,
        require_file_name=require_file_name,
        drop_degenerate_boxes=drop_degenerate_boxes,
    )


def read_dataset_image(image_root: str | os.PathLike[str], image: Mapping[str, Any], *,
                       json_file: str | os.PathLike[str] | None = None):
    """The one reader of a detection dataset's image, for every stage that crops boxes.

    Detectron2's reader, so the pixels are the ones the detector trains on: EXIF orientation
    applied (a phone photo stored sideways is turned upright, as the json's boxes assume).

    Args:
        image_root: folder the image's ``file_name`` is relative to.
        image: the json's image entry (``file_name``, ``height``, ``width``).
        json_file: named in error messages.

    Returns:
        (3, H, W) uint8 RGB torch tensor.

    Raises:
        FileNotFoundError: no such image file.
        ValueError: its (oriented) size differs from the json's height/width, so the boxes
            would not match the pixels.
    """
    import numpy as np
    import torch
    from detectron2.data.detection_utils import read_image

    path = Path(image_root) / image["file_name"]
    if not path.is_file():
        raise FileNotFoundError(f"{json_file or 'dataset'}: image {path} does not exist")
    arr = read_image(str(path), format="RGB")
    if arr.shape[:2] != (image["height"], image["width"]):
        raise ValueError(f"{path}: stored size {arr.shape[1]}x{arr.shape[0]} (EXIF orientation "
                         f"applied) differs from the json's {image['width']}x{image['height']}"
                         f"{f' ({json_file})' if json_file else ''}; fix the json's width/height")
    return torch.from_numpy(np.array(arr, copy=True)).permute(2, 0, 1).contiguous()


def _sorted_categories(coco: Mapping[str, Any]) -> list[dict]:
    return sorted(coco["categories"], key=lambda c: c["id"])


def category_split(coco: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """Splits category names into base and novel.

    Args:
        coco: A validated COCO dict. A category without ``split`` counts as base.

    Returns:
        ``(base_names, novel_names)``, each ordered by category id.
    """
    base: list[str] = []
    novel: list[str] = []
    for cat in _sorted_categories(coco):
        (novel if cat.get(SPLIT_KEY, "base") == "novel" else base).append(cat["name"])
    return base, novel


def is_lvis_format(coco: Mapping[str, Any]) -> bool:
    """LVIS-style annotations: every category has a ``frequency`` and the images carry
    ``neg_category_ids`` (federated labels: a category is judged only on images known to hold it
    or known not to), so they are scored with the LVIS API, not COCOeval."""
    cats, images = coco.get("categories") or [], coco.get("images") or []
    return (bool(cats) and all("frequency" in c for c in cats)
            and bool(images) and all("neg_category_ids" in im for im in images))


def _ov_metadata(coco: Mapping[str, Any], json_file: str, image_root: str) -> dict[str, Any]:
    """Metadata fields for an open-vocabulary dataset, matching Detectron2's id mapping."""
    cats = _sorted_categories(coco)
    # Detectron2's load_coco_json maps sorted dataset ids to 0..K-1 and asserts that metadata
    # set beforehand agrees, so this must be the same mapping.
    id_map = {cat["id"]: i for i, cat in enumerate(cats)}
    base, novel = category_split(coco)
    novel_ids = [i for i, cat in enumerate(cats) if cat.get(SPLIT_KEY, "base") == "novel"]
    base_ids = [i for i, cat in enumerate(cats) if cat.get(SPLIT_KEY, "base") != "novel"]
    return {
        "json_file": json_file,
        "image_root": image_root,
        "evaluator_type": "lvis" if is_lvis_format(coco) else "coco",
        "thing_classes": [cat["name"] for cat in cats],
        "thing_dataset_id_to_contiguous_id": id_map,
        "base_classes": base,
        "novel_classes": novel,
        "base_contiguous_ids": base_ids,
        "novel_contiguous_ids": novel_ids,
    }


def register_ov_dataset(
    name: str,
    json_file: str | os.PathLike[str],
    image_root: str | os.PathLike[str],
    *,
    overwrite: bool = False,
) -> str:
    """Registers a COCO-format dataset with Detectron2, with open-vocabulary metadata.

    The json is validated now; the Detectron2 dataset dicts are built lazily on the first
    ``DatasetCatalog.get(name)``. Metadata set: ``json_file``, ``image_root``,
    ``evaluator_type`` (``"lvis"`` for LVIS-style files, see :func:`is_lvis_format`, else
    ``"coco"``), ``thing_classes`` (all categories, ordered by id),
    ``thing_dataset_id_to_contiguous_id``, ``base_classes``/``novel_classes`` (names) and
    ``base_contiguous_ids``/``novel_contiguous_ids`` (ints in ``[0, len(thing_classes))``).

    Args:
        name: Dataset name, e.g. ``"ov_coco_train"``.
        json_file: COCO instances json.
        image_root: Directory that image ``file_name`` entries are relative to.
        overwrite: Replace an existing registration of ``name`` that points at other files.

    Returns:
        ``name``.

    Raises:
        DatasetFormatError: If the json is invalid.
        ValueError: If ``name`` is already registered with other files and not ``overwrite``.
    """
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.datasets import load_coco_json as d2_load_coco_json

    if not name:
        raise ValueError("dataset name must be non-empty")
    json_path = os.path.abspath(os.fspath(json_file))
    root = os.path.abspath(os.fspath(image_root))

    if name in DatasetCatalog.list():
        meta = MetadataCatalog.get(name)
        old = (meta.get("json_file"), meta.get("image_root"))
        old_abs = tuple(os.path.abspath(p) if isinstance(p, str) else p for p in old)
        is_ov = meta.get("base_classes") is not None
        if is_ov and old_abs == (json_path, root) and not overwrite:
            return name
        if not overwrite:
            raise ValueError(
                f"dataset {name!r} is already registered with json_file={old[0]!r}, "
                f"image_root={old[1]!r}; pass overwrite=True to replace it with "
                f"json_file={json_path!r}, image_root={root!r}"
            )
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)

    coco = load_coco_json(json_path)
    metadata = _ov_metadata(coco, json_path, root)
    if not os.path.isdir(root):
        logger.warning("dataset %r: image_root %s is not a directory", name, root)

    DatasetCatalog.register(name, lambda: d2_load_coco_json(json_path, root, name))
    MetadataCatalog.get(name).set(**metadata)
    return name


def parse_dataset_spec(spec: str) -> tuple[str, str, str]:
    """Parses a ``name=json_path:image_root`` dataset flag.

    The separator between the two paths is the ``:`` right after a ``.json`` suffix if there is
    one, else the last ``:``, so the image root may not contain ``:`` unless the json path ends
    in ``.json``.

    Args:
        spec: E.g. ``"mydata_val=data/ann/val.json:data/images"``.

    Returns:
        ``(name, json_path, image_root)``.

    Raises:
        ValueError: If the spec is malformed.
    """
    usage = "expected NAME=JSON_PATH:IMAGE_ROOT, e.g. mydata_val=ann/val.json:images"
    name, sep, rest = spec.partition("=")
    name = name.strip()
    if not sep or not name:
        raise ValueError(f"bad dataset spec {spec!r}: {usage}")
    cut = rest.find(".json:")
    if cut >= 0:
        json_path, image_root = rest[: cut + len(".json")], rest[cut + len(".json:") :]
    else:
        json_path, sep, image_root = rest.rpartition(":")
        if not sep:
            raise ValueError(f"bad dataset spec {spec!r}: missing ':IMAGE_ROOT'; {usage}")
    if not json_path or not image_root:
        raise ValueError(f"bad dataset spec {spec!r}: empty json path or image root; {usage}")
    return name, json_path, image_root


def register_from_spec(spec: str, *, overwrite: bool = False) -> str:
    """Registers a dataset from a ``name=json_path:image_root`` CLI flag.

    Args:
        spec: See :func:`parse_dataset_spec`.
        overwrite: See :func:`register_ov_dataset`.

    Returns:
        The registered dataset name.
    """
    name, json_path, image_root = parse_dataset_spec(spec)
    return register_ov_dataset(name, json_path, image_root, overwrite=overwrite)


def check_dataset(json_file: str | os.PathLike[str], image_root: str | os.PathLike[str] | None = None, *,
                  progress=None, max_listed: int = 20) -> dict:
    """Everything `ovd data check` verifies about a COCO dataset, beyond the json's own format
    (`load_coco_json`, which raises on the first malformed entry): every image file exists,
    decodes and has the json's size (EXIF orientation applied), every box lies inside its image
    (1 px tolerance), and which categories have no box or are declared novel.

    Args:
        json_file: the COCO json.
        image_root: its image folder (default: the json's folder).
        progress: optional ``progress(desc, total) -> advance(n)``.
        max_listed: problems listed per kind (the counts are complete).

    Returns:
        {"images", "boxes", "base", "novel", "errors": [str], "warnings": [str]}; errors make
        the dataset unusable as given, warnings are worth reading.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    json_file = Path(json_file)
    coco = load_coco_json(json_file)
    root = Path(image_root) if image_root else json_file.parent
    errors: dict[str, list[str]] = {}

    def problem(kind: str, text: str) -> None:
        errors.setdefault(kind, []).append(text)

    if not root.is_dir():
        problem("image folder", f"image folder {root} does not exist")
    sizes: dict[int, tuple[int, int]] = {}
    advance = progress("check images", len(coco["images"])) if progress and root.is_dir() else None
    for im in coco["images"] if root.is_dir() else []:
        path = root / im["file_name"]
        try:
            with Image.open(path) as f:
                f.load()
                w, h = ImageOps.exif_transpose(f).size
        except FileNotFoundError:
            problem("missing image", f"{path} (image id {im['id']}) does not exist")
        except (UnidentifiedImageError, OSError) as e:
            problem("unreadable image", f"{path} (image id {im['id']}) does not decode: {e}")
        else:
            sizes[im["id"]] = (w, h)
            if (w, h) != (im["width"], im["height"]):
                problem("size mismatch", f"{path}: stored {w}x{h} (EXIF orientation applied), the json "
                                         f"says {im['width']}x{im['height']}")
        if advance:
            advance(1)
    declared = {im["id"]: (im["width"], im["height"]) for im in coco["images"]}
    per_category = {c["id"]: 0 for c in coco["categories"]}
    for a in coco["annotations"]:
        per_category[a["category_id"]] += 1
        w, h = sizes.get(a["image_id"], declared[a["image_id"]])
        x, y, bw, bh = a["bbox"]
        if x < -1 or y < -1 or x + bw > w + 1 or y + bh > h + 1:
            problem("box outside image", f"annotation {a['id']}: box {a['bbox']} overruns image "
                                         f"{a['image_id']} ({w}x{h})")
    names = {c["id"]: c["name"] for c in coco["categories"]}
    base, novel = category_split(coco)
    warnings = [f"category {names[i]!r} (id {i}) has no box in this file" for i, n in per_category.items() if not n]
    if not novel:
        warnings.append("no category is declared novel (\"split\": \"novel\" here, or dataset.novel in the "
                        "pipeline config): fine for a training file, but novel AP and the gates need them")
    listed = []
    for kind, items in errors.items():
        listed += items[:max_listed] + ([f"... and {len(items) - max_listed} more ({kind})"]
                                        if len(items) > max_listed else [])
    return {"images": len(coco["images"]), "boxes": len(coco["annotations"]), "base": base, "novel": novel,
            "errors": listed, "error_counts": {k: len(v) for k, v in errors.items()}, "warnings": warnings}
