"""Sliced inference (models/tiling.py): the windows, the merge, and what it buys on a large
image of small objects."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision

from ovd.models.api import Detector
from ovd.models.detections import Detections
from ovd.models.runtime import ClassifyOptions, Preprocessing
from ovd.models.tiling import MERGE_IOU, TilePlan, merge_tiles, nms, plan_tiles
from ovd.training.data.synthetic import WorldConfig, detection_sample

PREP = Preprocessing("RGB", 256, 256)


def test_windows_cover_the_image_at_the_models_scale():
    plan = plan_tiles(1000, 1200, PREP, "on")
    *tiles, whole = plan.windows
    assert whole == (0, 0, 1200, 1000) and plan.image_size == (1000, 1200)
    assert {(x1 - x0, y1 - y0) for x0, y0, x1, y1 in tiles} == {(256, 256)}
    covered = np.zeros((1000, 1200), bool)
    for x0, y0, x1, y1 in tiles:
        covered[y0:y1, x0:x1] = True
    assert covered.all()
    assert max(x1 for _, _, x1, _ in tiles) == 1200 and max(y1 for *_, y1 in tiles) == 1000  # flush
    xs = sorted({x0 for x0, *_ in tiles})
    assert all(b - a <= int(256 * 0.8) for a, b in zip(xs, xs[1:], strict=False))  # >= 20% overlap


def test_auto_slices_only_images_the_resize_would_shrink_a_lot():
    assert not plan_tiles(480, 640, PREP, "auto").tiled  # shrunk 1.9x: one pass
    assert plan_tiles(1024, 1024, PREP, "auto").tiled
    assert not plan_tiles(4000, 3000, PREP, "off").tiled
    assert not plan_tiles(200, 250, PREP, "on").tiled  # smaller than a tile


def test_max_tiles_grows_the_tiles_instead_of_the_cost():
    small, default = plan_tiles(4000, 6000, PREP, "on", max_tiles=16), plan_tiles(4000, 6000, PREP, "on")
    assert len(small.windows) - 1 <= 16 < len(default.windows) - 1 <= 64
    assert small.windows[0][2] > default.windows[0][2] > 256  # 600 windows of 256 px would be needed
    with pytest.raises(ValueError, match="tiles"):
        plan_tiles(10, 10, PREP, "sometimes")


def test_numpy_nms_is_torchvisions():
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 100, (300, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(5, 40, (300, 2))], 1).astype(np.float32)
    scores = rng.random(300).astype(np.float32)
    for iou in (0.3, 0.5, 0.7):
        want = torchvision.ops.nms(torch.from_numpy(boxes), torch.from_numpy(scores), iou).numpy()
        assert np.array_equal(nms(boxes, scores, iou), want)
        assert np.array_equal(nms(boxes, scores, iou, max_keep=7), want[:7])  # stops early, same prefix


def test_per_class_merge_equals_one_shifted_nms():
    """The merge runs NMS per class and keeps the best of the union: the same boxes as one NMS
    over class-shifted boxes (torchvision's batched_nms), cut at max_detections."""
    rng = np.random.default_rng(1)
    xy = rng.uniform(0, 200, (400, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(5, 50, (400, 2))], 1).astype(np.float32)
    scores, classes = rng.random(400).astype(np.float32), rng.integers(0, 2, 400)
    plan = TilePlan(((0, 0, 256, 256), (0, 0, 256, 256)), (256, 256))
    half = [_dets(boxes[k::2], scores[k::2], classes[k::2]) for k in (0, 1)]
    got = merge_tiles(half, plan, ClassifyOptions(nms_threshold=0.5), max_detections=50)
    want = torchvision.ops.batched_nms(torch.from_numpy(np.concatenate([boxes[0::2], boxes[1::2]])),
                                       torch.from_numpy(np.concatenate([scores[0::2], scores[1::2]])),
                                       torch.from_numpy(np.concatenate([classes[0::2], classes[1::2]])), 0.5)[:50]
    assert np.allclose(got.scores, np.concatenate([scores[0::2], scores[1::2]])[want.numpy()])


def _dets(boxes, scores, classes, size=(256, 256)) -> Detections:
    return Detections(np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(scores, np.float32),
                      np.asarray(classes, np.int64), ("a", "b"), size)


def test_merge_drops_cut_pieces_and_duplicates():
    plan = TilePlan(((0, 0, 100, 100), (80, 0, 180, 100), (0, 0, 180, 100)), (100, 180))
    found = [
        # left window: an object cut by its right edge (x 90..100 of 100), and one whole object
        _dets([[90, 10, 100, 30], [10, 10, 30, 30]], [0.9, 0.8], [0, 1], (100, 100)),
        # right window (x offset 80): the same cut object seen whole, and the whole object of
        # the left window is not in it
        _dets([[10, 10, 30, 30]], [0.7], [0], (100, 100)),
        # whole image: the object again (a duplicate), of the same class
        _dets([[91, 11, 109, 29]], [0.6], [0], (100, 180)),
    ]
    merged = merge_tiles(found, plan)
    assert merged.image_size == (100, 180)
    boxes = {tuple(np.round(b).astype(int)) for b in merged.boxes}
    assert boxes == {(90, 10, 110, 30), (10, 10, 30, 30)}  # the cut piece dropped, the duplicate merged
    assert merged.scores.tolist() == pytest.approx([0.8, 0.7])


def test_merge_per_class_or_across_classes():
    plan = TilePlan(((0, 0, 100, 100), (0, 0, 100, 100)), (100, 100))
    found = [_dets([[10, 10, 50, 50]], [0.9], [0], (100, 100)), _dets([[11, 10, 50, 50]], [0.8], [1], (100, 100))]
    assert len(merge_tiles(found, plan)) == 2
    assert merge_tiles(found, plan, ClassifyOptions(class_agnostic=True)).labels == ["a"]
    assert MERGE_IOU == 0.5


#: Classes the shipped model was trained with boxes of that world v2 draws too.
KNOWN = ("red disk", "blue square", "green triangle", "yellow star", "purple ring", "orange cross",
         "white arrow", "brown hexagon")


def _mosaic(k: int = 4) -> tuple[np.ndarray, list[list[float]], list[str]]:
    """k x k world scenes in one image, with the boxes (XYXY) and names of their KNOWN objects."""
    world = WorldConfig(seed=7)
    tiles, boxes, names = [], [], []
    for j in range(k * k):
        rgb, objects = detection_sample(world, "test", j)
        tiles.append(rgb)
        dx, dy = (j % k) * rgb.shape[1], (j // k) * rgb.shape[0]
        for o in objects:
            if o.category.name in KNOWN:
                x1, y1, x2, y2 = o.box
                boxes.append([x1 + dx, y1 + dy, x2 + dx, y2 + dy])
                names.append(o.category.name)
    rows = [np.concatenate(tiles[r * k:(r + 1) * k], 1) for r in range(k)]
    return np.concatenate(rows, 0), boxes, names


def test_tiles_find_the_small_objects_of_a_large_image():
    """The shipped detector on a 1024 px image of 16 scenes: resized to 256 px its objects are
    a few pixels and most are missed; sliced, it finds most of them."""
    image, boxes, names = _mosaic()
    detector = Detector.load("default")
    classes = list(KNOWN)

    def recall(found: Detections) -> float:
        iou = torchvision.ops.box_iou(torch.tensor(boxes), torch.from_numpy(found.boxes)).numpy()
        same = np.array(names)[:, None] == np.array(found.labels)[None, :]
        return float(((iou >= 0.5) & same).any(1).mean())

    off = detector(image, classes, threshold=0.3, tiles="off")
    on = detector(image, classes, threshold=0.3, tiles="on")
    assert on.image_size == off.image_size == image.shape[:2]
    assert recall(on) > 0.5 > 2 * recall(off), (recall(on), recall(off))
    assert detector(image, classes, threshold=0.3).boxes.shape == on.boxes.shape  # auto slices it
