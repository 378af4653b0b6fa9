"""Compression (models/compression, training/compress.py, `ovd compress`): TID importance and
areas, CID centerness and per-instance weights, the KD losses, Light-ML, the student model, and
a short compression run that resumes, exports and loads."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from detector_testing import random_image, training_batch
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

from ovd.models.compression import (
    LightML,
    StudentOutputLayers,
    StudentRCNN,
    TaskIntegrationDistiller,
)
from ovd.models.compression.cid import (
    CenternessInstanceDistiller,
    centerness,
    enlarge_boxes,
    instance_normalise,
    localisation_kd_loss,
    logit_kd_loss,
    region_weights,
)
from ovd.models.compression.light_ml import channel_shuffle
from ovd.models.compression.tid import (
    KEY,
    LOW,
    WEAK,
    imitation_loss,
    importance_maps,
    localisation_score,
    select_areas,
)
from ovd.models.manifest import sha256_file
from ovd.training.train_detector import build_config

STUDENT = "configs/compress/synthetic_student_r18_narrow.yaml"
TEACHER = "configs/detector/synthetic_r18_fpn.yaml"
D = 16
SMALL = ["MODEL.OVD.EMBED_DIM", D, "MODEL.ROI_HEADS.NUM_CLASSES", 3, "MODEL.RPN.POST_NMS_TOPK_TEST", 50,
         "MODEL.RPN.POST_NMS_TOPK_TRAIN", 64, "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", 32,
         "INPUT.MIN_SIZE_TEST", 64, "INPUT.MAX_SIZE_TEST", 64]


def _student_cfg(*opts):
    return build_config(STUDENT, [*SMALL, "MODEL.KD.TID.TEACHER_CHANNELS", 128, *opts])


# --------------------------------------------------------------------------- TID

def test_localisation_score_levels_from_iou_and_thresholds():
    iou = torch.tensor([0.0, 0.3, 0.31, 0.5, 0.69, 0.7, 0.95])
    assert localisation_score(iou, (0.3, 0.7)).tolist() == pytest.approx(
        [0.4, 0.4, 1.5, 1.5, 1.5, 2.0, 2.0])
    assert localisation_score(iou, (0.4, 0.6), (3.0, 2.0, 1.0)).tolist() == pytest.approx(
        [1.0, 1.0, 1.0, 2.0, 3.0, 3.0, 3.0])


def _grid_anchors(h: int, w: int, size: float = 10.0) -> Boxes:
    """One anchor per location, location-major like Detectron2's: cell (y, x) -> row y*w + x."""
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    x0, y0 = xs.flatten() * size, ys.flatten() * size
    return Boxes(torch.stack([x0, y0, x0 + size, y0 + size], dim=1).float())


def test_importance_map_hand_built():
    # A 2 x 3 level, one anchor per cell, objectness 0 (sigmoid 0.5) everywhere; the GT box is
    # exactly the anchor of cell (1, 2) and overlaps no other anchor.
    anchors = _grid_anchors(2, 3)
    gt = [torch.tensor([[20.0, 10, 30, 20]])]
    obj = [torch.zeros(1, 1, 2, 3)]
    deltas = [torch.zeros(1, 4, 2, 3)]
    (imp,) = importance_maps(obj, deltas, [anchors], gt, iou_thresholds=(0.3, 0.7), loc_boxes="anchors")
    expected = torch.full((1, 2, 3), 0.5 * 0.4)
    expected[0, 1, 2] = 0.5 * 2.0
    assert torch.allclose(imp, expected)
    # "predicted": cell (0, 0)'s deltas move its anchor onto the GT box (dx = 20/10, dy = 10/10).
    deltas[0][0, :2, 0, 0] = torch.tensor([2.0, 1.0])
    (imp,) = importance_maps(obj, deltas, [anchors], gt, iou_thresholds=(0.3, 0.7),
                             loc_boxes="predicted", box2box=Box2BoxTransform((1.0, 1.0, 1.0, 1.0)))
    expected[0, 0, 0] = 0.5 * 2.0
    assert torch.allclose(imp, expected)
    # Objectness scales the score: logit +inf -> 1 x 2.0.
    obj[0][0, 0, 1, 2] = 50.0
    (imp,) = importance_maps(obj, deltas, [anchors], gt, iou_thresholds=(0.3, 0.7), loc_boxes="anchors")
    assert imp[0, 1, 2].item() == pytest.approx(2.0)


