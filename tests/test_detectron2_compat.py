"""Tests for the pure-PyTorch ``detectron2._C`` (scripts/detectron2_compat/_C.py).

The geometry tests load the module straight from the repository, so they run without
detectron2. The integration tests need detectron2 installed by
``scripts/detectron2_compat/install_detectron2.py`` and are skipped otherwise.
"""

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from torchvision.ops import box_iou

COMPAT_PATH = Path(__file__).resolve().parents[1] / "scripts" / "detectron2_compat" / "_C.py"


def _load_compat():
    spec = importlib.util.spec_from_file_location("ovd_detectron2_compat_C", COMPAT_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


compat = _load_compat()


@pytest.fixture(scope="module")
def d2_compat():
    """The installed ``detectron2._C``, when it is ovd's pure-PyTorch one."""
    pytest.importorskip("detectron2")
    from detectron2 import _C

    if not getattr(_C, "__ovd_compat__", False):
        pytest.skip("detectron2 has a compiled _C; these tests cover the pure-PyTorch one")
    return _C


def _random_boxes(n, generator, rotated):
    centres = torch.rand(n, 2, generator=generator) * 60
    sizes = torch.rand(n, 2, generator=generator) * 30 + 0.5
    if rotated:
        angles = torch.rand(n, 1, generator=generator) * 360 - 180
    else:
        angles = torch.zeros(n, 1)
    return torch.cat([centres, sizes, angles], dim=1)


def _xyxy(boxes):
    return torch.cat([boxes[:, :2] - boxes[:, 2:4] / 2, boxes[:, :2] + boxes[:, 2:4] / 2], dim=1)


# --- box_iou_rotated -------------------------------------------------------------------------


def test_axis_aligned_boxes_match_torchvision():
    g = torch.Generator().manual_seed(0)
    boxes1, boxes2 = _random_boxes(40, g, rotated=False), _random_boxes(30, g, rotated=False)
    expected = box_iou(_xyxy(boxes1), _xyxy(boxes2))
    assert (expected > 0).sum() > 50  # the sample really has overlaps
    torch.testing.assert_close(compat.box_iou_rotated(boxes1, boxes2), expected, atol=1e-5, rtol=0)

    # A half turn covers the same region.
    flipped = boxes2.clone()
    flipped[:, 4] = 180.0
    torch.testing.assert_close(compat.box_iou_rotated(boxes1, flipped), expected, atol=1e-5, rtol=0)


# 2x2 square vs the same square turned 45 degrees: the overlap is the square minus four corner
# triangles. The diamond's edge x + y = sqrt(2) cuts the corner (1, 1) at (1, sqrt(2) - 1) and
# (sqrt(2) - 1, 1): legs 2 - sqrt(2), area (2 - sqrt(2))^2 / 2 = 3 - 2 sqrt(2) each.
# Intersection = 4 - 4 (3 - 2 sqrt(2)) = 8 sqrt(2) - 8; union = 8 - intersection = 16 - 8 sqrt(2);
# IoU = (sqrt(2) - 1) / (2 - sqrt(2)) = 1 / sqrt(2).
_COS30, _SIN30 = math.cos(math.radians(30)), math.sin(math.radians(30))


@pytest.mark.parametrize(
    ("box1", "box2", "expected"),
    [
        pytest.param((5, 7, 4, 2, 30), (5, 7, 4, 2, 30), 1.0, id="identical"),
        pytest.param((0, 0, 4, 2, 30), (20, 0, 4, 2, -60), 0.0, id="disjoint"),
        pytest.param((0, 0, 2, 2, 0), (0, 0, 2, 2, 45), 1 / math.sqrt(2), id="square-vs-45deg"),
        pytest.param((3, 4, 4, 2, 0), (3, 4, 2, 4, 90), 1.0, id="90deg-swapped-wh"),
        pytest.param((3, 4, 4, 2, 15), (3, 4, 2, 4, -75), 1.0, id="minus-90deg-swapped-wh"),
        # Two 4x2 boxes at 30 degrees, the second shifted by 2 along the first's long axis.
        # Positive angles turn counter-clockwise on screen (y down), so that axis is
        # (cos 30, -sin 30). Overlap 2x2 = 4, union 8 + 8 - 4 = 12.
        pytest.param((0, 0, 4, 2, 30), (2 * _COS30, -2 * _SIN30, 4, 2, 30), 1 / 3, id="shift"),
        # Tiny, far from the origin: precision relies on clipping in a box-centred frame.
        pytest.param((1e4, 1e4, 0.2, 0.1, 10), (1e4, 1e4, 0.2, 0.1, 10), 1.0, id="far-tiny"),
        pytest.param((0, 0, 0, 2, 0), (0, 0, 0, 2, 0), 0.0, id="zero-area"),
    ],
)
def test_hand_computed_rotated_cases(box1, box2, expected):
    iou = compat.box_iou_rotated(
        torch.tensor([box1], dtype=torch.float64), torch.tensor([box2], dtype=torch.float64)
    )
    assert iou.shape == (1, 1)
    assert iou.item() == pytest.approx(expected, abs=1e-6)


def test_random_rotated_boxes_match_rasterised_estimate():
    g = torch.Generator().manual_seed(1)
    boxes1 = _random_boxes(12, g, rotated=True)
    boxes2 = boxes1 + torch.cat([torch.randn(12, 2, generator=g) * 5, torch.zeros(12, 3)], 1)
    boxes2[:, 2:] = _random_boxes(12, g, rotated=True)[:, 2:]
    iou = compat.box_iou_rotated(boxes1, boxes2).diagonal()

    def inside(points, box):
        # Undo the box's rotation: the forward map is (x, y) -> (c x + s y, -s x + c y).
        cos, sin = math.cos(math.radians(box[4])), math.sin(math.radians(box[4]))
        dx, dy = points[:, 0] - box[0], points[:, 1] - box[1]
        local_x, local_y = cos * dx - sin * dy, sin * dx + cos * dy
        return (local_x.abs() <= box[2] / 2) & (local_y.abs() <= box[3] / 2)

    axis = torch.linspace(-40, 110, 1200, dtype=torch.float64)
    grid = torch.cartesian_prod(axis, axis)
    for k in range(12):
        in1, in2 = inside(grid, boxes1[k].tolist()), inside(grid, boxes2[k].tolist())
        raster = (in1 & in2).sum() / (in1 | in2).sum()
        assert iou[k].item() == pytest.approx(raster.item(), abs=0.02)
    assert (iou > 0.05).sum() >= 4  # the sample really has overlaps


def test_shapes_symmetry_and_dtype():
    g = torch.Generator().manual_seed(2)
    boxes1, boxes2 = _random_boxes(25, g, rotated=True), _random_boxes(17, g, rotated=True)
    iou = compat.box_iou_rotated(boxes1, boxes2)
    assert iou.shape == (25, 17) and iou.dtype == torch.float32
    assert iou.min() >= 0 and iou.max() <= 1
    torch.testing.assert_close(iou, compat.box_iou_rotated(boxes2, boxes1).T, atol=1e-6, rtol=0)
    torch.testing.assert_close(compat.box_iou_rotated(boxes1, boxes1).diagonal(), torch.ones(25))

    assert compat.box_iou_rotated(boxes1.double(), boxes2.double()).dtype == torch.float64
    assert compat.box_iou_rotated(boxes1[:0], boxes2).shape == (0, 17)
    assert compat.box_iou_rotated(boxes1, boxes2[:0]).shape == (25, 0)
    with pytest.raises(ValueError, match=r"\[N, 5\]"):
        compat.box_iou_rotated(boxes1[:, :4], boxes2)


# --- nms_rotated -----------------------------------------------------------------------------


def test_nms_rotated_is_greedy_by_score():
    boxes = torch.tensor(
        [
            [2, 0, 4, 2, 0],  # 0: E, IoU 1/3 with A, 0.6 with B
            [0, 0, 4, 2, 0],  # 1: A, best score
            [30, 30, 2, 2, 45],  # 2: far away
            [1, 0, 4, 2, 0],  # 3: B, IoU 0.6 with A: suppressed by A
            [0, 0, 2, 4, 90],  # 4: same region as A: suppressed
        ],
        dtype=torch.float32,
    )
    scores = torch.tensor([0.7, 0.9, 0.1, 0.8, 0.85])
    # E survives: the only box it overlaps beyond the threshold (B) was itself suppressed.
    assert compat.nms_rotated(boxes, scores, 0.5).tolist() == [1, 0, 2]
    assert compat.nms_rotated(boxes, scores, 0.7).tolist() == [1, 3, 0, 2]
    assert compat.nms_rotated(boxes, scores, 0.0).tolist() == [1]

    empty = compat.nms_rotated(boxes[:0], scores[:0], 0.5)
    assert empty.dtype == torch.int64 and empty.shape == (0,)


def test_nms_rotated_matches_brute_force_greedy():
    g = torch.Generator().manual_seed(3)
    boxes = _random_boxes(150, g, rotated=True)
    scores = torch.rand(150, generator=g)
    iou = compat.box_iou_rotated(boxes, boxes)
    suppressed, expected = torch.zeros(150, dtype=torch.bool), []
    for i in scores.argsort(descending=True).tolist():
        if not suppressed[i]:
            expected.append(i)
            suppressed |= iou[i] >= 0.3
    assert compat.nms_rotated(boxes, scores, 0.3).tolist() == expected


# --- unsupported kernels ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "advice"),
    [
        ("deform_conv_forward", "torchvision.ops.deform_conv2d"),
        ("deform_conv_backward_input", "torchvision.ops.deform_conv2d"),
        ("deform_conv_backward_filter", "torchvision.ops.deform_conv2d"),
        ("modulated_deform_conv_forward", "torchvision.ops.deform_conv2d"),
        ("modulated_deform_conv_backward", "torchvision.ops.deform_conv2d"),
        ("roi_align_rotated_forward", "ROIAlignV2"),
        ("roi_align_rotated_backward", "ROIAlignV2"),
        ("InstanceAnnotation", "use_fast_impl=False"),
        ("COCOevalEvaluateImages", "use_fast_impl=False"),
        ("COCOevalAccumulate", "use_fast_impl=False"),
    ],
)
def test_unsupported_kernels_say_what_to_use(name, advice):
    with pytest.raises(NotImplementedError) as info:
        getattr(compat, name)(1, 2, key=3)
    assert f"detectron2._C.{name}" in str(info.value)
    assert advice in str(info.value)


