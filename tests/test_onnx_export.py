"""`ovd export --onnx`: one ONNX file for any vocabulary, equal to PyTorch, hash-checked,
and served by the service with OVD_BACKEND=onnx."""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from detector_testing import EXPORT_CATEGORIES as CATEGORIES
from detector_testing import same_detections
from PIL import Image

from ovd.models.exported import ExportError, load_export, verify_export
from ovd.models.onnx_export import (
    OnnxValidationError,
    check_reports,
    compare_with_torch,
    match_detections,
    random_vocabularies,
)
from ovd.models.onnx_runtime import load_onnx_runtime
from ovd.models.runtime import ClassifyOptions
from ovd.training.cli import main as ovd


def _images() -> list[torch.Tensor]:
    """Random uint8 images at the test size (64) and of other sizes the resize can give."""
    g = torch.Generator().manual_seed(5)
    return [torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)
            for h, w in ((64, 64), (64, 90), (51, 64))]


def test_manifest_lists_the_graphs_their_hashes_and_contract(onnx_export, plain_export):
    m = verify_export(onnx_export)
    assert set(m["files"]) >= {"detector", "onnx_detector", "onnx_encode", "onnx_classify"}
    assert m["files"]["onnx_detector"]["file"] == "detector.onnx"
    graph = m["onnx"]["graphs"]["onnx_detector"]
    assert [i["name"] for i in graph["inputs"]][:2] == ["image", "text"]
    assert [o["name"] for o in graph["outputs"]] == ["boxes", "scores", "classes"]
    assert m["onnx"]["validation"]["max_box_diff_px"] < 1e-2
    # The vocabulary axis of the file itself is symbolic, not the size it was traced with.
    model = onnx.load(str(onnx_export / "detector.onnx"), load_external_data=False)
    text = next(i for i in model.graph.input if i.name == "text")
    assert text.type.tensor_type.shape.dim[0].dim_param == "classes"
    assert verify_export(plain_export).get("onnx") is None  # the source was copied, not changed


def test_one_file_serves_vocabularies_of_any_size_like_pytorch(onnx_export):
    exported = load_export(onnx_export)
    detector = load_onnx_runtime(onnx_export).graphs
    vocabularies = [exported.text_embeddings([c["name"] for c in CATEGORIES]),
                    *random_vocabularies(exported.manifest["embed_dim"], (5, 16), seed=1)]
    reports = compare_with_torch(exported.model, detector, _images(), vocabularies)
    summary = check_reports(reports, box_tol=1e-2, score_tol=1e-3)
    assert summary["vocabulary_sizes"] == [3, 5, 16]
    assert summary["detections"] > 100 and all(r["want"] > 0 for r in reports)
    # 1000 names from the same file (scores near 1/1000 at tau 4: a threshold just above
    # keeps the candidate pairs few).
    big = random_vocabularies(exported.manifest["embed_dim"], (1000,), seed=2)
    reports = compare_with_torch(exported.model, detector, _images()[:1], big,
                                 ClassifyOptions(score_threshold=0.0025, score_mode="softmax"))
    assert check_reports(reports)["detections"] > 0
    # Different vocabularies give different answers, and classes index each one's rows.
    image = _images()[0].numpy()
    _, _, c5 = detector.detect(image, vocabularies[1].numpy())
    _, _, c16 = detector.detect(image, vocabularies[2].numpy())
    assert c5.max() < 5 and c16.max() >= 5
    boxes, scores, _ = detector.detect(image, vocabularies[2].numpy(),
                                       ClassifyOptions(score_threshold=0.1, max_detections=7))
    assert len(boxes) == 7 and scores.min() > 0.1 and np.all(np.diff(scores) <= 0)


def test_every_option_is_a_graph_input_equal_to_pytorch(onnx_export):
    """Score mode, NMS IoU, class-agnostic NMS and the candidate bound reach the graph (none is
    frozen by the trace): each setting matches PyTorch and changes the answer."""
    exported = load_export(onnx_export)
    graphs = load_onnx_runtime(onnx_export).graphs
    for graph in (graphs.classifier, graphs.detector):
        assert [i.name for i in graph.get_overridable_initializers()] == [
            "score_threshold", "max_detections", "nms_threshold", "class_agnostic", "score_mode",
            "max_candidates"]
    text = random_vocabularies(exported.manifest["embed_dim"], (16,), seed=3)
    base = ClassifyOptions(score_threshold=0.05, max_detections=100_000, score_mode="softmax")
    settings = [dataclasses.replace(base, **o) for o in (
        {}, {"score_mode": "per_name"}, {"nms_threshold": 0.2}, {"nms_threshold": 0.9},
        {"class_agnostic": True, "nms_threshold": 0.9}, {"max_candidates": 40}, {"score_mode": "per_name", "class_agnostic": True, "nms_threshold": 0.3})]
    answers = []
    for options in settings:
        check_reports(compare_with_torch(exported.model, graphs, _images(), text, options))
        _, scores, _ = graphs.detect(_images()[0].numpy(), text[0].numpy(), options)
        answers.append((len(scores), round(float(scores.sum()), 3)))
    assert len(set(answers)) == len(settings), answers