def test_tid_default_weak_areas_see_the_teachers_regression():
    # Same objectness in both models; only the teacher's deltas move cell (0, 0)'s anchor onto
    # the GT box (the anchor of cell (1, 2), which is the key area: highest objectness).
    anchors = _grid_anchors(2, 3)
    gt = [torch.tensor([[20.0, 10, 30, 20]])]
    obj = [torch.zeros(1, 1, 2, 3)]
    obj[0][0, 0, 1, 2] = 2.0
    student_deltas = [torch.zeros(1, 4, 2, 3)]
    teacher_deltas = [torch.zeros(1, 4, 2, 3)]
    teacher_deltas[0][0, :2, 0, 0] = torch.tensor([2.0, 1.0])
    box2box = Box2BoxTransform((1.0, 1.0, 1.0, 1.0))
    assert build_config(STUDENT).MODEL.KD.TID.LOC_BOXES == "predicted"

    def areas(tid):
        i_s = tid.importance(obj, student_deltas, [anchors], gt, box2box)
        i_t = tid.importance(obj, teacher_deltas, [anchors], gt, box2box)
        return select_areas(i_t[0], i_s[0], key_ratio=1 / 6, weak_ratio=1 / 6)

    got = areas(TaskIntegrationDistiller(8, 8))
    assert got[0, 1, 2] == KEY and got[0, 0, 0] == WEAK and (got == WEAK).sum() == 1
    # The anchors' own IoU is the same for both models: no gap, so no weak area at all.
    assert (areas(TaskIntegrationDistiller(8, 8, loc_boxes="anchors")) == WEAK).sum() == 0
    with pytest.raises(ValueError, match="box2box"):
        importance_maps(obj, student_deltas, [anchors], gt, iou_thresholds=(0.3, 0.7))


def test_key_and_weak_areas_on_a_hand_made_map():
    i_t = torch.tensor([[[0.9, 0.1, 0.5],
                         [0.8, 0.2, 0.6],
                         [0.0, 0.3, 0.4]]])
    i_s = torch.tensor([[[0.0, 0.0, 0.5],    # gap 0.9 (key anyway), 0.1, 0 (no gap)
                         [0.0, 0.0, 0.0],    # gap 0.8 (key), 0.2, 0.6
                         [0.0, 0.5, 0.0]]])  # 0, negative, 0.4
    areas = select_areas(i_t, i_s, key_ratio=2 / 9, weak_ratio=2 / 9)  # k = 2 and 2
    assert areas.tolist() == [[[KEY, LOW, LOW],
                               [KEY, LOW, WEAK],
                               [LOW, LOW, WEAK]]]
    # Weak areas need a positive gap: the student already matches the teacher outside key.
    areas = select_areas(i_t, i_t, key_ratio=1 / 9, weak_ratio=3 / 9)
    assert (areas == KEY).sum() == 1 and (areas == WEAK).sum() == 0


def test_tid_imitation_is_zero_when_the_student_equals_the_teacher():
    torch.manual_seed(0)
    tid = TaskIntegrationDistiller(8, 8, key_ratio=0.1, weak_ratio=0.1)
    with torch.no_grad():
        tid.adapter.weight.copy_(torch.eye(8)[:, :, None, None])
        tid.adapter.bias.zero_()
    feats = [torch.randn(2, 8, 6, 6), torch.randn(2, 8, 3, 3)]
    i_t = [torch.rand(2, 6, 6), torch.rand(2, 3, 3)]
    i_s = [torch.rand(2, 6, 6), torch.rand(2, 3, 3)]
    assert tid(feats, feats, i_s, i_t).item() == pytest.approx(0.0, abs=1e-6)
    assert tid([f + torch.randn_like(f) for f in feats], feats, i_s, i_t).item() > 0.1
    # Scale and offset per channel are normalised away (the "per-channel normalised" imitation).
    assert tid([3 * f + 1 for f in feats], feats, i_s, i_t).item() == pytest.approx(0.0, abs=1e-5)


