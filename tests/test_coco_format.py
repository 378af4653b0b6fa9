"""Tests for ovd.training.data.coco_format: validation, base/novel split and registration."""

from __future__ import annotations

import copy
import json
import math
import os
import uuid
from pathlib import Path

import pytest

from ovd.training.data.coco_format import (
    DatasetFormatError,
    category_split,
    load_coco_json,
    parse_dataset_spec,
    register_from_spec,
    register_ov_dataset,
)


def make_coco() -> dict:
    """Three real COCO classes with their COCO 2017 ids; categories deliberately out of id order."""
    return {
        "info": {"description": "tiny"},
        "images": [
            {"id": 10, "file_name": "a.jpg", "height": 48, "width": 64},
            {"id": 11, "file_name": "b.jpg", "height": 48, "width": 64},
        ],
        "annotations": [
            {"id": 1, "image_id": 10, "category_id": 1, "bbox": [1, 2, 10, 20], "area": 200,
             "iscrowd": 0},
            {"id": 2, "image_id": 10, "category_id": 5, "bbox": [5.5, 6.0, 8.0, 4.0], "area": 32,
             "iscrowd": 0},
            {"id": 3, "image_id": 11, "category_id": 2, "bbox": [0, 0, 30, 30], "area": 900,
             "iscrowd": 0},
        ],
        "categories": [
            {"id": 5, "name": "airplane", "supercategory": "vehicle", "split": "novel"},
            {"id": 1, "name": "person", "supercategory": "person", "split": "base"},
            {"id": 2, "name": "bicycle", "supercategory": "vehicle", "split": "base"},
        ],
    }  # fmt: skip


def write_json(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj))
    return path


@pytest.fixture
def coco_file(tmp_path: Path) -> Path:
    return write_json(tmp_path / "tiny.json", make_coco())


# ---------------------------------------------------------------- validation


def test_valid_file_loads(coco_file: Path) -> None:
    coco = load_coco_json(coco_file)
    assert len(coco["images"]) == 2
    assert len(coco["annotations"]) == 3


def test_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.json"
    with pytest.raises(DatasetFormatError, match="does not exist") as exc:
        load_coco_json(missing)
    assert str(missing) in str(exc.value)


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(DatasetFormatError, match="is a directory"):
        load_coco_json(tmp_path)


def test_error_is_a_value_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        load_coco_json(tmp_path / "nope.json")


def test_invalid_json_reports_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text('{\n  "images": [],\n  "annotations": [,]\n}')
    with pytest.raises(DatasetFormatError, match=r"invalid JSON at line 3, column 19") as exc:
        load_coco_json(path)
    assert str(path) in str(exc.value)


def test_top_level_not_object(tmp_path: Path) -> None:
    path = write_json(tmp_path / "list.json", [1, 2])
    with pytest.raises(DatasetFormatError, match="top level must be a JSON object"):
        load_coco_json(path)


@pytest.mark.parametrize("key", ["images", "annotations", "categories"])
def test_missing_top_level_key(tmp_path: Path, key: str) -> None:
    coco = make_coco()
    del coco[key]
    path = write_json(tmp_path / "x.json", coco)
    with pytest.raises(DatasetFormatError, match=rf"missing top-level key\(s\) \['{key}'\]") as exc:
        load_coco_json(path)
    assert str(path) in str(exc.value)


def test_empty_categories(tmp_path: Path) -> None:
    coco = make_coco()
    coco["categories"] = []
    coco["annotations"] = []
    with pytest.raises(DatasetFormatError, match="'categories' is empty"):
        load_coco_json(write_json(tmp_path / "x.json", coco))


def _mutated(mutate) -> dict:
    coco = make_coco()
    mutate(coco)
    return coco


