"""Your own dataset, end to end, the way the README's "Train on your own data" section says:
a plain COCO dataset (no split tags, non-square images in their own folder, one base class,
two novel classes declared by name in the config) goes through `ovd data check`, `ovd pipeline
--config`, `ovd eval --export`, `ovd serve` and the Python API, with a tiny schedule."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from PIL import Image, ImageDraw

from ovd.training.cli import main

CLASSES = {1: ("tree", (40, 160, 40)), 2: ("dead tree", (120, 80, 30)), 3: ("palm", (230, 200, 40))}


def _scene(rng, size):
    """An aerial-looking scene: noisy ground, 3-6 round crowns of the three classes."""
    w, h = size
    ground = rng.normal(110, 12, (h, w, 3)).clip(0, 255).astype(np.uint8)
    image = Image.fromarray(ground)
    draw = ImageDraw.Draw(image)
    boxes = []
    for _ in range(int(rng.integers(3, 7))):
        cat = int(rng.integers(1, 4))
        d = float(rng.uniform(14, 34))
        x, y = float(rng.uniform(0, w - d)), float(rng.uniform(0, h - d))
        draw.ellipse([x, y, x + d, y + d], fill=CLASSES[cat][1])
        boxes.append((cat, [round(x, 1), round(y, 1), round(d, 1), round(d, 1)]))
    return image, boxes


def _write_coco(folder, images_dir, name, count, seed):
    rng = np.random.default_rng(seed)
    coco = {"images": [], "annotations": [],
            "categories": [{"id": i, "name": n} for i, (n, _) in CLASSES.items()]}
    for k in range(count):
        size = (160, 120) if k % 2 else (120, 150)
        image, boxes = _scene(rng, size)
        file_name = f"{name}_{k:03d}.jpg"
        image.save(images_dir / file_name, quality=92)
        coco["images"].append({"id": k + 1, "file_name": file_name, "width": size[0], "height": size[1]})
        for cat, bbox in boxes:
            coco["annotations"].append({"id": len(coco["annotations"]) + 1, "image_id": k + 1,
                                        "category_id": cat, "bbox": bbox, "area": bbox[2] * bbox[3],
                                        "iscrowd": 0})
    path = folder / f"{name}.json"
    path.write_text(json.dumps(coco))
    return path


@pytest.fixture(autouse=True)
def _info_logs(caplog):
    caplog.set_level(logging.INFO)


def test_own_coco_dataset_end_to_end(tmp_path, monkeypatch, caplog, capsys):
    import ovd
    from ovd.models.exported import verify_export

    monkeypatch.chdir(tmp_path)
    data = tmp_path / "trees"
    (data / "images").mkdir(parents=True)
    _write_coco(data, data / "images", "train", 10, seed=1)
    _write_coco(data, data / "images", "val", 4, seed=2)
    (tmp_path / "trees.yaml").write_text("""\
paths:
  root: runs/trees
dataset:
  name: trees
  train_json: trees/train.json
  train_images: trees/images
  val_json: trees/val.json
  val_images: trees/images
  novel: [dead tree, palm]
clip:
  model: ovd-vit-tiny-64       # random weights: a smoke run; use a pretrained CLIP for real
clip_renorm:
  epochs: 1
  batch_size: 32
proposals:
  mode: cheap
  stride: auto
  sizes: auto
  cheap_topk: 32
targets:
  max_proposals: 20
detector:
  config: configs/detector/synthetic_r18_fpn.yaml
  opts: [SOLVER.MAX_ITER, 4, SOLVER.STEPS, "(3,)", SOLVER.WARMUP_ITERS, 1, SOLVER.CHECKPOINT_PERIOD, 2,
         SOLVER.IMS_PER_BATCH, 2, INPUT.MIN_SIZE_TRAIN, "(128,)", INPUT.MAX_SIZE_TRAIN, 192,
         INPUT.MIN_SIZE_TEST, 128, INPUT.MAX_SIZE_TEST, 192, DATALOADER.NUM_WORKERS, 0]