def test_imitation_weighs_areas_by_alpha_beta_gamma():
    torch.manual_seed(0)
    s, t = torch.randn(1, 4, 2, 2), torch.randn(1, 4, 2, 2)
    def norm(x):
        return (x - x.mean((2, 3), keepdim=True)) / (x.std((2, 3), unbiased=False, keepdim=True) + 1e-5)
    err = (norm(s) - norm(t)).pow(2).mean(1)[0]  # (2, 2)
    areas = torch.tensor([[[KEY, WEAK], [LOW, LOW]]])
    got = imitation_loss(s, t, areas, alpha=2.0, beta=0.5, gamma=0.1)
    want = 2.0 * err[0, 0] + 0.5 * err[0, 1] + 0.1 * err[1].mean()
    assert got.item() == pytest.approx(want.item(), rel=1e-5)


# --------------------------------------------------------------------------- CID

def test_centerness_hand_computed():
    box = torch.tensor([0.0, 0.0, 10.0, 20.0])
    points = torch.tensor([[5.0, 10.0], [2.0, 10.0], [2.0, 5.0], [11.0, 5.0], [0.0, 10.0]])
    got = centerness(points, box.expand(5, 4))
    # (l, r, t, b): (5,5,10,10) -> 1; (2,8,10,10) -> sqrt(1/4); (2,8,5,15) -> sqrt(1/4 * 1/3);
    # outside -> 0; on the border -> 0.
    assert got.tolist() == pytest.approx([1.0, 0.5, math.sqrt(1 / 12), 0.0, 0.0])
    assert enlarge_boxes(box[None], 2.0).tolist() == [[-5.0, -10.0, 15.0, 30.0]]


def _sampled(boxes: list[list[float]], matched: list[list[float]], size=(128, 128)) -> Instances:
    p = Instances(size)
    p.proposal_boxes = Boxes(torch.tensor(boxes))
    p.gt_boxes = Boxes(torch.tensor(matched))
    p.gt_classes = torch.zeros(len(boxes), dtype=torch.long)
    return p


def test_a_tiny_and_a_large_instance_get_equal_total_weight():
    tiny, large = [10.0, 10, 14, 14], [40.0, 40, 120, 120]
    targets = Instances((128, 128))
    targets.gt_boxes = Boxes(torch.tensor([tiny, large]))
    rois = [[10.0, 10, 14, 14], [9, 11, 14, 15],                                  # around tiny
            [40, 40, 120, 120], [45, 50, 110, 115], [60, 60, 100, 100], [38, 42, 125, 118],
            [80, 80, 120, 120], [42, 38, 100, 90],                                # around large
            [0, 100, 8, 108]]                                                     # far away
    matched = [tiny, tiny] + [large] * 7
    w = region_weights([_sampled(rois, matched)], [targets], enlarge=1.5)
    assert w[:2].sum().item() == pytest.approx(1.0)
    assert w[2:8].sum().item() == pytest.approx(1.0)
    assert w[8].item() == 0.0  # centre outside the enlarged large box
    assert w[2] > w[6]  # the centred RoI outweighs an off-centre one
    # An image without GT contributes nothing.
    empty = Instances((128, 128))
    empty.proposal_boxes = Boxes(torch.tensor([[0.0, 0, 10, 10]]))
    no_gt = Instances((128, 128))
    no_gt.gt_boxes = Boxes(torch.zeros(0, 4))
    assert region_weights([empty], [no_gt], enlarge=1.5).tolist() == [0.0]


def test_cid_localisation_kd_skips_background_rois_by_default():
    gt = [40.0, 40, 80, 80]
    targets = Instances((128, 128))
    targets.gt_boxes = Boxes(torch.tensor([gt]))
    # A foreground RoI on the box, and a background one (IoU 0.44) centred on it too: Detectron2
    # matches both to the box, so both have centerness 1.
    rois = _sampled([gt, [30.0, 30, 90, 90]], [gt, gt])
    rois.gt_classes = torch.tensor([0, 3])  # 3 = background with 3 classes
    logits = torch.randn(2, 4)
    student = torch.zeros(2, 4)
    teacher = torch.tensor([[0.0, 0, 0, 0], [1.0, 1, 1, 1]])  # differs on the background RoI only
    cid = CenternessInstanceDistiller()
    got = cid([rois], [targets], logits, logits, student, teacher, background_class=3)
    assert got["loss_kd_loc"].item() == 0.0
    old = CenternessInstanceDistiller(loc_foreground_only=False)
    got = old([rois], [targets], logits, logits, student, teacher, background_class=3)
    assert got["loss_kd_loc"].item() == pytest.approx(0.5 * 4.0)
    assert build_config(STUDENT).MODEL.KD.CID.LOC_FOREGROUND_ONLY