# (mutation, expected message fragment); each message must also name the offending entry.
INVALID_CASES = {
    "duplicate_image_id": (
        lambda c: c["images"][1].update(id=10),
        r"images\[1\] \(id=10\): duplicate image id 10",
    ),
    "duplicate_category_id": (
        lambda c: c["categories"][2].update(id=1),
        r"categories\[2\] \(id=1\): duplicate category id 1",
    ),
    "duplicate_category_name": (
        lambda c: c["categories"][2].update(name="person"),
        r"categories\[2\] \(id=2\): duplicate category name 'person'",
    ),
    "duplicate_annotation_id": (
        lambda c: c["annotations"][2].update(id=1),
        r"annotations\[2\] \(id=1\): duplicate annotation id 1",
    ),
    "unknown_image": (
        lambda c: c["annotations"][1].update(image_id=99),
        r"annotations\[1\] \(id=2\): references unknown image_id 99",
    ),
    "unknown_category": (
        lambda c: c["annotations"][0].update(category_id=7),
        r"annotations\[0\] \(id=1\): references unknown category_id 7",
    ),
    "bbox_three_numbers": (
        lambda c: c["annotations"][0].update(bbox=[1, 2, 3]),
        r"annotations\[0\] \(id=1\): bbox must be a list of 4 numbers",
    ),
    "bbox_missing": (
        lambda c: c["annotations"][0].pop("bbox"),
        r"annotations\[0\] \(id=1\): bbox must be a list of 4 numbers \[x, y, w, h\], got None",
    ),
    "bbox_string_value": (
        lambda c: c["annotations"][1].update(bbox=[1, "2", 3, 4]),
        r"annotations\[1\] \(id=2\): bbox must contain 4 finite numbers",
    ),
    "bbox_bool_value": (
        lambda c: c["annotations"][1].update(bbox=[1, 2, True, 4]),
        r"annotations\[1\] \(id=2\): bbox must contain 4 finite numbers",
    ),
    "bbox_nan": (
        lambda c: c["annotations"][1].update(bbox=[1, 2, math.nan, 4]),
        r"annotations\[1\] \(id=2\): bbox must contain 4 finite numbers",
    ),
    "bbox_inf": (
        lambda c: c["annotations"][1].update(bbox=[math.inf, 2, 3, 4]),
        r"annotations\[1\] \(id=2\): bbox must contain 4 finite numbers",
    ),
    "bbox_zero_width": (
        lambda c: c["annotations"][2].update(bbox=[0, 0, 0, 30]),
        r"annotations\[2\] \(id=3\): bbox width and height must be > 0, got \[0, 0, 0, 30\]",
    ),
    "bbox_negative_height": (
        lambda c: c["annotations"][2].update(bbox=[0, 0, 5, -1]),
        r"annotations\[2\] \(id=3\): bbox width and height must be > 0",
    ),
    "unknown_split": (
        lambda c: c["categories"][0].update(split="seen"),
        r"categories\[0\] \(id=5\) \('airplane'\): unknown split 'seen', expected one of "
        r"\['base', 'novel'\]",
    ),
    "category_id_not_int": (
        lambda c: c["categories"][1].update(id="1"),
        r"categories\[1\] \(id='1'\): 'id' must be an integer",
    ),
    "category_without_name": (
        lambda c: c["categories"][1].pop("name"),
        r"categories\[1\] \(id=1\): 'name' must be a non-empty string",
    ),
    "image_without_file_name": (
        lambda c: c["images"][0].pop("file_name"),
        r"images\[0\] \(id=10\): 'file_name' must be a non-empty string",
    ),
    "image_zero_height": (
        lambda c: c["images"][1].update(height=0),
        r"images\[1\] \(id=11\): 'height' must be a positive integer",
    ),
    "annotation_without_id": (
        lambda c: c["annotations"][0].pop("id"),
        r"annotations\[0\]: 'id' must be an integer",
    ),
    "bad_iscrowd": (
        lambda c: c["annotations"][0].update(iscrowd=2),
        r"annotations\[0\] \(id=1\): 'iscrowd' must be 0 or 1",
    ),
    "ignore_flag": (
        lambda c: c["annotations"][0].update(ignore=1),
        r"annotations\[0\] \(id=1\): a non-zero 'ignore' flag is not supported",
    ),
    "images_not_a_list": (
        lambda c: c.update(images={}),
        r"top-level 'images' must be a list",
    ),
}


@pytest.mark.parametrize("case", sorted(INVALID_CASES))
def test_invalid_entries(tmp_path: Path, case: str) -> None:
    mutate, pattern = INVALID_CASES[case]
    path = write_json(tmp_path / f"{case}.json", _mutated(mutate))
    with pytest.raises(DatasetFormatError, match=pattern) as exc:
        load_coco_json(path)
    assert str(exc.value).startswith(f"{path}: ")


def test_first_offending_entry_is_reported(tmp_path: Path) -> None:
    coco = make_coco()
    coco["annotations"][1]["bbox"] = [0, 0, 0, 1]
    coco["annotations"][2]["bbox"] = [0, 0, 1, 0]
    with pytest.raises(DatasetFormatError, match=r"annotations\[1\] \(id=2\)"):
        load_coco_json(write_json(tmp_path / "x.json", coco))


