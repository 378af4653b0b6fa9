"""CID: centerness-based instance-aware distillation of the region classifier and box regressor
(Du et al., arXiv 2411.02861; docs/methods.md section 3).

Known from the paper: valuable regions around instances are selected by the centerness of
proposals, small instances matter, and the distillation is logit-based. *(our formulation)*:

* each sampled RoI r is weighted by the FCOS centerness of its centre w.r.t. its matched GT box
  enlarged by `enlarge` about the box centre (0 when the centre falls outside that region):
  c_r = sqrt(min(l, r) / max(l, r) * min(t, b) / max(t, b));
* weights are normalised per instance, w_r = c_r / sum_{r' of the same instance} c_r', so every
  instance, tiny or large, contributes a total weight of 1;
* logit KD: L_cls = T^2 * sum_r w_r KL(softmax(z_T,r / T) || softmax(z_S,r / T)) / sum_r w_r
  over the C + 1 text-classifier logits of the teacher and the student on the same RoIs;
* localisation KD: L_loc = sum_r w_r smooth_l1(d_S,r - d_T,r) / sum_r w_r on their
  class-agnostic box deltas (summed over the 4 deltas; beta 0 = L1), over foreground RoIs only
  by default (weights re-normalised per instance after dropping the background ones): the
  teacher's regressor was trained on foreground RoIs alone, so its deltas elsewhere are no
  target.

Dividing by sum_r w_r (= the number of instances with a weighted RoI) makes both losses a mean
over instances.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from detectron2.structures import Instances


def enlarge_boxes(boxes: torch.Tensor, factor: float) -> torch.Tensor:
    """(N, 4) XYXY boxes (pixels) scaled by `factor` about their centres."""
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    half = (boxes[:, 2:] - boxes[:, :2]) * (factor / 2)
    return torch.cat([centres - half, centres + half], dim=1)


def centerness(points: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """FCOS centerness of points w.r.t. boxes.

    Args:
        points: (N, 2) x, y in pixels.
        boxes: (N, 4) XYXY in pixels, one per point.

    Returns:
        (N,) in [0, 1]: 1 at a box's centre, 0 on or outside its border.
    """
    left = points[:, 0] - boxes[:, 0]
    top = points[:, 1] - boxes[:, 1]
    right = boxes[:, 2] - points[:, 0]
    bottom = boxes[:, 3] - points[:, 1]
    lr = torch.stack([left, right], dim=1)
    tb = torch.stack([top, bottom], dim=1)
    inside = (lr.amin(1) > 0) & (tb.amin(1) > 0)
    ratio = (lr.amin(1) / lr.amax(1).clamp(min=1e-6)) * (tb.amin(1) / tb.amax(1).clamp(min=1e-6))
    return torch.where(inside, ratio.clamp(min=0).sqrt(), torch.zeros_like(ratio))


def instance_normalise(weights: torch.Tensor, instance: torch.Tensor) -> torch.Tensor:
    """Scale weights so that each instance's sum is 1.

    Args:
        weights: (R,) non-negative.
        instance: (R,) int64 instance id of each weight, -1 for none (weight 0).

    Returns:
        (R,); an instance whose weights are all 0 keeps them 0.
    """
    valid = instance >= 0
    out = torch.zeros_like(weights)
    if not valid.any():
        return out
    ids = instance[valid]
    sums = torch.zeros(int(ids.max()) + 1, dtype=weights.dtype, device=weights.device)
    sums.index_add_(0, ids, weights[valid])
    denom = sums[ids]
    out[valid] = torch.where(denom > 0, weights[valid] / denom.clamp(min=1e-12), torch.zeros_like(denom))
    return out


def region_centerness(proposals: list[Instances], targets: list[Instances], *, enlarge: float
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Centerness of the RoIs sampled by Detectron2's `label_and_sample_proposals` and the
    instance each belongs to.

    Args:
        proposals: per image, the sampled RoIs with `proposal_boxes` and (when the image has GT)
            `gt_boxes`, the GT box each RoI was matched to.
        targets: per image, the GT Instances (`gt_boxes`), defining the instances.
        enlarge: the instance region is the GT box scaled by this about its centre.

    Returns:
        (R,) centerness in [0, 1] of each RoI's centre in its instance region (0 outside), and
        (R,) int64 instance ids unique over the batch (-1 for RoIs of images without GT).
    """
    weights, instances, offset = [], [], 0
    for p, t in zip(proposals, targets, strict=True):
        boxes = p.proposal_boxes.tensor
        if len(t) == 0 or not p.has("gt_boxes"):
            weights.append(boxes.new_zeros(len(p)))
            instances.append(torch.full((len(p),), -1, dtype=torch.long, device=boxes.device))
            continue
        gt = t.gt_boxes.tensor
        # gt_boxes rows are copies of the matched GT boxes: recover the instance index
        same = (p.gt_boxes.tensor[:, None, :] == gt[None, :, :]).all(dim=2)
        index = same.float().argmax(dim=1)
        region = enlarge_boxes(gt, enlarge)[index]
        weights.append(centerness(p.proposal_boxes.get_centers(), region))
        instances.append(torch.where(same.any(dim=1), index + offset, torch.full_like(index, -1)))
        offset += len(gt)
    return torch.cat(weights), torch.cat(instances)


