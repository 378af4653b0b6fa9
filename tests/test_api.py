"""The Python API and the runtimes under it: `Detector.load(...)(images, classes)`, the plain
`Detections` value, preprocessing owned by the model layer, and the onnxruntime runtime that
answers like the PyTorch one without loading the PyTorch detector."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from detectron2.data import transforms as T
from detectron2.modeling.postprocessing import detector_postprocess
from detectron2.structures import Boxes, Instances
from PIL import Image
from torchvision.ops import box_iou

from ovd.models.api import Detector, read_image, resolve_model
from ovd.models.detections import Detections
from ovd.models.onnx_runtime import OnnxRuntime
from ovd.models.runtime import Preprocessing, TorchRuntime, load_runtime, to_original
from ovd.training.data.synthetic import WorldConfig, detection_sample


@pytest.fixture(scope="module")
def shipped() -> Detector:
    return Detector.load("default")


@pytest.fixture(scope="module")
def scene() -> np.ndarray:
    return detection_sample(WorldConfig(seed=99), "test", 0)[0]


# ---------------------------------------------------------------- preprocessing

@pytest.mark.parametrize("size", [(256, 256), (300, 517), (517, 300), (3000, 4000), (31, 9)])
def test_preprocessing_matches_detectron2(size):
    """Shape, rounding and pixels equal Detectron2's ResizeShortestEdge, which the detector was
    evaluated with, for square, odd, portrait and drone-photo sizes."""
    rgb = np.random.default_rng(0).integers(0, 255, (*size, 3), dtype=np.uint8)
    pre = Preprocessing("RGB", 256, 400)
    got = pre(rgb)
    want = T.ResizeShortestEdge(256, 400).get_transform(rgb).apply_image(rgb)
    assert got["image"].shape == (3, *want.shape[:2])
    assert got["image"].dtype == np.uint8 and np.array_equal(got["image"].transpose(1, 2, 0), want)
    assert (got["height"], got["width"]) == size
    bgr = Preprocessing("BGR", 256, 400)(rgb)["image"]
    assert np.array_equal(bgr, got["image"][::-1])
    h, w = want.shape[:2]
    assert pre.batch_key(got) == (-(-h // 32) * 32, -(-w // 32) * 32)


def test_to_original_matches_detector_postprocess():
    model_input = {"image": torch.zeros(3, 256, 341), "height": 600, "width": 800}
    boxes = np.array([[10, 20, 100, 120], [300, 200, 400, 300], [345, 10, 350, 20]], np.float32)
    scores, classes = np.array([0.9, 0.5, 0.4], np.float32), np.array([1, 0, 2])
    got = to_original(boxes, scores, classes, model_input, ["a", "b", "c"])
    inst = Instances((256, 341))
    inst.pred_boxes, inst.scores, inst.pred_classes = Boxes(torch.from_numpy(boxes)), \
        torch.from_numpy(scores), torch.from_numpy(classes)
    want = detector_postprocess(inst, 600, 800)
    assert np.allclose(got.boxes, want.pred_boxes.tensor.numpy(), atol=1e-4)
    assert got.labels == ["b", "a"]  # the box right of the image is empty once clipped
    assert got.image_size == (600, 800)


# ---------------------------------------------------------------- images

def test_read_image_accepts_paths_pil_and_arrays_and_applies_exif(tmp_path):
    rgb = np.zeros((20, 40, 3), np.uint8)
    rgb[:, :10] = 255  # a white left band
    im = Image.fromarray(rgb)
    exif = im.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to view": the viewer shows a 40 x 20 portrait
    buf = io.BytesIO()
    im.save(buf, "JPEG", exif=exif, quality=95)
    path = tmp_path / "rotated.jpg"
    path.write_bytes(buf.getvalue())
    upright = read_image(path)
    assert upright.shape == (40, 20, 3) and upright[:10].mean() > 200 and upright[-10:].mean() < 50
    assert read_image(Image.open(path)).shape == (40, 20, 3)
    assert read_image(str(path)).shape == (40, 20, 3)
    assert read_image(rgb[:, :, 0]).shape == (20, 40, 3)               # grey
    assert read_image(np.dstack([rgb, rgb[:, :, :1]])).shape == (20, 40, 3)  # RGBA
    with pytest.raises(ValueError, match="uint8"):
        read_image(rgb.astype(np.float32) / 255)
    with pytest.raises(ValueError, match="shape|got"):
        read_image(np.zeros((4, 4, 2), np.uint8))
    with pytest.raises(FileNotFoundError, match="no image file"):
        read_image(tmp_path / "missing.png")
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(ValueError, match="not an image"):
        read_image(tmp_path / "notes.png")


def test_resolve_model_names_the_fix(tmp_path):
    assert resolve_model("default").name == "default"
    with pytest.raises(FileNotFoundError, match="ovd export"):
        resolve_model(tmp_path / "nowhere")


def test_the_shipped_student_names_its_teacher_and_finds_the_objects():
    """`artifacts/student` loads by name, records the teacher it was distilled from (the
    shipped default's detector weights, by sha256) and its test metrics, and finds most base
    objects of four world-v2 test scenes (each scene's class names, box IoU >= 0.5; the
    teacher finds 13 of 13)."""
    from ovd.training.compress import teacher_weights_sha256

    student = Detector.load("student")
    teacher = student.manifest["distilled_from"]
    assert teacher["weights_sha256"] == teacher_weights_sha256(resolve_model("default"))
    assert teacher["kd"] == {"tid": True, "cid": True, "light_ml": True}
    assert student.manifest["metrics"]["synth_test"]["images"] == 400
    hits = total = 0
    for index in range(4):
        image, objects = detection_sample(WorldConfig(), "test", index)
        names = sorted({o.category.name for o in objects})
        found = student(image, names, threshold=0.3)
        for o in (o for o in objects if o.category.split == "base"):
            total += 1
            mine = torch.as_tensor(found.boxes[np.asarray(found.labels) == o.category.name]).reshape(-1, 4)
            hits += bool(mine.numel()) and float(box_iou(mine, torch.tensor([o.box], dtype=mine.dtype)).max()) >= 0.5
    assert hits >= 0.75 * total, f"{hits} of {total} base objects found"


# ---------------------------------------------------------------- the shipped detector

def test_detector_equals_the_models_own_inference(shipped, scene):
    """The API's answer is the detector's own `inference` (resize, encode, classify, rescale)
    on the same image and vocabulary."""
    names = ["red ring", "blue star", "red disk"]
    found = shipped(scene, names, threshold=0.05, max_detections=50, score_mode="softmax")
    runtime = shipped.runtime
    assert isinstance(runtime, TorchRuntime)
    model_input = T.ResizeShortestEdge(256, 256).get_transform(scene).apply_image(scene)
    with torch.inference_mode():
        want = runtime.model.inference(
            [{"image": torch.from_numpy(model_input.transpose(2, 0, 1).copy()), "height": 256, "width": 256}],
            text=runtime.text_embeddings(names))[0]["instances"]
    keep = want.scores > 0.05
    assert len(found) == int(keep.sum()) > 0
    assert np.allclose(found.boxes, want.pred_boxes.tensor[keep].numpy(), atol=1e-3)
    assert np.allclose(found.scores, want.scores[keep].numpy(), atol=1e-5)
    assert found.labels == [names[int(c)] for c in want.pred_classes[keep]]


def test_detector_batches_keep_input_order_and_sizes(shipped, scene):
    small = np.asarray(Image.fromarray(scene).resize((128, 128)))
    wide = np.ascontiguousarray(np.concatenate([scene, scene], axis=1))  # 256 x 512: another batch key
    names = ["red ring", "blue star"]
    batch = shipped([scene, wide, small, scene], names, threshold=0.2, batch_size=2)
    assert [d.image_size for d in batch] == [(256, 256), (256, 512), (128, 128), (256, 256)]
    alone = shipped(scene, names, threshold=0.2)
    for d in (batch[0], batch[3]):
        assert len(d) == len(alone) and np.allclose(d.boxes, alone.boxes, atol=1e-2)
    assert all((d.scores >= 0.2).all() and (d.boxes[:, 2] <= d.image_size[1]).all() for d in batch)


def test_detector_refuses_bad_vocabularies(shipped, scene):
    for classes, match in (([], "at least one"), (["a", " "], "empty"), (["a", "a"], "repeat")):
        with pytest.raises(ValueError, match=match):
            shipped(scene, classes)
    with pytest.raises(ValueError, match="threshold"):
        shipped(scene, ["a"], threshold=1.5)


def test_text_embeddings_carry_no_autograd_graph(shipped):
    """They are cached per vocabulary: a graph would keep the text tower's activations with them."""
    text = shipped.text_embeddings(["red ring", "cyan clover"])
    assert text.shape[0] == 2 and not text.requires_grad and text.grad_fn is None


# ---------------------------------------------------------------- Detections

def test_detections_conversions(tmp_path):
    d = Detections(np.array([[10, 20, 50, 60], [0, 0, 5, 5]], np.float32), np.array([0.9, 0.2], np.float32),
                   np.array([1, 0]), ("red ring", "blue star"), (100, 120))
    assert d.labels == ["blue star", "red ring"] and len(d) == 2
    assert d.to_json()[0] == {"box": [10.0, 20.0, 50.0, 60.0], "score": pytest.approx(0.9),
                              "label": "blue star", "class_index": 1}
    coco = d.to_coco(7)
    assert coco[0] == {"image_id": 7, "category_id": 2, "bbox": [10.0, 20.0, 40.0, 40.0],
                       "score": pytest.approx(0.9)}
    assert d.to_coco(7, {"blue star": 18, "red ring": 3})[1]["category_id"] == 3
    assert [c["category_id"] for c in d.to_coco(7, [5, 6])] == [6, 5]
    assert len(d.above(0.5)) == 1 and d.above(0.5).labels == ["blue star"]
    json.dumps(d.to_json())  # plain Python types only
    base = np.full((100, 120, 3), 90, np.uint8)
    drawn = d.draw(base)
    assert drawn.size == (120, 100) and (np.asarray(drawn) != base).any()
    assert (np.asarray(d.draw(Image.fromarray(base))) == np.asarray(drawn)).all()
    with pytest.raises(ValueError, match="disagree"):
        Detections(np.zeros((1, 4), np.float32), np.zeros(2, np.float32), np.zeros(2, np.int64), ("a",), (1, 1))


def test_detections_to_supervision():
    sv = pytest.importorskip("supervision")
    d = Detections(np.array([[1, 2, 3, 4]], np.float32), np.array([0.5], np.float32), np.array([0]),
                   ("a",), (10, 10))
    s = d.to_supervision()
    assert isinstance(s, sv.Detections) and list(s.data["class_name"]) == ["a"]


# ---------------------------------------------------------------- onnxruntime

def test_onnx_runtime_answers_like_torch_without_the_torch_detector(plain_export, onnx_export):
    onnx = load_runtime(onnx_export, backend="onnx")
    assert isinstance(onnx, OnnxRuntime) and not hasattr(onnx, "model")
    torch_rt = load_runtime(plain_export)
    names = ["red ring", "blue disk", "green cross"]
    rng = np.random.default_rng(3)
    images = [rng.integers(0, 255, (64, 64, 3), dtype=np.uint8), rng.integers(0, 255, (80, 50, 3), dtype=np.uint8)]
    a = Detector(torch_rt)(images, names, threshold=0.05)
    b = Detector(onnx)(images, names, threshold=0.05)
    for x, y in zip(a, b, strict=True):
        assert x.image_size == y.image_size and len(x) == len(y) > 0
        assert np.allclose(x.boxes, y.boxes, atol=1e-2) and np.allclose(x.scores, y.scores, atol=1e-3)
        assert x.labels == y.labels
    with pytest.raises(ValueError, match="backend"):
        load_runtime(plain_export, backend="tensorrt")


# ---------------------------------------------------------------- ovd detect

def test_ovd_detect_over_files_folders_and_globs(scene, tmp_path, monkeypatch, caplog):
    """From a folder outside the repository: per-image JSON, COCO, drawn images; a pattern that
    names nothing is a clear error, not a traceback."""
    from ovd.training.cli import main

    photos = tmp_path / "photos"
    (photos / "sub").mkdir(parents=True)
    Image.fromarray(scene).save(photos / "a.png")
    Image.fromarray(scene[:, ::-1]).save(photos / "sub" / "b.jpg", quality=95)
    Image.fromarray(scene[:128]).save(tmp_path / "c.png")
    (photos / "notes.txt").write_text("not an image")
    work = tmp_path / "elsewhere"
    work.mkdir()
    monkeypatch.chdir(work)
    assert main(["detect", str(photos), str(tmp_path / "*.png"), "--classes", "red ring", "blue star",
                 "--threshold", "0.2", "--out", "r.json", "--draw", "drawn"]) == 0
    report = json.loads((work / "r.json").read_text())
    assert [Path(i["file"]).name for i in report["images"]] == ["a.png", "b.jpg", "c.png"]
    assert report["classes"] == ["red ring", "blue star"] and report["model"]["name"]
    assert report["images"][2]["height"] == 128
    for image in report["images"]:
        assert all(d["score"] >= 0.2 and d["label"] in report["classes"] for d in image["detections"])
    assert sum(len(i["detections"]) for i in report["images"]) > 0
    assert sorted(p.name for p in (work / "drawn").iterdir()) == ["a.png", "b.png", "c.png"]

    assert main(["detect", str(photos / "a.png"), "--classes", "red ring", "--coco", "--out", "c.json"]) == 0
    coco = json.loads((work / "c.json").read_text())
    assert coco["categories"] == [{"id": 1, "name": "red ring"}]
    assert all(a["image_id"] == 1 and a["category_id"] == 1 and "score" in a for a in coco["annotations"])

    caplog.clear()
    assert main(["detect", str(tmp_path / "none*.jpg"), "--classes", "x"]) == 2
    assert "no image file found" in caplog.text

    # A truncated file is skipped and reported; the other images are still answered (exit 3).
    (photos / "broken.jpg").write_bytes((photos / "sub" / "b.jpg").read_bytes()[:300])
    assert main(["detect", str(photos), "--classes", "red ring", "--out", "p.json"]) == 3
    partial = json.loads((work / "p.json").read_text())
    assert [Path(i["file"]).name for i in partial["images"]] == ["a.png", "b.jpg"]
    assert [Path(x["file"]).name for x in partial["skipped"]] == ["broken.jpg"]