def test_drop_degenerate_boxes(tmp_path: Path) -> None:
    coco = make_coco()
    coco["annotations"][0]["bbox"] = [296.65, 388.33, 1.03, 0.0]  # as in COCO train2017 id 918
    path = write_json(tmp_path / "x.json", coco)
    with pytest.raises(DatasetFormatError, match="width and height must be > 0"):
        load_coco_json(path)
    loaded = load_coco_json(path, drop_degenerate_boxes=True)
    assert [a["id"] for a in loaded["annotations"]] == [2, 3]


def test_drop_degenerate_boxes_still_rejects_malformed(tmp_path: Path) -> None:
    coco = make_coco()
    coco["annotations"][0]["bbox"] = [1, 2, math.nan, 0]
    path = write_json(tmp_path / "x.json", coco)
    with pytest.raises(DatasetFormatError, match="4 finite numbers"):
        load_coco_json(path, drop_degenerate_boxes=True)


def test_file_name_optional_when_not_required(tmp_path: Path) -> None:
    coco = make_coco()
    for img in coco["images"]:
        del img["file_name"]
    path = write_json(tmp_path / "x.json", coco)
    assert len(load_coco_json(path, require_file_name=False)["images"]) == 2


# ---------------------------------------------------------------- base / novel


def test_category_split_orders_by_id() -> None:
    base, novel = category_split(make_coco())
    assert base == ["person", "bicycle"]
    assert novel == ["airplane"]


def test_category_split_missing_key_means_base() -> None:
    coco = make_coco()
    for cat in coco["categories"]:
        cat.pop("split")
    assert category_split(coco) == (["person", "bicycle", "airplane"], [])


# ---------------------------------------------------------------- spec parsing


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("val=ann/val.json:images", ("val", "ann/val.json", "images")),
        ("v=/abs/a.json:/abs/img", ("v", "/abs/a.json", "/abs/img")),
        ("v=a.json:C:/imgs", ("v", "a.json", "C:/imgs")),
        ("v=dir:x/ann:imgs", ("v", "dir:x/ann", "imgs")),
        (" v =a.json:i", ("v", "a.json", "i")),
    ],
)
def test_parse_dataset_spec(spec: str, expected: tuple[str, str, str]) -> None:
    assert parse_dataset_spec(spec) == expected


@pytest.mark.parametrize("spec", ["a.json:imgs", "=a.json:imgs", "v=a.json", "v=a.json:", "v=:i"])
def test_parse_dataset_spec_rejects(spec: str) -> None:
    with pytest.raises(ValueError, match="NAME=JSON_PATH:IMAGE_ROOT"):
        parse_dataset_spec(spec)


# ---------------------------------------------------------------- registration


@pytest.fixture
def d2_name():
    """A fresh dataset name, removed from both catalogs afterwards."""
    d2_data = pytest.importorskip("detectron2.data")
    name = f"test_ov_{uuid.uuid4().hex[:8]}"
    yield name
    if name in d2_data.DatasetCatalog.list():
        d2_data.DatasetCatalog.remove(name)
    if name in d2_data.MetadataCatalog.list():
        d2_data.MetadataCatalog.remove(name)


def test_register_metadata(coco_file: Path, tmp_path: Path, d2_name: str) -> None:
    from detectron2.data import MetadataCatalog

    assert register_ov_dataset(d2_name, coco_file, tmp_path) == d2_name
    meta = MetadataCatalog.get(d2_name)
    assert meta.json_file == os.path.abspath(coco_file)
    assert meta.image_root == os.path.abspath(tmp_path)
    assert meta.evaluator_type == "coco"
    assert meta.thing_classes == ["person", "bicycle", "airplane"]
    assert meta.thing_dataset_id_to_contiguous_id == {1: 0, 2: 1, 5: 2}
    assert meta.base_classes == ["person", "bicycle"]
    assert meta.novel_classes == ["airplane"]
    assert meta.base_contiguous_ids == [0, 1]
    assert meta.novel_contiguous_ids == [2]


