"""Tests for ovd.training.data.ov_splits: OV-COCO 48/17 and OV-LVIS f+c/r split builders."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import pytest

from ovd.training.data import ov_splits
from ovd.training.data.coco_format import DatasetFormatError, category_split, load_coco_json
from ovd.training.data.ov_splits import (
    OV_COCO_BASE,
    OV_COCO_NOVEL,
    OV_COCO_UNUSED,
    build_ov_coco,
    build_ov_lvis,
    build_split_cli,
)

# COCO 2017 (id, name) pairs as in instances_*2017.json: ids are sparse (1..90).
COCO_2017 = [
    (1, "person"), (2, "bicycle"), (3, "car"), (4, "motorcycle"), (5, "airplane"), (6, "bus"),
    (7, "train"), (8, "truck"), (9, "boat"), (10, "traffic light"), (11, "fire hydrant"),
    (13, "stop sign"), (14, "parking meter"), (15, "bench"), (16, "bird"), (17, "cat"),
    (18, "dog"), (19, "horse"), (20, "sheep"), (21, "cow"), (22, "elephant"), (23, "bear"),
    (24, "zebra"), (25, "giraffe"), (27, "backpack"), (28, "umbrella"), (31, "handbag"),
    (32, "tie"), (33, "suitcase"), (34, "frisbee"), (35, "skis"), (36, "snowboard"),
    (37, "sports ball"), (38, "kite"), (39, "baseball bat"), (40, "baseball glove"),
    (41, "skateboard"), (42, "surfboard"), (43, "tennis racket"), (44, "bottle"),
    (46, "wine glass"), (47, "cup"), (48, "fork"), (49, "knife"), (50, "spoon"), (51, "bowl"),
    (52, "banana"), (53, "apple"), (54, "sandwich"), (55, "orange"), (56, "broccoli"),
    (57, "carrot"), (58, "hot dog"), (59, "pizza"), (60, "donut"), (61, "cake"), (62, "chair"),
    (63, "couch"), (64, "potted plant"), (65, "bed"), (67, "dining table"), (70, "toilet"),
    (72, "tv"), (73, "laptop"), (74, "mouse"), (75, "remote"), (76, "keyboard"),
    (77, "cell phone"), (78, "microwave"), (79, "oven"), (80, "toaster"), (81, "sink"),
    (82, "refrigerator"), (84, "book"), (85, "clock"), (86, "vase"), (87, "scissors"),
    (88, "teddy bear"), (89, "hair drier"), (90, "toothbrush"),
]  # fmt: skip
COCO_ID = {name: cid for cid, name in COCO_2017}


def _ann(ann_id: int, image_id: int, name: str, bbox=(1.0, 2.0, 10.0, 8.0), **extra) -> dict:
    ann = {"id": ann_id, "image_id": image_id, "category_id": COCO_ID[name], "bbox": list(bbox),
           "area": bbox[2] * bbox[3], "iscrowd": 0, "segmentation": []}  # fmt: skip
    ann.update(extra)
    return ann


def make_coco_instances() -> dict:
    """A miniature instances_*2017.json with all 80 COCO classes and a few annotations.

    Image 1: person (base) + cat (novel) + a crowd of persons.
    Image 2: only a dog (novel): must survive in the train split with no annotations.
    Image 3: only a hot dog (unused class).
    Image 4: a tv (base) and a person box of zero height (as in train2017, dropped).
    """
    images = [
        {"id": i, "file_name": f"{i:012d}.jpg", "height": 480, "width": 640} for i in (1, 2, 3, 4)
    ]
    annotations = [
        _ann(101, 1, "person"),
        _ann(102, 1, "cat"),
        _ann(
            103, 1, "person", iscrowd=1, segmentation={"counts": [0, 480 * 640], "size": [480, 640]}
        ),
        _ann(104, 2, "dog"),
        _ann(105, 3, "hot dog"),
        _ann(106, 4, "tv"),
        _ann(107, 4, "person", bbox=(296.65, 388.33, 1.03, 0.0)),
    ]
    categories = [{"id": cid, "name": name, "supercategory": "x"} for cid, name in COCO_2017]
    return {
        "info": {"year": 2017},
        "licenses": [{"id": 1, "name": "CC"}],
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }


def write_json(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj))
    return path


@pytest.fixture
def coco_instances(tmp_path: Path) -> Path:
    return write_json(tmp_path / "instances_val2017.json", make_coco_instances())


def read(path: Path) -> dict:
    return json.loads(path.read_text())


def names_of(out: dict, anns: list[dict]) -> list[str]:
    by_id = {c["id"]: c["name"] for c in out["categories"]}
    return [by_id[a["category_id"]] for a in anns]


# ---------------------------------------------------------------- OV-COCO constants


def test_ov_coco_constants() -> None:
    assert len(OV_COCO_BASE) == 48
    assert len(OV_COCO_NOVEL) == 17
    assert len(OV_COCO_UNUSED) == 15
    all_names = OV_COCO_BASE + OV_COCO_NOVEL + OV_COCO_UNUSED
    assert len(set(all_names)) == 80
    assert set(all_names) == {name for _, name in COCO_2017}


# ---------------------------------------------------------------- OV-COCO builder


def test_ov_coco_train(coco_instances: Path, tmp_path: Path) -> None:
    path = build_ov_coco(coco_instances, tmp_path / "out", split="train")
    assert path == tmp_path / "out" / "ov_coco_train.json"
    out = read(path)

    assert len(out["categories"]) == 65
    assert [c["id"] for c in out["categories"]] == sorted(c["id"] for c in out["categories"])
    split_of = {c["name"]: c["split"] for c in out["categories"]}
    assert {n for n, s in split_of.items() if s == "base"} == set(OV_COCO_BASE)
    assert {n for n, s in split_of.items() if s == "novel"} == set(OV_COCO_NOVEL)
    assert not set(split_of) & set(OV_COCO_UNUSED)
    # Original COCO ids are kept.
    assert all(c["id"] == COCO_ID[c["name"]] for c in out["categories"])

    # Only base annotations; crowd kept; zero-height box dropped.
    assert sorted(a["id"] for a in out["annotations"]) == [101, 103, 106]
    assert set(names_of(out, out["annotations"])) == {"person", "tv"}
    crowd = next(a for a in out["annotations"] if a["id"] == 103)
    assert crowd["iscrowd"] == 1

    # Every image is kept, including the novel-only and unused-only ones.
    assert [img["id"] for img in out["images"]] == [1, 2, 3, 4]
    assert out["info"] == {"year": 2017}
    assert out["licenses"] == [{"id": 1, "name": "CC"}]


def test_ov_coco_val(coco_instances: Path, tmp_path: Path) -> None:
    out = read(build_ov_coco(coco_instances, tmp_path, split="val"))
    assert len(out["categories"]) == 65
    assert sorted(a["id"] for a in out["annotations"]) == [101, 102, 103, 104, 106]
    assert "hot dog" not in names_of(out, out["annotations"])
    assert [img["id"] for img in out["images"]] == [1, 2, 3, 4]


@pytest.mark.parametrize("split", ["train", "val"])
def test_ov_coco_output_is_valid_and_split_ordered_by_id(
    coco_instances: Path, tmp_path: Path, split: str
) -> None:
    out = load_coco_json(build_ov_coco(coco_instances, tmp_path, split=split))
    base, novel = category_split(out)
    assert base == sorted(OV_COCO_BASE, key=COCO_ID.__getitem__)
    assert novel == sorted(OV_COCO_NOVEL, key=COCO_ID.__getitem__)


def test_ov_coco_missing_categories_named(tmp_path: Path) -> None:
    coco = make_coco_instances()
    coco["categories"] = [c for c in coco["categories"] if c["name"] not in ("couch", "tv")]
    coco["annotations"] = [a for a in coco["annotations"] if a["category_id"] != COCO_ID["tv"]]
    src = write_json(tmp_path / "old_names.json", coco)
    with pytest.raises(
        DatasetFormatError, match=r"missing 2 OV-COCO categories \['tv', 'couch'\]"
    ) as exc:
        build_ov_coco(src, tmp_path / "out", split="train")
    assert str(src) in str(exc.value)
    assert not (tmp_path / "out").exists()


def test_ov_coco_missing_single_category(tmp_path: Path) -> None:
    coco = make_coco_instances()
    for cat in coco["categories"]:
        if cat["name"] == "tv":
            cat["name"] = "tvmonitor"
    src = write_json(tmp_path / "renamed.json", coco)
    with pytest.raises(DatasetFormatError, match=r"missing 1 OV-COCO category \['tv'\]"):
        build_ov_coco(src, tmp_path, split="val")


def test_ov_coco_invalid_input_raises(tmp_path: Path) -> None:
    coco = make_coco_instances()
    coco["annotations"][0]["image_id"] = 999
    src = write_json(tmp_path / "bad.json", coco)
    with pytest.raises(DatasetFormatError, match="unknown image_id 999"):
        build_ov_coco(src, tmp_path, split="train")


def test_ov_coco_bad_split(coco_instances: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"split must be one of \['train', 'val'\]"):
        build_ov_coco(coco_instances, tmp_path, split="test")  # type: ignore[arg-type]


# ---------------------------------------------------------------- atomic writes


def _leftovers(directory: Path) -> list[str]:
    return [p.name for p in directory.iterdir() if p.name.endswith(".tmp")]


def test_atomic_write_leaves_no_tmp(coco_instances: Path, tmp_path: Path) -> None:
    out_dir = tmp_path / "out"
    build_ov_coco(coco_instances, out_dir, split="train")
    build_ov_coco(coco_instances, out_dir, split="train")  # overwrite in place
    assert sorted(p.name for p in out_dir.iterdir()) == ["ov_coco_train.json"]


def test_atomic_write_failure_keeps_old_file(
    coco_instances: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out_dir = tmp_path / "out"
    path = build_ov_coco(coco_instances, out_dir, split="val")
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ov_splits.json, "dump", boom)
    with pytest.raises(OSError, match="disk full"):
        build_ov_coco(coco_instances, out_dir, split="val")
    assert path.read_bytes() == before
    assert _leftovers(out_dir) == []


# ---------------------------------------------------------------- OV-LVIS builder


def make_lvis() -> dict:
    """A miniature lvis_v1 json: 4 categories (2 f, 1 c, 1 r), images from both COCO splits."""
    categories = [
        {"id": 1, "name": "aerosol_can", "frequency": "c", "synonyms": ["aerosol_can"],
         "image_count": 8, "instance_count": 9},
        {"id": 2, "name": "air_conditioner", "frequency": "f", "synonyms": ["air_conditioner"],
         "image_count": 20, "instance_count": 30},
        {"id": 3, "name": "airplane", "frequency": "f", "synonyms": ["airplane", "aeroplane"],
         "image_count": 40, "instance_count": 50},
        {"id": 4, "name": "alarm_clock", "frequency": "r", "synonyms": ["alarm_clock"],
         "image_count": 2, "instance_count": 2},
    ]  # fmt: skip
    images = [
        {"id": 9, "coco_url": "http://images.cocodataset.org/train2017/000000000009.jpg",
         "height": 480, "width": 640, "neg_category_ids": [4], "not_exhaustive_category_ids": [2]},
        {"id": 139, "coco_url": "http://images.cocodataset.org/val2017/000000000139.jpg",
         "height": 426, "width": 640, "neg_category_ids": [], "not_exhaustive_category_ids": []},
    ]  # fmt: skip
    # LVIS annotations carry no iscrowd.
    annotations = [
        {"id": 1, "image_id": 9, "category_id": 1, "bbox": [1, 1, 5, 5], "area": 25.0},
        {"id": 2, "image_id": 9, "category_id": 2, "bbox": [2, 2, 5, 5], "area": 25.0},
        {"id": 3, "image_id": 139, "category_id": 3, "bbox": [3, 3, 5, 5], "area": 25.0},
        {"id": 4, "image_id": 139, "category_id": 4, "bbox": [4, 4, 6, 5]},
    ]
    return {"info": {"v": 1}, "images": images, "annotations": annotations,
            "categories": categories}  # fmt: skip


@pytest.fixture
def lvis_file(tmp_path: Path) -> Path:
    return write_json(tmp_path / "lvis_v1_val.json", make_lvis())


def test_ov_lvis_train(lvis_file: Path, tmp_path: Path) -> None:
    path = build_ov_lvis(lvis_file, tmp_path / "out", split="train")
    assert path.name == "ov_lvis_train.json"
    out = read(path)
    assert [(c["id"], c["split"]) for c in out["categories"]] == [
        (1, "base"), (2, "base"), (3, "base"), (4, "novel"),
    ]  # fmt: skip
    assert out["categories"][2]["synonyms"] == ["airplane", "aeroplane"]
    assert [a["id"] for a in out["annotations"]] == [1, 2, 3]
    assert all(a["iscrowd"] == 0 for a in out["annotations"])
    assert [img["id"] for img in out["images"]] == [9, 139]
    assert out["info"] == {"v": 1}


def test_ov_lvis_val(lvis_file: Path, tmp_path: Path) -> None:
    out = read(build_ov_lvis(lvis_file, tmp_path, split="val"))
    assert [a["id"] for a in out["annotations"]] == [1, 2, 3, 4]
    rare = out["annotations"][3]
    assert rare["iscrowd"] == 0
    assert rare["area"] == 30.0  # filled from the box (w * h) where LVIS omits it
    assert category_split(out) == (["aerosol_can", "air_conditioner", "airplane"], ["alarm_clock"])


def test_ov_lvis_images_keep_lvis_keys_and_get_file_name(lvis_file: Path, tmp_path: Path) -> None:
    out = read(build_ov_lvis(lvis_file, tmp_path, split="val"))
    img9, img139 = out["images"]
    assert img9["file_name"] == "train2017/000000000009.jpg"
    assert img139["file_name"] == "val2017/000000000139.jpg"
    assert img9["neg_category_ids"] == [4]
    assert img9["not_exhaustive_category_ids"] == [2]
    assert img139["coco_url"].endswith("val2017/000000000139.jpg")
    load_coco_json(tmp_path / "ov_lvis_val.json")  # a fully valid, registrable COCO file


def test_ov_lvis_missing_frequency(tmp_path: Path) -> None:
    lvis = make_lvis()
    del lvis["categories"][3]["frequency"]
    src = write_json(tmp_path / "lvis.json", lvis)
    with pytest.raises(
        DatasetFormatError, match=r"categories\[3\] \(id=4, 'alarm_clock'\) has no 'frequency'"
    ) as exc:
        build_ov_lvis(src, tmp_path / "out", split="train")
    assert str(src) in str(exc.value)


def test_ov_lvis_bad_frequency(tmp_path: Path) -> None:
    lvis = make_lvis()
    lvis["categories"][0]["frequency"] = "rare"
    src = write_json(tmp_path / "lvis.json", lvis)
    with pytest.raises(DatasetFormatError, match=r"has frequency 'rare'.*\['f', 'c', 'r'\]"):
        build_ov_lvis(src, tmp_path, split="val")


def test_ov_lvis_image_without_file_name_or_url(tmp_path: Path) -> None:
    lvis = make_lvis()
    del lvis["images"][1]["coco_url"]
    src = write_json(tmp_path / "lvis.json", lvis)
    with pytest.raises(DatasetFormatError, match=r"images\[1\] \(id=139\): needs 'file_name'"):
        build_ov_lvis(src, tmp_path, split="val")


# ---------------------------------------------------------------- CLI entry point


def test_build_split_cli(coco_instances: Path, lvis_file: Path, tmp_path: Path) -> None:
    coco_out = build_split_cli("ov-coco", coco_instances, tmp_path / "c", "val")
    assert coco_out == tmp_path / "c" / "ov_coco_val.json"
    assert len(read(coco_out)["categories"]) == 65
    lvis_out = build_split_cli("ov-lvis", str(lvis_file), str(tmp_path / "l"), "train")
    assert lvis_out == tmp_path / "l" / "ov_lvis_train.json"
    assert _leftovers(tmp_path / "c") == [] and _leftovers(tmp_path / "l") == []


def test_build_split_cli_rejects_unknown(coco_instances: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown split kind 'ov-voc'"):
        build_split_cli("ov-voc", coco_instances, tmp_path, "train")
    with pytest.raises(ValueError, match="split must be one of"):
        build_split_cli("ov-coco", coco_instances, tmp_path, "minival")


# ---------------------------------------------------------------- built split -> Detectron2


def test_registered_ov_coco_train(coco_instances: Path, tmp_path: Path) -> None:
    d2_data = pytest.importorskip("detectron2.data")
    from ovd.training.data.coco_format import register_ov_dataset

    path = build_ov_coco(coco_instances, tmp_path, split="train")
    name = f"test_ov_coco_{uuid.uuid4().hex[:8]}"
    try:
        register_ov_dataset(name, path, tmp_path)
        meta = d2_data.MetadataCatalog.get(name)
        assert len(meta.thing_classes) == 65
        assert len(meta.base_contiguous_ids) == 48
        assert len(meta.novel_contiguous_ids) == 17
        assert sorted(meta.base_contiguous_ids + meta.novel_contiguous_ids) == list(range(65))
        assert meta.thing_dataset_id_to_contiguous_id[90] == 64  # toothbrush, the last id
        novel_ids = set(meta.novel_contiguous_ids)
        dicts = d2_data.DatasetCatalog.get(name)
        assert len(dicts) == 4
        labels = [a["category_id"] for d in dicts for a in d["annotations"]]
        assert labels and not novel_ids & set(labels)
        assert dicts[0]["file_name"] == os.path.join(os.path.abspath(tmp_path), "000000000001.jpg")
    finally:
        if name in d2_data.DatasetCatalog.list():
            d2_data.DatasetCatalog.remove(name)
        if name in d2_data.MetadataCatalog.list():
            d2_data.MetadataCatalog.remove(name)
