"""Tests for ovd.training.data.detection_set: the one reader of a detection json."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ovd.training.data.detection_set import DetectionSet


def _write(tmp_path: Path) -> Path:
    """Two images listed out of id order, categories out of id order, a crowd box, a novel class."""
    for name, (w, h) in (("a.png", (40, 30)), ("b.png", (20, 20))):
        Image.fromarray(np.full((h, w, 3), 200, np.uint8)).save(tmp_path / name)
    coco = {
        "images": [{"id": 7, "file_name": "b.png", "width": 20, "height": 20},
                   {"id": 3, "file_name": "a.png", "width": 40, "height": 30}],
        "categories": [{"id": 9, "name": "cyan clover", "split": "novel", "tier": "novel_both"},
                       {"id": 2, "name": "red disk", "split": "base"}],
        "annotations": [
            {"id": 1, "image_id": 3, "category_id": 2, "bbox": [1, 2, 10, 5], "area": 50, "iscrowd": 0},
            {"id": 2, "image_id": 3, "category_id": 9, "bbox": [5, 5, 4, 4], "area": 16, "iscrowd": 0},
            {"id": 3, "image_id": 3, "category_id": 2, "bbox": [0, 0, 40, 30], "area": 1200, "iscrowd": 1},
            {"id": 4, "image_id": 7, "category_id": 9, "bbox": [2, 2, 6, 6], "area": 36, "iscrowd": 0},
        ],
    }
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(coco))
    return path


def test_orders_by_id_and_tags_categories(tmp_path):
    data = DetectionSet.load(_write(tmp_path))
    assert data.image_ids == [3, 7]
    assert data.names == ["red disk", "cyan clover"]
    assert data.is_novel.tolist() == [False, True]
    assert data.tiers == ["base", "novel_both"]
    assert data.image_root == tmp_path  # images default to the json's folder
    assert data.boxes[3].tolist()[0] == [1, 2, 11, 7]  # xywh -> xyxy


def test_annotations_filter_crowd_and_categories(tmp_path):
    data = DetectionSet.load(_write(tmp_path))
    boxes, labels = data.annotations(3)
    assert labels.tolist() == [0, 1]  # the crowd box is left out by default
    assert len(data.annotations(3, crowd=True)[0]) == 3
    boxes, labels = data.annotations(3, ~data.is_novel)
    assert labels.tolist() == [0] and boxes.tolist() == [[1, 2, 11, 7]]


def test_max_images_counts_by_id_and_read_gives_chw(tmp_path):
    data = DetectionSet.load(_write(tmp_path), max_images=1)
    assert data.image_ids == [3]
    pixels = data.read(3)
    assert pixels.shape == (3, 30, 40) and pixels.dtype == torch.uint8


def test_missing_image_folder_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        DetectionSet.load(_write(tmp_path), tmp_path / "nowhere")
