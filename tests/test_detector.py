"""The EZSD detector components: classifier, distillation loss, semantic regressor, per-call
vocabularies, the training mapper and the generalized AP computation."""

from __future__ import annotations

import json
import math
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from detector_testing import random_image, training_batch
from detectron2.data import transforms as T
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from ovd.models.detector import TextEmbeddingClassifier, distillation_loss
from ovd.training.evaluate import WithVocabulary, group_ap
from ovd.training.train_detector import DistillDatasetMapper, build_config

CONFIG = "configs/detector/synthetic_r18_fpn.yaml"
D = 16


def _cfg(**opts):
    flat = [x for kv in opts.items() for x in kv]
    cfg = build_config(CONFIG, ["MODEL.OVD.EMBED_DIM", D, "MODEL.ROI_HEADS.NUM_CLASSES", 3,
                                "MODEL.RPN.POST_NMS_TOPK_TEST", 50, "INPUT.MIN_SIZE_TEST", 64,
                                "INPUT.MAX_SIZE_TEST", 64, *flat])
    return cfg


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = build_model(_cfg(**{"MODEL.ROI_HEADS.SCORE_THRESH_TEST": 0.0}))
    m.train_text = F.normalize(torch.randn(3, D), dim=1)
    return m.eval()


def test_classifier_logits_hand_computed():
    clf = TextEmbeddingClassifier(2, init_temperature=100.0)
    with torch.no_grad():
        clf.background.weight.copy_(torch.tensor([[0.5, 0.0]]))
    assert torch.allclose(clf.background_vector, torch.tensor([0.5, 0.0]))  # un-normalised
    logits = clf(torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    assert torch.allclose(logits, torch.tensor([[100.0, 0.0, 50.0]]))
    assert math.isclose(clf.log_temperature.item(), math.log(100.0), rel_tol=1e-6)


def test_temperature_floor():
    clf = TextEmbeddingClassifier(2, init_temperature=100.0, min_temperature=20.0)
    with torch.no_grad():
        clf.log_temperature.fill_(math.log(2.0))  # as if SGD had collapsed it
        clf.background.weight.zero_()
    logits = clf(torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 0.0]]))
    assert torch.allclose(logits, torch.tensor([[20.0, 0.0]]))
    free = TextEmbeddingClassifier(2, init_temperature=2.0)
    free.background.weight.data.zero_()
    assert torch.allclose(free(torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 0.0]])),
                          torch.tensor([[2.0, 0.0]]))


def test_distillation_loss_hand_computed():
    # Image 0: two regions with weights 1 and 3 -> renormalised 0.5 and 1.5.
    # Image 1: one region, weight 0.2 -> 1.
    e = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    t = torch.tensor([[0.0, 1.0], [0.0, 1.0], [0.8, 0.6]])
    w = torch.tensor([1.0, 3.0, 0.2])
    idx = torch.tensor([0, 0, 1])
    # L1 distances: 2, 0, 0.4 -> (0.5*2 + 1.5*0 + 1*0.4) / 3
    assert math.isclose(distillation_loss(e, t, w, idx).item(), 1.4 / 3, rel_tol=1e-6)
    empty = distillation_loss(torch.zeros(0, 2, requires_grad=True), torch.zeros(0, 2),
                              torch.zeros(0), torch.zeros(0, dtype=torch.long))
    assert empty.item() == 0.0 and empty.requires_grad


def test_semantic_regressor_uses_the_class_text(model):
    pred = model.roi_heads.box_predictor
    x = torch.randn(5, model.roi_heads.box_head.output_shape.channels)
    text_a = F.normalize(torch.randn(3, D), dim=1)
    text_b = F.normalize(torch.randn(3, D), dim=1)
    gt = torch.tensor([0, 1, 2, 3, 3])  # 3 = background -> zero text
    with torch.no_grad():
        pred.bbox_pred.weight.normal_()
        _, da = pred(x, text_a, gt)
        _, db = pred(x, text_b, gt)
    assert not torch.allclose(da[:3], db[:3])
    assert torch.allclose(da[3:], db[3:])  # background rows see no text


