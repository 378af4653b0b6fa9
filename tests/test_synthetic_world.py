"""Tests for the synthetic world: determinism, COCO validity, boxes, captions, registration,
preview and the loader's errors (ovd.training.data.synthetic / shapes / preview)."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ovd.training.data import synthetic
from ovd.training.data.coco_format import load_coco_json, register_ov_dataset
from ovd.training.data.shapes import (
    CATEGORIES,
    COLOURS,
    DISTRACTOR_SHAPES,
    HELD_OUT_COLOURS,
    HELD_OUT_SHAPES,
    SHAPES,
    TIERS,
)
from ovd.training.data.synthetic import (
    WORLD_FORMAT,
    WorldConfig,
    detection_sample,
    load_world,
    world_datasets,
)

TINY = {"num_train": 4, "num_val": 3, "num_test": 2, "num_captions": 40, "num_caption_eval": 16}

BASE_IDS = {c.id for c in CATEGORIES if c.split == "base"}
NOVEL_IDS = {c.id for c in CATEGORIES if c.split == "novel"}
NAMES = {c.id: c.name for c in CATEGORIES}


@pytest.fixture(scope="module")
def world(make_world) -> Path:
    return make_world(workers=1)


@pytest.fixture(scope="module")
def cfg(world) -> WorldConfig:
    return WorldConfig.from_dict(load_world(world)["config"])


def _annotations(world: Path, name: str) -> dict:
    return load_coco_json(world / "detection" / "annotations" / f"{name}.json")


def _image_bytes(world: Path) -> dict[str, bytes]:
    return {str(p.relative_to(world)): p.read_bytes()
            for p in sorted((world / "detection").rglob("*.png"))}


# ---------------------------------------------------------------- determinism

def test_same_config_same_world_regardless_of_workers(world, make_world):
    other = make_world(workers=2)
    assert other != world
    a, b = load_world(world), load_world(other)
    assert a["fingerprint"] == b["fingerprint"]
    assert a["files"] == b["files"]
    images = _image_bytes(world)
    assert len(images) == TINY["num_train"] + TINY["num_val"] + TINY["num_test"]
    assert images == _image_bytes(other)
    for name in ("pretrain", "eval"):
        assert np.array_equal(np.load(world / "captions" / f"{name}.npy"),
                              np.load(other / "captions" / f"{name}.npy"))


def test_other_seed_other_world(world, make_world):
    other = make_world(workers=1, seed=1)
    assert load_world(other)["fingerprint"] != load_world(world)["fingerprint"]
    assert _image_bytes(other) != _image_bytes(world)


def test_world_json_records_config_and_file_hashes(world, cfg):
    w = load_world(world)
    assert w["format"] == WORLD_FORMAT
    assert (cfg.num_train, cfg.num_val, cfg.num_test, cfg.num_captions, cfg.num_caption_eval) == tuple(
        TINY.values())
    assert cfg.seed == 0
    assert set(w["files"]) == {
        "detection/annotations/train_all.json", "detection/annotations/train_base.json",
        "detection/annotations/val.json", "detection/annotations/test.json",
        "captions/pretrain.npy", "captions/pretrain.jsonl", "captions/eval.npy",
        "captions/eval.jsonl", "detection/train/*.png", "detection/val/*.png", "detection/test/*.png"}
    assert all(synthetic._sha256_file(world / f) == h for f, h in w["files"].items() if "*" not in f)


def test_fingerprint_covers_the_images(make_world, tmp_path):
    """The recorded digest of an image folder matches it, and changes with any one PNG."""
    import shutil

    src = make_world()
    recorded = load_world(src)["files"]["detection/val/*.png"]
    assert synthetic.folder_digest(src / "detection" / "val") == recorded
    copy = tmp_path / "val"
    shutil.copytree(src / "detection" / "val", copy)
    png = copy / "000000.png"
    png.write_bytes(png.read_bytes() + b"x")
    assert synthetic.folder_digest(copy) != recorded


# ---------------------------------------------------------------- COCO annotations

def test_categories_and_split_tags(world):
    cats = load_world(world)["categories"]
    assert len(cats) >= 12
    assert [c["id"] for c in cats] == [c.id for c in CATEGORIES]
    assert {c["split"] for c in cats} == {"base", "novel"}
    novel = [c for c in cats if c["split"] == "novel"]
    assert len(novel) / len(cats) >= 0.25
    assert {c["id"] for c in novel} == NOVEL_IDS
    assert len({c["name"] for c in cats}) == len(cats)
    for c in cats:
        assert c["name"] == NAMES[c["id"]] == f"{c['colour']} {c['shape']}"
        assert c["tier"] in TIERS and (c["tier"] == "base") == (c["split"] == "base")


def test_tiers_hold_out_attributes():
    """The tier table's promise: held-out colours and shapes are on no base category; N-comp
    pairs seen attributes anew, N-shape puts a seen colour on a held-out shape, N-both holds
    out both; every tier has at least 3 classes."""
    by_tier = {t: [c for c in CATEGORIES if c.tier == t] for t in TIERS}
    assert all(len(cs) >= 3 for cs in by_tier.values()), {t: len(cs) for t, cs in by_tier.items()}
    base_pairs = {(c.colour, c.shape) for c in by_tier["base"]}
    seen_colours = {c for c, _ in base_pairs}
    seen_shapes = {s for _, s in base_pairs}
    assert not seen_colours & HELD_OUT_COLOURS and not seen_shapes & HELD_OUT_SHAPES
    assert HELD_OUT_COLOURS < set(COLOURS) and HELD_OUT_SHAPES < set(SHAPES)
    for c in by_tier["novel_comp"]:
        assert c.colour in seen_colours and c.shape in seen_shapes and (c.colour, c.shape) not in base_pairs
    for c in by_tier["novel_shape"]:
        assert c.colour in seen_colours and c.shape in HELD_OUT_SHAPES
    for c in by_tier["novel_both"]:
        assert c.colour in HELD_OUT_COLOURS and c.shape in HELD_OUT_SHAPES


def test_clutter_never_takes_a_held_out_attribute():
    """Clutter colours stay CLUTTER_MIN_DISTANCE from every held-out colour, and the clutter
    polygons are not the held-out shapes (they are no category shape at all)."""
    rng = np.random.default_rng(0)
    held_out = np.array([COLOURS[c] for c in HELD_OUT_COLOURS], np.float32)
    colours = np.array([synthetic._clutter_colour(rng) for _ in range(500)], np.float32)
    distance = np.linalg.norm(colours[:, None] - held_out[None], axis=2).min(1)
    assert distance.min() >= synthetic.CLUTTER_MIN_DISTANCE
    assert colours.std(0).min() > 30  # still varied
    category_polygons = [geom for parts in SHAPES.values() for geom, _ in parts]
    assert not any(p in category_polygons for p in DISTRACTOR_SHAPES)


def test_annotation_files_are_valid_coco_with_ov_splits(world):
    base, full, val, test = (_annotations(world, n) for n in ("train_base", "train_all", "val", "test"))
    world_cats = load_world(world)["categories"]
    for coco in (base, full, val, test):
        assert coco["categories"] == world_cats  # all categories, split tags included
        assert coco["info"]["format"] == WORLD_FORMAT
    assert len(base["images"]) == len(full["images"]) == TINY["num_train"]
    assert len(val["images"]) == TINY["num_val"] and len(test["images"]) == TINY["num_test"]
    assert base["images"] == full["images"]
    # Training keeps base boxes only; the oracle file has those plus the novel ones.
    assert base["annotations"]
    assert {a["category_id"] for a in base["annotations"]} <= BASE_IDS
    assert {a["category_id"] for a in full["annotations"]} & NOVEL_IDS
    full_by_id = {a["id"]: a for a in full["annotations"]}
    for a in base["annotations"]:
        assert full_by_id[a["id"]] == a
    assert [a for a in full["annotations"] if a["category_id"] in BASE_IDS] == base["annotations"]
    assert len(full["annotations"]) > len(base["annotations"])
    # Validation and test are annotated with everything, novel included, and differ.
    assert {a["category_id"] for a in val["annotations"]} & NOVEL_IDS
    assert val["annotations"][:3] != test["annotations"][:3]
    hi = WorldConfig.objects_per_image[1]
    for coco in (full, val, test):
        per_image = np.bincount([a["image_id"] for a in coco["annotations"]],
                                minlength=len(coco["images"]) + 1)[1:]
        assert per_image.min() >= 1 and per_image.max() <= hi


def test_boxes_inside_image_with_positive_size(world, cfg):
    size = cfg.image_size
    for name in ("train_all", "val", "test"):
        coco = _annotations(world, name)
        for img in coco["images"]:
            assert (img["width"], img["height"]) == (size, size)
            with Image.open(world / "detection" / name.split("_")[0] / img["file_name"]) as im:
                assert im.size == (size, size) and im.mode == "RGB"
        for a in coco["annotations"]:
            x, y, w, h = a["bbox"]
            assert x >= 0 and y >= 0 and x + w <= size and y + h <= size, a
            assert w >= 2 and h >= 2, a
            assert max(w, h) <= cfg.object_size[1], a
            assert a["area"] == pytest.approx(w * h)
            assert a["iscrowd"] == 0


def test_annotations_match_detection_sample(world, cfg):
    """The written PNG and boxes are exactly what detection_sample renders for that index."""
    val = _annotations(world, "val")
    for index, img in enumerate(val["images"]):
        pixels, objects = detection_sample(cfg, "val", index)
        with Image.open(world / "detection" / "val" / img["file_name"]) as im:
            assert np.array_equal(np.asarray(im), pixels)
        written = [(a["category_id"], a["bbox"]) for a in val["annotations"]
                   if a["image_id"] == img["id"]]
        rendered = [(o.category.id, [o.box[0], o.box[1], o.box[2] - o.box[0], o.box[3] - o.box[1]])
                    for o in objects]
        assert written == rendered


def test_tight_box_bounds_the_alpha_mask():
    alpha = np.zeros((10, 12), np.float32)
    alpha[2:6, 3:8] = 1.0
    alpha[7, 0] = 0.5  # not above the 0.5 threshold: outside the box
    assert synthetic._tight_box(alpha, 20, 30, 100, 100) == (23.0, 32.0, 28.0, 36.0)
    # Clipped at the image border.
    assert synthetic._tight_box(alpha, -4, -3, 100, 100) == (0.0, 0.0, 4.0, 3.0)
    assert synthetic._tight_box(alpha, 95, 96, 100, 100) == (98.0, 98.0, 100.0, 100.0)
    # Under 2 px visible, or nothing visible: no box.
    assert synthetic._tight_box(alpha, 95, 97, 100, 100) is None
    assert synthetic._tight_box(alpha, 96, 0, 100, 100) is None
    assert synthetic._tight_box(np.zeros((5, 5), np.float32), 0, 0, 10, 10) is None


def test_box_region_holds_the_object_colour(make_world):
    """Inside a box, the commonest nearest-palette colour is (mostly) the category's colour:
    the annotated object is really there. A box off by a few pixels, or labelled with another
    category, fails this for most boxes. (The camera's colour cast, haze and blur are off here:
    they shift colours on purpose.)"""
    world = make_world(colour_cast=0.0, haze=0.0, desaturation=0.0, blur=0.0)

    names = list(COLOURS)
    palette = np.asarray([COLOURS[n] for n in names], np.float32)
    ranks = []
    for split in ("train_all", "val"):
        coco = _annotations(world, split)
        for img in coco["images"]:
            with Image.open(world / "detection" / split.split("_")[0] / img["file_name"]) as im:
                pixels = np.asarray(im, np.float32)
            for a in (a for a in coco["annotations"] if a["image_id"] == img["id"]):
                x, y, w, h = (int(round(v)) for v in a["bbox"])
                inside = pixels[y:y + h, x:x + w].reshape(-1, 1, 3)
                nearest = np.linalg.norm(inside - palette[None], axis=2).argmin(1)
                share = np.bincount(nearest, minlength=len(names))
                true = names.index(CATEGORIES[a["category_id"] - 1].colour)
                ranks.append(int((share > share[true]).sum()))
    ranks = np.asarray(ranks)
    assert len(ranks) >= 20
    assert (ranks == 0).mean() >= 0.6, np.bincount(ranks)
    assert (ranks <= 1).mean() >= 0.85, np.bincount(ranks)


# ---------------------------------------------------------------- caption corpus

@pytest.mark.parametrize("name,count", [("pretrain", TINY["num_captions"]),
                                        ("eval", TINY["num_caption_eval"])])
def test_caption_corpus(world, cfg, name, count):
    images = np.load(world / "captions" / f"{name}.npy")
    s = cfg.caption_image_size
    assert images.shape == (count, s, s, 3)
    assert images.dtype == np.uint8
    assert images.std() > 10  # not blank
    rows = [json.loads(line)
            for line in (world / "captions" / f"{name}.jsonl").read_text().splitlines()]
    assert len(rows) == count
    assert [r["index"] for r in rows] == list(range(count))
    for r in rows:
        assert (0 if name == "pretrain" else 1) <= len(r["category_ids"]) <= (1 if name == "eval" else 2)
        if name == "eval":  # evaluation crops name their one category in full
            assert NAMES[r["category_ids"][0]] in r["caption"], r
        if len(r["category_ids"]) == 2 and r["category_ids"][0] == r["category_ids"][1]:
            assert r["caption"] == f"two {NAMES[r['category_ids'][0]]}s"
    if name == "pretrain":
        assert any(len(r["category_ids"]) == 2 for r in rows)
    # Every sample is its own image.
    assert len({images[i].tobytes() for i in range(count)}) == count


# ---------------------------------------------------------------- Detectron2

def test_register_world_datasets(world):
    d2 = pytest.importorskip("detectron2.data")
    suffix = uuid.uuid4().hex[:8]
    datasets = world_datasets(world)
    assert set(datasets) == {"synth_train", "synth_train_all", "synth_val", "synth_test"}
    base_names = [c.name for c in CATEGORIES if c.split == "base"]
    novel_names = [c.name for c in CATEGORIES if c.split == "novel"]
    registered = []
    try:
        for key, (json_file, image_root) in datasets.items():
            name = register_ov_dataset(f"{key}_{suffix}", json_file, image_root)
            registered.append(name)
            meta = d2.MetadataCatalog.get(name)
            assert meta.thing_classes == [c.name for c in CATEGORIES]
            assert meta.base_classes == base_names
            assert meta.novel_classes == novel_names
            novel_contiguous = set(meta.novel_contiguous_ids)
            dicts = d2.DatasetCatalog.get(name)
            coco = load_coco_json(json_file)
            assert len(dicts) == len(coco["images"])
            boxes = [a for d in dicts for a in d["annotations"]]
            assert len(boxes) == len(coco["annotations"]) > 0
            for d in dicts:
                assert Path(d["file_name"]).is_file()
                for a in d["annotations"]:
                    assert len(a["bbox"]) == 4 and a["bbox"][2] > 0 and a["bbox"][3] > 0
            cats = {a["category_id"] for a in boxes}
            if key == "synth_train":
                assert not cats & novel_contiguous
            else:
                assert cats & novel_contiguous
    finally:
        for name in registered:
            d2.DatasetCatalog.remove(name)
            d2.MetadataCatalog.remove(name)


# ---------------------------------------------------------------- preview

def test_write_preview(world, tmp_path):
    from ovd.training.data.preview import write_preview

    out = write_preview(world, tmp_path / "sub" / "preview.png")
    assert out == tmp_path / "sub" / "preview.png"
    with Image.open(out) as im:
        assert im.format == "PNG"
        assert im.size[0] > 300 and im.size[1] > 300
        assert np.asarray(im.convert("L")).std() > 5


def test_write_preview_with_few_captions(make_world, tmp_path):
    from ovd.training.data.preview import write_preview

    world = make_world(num_train=1, num_val=1, num_test=1, num_captions=5, num_caption_eval=2)
    write_preview(world, tmp_path / "preview.png")


# ---------------------------------------------------------------- errors and config

def test_load_world_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="ovd data synth"):
        load_world(tmp_path / "nowhere")


def test_load_world_foreign_format(tmp_path):
    (tmp_path / "world.json").write_text(json.dumps({"format": "something-else/2"}))
    with pytest.raises(ValueError, match="something-else/2"):
        load_world(tmp_path)


def test_world_config_from_dict():
    cfg = WorldConfig.from_dict({"seed": 3, "object_size": [8, 20]})
    assert cfg.seed == 3 and cfg.object_size == (8, 20)
    assert cfg.num_train == WorldConfig().num_train
    with pytest.raises(ValueError, match="num_trian"):
        WorldConfig.from_dict({"num_trian": 3})


def test_caption_corpus_teaches_held_out_attributes():
    """The pretraining captions name every held-out colour and shape, in several pairings and
    alone ("a bolt", "something cyan"), while detection scenes' base boxes never show them."""
    cfg = WorldConfig(caption_attribute_only=0.5)
    captions = [synthetic.caption_sample(cfg, i)[1] for i in range(400)]
    words = [set(c.replace(".", "").split()) for c in captions]
    for attr in HELD_OUT_COLOURS | HELD_OUT_SHAPES:
        holding = [w for w in words if attr in w]
        assert len(holding) >= 5, attr
        partners = {x for w in holding for x in w} & (set(COLOURS) | set(SHAPES)) - {attr}
        assert len(partners) >= 4, (attr, partners)
    alone_shape = [c for c in captions if not set(c.split()) & set(COLOURS)
                   and set(c.replace(".", "").split()) & HELD_OUT_SHAPES]
    alone_colour = [c for c in captions if not set(c.replace(".", "").split()) & set(SHAPES)
                    and set(c.split()) & HELD_OUT_COLOURS]
    assert alone_shape and alone_colour