def region_weights(proposals: list[Instances], targets: list[Instances], *, enlarge: float,
                   mask: torch.Tensor | None = None, per_instance: bool = True) -> torch.Tensor:
    """CID weights of the sampled RoIs (see :func:`region_centerness` for the arguments).

    Args:
        mask: (R,) bool; RoIs where it is False weigh 0 (before the per-instance normalisation,
            so an instance's remaining RoIs still sum to 1).
        per_instance: normalise each instance's weights to sum 1 (CID); False keeps the raw
            centerness, so an instance weighs by how many RoIs were sampled around it.

    Returns:
        (R,) non-negative weights in RoI order.
    """
    weights, instance = region_centerness(proposals, targets, enlarge=enlarge)
    if mask is not None:
        weights = weights * mask
    if per_instance:
        return instance_normalise(weights, instance)
    return torch.where(instance >= 0, weights, torch.zeros_like(weights))


def _weighted_mean(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    total = weights.sum()
    if total <= 0:
        return values.sum() * 0.0  # keeps the graph: no weighted RoI in this batch
    return (weights * values).sum() / total


def logit_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                  weights: torch.Tensor, temperature: float) -> torch.Tensor:
    """Weighted KL distillation of region logits at temperature T.

    Args:
        student_logits, teacher_logits: (R, K) logits of the same RoIs over the same classes.
        weights: (R,) region weights (e.g. :func:`region_weights`).
        temperature: T; the loss is scaled by T^2 so its gradients keep their size across T.

    Returns:
        Scalar T^2 * sum_r w_r KL(p_T || p_S) / sum_r w_r (0 when all weights are 0).
    """
    log_p_s = F.log_softmax(student_logits / temperature, dim=1)
    log_p_t = F.log_softmax(teacher_logits.detach() / temperature, dim=1)
    kl = F.kl_div(log_p_s, log_p_t, reduction="none", log_target=True).sum(dim=1)
    return temperature ** 2 * _weighted_mean(kl, weights)


def localisation_kd_loss(student_deltas: torch.Tensor, teacher_deltas: torch.Tensor,
                         weights: torch.Tensor, beta: float = 0.0) -> torch.Tensor:
    """Weighted smooth-L1 distillation of box deltas.

    Args:
        student_deltas, teacher_deltas: (R, 4) class-agnostic deltas of the same RoIs.
        weights: (R,) region weights.
        beta: smooth-L1 beta (0 = L1).

    Returns:
        Scalar sum_r w_r sum_j smooth_l1(d_S - d_T)_rj / sum_r w_r (0 when all weights are 0).
    """
    diff = student_deltas - teacher_deltas.detach()
    if beta > 0:
        per = torch.where(diff.abs() < beta, 0.5 * diff.pow(2) / beta, diff.abs() - 0.5 * beta)
    else:
        per = diff.abs()
    return _weighted_mean(per.sum(dim=1), weights)


@dataclass(frozen=True)
class CenternessInstanceDistiller:
    """The two CID losses with their settings (no trainable state).

    Attributes:
        cls_weight: factor of the logit KD loss (0 = off).
        loc_weight: factor of the localisation KD loss (0 = off).
        temperature: T of the logit KD.
        enlarge: instance-region enlargement about the GT box centre.
        loc_beta: smooth-L1 beta of the localisation KD (0 = L1).
        per_instance: each instance's weights sum to 1 (False: raw centerness).
        loc_foreground_only: the localisation KD skips background RoIs (where the teacher's
            regressor was never trained).
    """

    cls_weight: float = 1.0
    loc_weight: float = 1.0
    temperature: float = 2.0
    enlarge: float = 1.5
    loc_beta: float = 0.0
    per_instance: bool = True
    loc_foreground_only: bool = True

    def __call__(self, proposals: list[Instances], targets: list[Instances],
                 student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                 student_deltas: torch.Tensor, teacher_deltas: torch.Tensor,
                 background_class: int) -> dict[str, torch.Tensor]:
        """
        Args:
            proposals: per image, the sampled RoIs with `gt_classes` (see
                :func:`region_centerness`).
            targets: per image, the GT Instances.
            student_logits, teacher_logits: (R, C + 1) logits of those RoIs.
            student_deltas, teacher_deltas: (R, 4) box deltas of those RoIs.
            background_class: the `gt_classes` label of background RoIs (C in Detectron2).

        Returns:
            {"loss_kd_cls", "loss_kd_loc"}, each already multiplied by its weight (a loss whose
            weight is 0 is left out).
        """
        losses = {}
        if self.cls_weight:
            weights = region_weights(proposals, targets, enlarge=self.enlarge, per_instance=self.per_instance)
            losses["loss_kd_cls"] = self.cls_weight * logit_kd_loss(
                student_logits, teacher_logits, weights, self.temperature)
        if self.loc_weight:
            foreground = (torch.cat([p.gt_classes for p in proposals]) != background_class
                          if self.loc_foreground_only else None)
            weights = region_weights(proposals, targets, enlarge=self.enlarge, mask=foreground,
                                     per_instance=self.per_instance)
            losses["loss_kd_loc"] = self.loc_weight * localisation_kd_loss(
                student_deltas, teacher_deltas, weights, self.loc_beta)
        return losses