def test_semantic_regressor_at_test_time_uses_background_when_it_wins(model):
    """Inference: t_y is the text of the arg-max over classes *and* background; a region that
    background wins regresses with the zero vector (EZSD), not with its best class's text."""
    pred = model.roi_heads.box_predictor
    clf = pred.classifier
    emb = F.normalize(torch.randn(6, D), dim=1)
    f_reg = torch.randn(6, pred.bbox_pred.in_features - D)
    text = F.normalize(torch.randn(3, D), dim=1)
    with torch.no_grad():
        w = clf.background.weight.clone()
        clf.background.weight.copy_(emb[:3].sum(0, keepdim=True) * 10)  # bg wins rows 0-2
        logits, deltas = pred._predict(emb, f_reg, text)
        winner = logits.argmax(1)
        bg = winner == 3
        assert bg.any() and (~bg).any()
        zero_text = pred.deltas(f_reg, torch.zeros(6, D))
        own_text = pred.deltas(f_reg, text[logits[:, :3].argmax(1)])
        clf.background.weight.copy_(w)
    assert torch.allclose(deltas[bg], zero_text[bg])
    assert torch.allclose(deltas[~bg], own_text[~bg])
    assert not torch.allclose(deltas[bg], own_text[bg])


def test_per_call_vocabularies_are_independent(model):
    inputs = [random_image(1)]
    vocab_a = F.normalize(torch.randn(4, D), dim=1)
    vocab_b = F.normalize(torch.randn(7, D), dim=1)
    with torch.inference_mode():
        a1 = model(inputs, text=vocab_a)[0]["instances"]
        b = model(inputs, text=vocab_b)[0]["instances"]
        a2 = model(inputs, text=vocab_a)[0]["instances"]
    assert len(a1) > 0 and len(b) > 0
    assert torch.equal(a1.scores, a2.scores) and torch.equal(a1.pred_boxes.tensor, a2.pred_boxes.tensor)
    assert int(a1.pred_classes.max()) < 4 and int(b.pred_classes.max()) < 7

    results: dict[str, list] = {"a": [], "b": []}

    def run(name, vocab):
        with torch.inference_mode():
            for _ in range(3):
                results[name].append(model(inputs, text=vocab)[0]["instances"].scores.clone())

    threads = [threading.Thread(target=run, args=("a", vocab_a)),
               threading.Thread(target=run, args=("b", vocab_b))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert all(torch.equal(s, a1.scores) for s in results["a"])
    assert all(torch.equal(s, b.scores) for s in results["b"])


def test_one_encode_serves_several_vocabularies(model):
    """encode() once, classify() per vocabulary == a full forward per vocabulary."""
    inputs = [random_image(1), random_image(2)]
    vocabs = [F.normalize(torch.randn(4, D), dim=1), F.normalize(torch.randn(9, D), dim=1)]
    predictor = model.roi_heads.box_predictor
    with torch.inference_mode():
        regions = model.encode(inputs)
        assert [r.embeddings.shape[1] for r in regions] == [D, D]
        for text in vocabs:
            full = model(inputs, text=text)
            split = model.to_original_size(predictor.classify(regions, text), inputs)
            for f, s in zip(full, split, strict=True):
                assert torch.equal(f["instances"].scores, s["instances"].scores)
                assert torch.equal(f["instances"].pred_boxes.tensor, s["instances"].pred_boxes.tensor)
        few = predictor.classify(regions[:1], vocabs[0], max_detections=2, score_thresh=0.0)[0]
        assert len(few) == 2
        none = predictor.classify(regions[:1], vocabs[0], score_thresh=1.01)[0]
        assert len(none) == 0


def test_detect_is_detectron2s_inference_in_softmax_mode(model):
    """`detect` (what PyTorch and the ONNX graphs run) with softmax scores and per-class NMS
    gives Detectron2's `fast_rcnn_inference` on the same regions."""
    from detectron2.modeling.roi_heads.fast_rcnn import fast_rcnn_inference

    predictor = model.roi_heads.box_predictor
    text = F.normalize(torch.randn(5, D, generator=torch.Generator().manual_seed(1)), dim=1)
    with torch.inference_mode():
        regions = model.encode([random_image(1), random_image(2)])
        for thresh, topk in ((0.0, 100), (0.15, 7)):
            ours = predictor.classify(regions, text, score_thresh=thresh, max_detections=topk)
            for r, got in zip(regions, ours, strict=True):
                logits, deltas = predictor._predict(r.embeddings, r.reg_features, text)
                boxes = predictor.box2box_transform.apply_deltas(deltas, r.proposals)
                (want,), _ = fast_rcnn_inference([boxes], [F.softmax(logits, -1)], [r.image_size], thresh,
                                                 predictor.test_nms_thresh, topk)
                assert len(got) == len(want) > 0
                torch.testing.assert_close(got.scores, want.scores)
                torch.testing.assert_close(got.pred_boxes.tensor, want.pred_boxes.tensor)
                assert torch.equal(got.pred_classes, want.pred_classes)


def test_per_name_scores_do_not_depend_on_the_other_names(model):
    predictor = model.roi_heads.box_predictor
    text = F.normalize(torch.randn(6, D, generator=torch.Generator().manual_seed(2)), dim=1)
    everything = {"score_thresh": 0.05, "max_detections": 100_000}
    with torch.inference_mode():
        regions = model.encode([random_image(3)])
        alone = predictor.classify(regions, text[2:3], score_mode="per_name", **everything)[0]
        among = predictor.classify(regions, text, score_mode="per_name", **everything)[0]
        mine = among[among.pred_classes == 2]
        assert len(alone) == len(mine) > 0
        torch.testing.assert_close(alone.scores, mine.scores)
        torch.testing.assert_close(alone.pred_boxes.tensor, mine.pred_boxes.tensor)
        # Softmax spreads a region's probability over the names sent: the same name scores
        # less once others are added.
        soft_alone = predictor.classify(regions, text[2:3], **everything)[0]
        soft_among = predictor.classify(regions, text, **everything)[0]
        assert soft_among[soft_among.pred_classes == 2].scores.sum() < 0.9 * soft_alone.scores.sum()


def test_nms_threshold_and_class_agnostic_nms(model):
    from detectron2.structures import pairwise_iou

    predictor = model.roi_heads.box_predictor
    text = F.normalize(torch.randn(4, D, generator=torch.Generator().manual_seed(3)), dim=1)

    def max_iou(found, same_class_only=False):
        iou = pairwise_iou(found.pred_boxes, found.pred_boxes).fill_diagonal_(0)
        if same_class_only:
            iou[found.pred_classes[:, None] != found.pred_classes[None, :]] = 0
        return float(iou.max())

    with torch.inference_mode():
        regions = model.encode([random_image(4)])
        per_class, agnostic, loose = (predictor.classify(regions, text, score_thresh=0.0, nms_thresh=iou,
                                                          max_detections=100_000,
                                                          class_agnostic=agnostic)[0]
                                      for iou, agnostic in ((0.5, False), (0.5, True), (1.0, False)))
    assert max_iou(per_class, same_class_only=True) <= 0.5 < max_iou(per_class)  # classes overlap
    assert max_iou(agnostic) <= 0.5  # one label per object
    assert len(loose) > len(per_class) > len(agnostic) > 0


def test_evaluation_leaves_the_model_in_the_mode_it_found():
    """Detectron2's inference_on_dataset restores the *wrapper's* mode on exit: an eval-mode
    model must still be in eval mode afterwards (a benchmark timed it right after evaluating)."""
    from detectron2.evaluation import DatasetEvaluator, inference_on_dataset

    torch.manual_seed(0)
    m = build_model(_cfg()).eval()
    seen = []

    class Count(DatasetEvaluator):
        def process(self, inputs, outputs):
            seen.append(len(outputs[0]["instances"]))

        def evaluate(self):
            return {}

    inference_on_dataset(WithVocabulary(m, F.normalize(torch.randn(3, D), dim=1)),
                         [[random_image(1)]], Count())
    assert len(seen) == 1 and not m.training
    m.train()
    assert WithVocabulary(m, torch.zeros(1, D)).training  # and a training model stays in training


def test_evaluation_keeps_300_detections_with_no_score_floor():
    """EZSD's generalized evaluation: 300 per image and no threshold, whatever the config's
    test values (the synthetic config keeps 100 above 0.05 for serving)."""
    torch.manual_seed(0)
    m = build_model(_cfg(**{"MODEL.RPN.POST_NMS_TOPK_TEST": 200})).eval()
    text = F.normalize(torch.randn(3, D), dim=1)
    with torch.inference_mode():
        served = m([random_image(1)], text=text)[0]["instances"]
        evaluated = WithVocabulary(m, text, max_detections=300, score_thresh=0.0)(
            [random_image(1)])[0]["instances"]
    assert len(served) <= 100 and (served.scores > 0.05).all()
    assert 100 < len(evaluated) <= 300
    assert float(evaluated.scores.min()) < 0.05


def test_training_step_has_every_loss_and_distillation_reaches_the_box_head():
    torch.manual_seed(0)
    m = build_model(_cfg())
    m.train_text = F.normalize(torch.randn(3, D), dim=1)
    m.train()
    batch = training_batch(D, (4.0, 4, 30, 30))
    with EventStorage(0):
        losses = m(batch)
    assert set(losses) == {"loss_cls", "loss_box_reg", "loss_rpn_cls", "loss_rpn_loc", "loss_distill"}
    assert all(torch.isfinite(v) for v in losses.values())
    losses["loss_distill"].backward()
    assert m.roi_heads.box_predictor.embed.weight.grad.abs().sum() > 0
    assert m.roi_heads.box_head.fc1.weight.grad.abs().sum() > 0
    assert m.roi_heads.box_predictor.bbox_pred.weight.grad is None  # regression not involved


class _Targets(dict):
    pass


def test_mapper_maps_classes_and_transforms_distill_boxes(tmp_path):
    from PIL import Image

    Image.fromarray(np.zeros((32, 48, 3), np.uint8)).save(tmp_path / "a.png")
    cfg = _cfg(**{"INPUT.MIN_SIZE_TRAIN": (64,), "INPUT.MAX_SIZE_TRAIN": 1000,
                  "INPUT.RANDOM_FLIP": "none"})
    targets = _Targets({7: {"boxes": torch.tensor([[1.0, 2, 11, 12], [0, 0, 20, 20], [5, 5, 9, 9]]),
                            "embeddings": torch.eye(3, D),
                            "weights": torch.tensor([1.0, 0.9, 0.3]),
                            "is_gt": torch.tensor([True, False, False])}})
    mapper = DistillDatasetMapper(cfg, class_map=torch.tensor([0, -1, 1]), targets=targets,
                                  max_proposals=1)
    assert any(isinstance(a, T.ResizeShortestEdge) for a in mapper.augmentations.augs)
    out = mapper({"file_name": str(tmp_path / "a.png"), "image_id": 7, "height": 32, "width": 48,
                  "annotations": [
                      {"bbox": [1, 2, 10, 10], "bbox_mode": 1, "category_id": 0},
                      {"bbox": [20, 2, 10, 10], "bbox_mode": 1, "category_id": 1},  # novel: dropped
                      {"bbox": [30, 10, 10, 10], "bbox_mode": 1, "category_id": 2}]})
    assert out["image"].shape[1:] == (64, 96)  # resized by 2
    assert out["instances"].gt_classes.tolist() == [0, 1]
    dist = out["distill"]
    assert len(dist) == 2  # the GT region + max_proposals=1 proposal
    assert torch.allclose(dist.boxes.tensor, torch.tensor([[2.0, 4, 22, 24], [0, 0, 40, 40]]))
    assert dist.weights.tolist() == pytest.approx([1.0, 0.9])


def test_group_ap_hand_built(tmp_path):
    gt = {"images": [{"id": 1, "width": 100, "height": 100, "file_name": "a.png"}],
          "annotations": [
              {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20], "area": 400, "iscrowd": 0},
              {"id": 2, "image_id": 1, "category_id": 2, "bbox": [50, 50, 30, 30], "area": 900, "iscrowd": 0}],
          "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt))
    dets = [{"image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20], "score": 0.9},
            {"image_id": 1, "category_id": 2, "bbox": [0, 0, 10, 10], "score": 0.8}]
    r = group_ap(path, dets, {"base": [1], "novel": [2], "all": [1, 2]})
    assert r["base"]["AP50"] == pytest.approx(100.0)
    assert r["novel"]["AP50"] == pytest.approx(0.0)
    assert r["all"]["AP50"] == pytest.approx(50.0)
    assert r["base"]["APs"] == pytest.approx(100.0)  # 20x20 is a small object


def test_background_vector_is_an_ordinary_linear_layer():
    """Default nn.Linear init (not zero) and a plain SGD step: one step at lr 0.1 moves w_bg by
    0.1 x its gradient (the old tau_0-scaled storage moved it 100x less)."""
    torch.manual_seed(0)
    clf = TextEmbeddingClassifier(D, init_temperature=100.0)
    w0 = clf.background_vector.detach().clone()
    assert 0.2 < w0.norm().item() < 1.5  # uniform(+-1/sqrt(D)): norm ~ 1/sqrt(3)
    e = F.normalize(torch.randn(8, D), dim=1)
    loss = F.cross_entropy(clf(e, F.normalize(torch.randn(3, D), dim=1)),
                           torch.full((8,), 3))  # every region is background
    loss.backward()
    grad = clf.background.weight.grad[0].clone()
    torch.optim.SGD(clf.parameters(), lr=0.1).step()
    assert torch.allclose(clf.background_vector - w0, -0.1 * grad, atol=1e-7)
    assert (clf.background_vector - w0).norm() > 1e-3


def test_version_1_background_is_loaded_as_the_same_vector():
    """Exports up to 2026-12-01 stored background = 100 * w_bg; they still load unchanged."""
    clf = TextEmbeddingClassifier(2, init_temperature=100.0)
    clf.load_state_dict({"background": torch.tensor([50.0, 0.0]),
                         "log_temperature": torch.tensor(math.log(40.0))})
    assert torch.allclose(clf.background_vector, torch.tensor([0.5, 0.0]))
    logits = clf(torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 0.0]]))
    assert torch.allclose(logits, torch.tensor([[40.0, 20.0]]))


def test_version_1_conversion_uses_the_configured_initial_temperature():
    clf = TextEmbeddingClassifier(2, init_temperature=50.0)
    clf.load_state_dict({"background": torch.tensor([50.0, 0.0]),
                         "log_temperature": torch.tensor(0.0)})
    assert torch.allclose(clf.background_vector, torch.tensor([1.0, 0.0]))


def test_optimizer_exempts_temperature_but_decays_the_background_vector():
    from ovd.training.train_detector import Trainer

    cfg = _cfg()
    cfg.SOLVER.WEIGHT_DECAY = 1e-4
    model = build_model(cfg)
    optimizer = Trainer.build_optimizer(cfg, model)
    clf = model.roi_heads.box_predictor.classifier
    decay = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    assert decay[id(clf.log_temperature)] == 0.0
    assert decay[id(clf.background.weight)] == 1e-4
    assert decay[id(model.roi_heads.box_predictor.embed.weight)] == 1e-4