""")
    assert main(["data", "check", "trees/train.json", "--image-root", "trees/images"]) == 0
    assert "OK" in capsys.readouterr().out

    assert main(["pipeline", "--config", "trees.yaml"]) == 0
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "1 base classes ['tree'], 2 novel ['dead tree', 'palm']" in messages
    assert "background crops are its negatives" in messages  # one base class: our renorm negatives
    run = tmp_path / "runs" / "trees"
    train = json.loads((run / "dataset" / "annotations" / "train_base.json").read_text())
    assert {a["category_id"] for a in train["annotations"]} == {1}  # novel boxes never trained on
    assert (run / "dataset" / "annotations" / "train_all.json").is_file()  # ... but gated on
    manifest = verify_export(run / "export")
    assert manifest["name"] == "ovd-trees"
    assert {c["name"]: c["split"] for c in manifest["categories"]} == {
        "tree": "base", "dead tree": "novel", "palm": "novel"}
    assert "trees_val" in manifest["metrics"]  # no test split: reported on val
    gates = json.loads((run / "gates.json").read_text())
    assert {"renorm", "proposals", "targets", "detector"} <= set(gates)

    capsys.readouterr()
    assert main(["clip", "eval", "--config", "trees.yaml"]) == 0  # on the dataset's val crops
    assert "GT crops of" in capsys.readouterr().out
    assert main(["gates", "--config", "trees.yaml", "--out", "gates_again.json"]) == 0
    assert json.loads((tmp_path / "gates_again.json").read_text())["renorm"]["novel"]["n"] > 0

    assert main(["eval", "--export", str(run / "export"), "--config", "trees.yaml", "--dataset", "trees_val",
                 "--out", "eval_export"]) == 0
    metrics = json.loads((tmp_path / "eval_export" / "metrics.json").read_text())
    assert metrics["images"] == 4 and set(metrics) >= {"novel", "base", "all"}

    # ONNX graphs, validated against PyTorch on three of the dataset's own (non-square) images.
    assert main(["export", "--config", "trees.yaml", "--onnx", "--out", "onnx_export"]) == 0
    assert verify_export(tmp_path / "onnx_export")["onnx"]["validation"]["images"] == "3 given"

    # A second run reuses what did not change; editing the training json re-runs what read it:
    # the re-normalised CLIP and the detector (which restarts rather than resuming another recipe).
    caplog.clear()
    assert main(["pipeline", "--config", "trees.yaml"]) == 0
    messages = [r.getMessage() for r in caplog.records]
    for stage in ("CLIP", "CLIP re-normalisation (LayerNorms only)"):
        assert any(f"] {stage}: reused" in m for m in messages), stage
    assert not any("trained from other inputs" in m for m in messages)
    coco = json.loads((data / "train.json").read_text())
    coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] != 1]
    (data / "train.json").write_text(json.dumps(coco))
    caplog.clear()
    assert main(["pipeline", "--config", "trees.yaml"]) == 0
    messages = [r.getMessage() for r in caplog.records]
    assert any("] CLIP re-normalisation (LayerNorms only): done" in m for m in messages)
    assert any("trained from other inputs" in m and "train_json_sha256" in m for m in messages)

    # `ovd serve` on the export answers a request with the novel names (no Redis: memory caches).
    import base64

    import httpx

    from ovd.service.launch import ServerProcess

    image = base64.b64encode((data / "images" / "val_001.jpg").read_bytes()).decode()
    with ServerProcess(run / "export", env={"OVD_REDIS_URL": ""}) as server:
        r = httpx.post(f"{server.url}/v1/detect", timeout=120,
                       json={"image": image, "classes": ["dead tree", "palm"], "score_threshold": 0.0})
    assert r.status_code == 200, r.text
    assert r.json()["model"]["name"] == "ovd-trees" and r.json()["image"] == {"width": 160, "height": 120, "tiles": 0}

    found = ovd.Detector.load(run / "export")(data / "images" / "val_000.jpg", ["dead tree", "palm", "tree"],
                                               threshold=0.0)
    assert found.image_size == (150, 120) and len(found.boxes) > 0


def test_the_example_config_is_valid():
    """configs/own_dataset.example.yaml, which the README points to, parses into every section."""
    from ovd.training.config import REPO_ROOT, load_config
    from ovd.training.data.dataset import DatasetConfig
    from ovd.training.pipeline import ClipSource, Pipeline
    from ovd.training.proposals import ProposalConfig

    cfg = load_config(REPO_ROOT / "configs" / "own_dataset.example.yaml")
    dataset = DatasetConfig.from_config(cfg)
    assert dataset.novel == ("dead tree", "palm") and dataset.split("test") is None
    assert ClipSource.from_config(cfg).pretrained == "laion2b_s34b_b79k"
    assert ProposalConfig.from_config(cfg).mode == "cheap"
    assert Pipeline(cfg, None).renorm_cfg.tune == "vision"


def test_device_auto_follows_the_machine(monkeypatch):
    """The example config trains on the GPU when there is one (MODEL.DEVICE auto), and on the
    CPU otherwise, where Detectron2's own default ("cuda") would fail."""
    import torch

    from ovd.training.config import REPO_ROOT, load_config
    from ovd.training.train_detector import build_config, detector_config_file

    cfg = load_config(REPO_ROOT / "configs" / "own_dataset.example.yaml")
    file, opts = detector_config_file(cfg), cfg["detector"]["opts"]
    for gpu, device in ((False, "cpu"), (True, "cuda")):
        monkeypatch.setattr(torch.cuda, "is_available", lambda gpu=gpu: gpu)
        assert build_config(file, opts).MODEL.DEVICE == device
    assert build_config(file).MODEL.DEVICE == "cpu"  # the synthetic YAML's own choice stays