def test_cid_without_instance_normalisation_keeps_raw_centerness():
    tiny, large = [10.0, 10, 14, 14], [40.0, 40, 120, 120]
    targets = Instances((128, 128))
    targets.gt_boxes = Boxes(torch.tensor([tiny, large]))
    rois = _sampled([tiny, large, large, [0.0, 100, 8, 108]], [tiny, large, large, large])
    raw = region_weights([rois], [targets], enlarge=1.5, per_instance=False)
    assert raw.tolist() == pytest.approx([1.0, 1.0, 1.0, 0.0])  # the large box weighs 2x the tiny one
    assert region_weights([rois], [targets], enlarge=1.5).tolist() == pytest.approx([1.0, 0.5, 0.5, 0.0])


def test_instance_normalise_hand_computed():
    w = instance_normalise(torch.tensor([1.0, 3.0, 0.5, 0.0, 2.0]), torch.tensor([0, 0, 2, 1, -1]))
    assert w.tolist() == pytest.approx([0.25, 0.75, 1.0, 0.0, 0.0])


def test_cid_losses_hand_computed_and_zero_when_the_student_equals_the_teacher():
    student = torch.tensor([[math.log(3.0), 0.0], [5.0, -1.0]], requires_grad=True)
    teacher = torch.tensor([[0.0, 0.0], [0.0, 3.0]])
    weights = torch.tensor([1.0, 0.0])  # the second RoI is outside every instance region
    # KL((.5, .5) || (.75, .25)) = .5 ln(.5/.75) + .5 ln(.5/.25) = .5 ln(4/3)
    assert logit_kd_loss(student, teacher, weights, 1.0).item() == pytest.approx(0.5 * math.log(4 / 3))
    logits = torch.randn(6, 4)
    w = torch.rand(6)
    assert logit_kd_loss(logits, logits.clone(), w, 2.0).item() == pytest.approx(0.0, abs=1e-6)
    deltas = torch.randn(6, 4)
    assert localisation_kd_loss(deltas, deltas.clone(), w).item() == 0.0
    assert localisation_kd_loss(deltas + 1, deltas, w).item() == pytest.approx(4.0)  # L1 over 4
    assert localisation_kd_loss(deltas + 1, deltas, w, beta=2.0).item() == pytest.approx(4 * 0.25)
    zero = logit_kd_loss(student, teacher, torch.zeros(2), 2.0)
    assert zero.item() == 0.0 and zero.requires_grad


# --------------------------------------------------------------------------- Light-ML

def _predictor(light_ml: bool, at_inference: bool = True) -> StudentOutputLayers:
    torch.manual_seed(0)
    return StudentOutputLayers(ShapeSpec(channels=32), embed_dim=8, branch_dim=16, init_temperature=10.0,
                               semantic_regressor=True, light_ml=light_ml, light_ml_channels=4,
                               light_ml_at_inference=at_inference, num_classes=3,
                               box2box_transform=Box2BoxTransform((10.0, 10.0, 5.0, 5.0)))


def test_channel_shuffle_interleaves_the_branches():
    a = torch.tensor([[[1.0], [2.0]]])
    b = torch.tensor([[[10.0], [20.0]]])
    assert channel_shuffle(torch.cat([a, b], 1), 2).flatten().tolist() == [1.0, 10.0, 2.0, 20.0]


@pytest.mark.parametrize("light_ml", [True, False])
def test_logit_kd_reaches_the_regression_branch_only_through_light_ml(light_ml):
    predictor = _predictor(light_ml)
    x = torch.randn(6, 32)
    text = F.normalize(torch.randn(3, 8), dim=1)
    logits, _ = predictor(x, text, torch.tensor([0, 1, 2, 3, 3, 0]))
    logit_kd_loss(logits, torch.randn(6, 4), torch.ones(6), 2.0).backward()
    reg_grad = predictor.reg_branch[0].weight.grad
    assert predictor.cls_branch[0].weight.grad.abs().sum() > 0
    if light_ml:
        assert reg_grad is not None and reg_grad.abs().sum() > 0
    else:
        assert reg_grad is None
    assert predictor.bbox_pred.weight.grad is None  # the deltas themselves are not in this loss


