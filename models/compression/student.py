"""The compressed student detector: EZSD's open-vocabulary box head with Light-ML, trained with
TID and CID from a frozen teacher held outside its modules.

`StudentRCNN` is an `OpenVocabRCNN`: inference, `encode` and `box_predictor.classify` are the
teacher's, so a student exports, loads and serves exactly like one. In training with a teacher
attached (`attach_teacher`, done by `ovd compress`), it adds to the EZSD losses

* ``loss_kd_tid``: TID feature imitation on the RPN's FPN levels (models/compression/tid.py);
* ``loss_kd_cls`` / ``loss_kd_loc``: CID logit and box-delta distillation on the student's
  sampled RoIs, which the teacher's box head classifies too (models/compression/cid.py).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.modeling.proposal_generator.rpn import RPN
from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY
from detectron2.structures import Boxes, ImageList, Instances
from detectron2.utils.events import get_event_storage

from ovd.models.detector.meta_arch import OpenVocabRCNN
from ovd.models.detector.output_layers import EZSDOutputLayers
from ovd.models.detector.roi_heads import EZSDROIHeads

from .cid import CenternessInstanceDistiller
from .light_ml import LightML
from .tid import TaskIntegrationDistiller


class DenseRPNOutputs(NamedTuple):
    """One model's RPN inputs and raw outputs, per level (in the RPN's `in_features` order).

    Attributes:
        features: (N, C, H, W) FPN features.
        anchors: Boxes (H * W * A, 4), location-major.
        objectness: (N, A, H, W) objectness logits.
        deltas: (N, A * 4, H, W) anchor deltas.
    """

    features: list[torch.Tensor]
    anchors: list[Boxes]
    objectness: list[torch.Tensor]
    deltas: list[torch.Tensor]


def rpn_dense_outputs(rpn: RPN, features: dict[str, torch.Tensor]) -> DenseRPNOutputs:
    """Run an RPN's anchor generator and head only."""
    levels = [features[f] for f in rpn.in_features]
    objectness, deltas = rpn.rpn_head(levels)
    return DenseRPNOutputs(levels, rpn.anchor_generator(levels), objectness, deltas)


def rpn_forward_train(rpn: RPN, images: ImageList, features: dict[str, torch.Tensor],
                      gt_instances: list[Instances]) -> tuple[list[Instances], dict, DenseRPNOutputs]:
    """Detectron2's `RPN.forward` in training (v0.6, step for step) that also returns the dense
    outputs TID needs, so the RPN head runs once.

    Returns:
        (proposals, losses) as `RPN.forward`, and the DenseRPNOutputs.
    """
    dense = rpn_dense_outputs(rpn, features)
    box_dim = rpn.anchor_generator.box_dim
    objectness = [o.permute(0, 2, 3, 1).flatten(1) for o in dense.objectness]  # (N, H*W*A)
    deltas = [d.view(d.shape[0], -1, box_dim, d.shape[-2], d.shape[-1]).permute(0, 3, 4, 1, 2)
              .flatten(1, -2) for d in dense.deltas]  # (N, H*W*A, 4)
    gt_labels, gt_boxes = rpn.label_and_sample_anchors(dense.anchors, gt_instances)
    losses = rpn.losses(dense.anchors, objectness, gt_labels, deltas, gt_boxes)
    proposals = rpn.predict_proposals(dense.anchors, objectness, deltas, images.image_sizes)
    return proposals, losses, dense