def test_dataset_section_errors_name_the_fix(tmp_path, monkeypatch):
    from ovd.training.data.dataset import DatasetConfig, prepare_dataset

    monkeypatch.chdir(tmp_path)
    (tmp_path / "images").mkdir()
    path = _write_coco(tmp_path, tmp_path / "images", "train", 2, seed=3)
    with pytest.raises(ValueError, match="train_json is required"):
        DatasetConfig()
    with pytest.raises(ValueError, match=r"dataset.novel names \['oak'\] are not categories"):
        prepare_dataset(DatasetConfig(train_json=str(path), train_images="images", novel=("oak",)), tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="image folder .* working directory"):
        prepare_dataset(DatasetConfig(train_json=str(path), train_images="nowhere"), tmp_path / "out")
    with pytest.raises(ValueError, match="has no box of a base class"):
        prepare_dataset(DatasetConfig(train_json=str(path), train_images="images", novel=("tree", "dead tree", "palm")),
                        tmp_path / "out")
    coco = json.loads(path.read_text())
    coco["annotations"][0]["bbox"] = [100.0, 100.0, 500.0, 20.0]  # overruns the image
    path.write_text(json.dumps(coco))
    with pytest.raises(ValueError, match=r"train split .*train.json .* overruns image"):
        prepare_dataset(DatasetConfig(train_json=str(path), train_images="images", novel=("palm",)), tmp_path / "out")


def test_config_mistakes_fail_before_any_stage_runs(tmp_path):
    from ovd.training.layout import RunLayout
    from ovd.training.pipeline import Pipeline

    for cfg, match in (({"clip_renorm": {"epochs": "one"}}, "clip_renorm config: a value has the wrong type"),
                       ({"detector": {"config": "configs/detector/synthetic_r18_fpn.yaml",
                                      "opts": ["SOLVER.MAX_ITERS", 3]}}, "SOLVER.MAX_ITERS"),
                       ({"proposals": {"mode": "chep"}}, "mode 'chep'")):
        with pytest.raises(ValueError, match=match):
            Pipeline(cfg, RunLayout(tmp_path)).check_config()