def test_env_helpers():
    assert "pure-PyTorch" in compat.get_compiler_version()
    assert compat.get_cuda_version() == "not available"
    assert compat.has_cuda() is False


# --- through detectron2 ----------------------------------------------------------------------


def test_detectron2_rotated_ops_route_through_compat(d2_compat, monkeypatch):
    from detectron2.layers import batched_nms_rotated, nms_rotated
    from detectron2.layers.rotated_boxes import pairwise_iou_rotated
    from detectron2.structures import RotatedBoxes
    from detectron2.structures import pairwise_iou_rotated as structures_iou

    g = torch.Generator().manual_seed(4)
    boxes = _random_boxes(20, g, rotated=True)
    scores = torch.rand(20, generator=g)
    expected_iou = compat.box_iou_rotated(boxes, boxes)

    calls = []

    def spy(fn):
        def wrapped(*args):
            calls.append(fn.__name__)
            return fn(*args)

        return wrapped

    monkeypatch.setattr(d2_compat, "box_iou_rotated", spy(d2_compat.box_iou_rotated))
    monkeypatch.setattr(d2_compat, "nms_rotated", spy(d2_compat.nms_rotated))

    torch.testing.assert_close(pairwise_iou_rotated(boxes, boxes), expected_iou)
    rotated = RotatedBoxes(boxes)
    torch.testing.assert_close(structures_iou(rotated, rotated), expected_iou)
    assert (
        nms_rotated(boxes, scores, 0.3).tolist() == compat.nms_rotated(boxes, scores, 0.3).tolist()
    )

    # Batched NMS never suppresses across classes: two identical boxes in different classes.
    pair = torch.tensor([[5, 5, 4, 2, 10], [5, 5, 4, 2, 10]], dtype=torch.float32)
    kept = batched_nms_rotated(pair, torch.tensor([0.9, 0.8]), torch.tensor([0, 1]), 0.5)
    assert sorted(kept.tolist()) == [0, 1]
    assert calls == ["box_iou_rotated", "box_iou_rotated", "nms_rotated", "nms_rotated"]