def test_one_nms_swap_between_tied_candidates_passes_but_moved_boxes_fail():
    """Saturated scores tie within float noise; the runtimes' NMS may keep a different one of two
    overlapping candidates (seen on the shipped model: 0.9999919 vs 0.9999918, boxes 0.6 px apart)."""
    boxes = np.array([[10, 10, 50, 50], [60, 60, 90, 90], [0, 0, 20, 30]], np.float32)
    scores = np.array([0.9999919, 0.9, 0.8], np.float32)
    classes = np.array([1, 2, 2])
    swapped = boxes.copy()
    swapped[0] += 0.6
    report = match_detections((boxes, scores, classes), (swapped, scores, classes))
    assert report["swaps"] == 1 and report["max_box_diff"] == 0
    check_reports([{**report, "classes": 3}])
    moved = boxes + 0.6  # every box: a regression that differs, not a tie
    report = match_detections((boxes, scores, classes), (moved, scores, classes))
    with pytest.raises(OnnxValidationError, match="differs from PyTorch"):
        check_reports([{**report, "classes": 3}])
    apart = boxes.copy()
    apart[0] += 30  # no overlap: a different object, never a swap
    report = match_detections((boxes, scores, classes), (apart, scores, classes))
    assert report["swaps"] == 0 and report["max_box_diff"] == 30


def test_a_different_model_fails_the_comparison(onnx_export):
    exported = load_export(onnx_export)
    detector = load_onnx_runtime(onnx_export).graphs
    with torch.no_grad():
        exported.model.roi_heads.box_predictor.bbox_pred.bias.add_(0.5)  # every box moves
    text = random_vocabularies(exported.manifest["embed_dim"], (5,))
    with pytest.raises(OnnxValidationError, match="differs from PyTorch"):
        check_reports(compare_with_torch(exported.model, detector, _images()[:1], text))


def test_the_text_tower_and_tokenizer_run_in_onnx_like_pytorch(onnx_export):
    exported = load_export(onnx_export)
    runtime = load_onnx_runtime(onnx_export)
    text = runtime.manifest["onnx"]["text"]
    assert text["validation"]["tokens_equal"] and text["validation"]["max_abs_diff"] < 1e-4
    names = ["red ring", "a forklift", "Café crème", "dead tree", "x" * 200]
    want = exported.text_embeddings(names).detach().numpy()
    got = runtime.text_embeddings(names)
    assert got.shape == want.shape and np.abs(got - want).max() < 1e-4
    assert np.allclose(np.linalg.norm(got, axis=1), 1, atol=1e-5)


