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
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.modeling.roi_heads.fast_rcnn import FastRCNNOutputLayers, fast_rcnn_inference
from detectron2.structures import Instances
from torch import nn


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
                 nms_thresh: float | None = None) -> list[Instances]:
        """Detections per image for one vocabulary (the vocabulary-dependent part of inference).

        Args:
            regions: per image, from `EZSDROIHeads.encode_regions`.
            text: (C, D) normalised text embeddings; pred_classes index its rows.
            score_thresh, max_detections, nms_thresh: override the config's test values.

        Returns:
            Instances per image (pred_boxes in resized-input pixels, scores, pred_classes).
        """
        if not regions:
            return []
        sizes = [len(r.proposals) for r in regions]
        logits, deltas = self._predict(torch.cat([r.embeddings for r in regions]),
                                       torch.cat([r.reg_features for r in regions]), text)
        boxes = self.box2box_transform.apply_deltas(deltas, torch.cat([r.proposals for r in regions]))
        scores = F.softmax(logits, dim=-1)
        instances, _ = fast_rcnn_inference(
            boxes.split(sizes), scores.split(sizes), [r.image_size for r in regions],
            self.test_score_thresh if score_thresh is None else score_thresh,
            self.test_nms_thresh if nms_thresh is None else nms_thresh,
            self.test_topk_per_image if max_detections is None else max_detections)
        return instances
