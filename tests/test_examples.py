"""Query by example (models/examples.py and `Detector(..., examples=...)`): the geometry of
example boxes, the query row a box becomes, and the API around it. How good an example is as a
query is measured, not tested: benchmarks/results/example_queries.md."""

from __future__ import annotations

import json
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

import ovd
from ovd.models.api import Detector, WeakExampleWarning
from ovd.models.examples import (
    box_iou,
    check_box,
    example_inputs,
    example_rows,
    prototypes,
    weak_example_warnings,
)
from ovd.models.runtime import Preprocessing, load_runtime
from ovd.training.data.synthetic import WorldConfig, detection_sample

PREP = Preprocessing("RGB", 256, 256)


def _unit(v):
    v = np.asarray(v, np.float32)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def test_box_iou_and_box_checks():
    a = np.array([[0, 0, 10, 10], [5, 5, 15, 15]], np.float32)
    iou = box_iou(a, a)
    assert np.allclose(np.diag(iou), 1) and iou[0, 1] == pytest.approx(25 / 175)
    assert check_box([-5, 2, 300, 50], 100, 80) == (0.0, 2.0, 100.0, 50.0)  # clipped to the image
    for bad, match in (([1, 2, 3], "x1, y1, x2, y2"), (["a", 1, 2, 3], "x1, y1, x2, y2"),
                       ([0, 0, float("nan"), 5], "non-finite"), ([50, 5, 40, 20], "empty"),
                       ([200, 5, 300, 20], "empty")):
        with pytest.raises(ValueError, match=match):
            check_box(bad, 100, 80)


def test_example_inputs_use_the_whole_image_or_a_window_in_a_large_one():
    small = np.zeros((300, 400, 3), np.uint8)
    (x, which, boxes), = example_inputs(small, [[10, 10, 50, 60], [100, 100, 140, 130]], PREP)
    assert which == [0, 1] and boxes[1] == (100, 100, 140, 130) and (x["height"], x["width"]) == (300, 400)
    large = np.zeros((2000, 3000, 3), np.uint8)  # shrunk ~8x by the resize: a window per box
    parts = example_inputs(large, [[1000, 900, 1020, 930], [2950, 1950, 3000, 2000]], PREP)
    assert [p[1] for p in parts] == [[0], [1]]
    (x0, which0, (b0,)), (x1, _, (b1,)) = parts
    assert (x0["height"], x0["width"]) == (256, 256)  # max(min_size, 4 x 30 px)
    assert b0 == (1000 - 882, 900 - 787, 1020 - 882, 930 - 787)  # centred on the box
    assert (x1["height"], x1["width"]) == (256, 256) and b1 == (206, 206, 256, 256)  # kept inside


def test_example_rows_take_the_best_proposal_and_shift_it_by_the_gap():
    rng = np.random.default_rng(0)
    embeddings = _unit(rng.normal(size=(3, 8)))
    regions = SimpleNamespace(proposals=np.array([[0, 0, 20, 20], [40, 40, 80, 80], [42, 38, 82, 78]], np.float32),
                              embeddings=embeddings)
    model_input = {"image": np.zeros((3, 128, 128), np.uint8), "height": 256, "width": 256}  # resized 2x
    text_mean = _unit(rng.normal(size=8))
    (raw,) = example_rows(regions, model_input, [[80, 80, 160, 160]], text_mean, shift=0.0)
    (row,) = example_rows(regions, model_input, [[80, 80, 160, 160]], text_mean, shift=1.0)
    (half,) = example_rows(regions, model_input, [[80, 80, 160, 160]], text_mean, shift=0.5)
    assert np.allclose(half.row, _unit(embeddings[1] + 0.5 * (text_mean - _unit(embeddings.mean(0)))), atol=1e-6)
    assert raw.iou == pytest.approx(1.0) and np.allclose(raw.row, embeddings[1])
    want = _unit(embeddings[1] - _unit(embeddings.mean(0)) + text_mean)
    assert np.allclose(row.row, want, atol=1e-6) and row.box == (80, 80, 160, 160)
    labels, rows = prototypes(["a", "b", "a"], [row, raw, raw])
    assert labels == ["a", "b"] and np.allclose(rows[0], _unit(row.row + raw.row), atol=1e-6)
    (weak,) = weak_example_warnings(["a"], example_rows(regions, model_input, [[0, 0, 100, 100]], text_mean))
    assert "IoU 0.16" in weak["message"] and weak["name"] == "a"