def test_light_ml_inference_switch():
    x = torch.randn(5, 32)
    for at_inference in (True, False):
        predictor = _predictor(True, at_inference)
        raw = (predictor.cls_branch(x), predictor.reg_branch(x))
        predictor.train()
        lifted = predictor.branches(x)
        assert not torch.allclose(lifted[0], raw[0]) and not torch.allclose(lifted[1], raw[1])
        predictor.eval()
        with torch.no_grad():
            got = predictor.branches(x)
        same = all(torch.equal(g, r) for g, r in zip(got, raw, strict=True))
        assert same is (not at_inference)
    with pytest.raises(ValueError, match="even channel count"):
        LightML(16, channels=3)


def test_zero_init_light_ml_starts_as_the_identity_and_its_gains_learn():
    torch.manual_seed(0)
    lm = LightML(16, channels=4, zero_init=True)
    f_cls, f_reg = torch.randn(5, 16), torch.randn(5, 16, requires_grad=True)
    out_cls, out_reg = lm(f_cls, f_reg)
    assert torch.equal(out_cls, f_cls) and torch.equal(out_reg, f_reg)
    out_cls.square().sum().backward()  # a classification-side loss
    assert lm.gains.grad[0] != 0 and lm.gains.grad[1] == 0
    with torch.no_grad():
        lm.gains.fill_(0.5)
    out_cls, _ = lm(f_cls, f_reg)
    assert not torch.equal(out_cls, f_cls)
    assert "gains" not in dict(LightML(16, channels=4).named_parameters())  # the paper's form


# --------------------------------------------------------------------------- the student

def test_student_config_builds_a_narrow_model_whose_encode_and_classify_serve():
    torch.manual_seed(0)
    model = build_model(_student_cfg("MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.0)).eval()
    assert isinstance(model, StudentRCNN)
    assert model.backbone.bottom_up.res2[0].conv1.out_channels == 32
    assert {s.channels for s in model.backbone.output_shape().values()} == {64}
    predictor = model.roi_heads.box_predictor
    assert isinstance(predictor, StudentOutputLayers) and predictor.light_ml is not None
    assert predictor.light_ml.gains is not None  # ZERO_INIT in the config
    assert model.tid.adapter.out_channels == 128 and model.cid is not None
    inputs = [random_image(1), random_image(2)]
    text = F.normalize(torch.randn(4, D), dim=1)
    with torch.inference_mode():
        regions = model.encode(inputs)
        split = model.to_original_size(predictor.classify(regions, text), inputs)
        full = model(inputs, text=text)
    assert [r.embeddings.shape[1] for r in regions] == [D, D]
    assert len(full[0]["instances"]) > 0
    for f, s in zip(full, split, strict=True):
        assert torch.equal(f["instances"].scores, s["instances"].scores)
        assert torch.equal(f["instances"].pred_boxes.tensor, s["instances"].pred_boxes.tensor)


def test_narrow_backbone_is_detectron2_r18_fpn_at_full_width():
    from detectron2.modeling.backbone.fpn import build_resnet_fpn_backbone

    from ovd.models.compression.backbone import build_narrow_resnet_fpn_backbone

    cfg = build_config(TEACHER)
    ours = build_narrow_resnet_fpn_backbone(cfg, ShapeSpec(channels=3)).state_dict()
    theirs = build_resnet_fpn_backbone(cfg, ShapeSpec(channels=3)).state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}


def _batch() -> list[dict]:
    return training_batch(D, (4.0, 4, 20, 20))


def test_training_step_with_a_frozen_teacher():
    torch.manual_seed(0)
    teacher = build_model(build_config(TEACHER, SMALL))
    student = build_model(_student_cfg("MODEL.KD.TID.LOC_BOXES", "predicted"))
    student.train_text = F.normalize(torch.randn(3, D), dim=1)
    student.attach_teacher(teacher)
    student.train()
    with EventStorage(0):
        losses = student(_batch())
    assert set(losses) == {"loss_cls", "loss_box_reg", "loss_rpn_cls", "loss_rpn_loc", "loss_distill",
                           "loss_kd_tid", "loss_kd_cls", "loss_kd_loc"}
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_kd_tid"] > 0 and losses["loss_kd_cls"] > 0
    sum(losses.values()).backward()
    assert student.tid.adapter.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())
    assert not teacher.training  # the student's train() does not reach the teacher
    keys = set(student.state_dict())
    assert keys == set(build_model(_student_cfg()).state_dict())  # no teacher weights inside
    assert not any(k.startswith("_teacher") for k in keys)
    # Without a teacher the student trains like the EZSD detector (the no-KD baseline).
    plain = build_model(_student_cfg())
    plain.train_text = student.train_text
    with EventStorage(0):
        assert set(plain.train()(_batch())) == {"loss_cls", "loss_box_reg", "loss_rpn_cls",
                                               "loss_rpn_loc", "loss_distill"}


