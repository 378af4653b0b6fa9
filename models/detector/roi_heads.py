"""ROI heads of the open-vocabulary detector: Detectron2's StandardROIHeads with the EZSD box
predictor, a per-call vocabulary, and the region-distillation loss in training.
"""

from __future__ import annotations

import torch
from detectron2.config import configurable
from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY, StandardROIHeads
from detectron2.structures import ImageList, Instances
from detectron2.utils.events import get_event_storage

from .output_layers import EZSDOutputLayers, RegionFeatures, distillation_loss


@ROI_HEADS_REGISTRY.register()
class EZSDROIHeads(StandardROIHeads):
    """StandardROIHeads whose forward takes the vocabulary's text embeddings per call.

    In training, `distill` carries per image the regions to distil (GT boxes and CLIP
    proposals), their CLIP embeddings and weights; they go through the same RoIAlign and box
    head as the sampled proposals, and `loss_distill` is added to the losses.
    """

    @configurable
    def __init__(self, *, distill_weight: float, **kwargs):
        """
        Args:
            distill_weight: lambda of the distillation loss.
            **kwargs: StandardROIHeads arguments.
        """
        super().__init__(**kwargs)
        self.distill_weight = distill_weight

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        ret["distill_weight"] = cfg.MODEL.OVD.DISTILL_WEIGHT
        return ret

    @classmethod
    def _init_box_head(cls, cfg, input_shape):
        ret = super()._init_box_head(cfg, input_shape)
        ret["box_predictor"] = EZSDOutputLayers(cfg, ret["box_head"].output_shape)
        return ret

    def box_features(self, features: dict[str, torch.Tensor], boxes: list) -> torch.Tensor:
        """Shared box-head features (R, d) of boxes (list of Boxes per image)."""
        x = self.box_pooler([features[f] for f in self.box_in_features], boxes)
        return self.box_head(x)

    def forward(self, images: ImageList, features: dict[str, torch.Tensor],
                proposals: list[Instances], targets: list[Instances] | None = None, *,
                text: torch.Tensor, distill: list[Instances] | None = None):
        """
        Args:
            images, features, proposals, targets: as in StandardROIHeads.
            text: (C, D) normalised text embeddings; gt_classes index into it.
            distill: per image, Instances with `boxes` (Boxes, input-image pixels),
                `embeddings` (N, D) and `weights` (N,); training only.

        Returns:
            (instances, losses) as StandardROIHeads; pred_classes index into `text`.
        """
        del images
        predictor: EZSDOutputLayers = self.box_predictor
        if not self.training:
            return predictor.classify(self.encode_regions(features, proposals), text), {}
        proposals = self.label_and_sample_proposals(proposals, targets)
        x = self.box_features(features, [p.proposal_boxes for p in proposals])
        gt_classes = torch.cat([p.gt_classes for p in proposals])
        losses = predictor.losses(predictor(x, text, gt_classes), proposals)
        classifier = predictor.classifier
        get_event_storage().put_scalars(**{
            "fast_rcnn/temperature": classifier.temperature.item(),
            "fast_rcnn/background_norm": classifier.background_vector.norm().item()})
        if distill is not None and self.distill_weight > 0:
            losses["loss_distill"] = self.distill_weight * self.distillation(features, distill)
        return proposals, losses

    def encode_regions(self, features: dict[str, torch.Tensor],
                       proposals: list[Instances]) -> list[RegionFeatures]:
        """The vocabulary-independent part of inference, per image (see RegionFeatures)."""
        predictor: EZSDOutputLayers = self.box_predictor
        x = self.box_features(features, [p.proposal_boxes for p in proposals])
        f_cls, f_reg = predictor.branches(x)
        embeddings = predictor.region_embeddings(f_cls)
        sizes = [len(p) for p in proposals]
        return [RegionFeatures(p.proposal_boxes.tensor, e, r, p.image_size)
                for p, e, r in zip(proposals, embeddings.split(sizes), f_reg.split(sizes),
                                        strict=True)]

    def distillation(self, features: dict[str, torch.Tensor], distill: list[Instances]) -> torch.Tensor:
        """The EZSD distillation loss of the given regions (scalar)."""
        predictor: EZSDOutputLayers = self.box_predictor
        x = self.box_features(features, [d.boxes for d in distill])
        f_cls, _ = predictor.branches(x)
        image_index = torch.cat([torch.full((len(d),), i, dtype=torch.long, device=x.device)
                                 for i, d in enumerate(distill)])
        return distillation_loss(predictor.region_embeddings(f_cls),
                                 torch.cat([d.embeddings for d in distill]).float(),
                                 torch.cat([d.weights for d in distill]).float(), image_index)