@pytest.fixture(scope="module")
def shipped() -> Detector:
    return Detector.load("default")


@pytest.fixture(scope="module")
def scene():
    return detection_sample(WorldConfig(seed=99), "test", 0)


def test_detector_answers_examples_beside_names(shipped, scene, tmp_path):
    image, objects = scene
    box = list(objects[3].box)
    found = shipped(image, ["red ring"], examples=[ovd.Example(box, "like this")], threshold=0.0,
                    max_detections=300)
    assert found.classes == ("red ring", "like this") and {"red ring", "like this"} == set(found.labels)
    # The example's own image, given as a file, gives the same rows as "the searched image".
    Image.fromarray(image).save(tmp_path / "example.png")
    again = shipped(image, ["red ring"], examples=[ovd.Example(box, "like this", image=tmp_path / "example.png")],
                    threshold=0.0, max_detections=300)
    assert np.allclose(found.scores, again.scores) and np.allclose(found.boxes, again.boxes)
    # Examples alone; two examples with one label become one row (one class).
    alone = shipped(image, examples=[ovd.Example(box, "x"), ovd.Example(list(objects[0].box), "x")], threshold=0.0)
    assert alone.classes == ("x",) and len(alone) > 0
    # Per-name scores: the name's detections do not change when an example is added.
    name_only = shipped(image, ["red ring"], threshold=0.0, max_detections=300)
    ring = found.class_indices == 0
    assert np.allclose(np.sort(found.scores[ring])[::-1][:20], name_only.scores[:20], atol=1e-5)


def test_detector_refuses_bad_examples_with_the_fix(shipped, scene):
    image, objects = scene
    box = list(objects[0].box)
    with pytest.raises(ValueError, match="at least one class name or example"):
        shipped(image)
    with pytest.raises(ValueError, match="labels of their own"):
        shipped(image, ["x"], examples=[ovd.Example(box, "x")])
    with pytest.raises(ValueError, match="empty"):
        shipped(image, examples=[ovd.Example([10, 10, 10, 30], "x")])
    with pytest.raises(ValueError, match="image=..."):
        shipped([image, image], examples=[ovd.Example(box, "x")])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        shipped(image, examples=[ovd.Example([0, 0, 256, 256], "everything")])
    assert any(issubclass(w.category, WeakExampleWarning) for w in caught)


def test_example_rows_agree_between_torch_and_onnx(plain_export, onnx_export):
    rng = np.random.default_rng(5)
    image = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
    examples = [ovd.Example([10, 12, 40, 44], "a"), ovd.Example([30, 5, 60, 30], "b")]
    t = Detector(load_runtime(plain_export)).embed_examples(examples, image)
    o = Detector(load_runtime(onnx_export, backend="onnx")).embed_examples(examples, image)
    assert t.labels == o.labels == ("a", "b") and np.allclose(t.rows, o.rows, atol=1e-3)


def test_ovd_detect_with_examples(shipped, scene, tmp_path, monkeypatch):
    from ovd.training.cli import main

    image, objects = scene
    Image.fromarray(image).save(tmp_path / "a.png")
    Image.fromarray(image[:, ::-1]).save(tmp_path / "b.png")
    monkeypatch.chdir(tmp_path)
    box = ",".join(str(v) for v in objects[3].box)
    assert main(["detect", "a.png", "b.png", "--classes", "red ring", "--example", "a.png", box, "like this",
                 "--threshold", "0", "--coco", "--out", "c.json"]) == 0
    coco = json.loads((tmp_path / "c.json").read_text())
    assert coco["categories"] == [{"id": 1, "name": "red ring"}, {"id": 2, "name": "like this"}]
    assert {a["category_id"] for a in coco["annotations"]} == {1, 2}
    assert coco["info"]["options"]["examples"][0]["label"] == "like this"
    with pytest.raises(SystemExit, match="X1,Y1,X2,Y2"):
        main(["detect", "a.png", "--example", "a.png", "1,2,3", "x"])
    with pytest.raises(SystemExit, match="--classes, or --example"):
        main(["detect", "a.png"])