def test_rpn_forward_with_dense_outputs_is_detectron2s_rpn_forward():
    from ovd.models.compression.student import rpn_forward_train

    torch.manual_seed(0)
    model = build_model(_student_cfg()).train()
    batch = _batch()
    images = model.preprocess_image(batch)
    gt = [x["instances"] for x in batch]
    features = model.backbone(images.tensor)
    with EventStorage(0):
        torch.manual_seed(1)
        ours, our_losses, dense = rpn_forward_train(model.proposal_generator, images, features, gt)
        torch.manual_seed(1)
        theirs, their_losses = model.proposal_generator(images, features, gt)
    assert {k: v.item() for k, v in our_losses.items()} == {k: v.item() for k, v in their_losses.items()}
    for a, b in zip(ours, theirs, strict=True):
        assert torch.equal(a.proposal_boxes.tensor, b.proposal_boxes.tensor)
    assert [o.shape for o in dense.objectness] == [(2, 3, 16, 16), (2, 3, 8, 8), (2, 3, 4, 4),
                                                   (2, 3, 2, 2), (2, 3, 1, 1)]
    assert [len(a) for a in dense.anchors] == [3 * 256, 3 * 64, 3 * 16, 3 * 4, 3]


def test_a_teacher_of_another_width_is_refused():
    student = build_model(_student_cfg("MODEL.KD.TID.TEACHER_CHANNELS", 96))
    with pytest.raises(ValueError, match="FPN is 128 channels"):
        student.attach_teacher(build_model(build_config(TEACHER, SMALL)))
    with pytest.raises(ValueError, match="dimensions"):
        student.attach_teacher(build_model(build_config(TEACHER, [*SMALL, "MODEL.OVD.EMBED_DIM", 8])))


# --------------------------------------------------------------------------- ovd compress

@pytest.fixture(scope="module")
def teacher_root(make_world, tmp_path_factory):
    """A pipeline root with a tiny world, a CLIP, GT-only distillation targets and a (random,
    untrained) teacher saved as a training output folder, as `ovd train` would leave it."""
    from detectron2.checkpoint import DetectionCheckpointer

    from ovd.models.clip.model import architecture_config, load_clip, save_clip
    from ovd.training.data.coco_format import register_from_spec
    from ovd.training.data.synthetic import world_datasets
    from ovd.training.targets import TargetsConfig, run_targets
    from ovd.training.train_detector import prepare

    root = tmp_path_factory.mktemp("compress")
    world = make_world(num_train=4, image_size=64)
    (root / "world").symlink_to(world, target_is_directory=True)
    torch.manual_seed(0)
    clip_dir = root / "clip" / "pretrained"
    save_clip(load_clip("ovd-vit-tiny-64"), clip_dir, model_cfg=architecture_config("ovd-vit-tiny-64"),
              record={"stage": "test"})
    clip = load_clip(str(clip_dir))
    specs = [f"{n}={j}:{r}" for n, (j, r) in world_datasets(world).items()]
    json_file, image_root = world_datasets(world)["synth_train"]
    run_targets(clip, json_file, image_root, None, root / "targets", TargetsConfig())
    for spec in specs:
        register_from_spec(spec, overwrite=True)
    cfg = build_config(TEACHER, ["DATASETS.REGISTER", specs, "OUTPUT_DIR", str(root / "detector")])
    cfg = prepare(cfg, clip)
    DetectionCheckpointer(build_model(cfg), save_dir=cfg.OUTPUT_DIR).save("model_final")
    (root / "detector" / "config.yaml").write_text(cfg.dump())
    return root