def test_the_onnx_runtime_never_imports_torch(onnx_export):
    """onnxruntime, numpy, PIL and tokenizers only: a fresh interpreter runs a whole detection
    through the Python API (preprocess, text, encode, classify) and has imported neither torch
    nor Detectron2."""
    code = (
        "import sys, numpy as np, ovd\n"
        f"detector = ovd.Detector.load({str(onnx_export)!r}, backend='onnx')\n"
        "d = detector(np.full((70, 90, 3), 128, np.uint8), ['red ring', 'blue star'], threshold=0.0)\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'detectron2', 'open_clip'))\n"
        "assert not heavy, heavy[:5]\n"
        "print(d.image_size, len(d.boxes))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("(70, 90)")


def test_a_client_with_onnxruntime_alone_runs_the_export(onnx_export, tmp_path):
    """The export ships portable.py (input transform, tokenizer, boxes back to the photo): a
    fresh interpreter that imports nothing from this project runs detector.onnx on a photo and
    gets the boxes ovd.Detector's ONNX backend gives (same options: the graph's defaults)."""
    from PIL import Image

    import ovd

    photo = tmp_path / "photo.png"
    Image.fromarray(((np.indices((70, 90)).sum(0) * 7) % 256).astype(np.uint8)[..., None].repeat(3, 2)).save(photo)
    names = ["red ring", "blue star"]
    code = f"""
import importlib.util, json, sys, numpy as np, onnxruntime as ort
from PIL import Image
export = {str(onnx_export)!r}
spec = importlib.util.spec_from_file_location("portable", export + "/portable.py")
portable = sys.modules["portable"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(portable)
manifest = json.load(open(export + "/manifest.json"))
prompts = [manifest["prompt_template"].format(n) for n in {names!r}]
tokens = portable.Tokenizer.from_manifest(export, manifest)(prompts)
text = ort.InferenceSession(export + "/text_encoder.onnx").run(None, {{"tokens": tokens}})[0]
x = portable.Preprocessing.from_manifest(manifest)(np.asarray(Image.open({str(photo)!r}).convert("RGB")))
boxes, scores, classes = ort.InferenceSession(export + "/detector.onnx").run(None, {{"image": x["image"], "text": text}})
boxes, keep = portable.to_original_boxes(boxes, x)
ours = sorted(m for m in sys.modules if m.split(".")[0] in ("ovd", "torch", "detectron2", "open_clip"))
assert not ours, ours[:5]
print(json.dumps({{"boxes": boxes[keep].tolist(), "scores": scores[keep].tolist()}}))
"""
    out = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    defaults = json.loads((onnx_export / "manifest.json").read_text())["onnx"]["defaults"]
    want = ovd.Detector.load(onnx_export, backend="onnx")(
        np.asarray(Image.open(photo).convert("RGB")), names, threshold=defaults["score_threshold"],
        score_mode="softmax")
    assert len(got["boxes"]) == len(want.boxes) > 0
    np.testing.assert_allclose(np.array(got["boxes"]), want.boxes, atol=1e-3)
    np.testing.assert_allclose(np.array(got["scores"]), want.scores, atol=1e-5)


def test_the_service_with_the_onnx_backend_never_imports_torch(onnx_export):
    """OVD_BACKEND=onnx: the app loads the export, answers /v1/detect, and a fresh interpreter
    has imported neither torch nor Detectron2 nor open_clip (the COCO/LVIS vocabularies are read
    from Detectron2's data files without importing the package)."""
    code = (
        "import base64, io, sys, time, numpy as np\n"
        "from PIL import Image\n"
        "from fastapi.testclient import TestClient\n"
        "from ovd.service.app import create_app\n"
        "from ovd.service.settings import Settings\n"
        "buf = io.BytesIO(); Image.fromarray(np.full((60, 80, 3), 120, np.uint8)).save(buf, 'PNG')\n"
        f"settings = Settings(model_dir={str(onnx_export)!r}, backend='onnx', redis_url='')\n"
        "with TestClient(create_app(settings)) as client:\n"
        "    for _ in range(300):\n"
        "        if client.get('/readyz').status_code == 200: break\n"
        "        time.sleep(0.1)\n"
        "    r = client.post('/v1/detect', json={'image': base64.b64encode(buf.getvalue()).decode(),\n"
        "                                        'classes': ['red ring', 'blue star'], 'score_threshold': 0.0})\n"
        "    assert r.status_code == 200, r.text\n"
        "    assert len(client.get('/v1/vocabularies').json()['vocabularies']) >= 3\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'detectron2', 'open_clip'))\n"
        "assert not heavy, heavy[:5]\n"
        "print(r.json()['image'])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "'width': 80" in out.stdout


def test_tampered_or_missing_graphs_are_refused(onnx_export, plain_export, tmp_path):
    copy = tmp_path / "e"
    shutil.copytree(onnx_export, copy)
    graph = copy / "detector.onnx"
    data = bytearray(graph.read_bytes())
    data[len(data) // 2] ^= 0xFF
    graph.write_bytes(bytes(data))
    with pytest.raises(ExportError, match="sha256"):
        load_onnx_runtime(copy)
    with pytest.raises(ExportError, match="sha256"):
        verify_export(copy)
    with pytest.raises(ExportError, match="no ONNX graphs"):
        load_onnx_runtime(plain_export)
    assert ovd(["export", "--from-export", str(plain_export), "--out", str(tmp_path / "x")]) == 2


def test_validation_runs_on_the_users_images_when_given(onnx_export, plain_export, tmp_path):
    """Without --onnx-images the graphs are checked on drawn scenes; with them, on the user's
    images (any size: the export's own preprocessing resizes them), and the manifest says which."""
    assert verify_export(onnx_export)["onnx"]["validation"]["images"] == "3 drawn scenes"
    (tmp_path / "mine").mkdir()
    for i, size in enumerate(((300, 200), (90, 120))):
        (tmp_path / "mine" / f"{i}.png").write_bytes(_png(*size, seed=10 + i))
    out = tmp_path / "export"
    assert ovd(["export", "--onnx", "--from-export", str(plain_export), "--out", str(out),
                "--onnx-images", str(tmp_path / "mine")]) == 0
    validation = verify_export(out)["onnx"]["validation"]
    assert validation["images"] == "2 given" and validation["comparisons"] > 0


def _png(width: int, height: int, seed: int) -> bytes:
    rgb = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "PNG")
    return buf.getvalue()


def _torch_answer(exported, data: bytes, names: list[str]) -> list[dict]:
    """The torch model's detections of the service's input, in the API's JSON shape."""
    from detectron2.data import transforms as T

    from ovd.service.images import decode_image

    rgb = decode_image(data, max_pixels=10**8)
    cfg = exported.manifest["input"]
    resized = T.ResizeShortestEdge(cfg["min_size_test"], cfg["max_size_test"]).get_transform(rgb).apply_image(rgb)
    inputs = {"image": torch.from_numpy(resized.transpose(2, 0, 1).copy()), "height": rgb.shape[0],
              "width": rgb.shape[1]}
    with torch.inference_mode():
        # As the service builds T: the template's embeddings rounded to float16, renormalised.
        text = F.normalize(exported.text_embeddings(names).half().float(), dim=-1)
        model = exported.model  # with the service's default score mode
        found = model.classify(model.encode([inputs]), text, score_mode=ClassifyOptions().score_mode)
        inst = model.to_original_size(found, [inputs])[0]["instances"]
    return [{"box": b, "score": s, "class_index": c} for b, s, c in
            zip(inst.pred_boxes.tensor.tolist(), inst.scores.tolist(), inst.pred_classes.tolist(),
                strict=True)]


def test_service_with_the_onnx_backend_answers_like_torch(onnx_export):
    import httpx
    from redis_testing import redis_process_or_skip

    from ovd.service.launch import ServerProcess

    exported = load_export(onnx_export)
    names = ["red ring", "blue disk", "a thing never seen"]
    images = [_png(80, 64, seed=1), _png(64, 64, seed=2)]  # resized to 64 x 80 and 64 x 64
    with redis_process_or_skip() as (url, _), ServerProcess(
            onnx_export, env={"OVD_BACKEND": "onnx", "OVD_REDIS_URL": url, "OVD_REDIS_PREFIX": "onnx",
                              "OVD_TORCH_THREADS": "1"}) as server:
        answers = [httpx.post(f"{server.url}/v1/detect", timeout=60, json={
            "image": base64.b64encode(data).decode(), "classes": names}) for data in images]
        log = server.log()
    assert "onnx backend" in log
    for data, r in zip(images, answers, strict=True):
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["classes"] == names and set(body["timings_ms"]) >= {"model", "classify"}
        want = _torch_answer(exported, data, names)
        assert want and same_detections(body["detections"], want, box_tol=1e-2, score_tol=1e-3), (body["detections"][:3], want[:3])
        assert all(d["label"] == names[d["class_index"]] for d in body["detections"])


def test_int8_graphs_are_kept_only_within_their_ap_tolerance(onnx_export, make_world, tmp_path):
    """`ovd export --onnx --quantize int8`'s check: the int8 image graphs replace the float32
    ones only if AP50 (all) on the val split falls by at most the tolerance; otherwise the
    float32 files and manifest come back untouched."""
    from ovd.models.manifest import ONNX_FILES
    from ovd.models.onnx_export import OnnxValidationError
    from ovd.models.runtime import load_runtime
    from ovd.training.data.coco_format import register_ov_dataset
    from ovd.training.data.synthetic import world_datasets
    from ovd.training.export import quantize_export

    datasets = world_datasets(make_world())
    register_ov_dataset("quantize_val", *datasets["synth_val"], overwrite=True)
    train_json, train_root = datasets["synth_train"]
    calibration = [train_root / im["file_name"] for im in json.loads(Path(train_json).read_text())["images"][:4]]
    folder = tmp_path / "int8"
    shutil.copytree(onnx_export, folder)
    float32 = {k: (folder / ONNX_FILES[k]).read_bytes() for k in ("onnx_encode", "onnx_detector")}
    with pytest.raises(OnnxValidationError, match="keeps its float32 graphs"):
        quantize_export(folder, dataset="quantize_val", calibration=calibration, tolerance=-1000.0)
    assert all((folder / ONNX_FILES[k]).read_bytes() == b for k, b in float32.items())
    assert "quantization" not in verify_export(folder)["onnx"]
    record = quantize_export(folder, dataset="quantize_val", calibration=calibration, tolerance=1000.0)
    manifest = verify_export(folder)
    assert manifest["onnx"]["quantization"]["precision"] == "int8" and record["calibration_images"] == 4
    assert {"all_AP50_fp32", "all_AP50_int8"} <= set(record["validation"])
    assert (folder / ONNX_FILES["onnx_encode"]).stat().st_size < 0.5 * len(float32["onnx_encode"])
    runtime = load_runtime(folder, backend="onnx")
    x = runtime.preprocessing(np.full((64, 80, 3), 120, np.uint8))
    (found,) = runtime.classify(runtime.encode([x]), runtime.text_embeddings(["red ring"]), [x], ["red ring"])
    assert found.image_size == (64, 80)