def test_register_dataset_dicts(coco_file: Path, tmp_path: Path, d2_name: str) -> None:
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.structures import BoxMode

    register_ov_dataset(d2_name, coco_file, tmp_path)
    dicts = DatasetCatalog.get(d2_name)
    assert [d["image_id"] for d in dicts] == [10, 11]
    first = dicts[0]
    assert first["file_name"] == os.path.join(os.path.abspath(tmp_path), "a.jpg")
    assert (first["height"], first["width"]) == (48, 64)
    boxes = {a["category_id"]: a["bbox"] for a in first["annotations"]}
    # Dataset ids 1 and 5 become contiguous ids 0 and 2.
    assert boxes == {0: [1, 2, 10, 20], 2: [5.5, 6.0, 8.0, 4.0]}
    assert all(a["bbox_mode"] == BoxMode.XYWH_ABS for a in first["annotations"])
    assert dicts[1]["annotations"][0]["category_id"] == 1
    # Detectron2's loader re-derives the class list; it must agree with what was registered.
    assert MetadataCatalog.get(d2_name).thing_classes == ["person", "bicycle", "airplane"]


def test_register_plain_dataset_is_all_base(tmp_path: Path, d2_name: str) -> None:
    from detectron2.data import MetadataCatalog

    coco = make_coco()
    for cat in coco["categories"]:
        cat.pop("split")
    register_ov_dataset(d2_name, write_json(tmp_path / "plain.json", coco), tmp_path)
    meta = MetadataCatalog.get(d2_name)
    assert meta.base_contiguous_ids == [0, 1, 2]
    assert meta.novel_contiguous_ids == []
    assert meta.novel_classes == []


def test_register_validates_eagerly(tmp_path: Path, d2_name: str) -> None:
    from detectron2.data import DatasetCatalog

    coco = make_coco()
    coco["annotations"][0]["category_id"] = 42
    bad = write_json(tmp_path / "bad.json", coco)
    with pytest.raises(DatasetFormatError, match="unknown category_id 42"):
        register_ov_dataset(d2_name, bad, tmp_path)
    assert d2_name not in DatasetCatalog.list()


def test_reregister_same_files_is_noop(
    coco_file: Path, tmp_path: Path, d2_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from detectron2.data import DatasetCatalog

    register_ov_dataset(d2_name, coco_file, tmp_path)
    loader = DatasetCatalog[d2_name]
    # Relative spelling of the same paths counts as the same files.
    monkeypatch.chdir(tmp_path)
    register_ov_dataset(d2_name, coco_file.name, ".")
    assert DatasetCatalog[d2_name] is loader


def test_reregister_other_files_raises(coco_file: Path, tmp_path: Path, d2_name: str) -> None:
    from detectron2.data import MetadataCatalog

    register_ov_dataset(d2_name, coco_file, tmp_path)
    other = write_json(tmp_path / "other.json", make_coco())
    with pytest.raises(ValueError, match="already registered.*overwrite=True"):
        register_ov_dataset(d2_name, other, tmp_path)
    with pytest.raises(ValueError, match="already registered"):
        register_ov_dataset(d2_name, coco_file, tmp_path / "elsewhere")
    assert MetadataCatalog.get(d2_name).json_file == os.path.abspath(coco_file)


def test_overwrite_replaces_registration(coco_file: Path, tmp_path: Path, d2_name: str) -> None:
    from detectron2.data import DatasetCatalog, MetadataCatalog

    register_ov_dataset(d2_name, coco_file, tmp_path)
    coco = copy.deepcopy(make_coco())
    coco["categories"].append({"id": 17, "name": "cat", "split": "novel"})
    other = write_json(tmp_path / "other.json", coco)
    register_ov_dataset(d2_name, other, tmp_path, overwrite=True)
    meta = MetadataCatalog.get(d2_name)
    assert meta.json_file == os.path.abspath(other)
    assert meta.thing_classes == ["person", "bicycle", "airplane", "cat"]
    assert meta.novel_contiguous_ids == [2, 3]
    assert len(DatasetCatalog.get(d2_name)) == 2


def test_register_over_foreign_registration_raises(
    coco_file: Path, tmp_path: Path, d2_name: str
) -> None:
    from detectron2.data import DatasetCatalog

    DatasetCatalog.register(d2_name, lambda: [])
    with pytest.raises(ValueError, match="already registered"):
        register_ov_dataset(d2_name, coco_file, tmp_path)
    register_ov_dataset(d2_name, coco_file, tmp_path, overwrite=True)
    assert len(DatasetCatalog.get(d2_name)) == 2


def test_register_from_spec(coco_file: Path, tmp_path: Path, d2_name: str) -> None:
    from detectron2.data import DatasetCatalog, MetadataCatalog

    assert register_from_spec(f"{d2_name}={coco_file}:{tmp_path}") == d2_name
    assert MetadataCatalog.get(d2_name).novel_classes == ["airplane"]
    assert len(DatasetCatalog.get(d2_name)) == 2