RUN = ["SOLVER.IMS_PER_BATCH", "2", "SOLVER.CHECKPOINT_PERIOD", "2", "SOLVER.WARMUP_ITERS", "1",
       "SOLVER.STEPS", "(5,)", "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "64",
       "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "64", "DATALOADER.NUM_WORKERS", "0",
       "MODEL.RPN.POST_NMS_TOPK_TRAIN", "64", "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "32"]


def test_compress_runs_resumes_exports_and_loads(teacher_root, tmp_path, monkeypatch):
    from detectron2.checkpoint import DetectionCheckpointer

    from ovd.models.exported import load_export
    from ovd.training.cli import main
    from ovd.training.compress import CompressTrainer

    root = teacher_root
    student_dir = root / "student"
    # A run stopped after 4 of its iterations (checkpoints at 2 and 4) ...
    assert main(["compress", "--root", str(root), *RUN, "SOLVER.MAX_ITER", "4"]) == 0
    assert {p.name for p in student_dir.glob("model_*.pth")} == {
        "model_0000001.pth", "model_0000003.pth", "model_final.pth"}
    cfg = build_config(student_dir / "config.yaml")
    assert cfg.MODEL.META_ARCHITECTURE == "StudentRCNN" and cfg.MODEL.KD.TID.TEACHER_CHANNELS == 128
    assert cfg.MODEL.KD.TEACHER == str((root / "detector").resolve())
    saved = torch.load(student_dir / "model_final.pth", weights_only=False)
    assert set(saved["model"]) == set(build_model(cfg).state_dict())  # the teacher is not saved
    assert saved["iteration"] == 3
    # ... continues from iteration 4 when run again with the longer schedule.
    assert main(["compress", "--root", str(root), *RUN, "SOLVER.MAX_ITER", "6"]) == 0
    log = (student_dir / "log.txt").read_text()
    assert "Starting training from iteration 4" in log
    assert torch.load(student_dir / "model_final.pth", weights_only=False)["iteration"] == 5
    metrics = (student_dir / "metrics.json").read_text()
    assert '"loss_kd_tid"' in metrics and '"loss_kd_cls"' in metrics and '"loss_distill"' in metrics
    # Killed in iteration 6 (after the checkpoint of iteration 5), it resumes from 6.
    original = CompressTrainer.run_step

    def killed_at_6(self):
        if self.iter == 6:
            raise KeyboardInterrupt
        original(self)

    monkeypatch.setattr(CompressTrainer, "run_step", killed_at_6)
    assert main(["compress", "--root", str(root), *RUN, "SOLVER.MAX_ITER", "8"]) == 130
    monkeypatch.undo()
    assert main(["compress", "--root", str(root), *RUN, "SOLVER.MAX_ITER", "8"]) == 0
    assert "Starting training from iteration 6" in (student_dir / "log.txt").read_text()
    assert torch.load(student_dir / "model_final.pth", weights_only=False)["iteration"] == 7

    # The student exports and loads like a teacher; the export serves what the checkpoint does.
    assert main(["export", "--root", str(root), "--model-dir", str(student_dir),
                 "--out", str(tmp_path / "export")]) == 0
    exported = load_export(tmp_path / "export")
    assert isinstance(exported.model, StudentRCNN)
    # Its manifest names the teacher (by its weights, not a path of this machine).
    teacher = exported.manifest["distilled_from"]
    assert teacher == {"name": "detector", "weights_sha256": sha256_file(root / "detector" / "model_final.pth"),
                       "kd": {"tid": True, "cid": True, "light_ml": True}}
    assert str(root) not in (tmp_path / "export" / "detector.yaml").read_text()
    trained = build_model(cfg).eval()
    DetectionCheckpointer(trained).load(str(student_dir / "model_final.pth"))
    text = exported.text_embeddings(["red ring", "blue disk"])
    inputs = [random_image(5)]
    with torch.inference_mode():
        a = exported.model.encode(inputs)[0]
        b = trained.encode(inputs)[0]
        found = exported.model.roi_heads.box_predictor.classify([a], text, score_thresh=0.0)[0]
    assert torch.equal(a.proposals, b.proposals) and torch.allclose(a.embeddings, b.embeddings)
    assert len(found) > 0 and int(found.pred_classes.max()) < 2
    # An export can be a teacher too (same CLIP recorded in both).
    from ovd.training.compress import load_teacher, teacher_clip_sha256

    assert isinstance(load_teacher(tmp_path / "export"), StudentRCNN)
    assert teacher_clip_sha256(tmp_path / "export") == teacher_clip_sha256(root / "detector") != ""
