"""The OV-COCO and OV-LVIS detector configs train for real on a tiny COCO-format set at real
image sizes (640 x 480 JPEGs), through `ovd train --config` with a `dataset:` section: they
once failed at the first step (Detectron2's SEED -1 reached numpy's seeding as -1 + rank)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from ovd.training.cli import main


def _dataset(folder, count=3):
    rng = np.random.default_rng(0)
    (folder / "images").mkdir(parents=True)
    coco = {"images": [], "annotations": [],
            "categories": [{"id": 1, "name": "person"}, {"id": 3, "name": "car"}, {"id": 17, "name": "cat"}]}
    for k in range(count):
        Image.fromarray(rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)).save(folder / "images" / f"{k}.jpg")
        coco["images"].append({"id": k + 1, "file_name": f"{k}.jpg", "width": 640, "height": 480})
        for j, cat in enumerate((1, 3, 17)):
            coco["annotations"].append({"id": 3 * k + j + 1, "image_id": k + 1, "category_id": cat,
                                        "bbox": [40.0 + 150 * j, 60.0, 120.0, 200.0], "area": 24000.0,
                                        "iscrowd": 0})
    (folder / "train.json").write_text(json.dumps(coco))


@pytest.mark.parametrize("detector", ["ov_coco_r50_fpn_1x.yaml", "ov_lvis_r50_fpn_4x.yaml"])
def test_real_config_trains_on_real_size_images(detector, tmp_path, monkeypatch):
    from detectron2.config import CfgNode

    monkeypatch.chdir(tmp_path)
    _dataset(tmp_path / "data")
    (tmp_path / "run.yaml").write_text(f"""\
paths: {{root: runs/real}}
dataset: {{name: real, train_json: data/train.json, train_images: data/images, novel: [cat]}}
detector:
  config: configs/detector/{detector}
  opts: [MODEL.WEIGHTS, "", MODEL.DEVICE, cpu, SOLVER.MAX_ITER, 1, SOLVER.IMS_PER_BATCH, 1,
         SOLVER.CHECKPOINT_PERIOD, 1000, INPUT.MIN_SIZE_TRAIN, "(320,)", DATALOADER.NUM_WORKERS, 0]
""")
    assert main(["train", "--config", "run.yaml", "--no-distill", "--clip", "ovd-vit-tiny-64"]) == 0
    out = tmp_path / "runs" / "real" / "detector"
    assert (out / "model_final.pth").is_file()
    saved = CfgNode.load_yaml_with_base(str(out / "config.yaml"))
    assert saved["SEED"] >= 0 and saved["DATASETS"]["TRAIN"] == ["real_train"]
