"""EZSD box predictor: region embeddings classified against text embeddings given per call,
class-agnostic box deltas from a semantic regressor, and the region-distillation loss.

Vocabulary contract: nothing about the class names is stored in the module. Every call takes
the (C, D) L2-normalised text-embedding matrix of the vocabulary it should use, so concurrent
calls with different vocabularies cannot affect each other.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
import torchvision
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.modeling.roi_heads.fast_rcnn import FastRCNNOutputLayers
from detectron2.structures import Boxes, Instances
from torch import nn

from ..runtime import SCORE_MODES

#: `max_candidates` when none is given: more pairs than any image has.
NO_CANDIDATE_BOUND = 2**62


class RegionFeatures(NamedTuple):
    """What the detector knows about one image's proposals before it is given a vocabulary.

    Computing this is almost all of inference (backbone, RPN, RoIAlign, box head); classifying
    it against a vocabulary is two small matmuls. A server can therefore run one batch of
    images once and answer requests with different vocabularies from the same batch.

    Attributes:
        proposals: (R, 4) proposal boxes, XYXY pixels of the resized input image.
        embeddings: (R, D) L2-normalised region embeddings.
        reg_features: (R, branch_dim) regression-branch features.
        image_size: (height, width) of the resized input image.
    """

    proposals: torch.Tensor
    embeddings: torch.Tensor
    reg_features: torch.Tensor
    image_size: tuple[int, int]


class TextEmbeddingClassifier(nn.Module):
    """logits = tau * [e . T^T, e . w_bg].

    e is a normalised region embedding, T the normalised text embeddings of the vocabulary,
    w_bg a learnable **un-normalised** background vector, tau = exp(s) a learnable temperature.

    w_bg is an ordinary ``Linear(D, 1, bias=False)`` (default init, weight decay), as in the
    EZSD authors' code. An earlier version started it at zero and stored it scaled by
    1 / tau_0, which cut its effective SGD step 10^4-fold: after 900 iterations its norm was
    0.008, so the background logit was always ~0 and "background" could only win by every
    class cosine being negative. Gradient clipping (configs/detector/synthetic_r18_fpn.yaml)
    is what keeps the tau-scaled gradients in check.

    Args:
        embed_dim: D, the CLIP embedding size.
        init_temperature: initial tau (EZSD: 100, i.e. s = ln 100).
        min_temperature: tau is clamped at this floor *(our addition: on the synthetic world,
            SGD drove tau from 100 to 2.8 in 900 iterations, after which only the un-normalised
            background vector could produce large logits and foreground scores went uniform)*.
            0 disables the floor.
    """

    #: Checkpoints of version 1 stored ``background`` (D,) = tau_0 * w_bg, tau_0 the initial
    #: temperature.
    _version = 2

    def __init__(self, embed_dim: int, init_temperature: float = 100.0, min_temperature: float = 0.0):
        super().__init__()
        self.background = nn.Linear(embed_dim, 1, bias=False)
        self._v1_scale = 1.0 / init_temperature
        self.log_temperature = nn.Parameter(torch.tensor(math.log(init_temperature)))
        self.min_log_temperature = math.log(min_temperature) if min_temperature > 0 else -math.inf

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args, **kwargs):
        old = prefix + "background"
        if local_metadata.get("version", 1) < 2 and old in state_dict:
            # Version 1 (shipped exports up to 2026-12-01): w_bg = background / tau_0, computed
            # as that version did (float32 times 1 / tau_0), so old exports give the same logits.
            w = state_dict.pop(old).to(torch.float32) * self._v1_scale
            state_dict[prefix + "background.weight"] = w.view(1, -1)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args, **kwargs)

    @property
    def background_vector(self) -> torch.Tensor:
        """w_bg (D,), un-normalised."""
        return self.background.weight[0]

    @property
    def temperature(self) -> torch.Tensor:
        """tau, a scalar tensor (with the floor applied)."""
        return self.log_temperature.clamp(min=self.min_log_temperature).exp()

    def forward(self, region_embeddings: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """(N, D) normalised regions, (C, D) normalised text -> (N, C + 1) logits, bg last."""
        return self.temperature * torch.cat([region_embeddings @ text.T,
                                             self.background(region_embeddings)], dim=1)


def distillation_loss(region_embeddings: torch.Tensor, clip_embeddings: torch.Tensor,
                      weights: torch.Tensor, image_index: torch.Tensor) -> torch.Tensor:
    """EZSD region distillation: mean over regions of w~_r * ||e_r - t_r||_1.

    Args:
        region_embeddings: (R, D) the detector's normalised region embeddings.
        clip_embeddings: (R, D) CLIP's normalised embeddings of the same regions.
        weights: (R,) raw region weights (1 for GT boxes, CLIP confidence for proposals).
        image_index: (R,) which image each region belongs to; weights are renormalised to
            mean 1 within each image.

    Returns:
        Scalar loss (0 with a graph when R = 0).
    """
    if region_embeddings.numel() == 0:
        return region_embeddings.sum() * 0.0
    n_images = int(image_index.max()) + 1
    sums = torch.zeros(n_images, dtype=weights.dtype, device=weights.device).index_add_(
        0, image_index, weights)
    counts = torch.bincount(image_index, minlength=n_images).to(weights.dtype)
    mean_w = (sums / counts.clamp(min=1))[image_index]
    w = weights / mean_w.clamp(min=1e-12)
    l1 = (region_embeddings - clip_embeddings).abs().sum(dim=1)
    return (w * l1).mean()


class EZSDOutputLayers(FastRCNNOutputLayers):
    """Classification branch -> region embedding -> text classifier; regression branch ->
    class-agnostic deltas, optionally conditioned on the class's text embedding.

    Inputs are the shared box-head features (N, d). Detectron2's `losses` and `inference` are
    reused as they are: predictions are `(logits (N, C+1), deltas (N, 4))`.
    """

    @configurable
    def __init__(self, input_shape: ShapeSpec, *, embed_dim: int, branch_dim: int,
                 init_temperature: float, min_temperature: float = 0.0, semantic_regressor: bool,
                 **kwargs):
        """
        Args:
            input_shape: shape of the shared box-head feature.
            embed_dim: D, CLIP's embedding size.
            branch_dim: width of each branch's hidden FC layer.
            init_temperature: initial classifier temperature tau.
            min_temperature: floor of tau (0 = none).
            semantic_regressor: regress from concat(x_reg, t_y) (EZSD) instead of x_reg alone.
            **kwargs: FastRCNNOutputLayers arguments (box2box_transform, num_classes, ...).
        """
        super().__init__(input_shape, cls_agnostic_bbox_reg=True, **kwargs)
        d = input_shape.channels * (input_shape.width or 1) * (input_shape.height or 1)
        del self.cls_score, self.bbox_pred
        self.cls_branch = nn.Sequential(nn.Linear(d, branch_dim), nn.ReLU(inplace=True))
        self.reg_branch = nn.Sequential(nn.Linear(d, branch_dim), nn.ReLU(inplace=True))
        self.embed = nn.Linear(branch_dim, embed_dim)
        self.classifier = TextEmbeddingClassifier(embed_dim, init_temperature, min_temperature)
        self.semantic_regressor = semantic_regressor
        self.bbox_pred = nn.Linear(branch_dim + (embed_dim if semantic_regressor else 0), 4)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.constant_(self.bbox_pred.bias, 0.0)
        self.embed_dim = embed_dim

    @classmethod
    def from_config(cls, cfg, input_shape):
        args = super().from_config(cfg, input_shape)
        args.update(embed_dim=cfg.MODEL.OVD.EMBED_DIM, branch_dim=cfg.MODEL.OVD.BRANCH_DIM,
                    init_temperature=cfg.MODEL.OVD.INIT_TEMPERATURE,
                    min_temperature=cfg.MODEL.OVD.MIN_TEMPERATURE,
                    semantic_regressor=cfg.MODEL.OVD.SEMANTIC_REGRESSOR)
        args["box2box_transform"] = Box2BoxTransform(weights=cfg.MODEL.ROI_BOX_HEAD.BBOX_REG_WEIGHTS)
        args.pop("cls_agnostic_bbox_reg", None)
        return args

    def branches(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Shared features (N, ...) -> (F_cls, F_reg), each (N, branch_dim)."""
        x = x.flatten(1)
        return self.cls_branch(x), self.reg_branch(x)

    def region_embeddings(self, f_cls: torch.Tensor) -> torch.Tensor:
        """(N, branch_dim) -> (N, D) L2-normalised region embeddings e^."""
        return F.normalize(self.embed(f_cls), dim=1)

    def deltas(self, f_reg: torch.Tensor, class_text: torch.Tensor | None) -> torch.Tensor:
        """Class-agnostic deltas (N, 4); class_text (N, D) is t_y (zeros for background)."""
        if self.semantic_regressor:
            f_reg = torch.cat([f_reg, class_text], dim=1)
        return self.bbox_pred(f_reg)

    def forward(self, x: torch.Tensor, text: torch.Tensor,
                gt_classes: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            x: (N, ...) shared box-head features.
            text: (C, D) normalised text embeddings of this call's vocabulary.
            gt_classes: (N,) assigned classes in training (C = background); at inference None,
                and t_y is the text of the arg-max over the C classes and background (the
                zero vector when background wins).

        Returns:
            logits (N, C + 1) and class-agnostic deltas (N, 4).
        """
        f_cls, f_reg = self.branches(x)
        return self._predict(self.region_embeddings(f_cls), f_reg, text, gt_classes)

    def _predict(self, embeddings: torch.Tensor, f_reg: torch.Tensor, text: torch.Tensor,
                 gt_classes: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.classifier(embeddings, text)
        class_text = None
        if self.semantic_regressor:
            padded = torch.cat([text, text.new_zeros(1, text.shape[1])])  # row C = background
            # At test time: the arg-max over the C classes *and* background, so a region the
            # classifier calls background regresses with the zero vector, as in training
            # (EZSD's code does the same).
            labels = gt_classes if gt_classes is not None else logits.argmax(1)
            class_text = padded[labels]
        return logits, self.deltas(f_reg, class_text)

    def classify(self, regions: list[RegionFeatures], text: torch.Tensor, *,
                 score_thresh: float | None = None, max_detections: int | None = None,
                 nms_thresh: float | None = None, score_mode: str = "softmax",
                 class_agnostic: bool = False, max_candidates: int | None = None) -> list[Instances]:
        """Detections per image for one vocabulary (the vocabulary-dependent part of inference).

        Args:
            regions: per image, from `EZSDROIHeads.encode_regions`.
            text: (C, D) normalised text embeddings; pred_classes index its rows.
            score_thresh, max_detections, nms_thresh: override the config's test values.
            score_mode, class_agnostic, max_candidates: see `detect` (and ClassifyOptions,
                models/runtime.py; max_candidates None: no bound).

        Returns:
            Instances per image (pred_boxes in resized-input pixels, scores, pred_classes).
        """
        def scalar(value, default, dtype):
            return torch.tensor(default if value is None else value, dtype=dtype, device=text.device)

        options = (scalar(score_thresh, self.test_score_thresh, torch.float32),
                   scalar(max_detections, self.test_topk_per_image, torch.int64),
                   scalar(nms_thresh, self.test_nms_thresh, torch.float32),
                   scalar(bool(class_agnostic), None, torch.bool),
                   scalar(SCORE_MODES.index(score_mode), None, torch.int64),
                   scalar(max_candidates, NO_CANDIDATE_BOUND, torch.int64))
        out = []
        for r in regions:
            size = torch.tensor(r.image_size, dtype=torch.int64, device=text.device)
            boxes, scores, classes = self.detect(r.proposals, r.embeddings, r.reg_features, size, text, *options)
            result = Instances(tuple(r.image_size))
            result.pred_boxes, result.scores, result.pred_classes = Boxes(boxes), scores, classes
            out.append(result)
        return out

    def detect(self, proposals: torch.Tensor, embeddings: torch.Tensor, reg_features: torch.Tensor,
               image_size: torch.Tensor, text: torch.Tensor, score_threshold: torch.Tensor,
               max_detections: torch.Tensor, nms_threshold: torch.Tensor, class_agnostic: torch.Tensor,
               score_mode: torch.Tensor, max_candidates: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One image's detections, written so that a trace (models/onnx_export.py) is right for
        any vocabulary size and any option value: every option is a tensor, no Python branch
        depends on data.

        With score_mode softmax, per-class NMS and no candidate bound this is Detectron2's
        `fast_rcnn_inference_single_image` (up to the order of exact score ties; a test checks
        it): every (region, class) pair above the threshold is a candidate, boxes are clipped,
        NMS runs per class, the best `max_detections` are kept. `max_candidates` keeps only the
        best pairs before box regression and NMS, so their cost is bounded whatever the
        vocabulary size, threshold and score mode (per-name scores do not sum to one, so a
        threshold alone bounds nothing: every name of a region may pass it).

        The box of a pair is regressed from the text of the class that *its score is about*:
        in softmax mode the row's arg-max over the classes and background (EZSD's test-time
        rule, the zero vector when background wins), in per-name mode the pair's own class, as
        in training; so in per-name mode a name's boxes and scores depend on nothing but the
        region and the name.

        Args:
            proposals: (R, 4) XYXY pixels. embeddings: (R, D) normalised. reg_features: (R, B).
            image_size: (2,) int64 (height, width) that boxes are clipped to.
            text: (C, D) normalised text embeddings.
            score_threshold: () float; max_detections: () int64 >= 0; nms_threshold: () float IoU;
            class_agnostic: () bool, NMS across classes; score_mode: () int64, the mode's index in
            SCORE_MODES; max_candidates: () int64, the most (region, class) pairs kept for NMS.

        Returns:
            boxes (N, 4) XYXY pixels, scores (N,) best first, classes (N,) rows of text.
        """
        logits = self.classifier(embeddings, text)  # (R, C + 1), background last
        per_name = score_mode == SCORE_MODES.index("per_name")
        scores = torch.where(per_name, torch.sigmoid(logits[:, :-1] - logits[:, -1:]),
                             F.softmax(logits, dim=-1)[:, :-1])  # (R, C)
        pairs = (scores > score_threshold).nonzero()  # row-major, as Detectron2's
        rows, classes = pairs[:, 0], pairs[:, 1]
        scores = scores[rows, classes]
        count = scores.shape[0]  # a 0-dim tensor while tracing, an int otherwise
        if torch.jit.is_tracing():
            scores, best = scores.topk(torch.clamp(count, max=max_candidates))
            rows, classes = rows[best], classes[best]
        elif count > int(max_candidates):
            scores, best = scores.topk(int(max_candidates))
            rows, classes = rows[best], classes[best]
        class_text = None
        if self.semantic_regressor:
            padded = torch.cat([text, text.new_zeros(1, text.shape[1])])  # row C = background
            labels = torch.where(per_name, classes, logits.argmax(1)[rows])
            class_text = padded[labels]
        boxes = self.box2box_transform.apply_deltas(self.deltas(reg_features[rows], class_text),
                                                    proposals[rows])
        finite = torch.isfinite(boxes).all(dim=1) & torch.isfinite(scores)
        boxes, scores, classes = boxes[finite], scores[finite], classes[finite]
        size = image_size.to(boxes.dtype)
        zero = boxes.new_zeros(())
        x1, y1, x2, y2 = boxes.unbind(1)
        boxes = torch.stack([torch.minimum(torch.maximum(x1, zero), size[1]),
                             torch.minimum(torch.maximum(y1, zero), size[0]),
                             torch.minimum(torch.maximum(x2, zero), size[1]),
                             torch.minimum(torch.maximum(y2, zero), size[0])], dim=1)
        # Per-class NMS in one call: clipped boxes lie in [0, max(H, W)], so shifting class k by
        # k * (max(H, W) + 1) separates classes without a reduction over the boxes
        # (torchvision's batched_nms takes boxes.max(), undefined for zero candidates); a
        # class-agnostic call shifts nothing.
        offsets = classes.to(boxes.dtype) * (size.max() + 1) * (~class_agnostic).to(boxes.dtype)
        keep = nms(boxes + offsets[:, None], scores, nms_threshold)
        # keep[:max_detections] with a tensor bound: NMS returns keep best first, so mask by rank.
        rank = torch.cumsum(torch.ones_like(keep), 0)
        keep = keep[rank <= max_detections]
        return boxes[keep], scores[keep], classes[keep]


class _NMS(torch.autograd.Function):
    """torchvision's NMS whose IoU threshold stays a tensor input when traced to ONNX
    (torchvision's own ONNX symbolic writes the threshold into the graph as a constant)."""

    @staticmethod
    def forward(ctx, boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: torch.Tensor) -> torch.Tensor:
        return torchvision.ops.nms(boxes, scores, float(iou_threshold))

    @staticmethod
    def symbolic(g, boxes, scores, iou_threshold):
        # ONNX NonMaxSuppression: boxes (1, N, 4), scores (1, 1, N) -> (K, 3) rows of
        # [batch, class, box], best first; column 2 is torchvision's `keep`.
        def const(values, dtype):
            return g.op("Constant", value_t=torch.tensor(values, dtype=dtype))

        boxes = g.op("Unsqueeze", boxes, const([0], torch.int64))
        scores = g.op("Unsqueeze", scores, const([0, 1], torch.int64))
        selected = g.op("NonMaxSuppression", boxes, scores, const([2 ** 62], torch.int64),
                        g.op("Reshape", iou_threshold, const([1], torch.int64)))
        return g.op("Gather", selected, const(2, torch.int64), axis_i=1)


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: torch.Tensor) -> torch.Tensor:
    """Indices of the boxes NMS keeps, best first (torchvision.ops.nms; traceable with a
    tensor threshold)."""
    if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
        return _NMS.apply(boxes, scores, iou_threshold)
    return torchvision.ops.nms(boxes, scores, float(iou_threshold))