class StudentOutputLayers(EZSDOutputLayers):
    """EZSDOutputLayers whose `branches()` end in Light-ML (when enabled), so training, `encode`
    and `classify` all see the lifted branch features.

    Args:
        light_ml: build the Light-ML module.
        light_ml_channels, light_ml_kernel_size, light_ml_at_inference, light_ml_zero_init: see
            LightML.
        **kwargs: EZSDOutputLayers arguments.
    """

    @configurable
    def __init__(self, input_shape, *, light_ml: bool = False, light_ml_channels: int = 16,
                 light_ml_kernel_size: int = 3, light_ml_at_inference: bool = True,
                 light_ml_zero_init: bool = False, **kwargs):
        super().__init__(input_shape, **kwargs)
        branch_dim = self.cls_branch[0].out_features
        self.light_ml = (LightML(branch_dim, channels=light_ml_channels, kernel_size=light_ml_kernel_size,
                                 at_inference=light_ml_at_inference, zero_init=light_ml_zero_init)
                         if light_ml else None)

    @classmethod
    def from_config(cls, cfg, input_shape):
        args = super().from_config(cfg, input_shape)
        lm = cfg.MODEL.KD.LIGHT_ML
        args.update(light_ml=lm.ENABLED, light_ml_channels=lm.CHANNELS,
                    light_ml_kernel_size=lm.KERNEL_SIZE, light_ml_at_inference=lm.INFERENCE,
                    light_ml_zero_init=lm.ZERO_INIT)
        return args

    def branches(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Shared features (N, ...) -> (F_cls, F_reg), each (N, branch_dim), Light-ML applied."""
        f_cls, f_reg = super().branches(x)
        if self.light_ml is not None:
            f_cls, f_reg = self.light_ml(f_cls, f_reg)
        return f_cls, f_reg


@ROI_HEADS_REGISTRY.register()
class StudentROIHeads(EZSDROIHeads):
    """EZSDROIHeads with StudentOutputLayers, whose training step can also return the sampled
    RoIs' predictions (for distillation)."""

    @classmethod
    def _init_box_head(cls, cfg, input_shape):
        ret = super()._init_box_head(cfg, input_shape)
        ret["box_predictor"] = StudentOutputLayers(cfg, ret["box_head"].output_shape)
        return ret

    def forward(self, images: ImageList, features: dict[str, torch.Tensor],
                proposals: list[Instances], targets: list[Instances] | None = None, *,
                text: torch.Tensor, distill: list[Instances] | None = None):
        """As EZSDROIHeads.forward."""
        if not self.training:
            return super().forward(images, features, proposals, targets, text=text, distill=distill)
        sampled, _, losses = self.forward_with_predictions(features, proposals, targets, text=text,
                                                           distill=distill)
        return sampled, losses

    def forward_with_predictions(self, features: dict[str, torch.Tensor], proposals: list[Instances],
                                 targets: list[Instances], *, text: torch.Tensor,
                                 distill: list[Instances] | None = None):
        """The training step of EZSDROIHeads.forward, also returning its predictions.

        Returns:
            sampled: per image, the sampled RoIs (proposal_boxes, gt_classes, gt_boxes, ...).
            predictions: (logits (R, C + 1), deltas (R, 4)) of those RoIs, in order.
            losses: loss_cls, loss_box_reg (and loss_distill).
        """
        predictor: StudentOutputLayers = self.box_predictor
        sampled = self.label_and_sample_proposals(proposals, targets)
        x = self.box_features(features, [p.proposal_boxes for p in sampled])
        predictions = predictor(x, text, torch.cat([p.gt_classes for p in sampled]))
        losses = predictor.losses(predictions, sampled)
        get_event_storage().put_scalar("fast_rcnn/temperature", predictor.classifier.temperature.item())
        if distill is not None and self.distill_weight > 0:
            losses["loss_distill"] = self.distill_weight * self.distillation(features, distill)
        return sampled, predictions, losses


class TeacherOutputs(NamedTuple):
    """What the teacher computes for one student training step (no gradient).

    Attributes:
        dense: its RPN inputs and outputs on the same images.
        logits: (R, C + 1) its text-classifier logits of the student's sampled RoIs.
        deltas: (R, 4) its class-agnostic deltas of those RoIs (semantic regressor given the
            same assigned classes as the student's).
    """

    dense: DenseRPNOutputs
    logits: torch.Tensor
    deltas: torch.Tensor


class FrozenTeacher:
    """A trained detector used as a teacher: eval mode, no gradient, never trained.

    Deliberately not an nn.Module, so a student holding one does not register it: the teacher
    is absent from the student's `state_dict` (checkpoints, exports), `parameters()` (the
    optimizer) and `train()` / `to()` calls.

    Args:
        model: an OpenVocabRCNN (or a StudentRCNN), already on the student's device.
    """

    def __init__(self, model: OpenVocabRCNN):
        self.model = model.eval().requires_grad_(False)

    @torch.no_grad()
    def __call__(self, batched_inputs: list[dict], boxes: list[Boxes], text: torch.Tensor,
                 gt_classes: torch.Tensor) -> TeacherOutputs:
        """The teacher on the student's inputs and sampled RoIs.

        Args:
            batched_inputs: the student's training inputs (the teacher normalises them itself).
            boxes: per image, the student's sampled RoI boxes (input-image pixels).
            text: (C, D) the vocabulary's text embeddings.
            gt_classes: (R,) the classes assigned to the RoIs (C = background).
        """
        m = self.model
        images = m.preprocess_image(batched_inputs)
        features = m.backbone(images.tensor)
        dense = rpn_dense_outputs(m.proposal_generator, features)
        x = m.roi_heads.box_features(features, boxes)
        logits, deltas = m.roi_heads.box_predictor(x, text, gt_classes)
        return TeacherOutputs(dense, logits, deltas)


@META_ARCH_REGISTRY.register()
class StudentRCNN(OpenVocabRCNN):
    """OpenVocabRCNN trained by distillation from a frozen teacher (TID + CID).

    Without a teacher, or with both methods off, it trains exactly like OpenVocabRCNN (with its
    own backbone and box head), which gives the no-distillation baseline of the same network.
    """

    @configurable
    def __init__(self, *, tid: TaskIntegrationDistiller | None = None,
                 cid: CenternessInstanceDistiller | None = None, **kwargs):
        """
        Args:
            tid: the TID loss and its adapter (None = off).
            cid: the CID losses (None = off).
            **kwargs: OpenVocabRCNN arguments.
        """
        super().__init__(**kwargs)
        self.tid = tid
        self.cid = cid
        self._teacher: FrozenTeacher | None = None

    @classmethod
    def from_config(cls, cfg):
        ret = super().from_config(cfg)
        kd = cfg.MODEL.KD
        ret["tid"] = None
        if kd.TID.ENABLED:
            shapes = ret["backbone"].output_shape()
            widths = {shapes[f].channels for f in cfg.MODEL.RPN.IN_FEATURES}
            if len(widths) != 1:
                raise ValueError(f"TID needs FPN levels of one width, got {sorted(widths)}")
            width = widths.pop()
            ret["tid"] = TaskIntegrationDistiller(
                width, kd.TID.TEACHER_CHANNELS or width, weight=kd.TID.WEIGHT,
                iou_thresholds=cfg.MODEL.RPN.IOU_THRESHOLDS, loc_scores=kd.TID.LOC_SCORES,
                loc_boxes=kd.TID.LOC_BOXES, key_ratio=kd.TID.KEY_RATIO, weak_ratio=kd.TID.WEAK_RATIO,
                alpha=kd.TID.ALPHA, beta=kd.TID.BETA, gamma=kd.TID.GAMMA)
        ret["cid"] = (CenternessInstanceDistiller(
            cls_weight=kd.CID.CLS_WEIGHT, loc_weight=kd.CID.LOC_WEIGHT,
            temperature=kd.CID.TEMPERATURE, enlarge=kd.CID.ENLARGE, loc_beta=kd.CID.LOC_BETA,
            per_instance=kd.CID.INSTANCE_NORMALISE, loc_foreground_only=kd.CID.LOC_FOREGROUND_ONLY)
            if kd.CID.ENABLED else None)
        return ret

    @property
    def teacher(self) -> FrozenTeacher | None:
        """The attached teacher, or None."""
        return self._teacher

    def attach_teacher(self, teacher: OpenVocabRCNN) -> FrozenTeacher:
        """Hold `teacher` (moved to this model's device, frozen) for distillation.

        Raises:
            ValueError: the student has no StudentROIHeads, or the teacher's region embeddings or
                FPN levels do not fit it.
        """
        if not isinstance(self.roi_heads, StudentROIHeads):
            raise ValueError(f"distillation needs StudentROIHeads, not {type(self.roi_heads).__name__} "
                             "(MODEL.ROI_HEADS.NAME)")
        t_pred = teacher.roi_heads.box_predictor
        if t_pred.embed_dim != self.roi_heads.box_predictor.embed_dim:
            raise ValueError(f"teacher embeds regions in {t_pred.embed_dim} dimensions, the student in "
                             f"{self.roi_heads.box_predictor.embed_dim}: they need the same CLIP")
        if self.tid is not None:
            levels = self.proposal_generator.in_features
            if list(teacher.proposal_generator.in_features) != list(levels):
                raise ValueError(f"TID pairs FPN levels: the teacher's RPN reads "
                                 f"{teacher.proposal_generator.in_features}, the student's {levels}")
            width = teacher.backbone.output_shape()[levels[0]].channels
            if width != self.tid.adapter.out_channels:
                raise ValueError(f"the teacher's FPN is {width} channels wide, the TID adapter maps to "
                                 f"{self.tid.adapter.out_channels} (MODEL.KD.TID.TEACHER_CHANNELS)")
        self._teacher = FrozenTeacher(teacher.to(self.device))
        return self._teacher

    def forward(self, batched_inputs: list[dict], text: torch.Tensor | None = None):
        if not self.training or self._teacher is None or (self.tid is None and self.cid is None):
            return super().forward(batched_inputs, text=text)
        text, images, gt_instances, distill, features = self.training_inputs(batched_inputs, text)
        proposals, losses, dense = rpn_forward_train(self.proposal_generator, images, features,
                                                     gt_instances)
        sampled, (logits, deltas), roi_losses = self.roi_heads.forward_with_predictions(
            features, proposals, gt_instances, text=text, distill=distill)
        losses.update(roi_losses)
        teacher = self._teacher(batched_inputs, [p.proposal_boxes for p in sampled], text,
                                torch.cat([p.gt_classes for p in sampled]))
        if self.tid is not None:
            gt_boxes = [g.gt_boxes.tensor for g in gt_instances]
            importance_s = self.tid.importance(dense.objectness, dense.deltas, dense.anchors, gt_boxes,
                                               self.proposal_generator.box2box_transform)
            t_rpn = self._teacher.model.proposal_generator
            importance_t = self.tid.importance(teacher.dense.objectness, teacher.dense.deltas,
                                               teacher.dense.anchors, gt_boxes, t_rpn.box2box_transform)
            losses["loss_kd_tid"] = self.tid(dense.features, teacher.dense.features, importance_s,
                                             importance_t)
        if self.cid is not None:
            losses.update(self.cid(sampled, gt_instances, logits, teacher.logits, deltas,
                                   teacher.deltas, background_class=self.roi_heads.num_classes))
        return losses