def test_detectron2_roi_align_rotated_error_is_clear(d2_compat):
    from detectron2.layers import ROIAlignRotated

    pooler = ROIAlignRotated(output_size=(7, 7), spatial_scale=1.0, sampling_ratio=2)
    rois = torch.tensor([[0, 8, 8, 4, 4, 30]], dtype=torch.float32)
    with pytest.raises(NotImplementedError, match="ROIAlignV2"):
        pooler(torch.rand(1, 3, 16, 16), rois)


@pytest.fixture
def tiny_coco_dataset(d2_compat, tmp_path):
    """A registered 2-image COCO dataset with category ids 1 and 3; yields (name, gt)."""
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.datasets import register_coco_instances

    gt = {  # image id -> [(category id, x, y, w, h)]
        1: [(1, 4.0, 4.0, 20.0, 30.0), (3, 30.0, 10.0, 25.0, 25.0)],
        2: [(3, 10.0, 20.0, 40.0, 30.0)],
    }
    coco = {
        "info": {},
        "licenses": [],
        "images": [
            {"id": 1, "file_name": "a.jpg", "height": 64, "width": 64},
            {"id": 2, "file_name": "b.jpg", "height": 64, "width": 80},
        ],
        "categories": [{"id": 1, "name": "cat"}, {"id": 3, "name": "dog"}],
        "annotations": [],
    }
    for image_id, anns in gt.items():
        for cat, x, y, w, h in anns:
            coco["annotations"].append(
                {
                    "id": len(coco["annotations"]) + 1,
                    "image_id": image_id,
                    "category_id": cat,
                    "bbox": [x, y, w, h],
                    "area": w * h,
                    "iscrowd": 0,
                }
            )
    json_file = tmp_path / "instances.json"
    json_file.write_text(json.dumps(coco))
    name = f"ovd_compat_{tmp_path.name}"
    register_coco_instances(name, {}, str(json_file), str(tmp_path))
    DatasetCatalog.get(name)  # loading sets the dataset-id -> contiguous-id mapping
    yield name, gt
    DatasetCatalog.remove(name)
    MetadataCatalog.remove(name)


def _perfect_predictions(name, gt):
    from detectron2.data import MetadataCatalog
    from detectron2.structures import Boxes, Instances

    to_contiguous = MetadataCatalog.get(name).thing_dataset_id_to_contiguous_id
    image_sizes = {1: (64, 64), 2: (64, 80)}
    inputs, outputs = [], []
    for image_id, anns in gt.items():
        xyxy = torch.tensor([[x, y, x + w, y + h] for _, x, y, w, h in anns])
        instances = Instances(
            image_sizes[image_id],
            pred_boxes=Boxes(xyxy),
            scores=torch.linspace(0.9, 0.8, len(anns)),
            pred_classes=torch.tensor([to_contiguous[cat] for cat, *_ in anns]),
        )
        inputs.append({"image_id": image_id})
        outputs.append({"instances": instances})
    return inputs, outputs


def test_coco_evaluator_official_impl_perfect_predictions(tiny_coco_dataset):
    from detectron2.evaluation import COCOEvaluator

    name, gt = tiny_coco_dataset
    evaluator = COCOEvaluator(name, tasks=("bbox",), distributed=False, use_fast_impl=False)
    evaluator.reset()
    evaluator.process(*_perfect_predictions(name, gt))
    bbox = evaluator.evaluate()["bbox"]
    for metric in ("AP", "AP50", "AP75", "AP-cat", "AP-dog"):
        assert bbox[metric] == pytest.approx(100.0), metric


def test_coco_evaluator_fast_impl_error_is_clear(tiny_coco_dataset):
    from detectron2.evaluation import COCOEvaluator

    name, gt = tiny_coco_dataset
    evaluator = COCOEvaluator(name, tasks=("bbox",), distributed=False, use_fast_impl=True)
    evaluator.reset()
    evaluator.process(*_perfect_predictions(name, gt))
    with pytest.raises(NotImplementedError, match="use_fast_impl=False"):
        evaluator.evaluate()
