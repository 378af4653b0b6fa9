"""TID: task-integration feature distillation (arXiv 2404.01699; docs/methods.md section 2).

Known from the paper: a location's importance is the product of a classification score and a
localisation score; the localisation score is 2.0 / 1.5 / 0.4 when the location's best IoU with
GT is >= the positive threshold / in between / <= the negative threshold; key areas are where
the teacher's importance is high, weak areas where the teacher's exceeds the student's, and
low-value areas are attenuated.

*(our formulation)* for a two-stage detector, per FPN level l, image n and location p, with m
the teacher or the student and a the anchors of that location:

    I_m(p) = max_a sigmoid(o_m(p, a)) * S_loc(IoU(box_m(p, a), GT))

o_m is model m's RPN objectness logit and box_m the anchor moved by m's own RPN deltas
("predicted", the default: the regression task enters the importance, so a location where the
teacher regresses onto an object and the student does not is a weak area) or the anchor itself
("anchors": identical for both models, so weak areas reduce to objectness gaps). Key = top-k of I_T (k = ceil(key_ratio * H * W));
weak = top-k of (I_T - I_S)+ outside key (positive values only); low = the rest. The loss
imitates the teacher's FPN features with the student's, mapped by a 1x1 adapter to the
teacher's width, both normalised per channel over the level's locations:

    L = mean_levels(alpha * mean_key(e) + beta * mean_weak(e) + gamma * mean_low(e)),
    e(p) = mean_c(norm(adapter(F_S))(c, p) - norm(F_T)(c, p))^2

Each area is averaged over its own locations, so alpha/beta/gamma weigh areas, not pixels.
The RoI classifier's scores are not used (the paper's "where pooled" variant is not built).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.structures import Boxes, pairwise_iou
from torch import nn

LOW, WEAK, KEY = 0, 1, 2
"""Area labels of :func:`select_areas`."""


def localisation_score(best_iou: torch.Tensor, iou_thresholds: Sequence[float],
                       scores: Sequence[float] = (2.0, 1.5, 0.4)) -> torch.Tensor:
    """TID's localisation score of each location from its best IoU with GT.

    Args:
        best_iou: (...) best IoU of each box with any GT box, in [0, 1] (0 where no GT).
        iou_thresholds: (negative, positive) thresholds, the RPN's MODEL.RPN.IOU_THRESHOLDS.
        scores: (score at IoU >= positive, in between, at IoU <= negative).

    Returns:
        (...) scores, same shape as best_iou.
    """
    negative, positive = iou_thresholds
    high, mid, low = scores
    out = torch.full_like(best_iou, mid)
    out[best_iou >= positive] = high
    out[best_iou <= negative] = low
    return out


def best_iou(boxes: torch.Tensor, gt_boxes: torch.Tensor) -> torch.Tensor:
    """(R, 4) and (G, 4) XYXY boxes -> (R,) best IoU of each box with any GT (0 if G = 0)."""
    if len(gt_boxes) == 0:
        return boxes.new_zeros(len(boxes))
    return pairwise_iou(Boxes(gt_boxes), Boxes(boxes)).amax(dim=0)


def importance_maps(objectness: list[torch.Tensor], anchor_deltas: list[torch.Tensor],
                    anchors: list[Boxes], gt_boxes: list[torch.Tensor], *,
                    iou_thresholds: Sequence[float], loc_scores: Sequence[float] = (2.0, 1.5, 0.4),
                    loc_boxes: str = "predicted",
                    box2box: Box2BoxTransform | None = None) -> list[torch.Tensor]:
    """TID importance I(p) of every location of every level, from one model's RPN outputs.

    Args:
        objectness: per level, (N, A, H, W) RPN objectness logits.
        anchor_deltas: per level, (N, A * 4, H, W) RPN box deltas (used when loc_boxes is
            "predicted").
        anchors: per level, Boxes (H * W * A, 4) in Detectron2's order (location-major).
        gt_boxes: per image, (G, 4) XYXY GT boxes in input-image pixels.
        iou_thresholds: (negative, positive) IoU thresholds of the RPN.
        loc_scores: see :func:`localisation_score`.
        loc_boxes: "predicted" (IoU of the anchor moved by the model's own deltas, so the score
            reflects that model's regression: the paper's) or "anchors" (IoU of the anchor
            itself, identical for teacher and student).
        box2box: the RPN's box transform, needed for "predicted".

    Returns:
        Per level, (N, H, W) importance in [0, max(loc_scores)], without gradient.
    """
    if loc_boxes not in ("anchors", "predicted"):
        raise ValueError(f"TID localisation boxes must be 'anchors' or 'predicted', not {loc_boxes!r}")
    if loc_boxes == "predicted" and box2box is None:
        raise ValueError("TID's 'predicted' localisation boxes need the RPN's box2box transform")
    maps = []
    with torch.no_grad():
        for logits, deltas, level_anchors in zip(objectness, anchor_deltas, anchors, strict=True):
            n, a, h, w = logits.shape
            per_image = []
            for i in range(n):
                boxes = level_anchors.tensor
                if loc_boxes == "predicted":
                    d = deltas[i].view(a, 4, h, w).permute(2, 3, 0, 1).reshape(-1, 4)
                    boxes = box2box.apply_deltas(d, boxes)
                iou = best_iou(boxes, gt_boxes[i]).view(h, w, a).permute(2, 0, 1)
                per_image.append(localisation_score(iou, iou_thresholds, loc_scores))
            maps.append((logits.sigmoid() * torch.stack(per_image)).amax(dim=1))
    return maps


def select_areas(teacher_importance: torch.Tensor, student_importance: torch.Tensor, *,
                 key_ratio: float, weak_ratio: float) -> torch.Tensor:
    """Key, weak and low-value areas of one level.

    Args:
        teacher_importance, student_importance: (N, H, W) I_T and I_S.
        key_ratio: key areas are the top ceil(key_ratio * H * W) locations of I_T per image.
        weak_ratio: weak areas are the top ceil(weak_ratio * H * W) locations of
            (I_T - I_S)+ outside the key areas, per image, among those where it is > 0.

    Returns:
        (N, H, W) int64 labels KEY, WEAK or LOW.
    """
    n, h, w = teacher_importance.shape
    t = teacher_importance.reshape(n, -1)
    gap = (t - student_importance.reshape(n, -1)).clamp(min=0)
    areas = torch.full_like(t, LOW, dtype=torch.long)
    k_key = min(math.ceil(key_ratio * h * w), h * w)
    k_weak = min(math.ceil(weak_ratio * h * w), h * w)
    if k_key > 0:
        areas.scatter_(1, t.topk(k_key, dim=1).indices, KEY)
    if k_weak > 0:
        gap = gap.masked_fill(areas == KEY, 0.0)
        values, idx = gap.topk(k_weak, dim=1)
        weak = torch.zeros_like(areas, dtype=torch.bool).scatter_(1, idx, values > 0)
        areas[weak] = WEAK
    return areas.view(n, h, w)


def channel_normalise(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """(N, C, H, W) -> each image's channels normalised to mean 0, std 1 over H x W."""
    mean = x.mean(dim=(2, 3), keepdim=True)
    std = x.std(dim=(2, 3), keepdim=True, unbiased=False)
    return (x - mean) / (std + eps)


def imitation_loss(student: torch.Tensor, teacher: torch.Tensor, areas: torch.Tensor, *,
                   alpha: float, beta: float, gamma: float) -> torch.Tensor:
    """Area-weighted feature imitation of one level (see the module docstring).

    Args:
        student: (N, C, H, W) student features already mapped to the teacher's width.
        teacher: (N, C, H, W) teacher features.
        areas: (N, H, W) labels from :func:`select_areas`.
        alpha, beta, gamma: weights of the key, weak and low-value areas' mean errors.

    Returns:
        Scalar; an area without locations contributes 0.
    """
    if student.shape != teacher.shape:
        raise ValueError(f"student features {tuple(student.shape)} do not match the teacher's "
                         f"{tuple(teacher.shape)}")
    err = (channel_normalise(student) - channel_normalise(teacher)).pow(2).mean(dim=1)
    loss = err.sum() * 0.0
    for label, weight in ((KEY, alpha), (WEAK, beta), (LOW, gamma)):
        mask = areas == label
        if weight and mask.any():
            loss = loss + weight * err[mask].mean()
    return loss


class TaskIntegrationDistiller(nn.Module):
    """The TID loss over FPN levels, with the student-to-teacher 1x1 adapter it trains.

    Args:
        student_channels: the student's FPN width.
        teacher_channels: the teacher's FPN width.
        weight: factor of the loss.
        iou_thresholds, loc_scores, loc_boxes: see :func:`importance_maps`.
        key_ratio, weak_ratio: see :func:`select_areas`.
        alpha, beta, gamma: see :func:`imitation_loss` (gamma << alpha, beta).
    """

    def __init__(self, student_channels: int, teacher_channels: int, *, weight: float = 1.0,
                 iou_thresholds: Sequence[float] = (0.3, 0.7),
                 loc_scores: Sequence[float] = (2.0, 1.5, 0.4), loc_boxes: str = "predicted",
                 key_ratio: float = 0.02, weak_ratio: float = 0.02, alpha: float = 1.0,
                 beta: float = 0.5, gamma: float = 0.05):
        super().__init__()
        if loc_boxes not in ("anchors", "predicted"):
            raise ValueError(f"TID localisation boxes must be 'anchors' or 'predicted', not {loc_boxes!r}")
        self.adapter = nn.Conv2d(student_channels, teacher_channels, kernel_size=1)
        self.weight = weight
        self.iou_thresholds, self.loc_scores = tuple(iou_thresholds), tuple(loc_scores)
        self.loc_boxes = loc_boxes
        self.key_ratio, self.weak_ratio = key_ratio, weak_ratio
        self.alpha, self.beta, self.gamma = alpha, beta, gamma

    def importance(self, objectness: list[torch.Tensor], anchor_deltas: list[torch.Tensor],
                   anchors: list[Boxes], gt_boxes: list[torch.Tensor],
                   box2box: Box2BoxTransform) -> list[torch.Tensor]:
        """:func:`importance_maps` with this distiller's settings: per level (N, H, W)."""
        return importance_maps(objectness, anchor_deltas, anchors, gt_boxes,
                               iou_thresholds=self.iou_thresholds, loc_scores=self.loc_scores,
                               loc_boxes=self.loc_boxes, box2box=box2box)

    def forward(self, student_features: list[torch.Tensor], teacher_features: list[torch.Tensor],
                student_importance: list[torch.Tensor],
                teacher_importance: list[torch.Tensor]) -> torch.Tensor:
        """
        Args:
            student_features: per level, (N, C_s, H, W).
            teacher_features: per level, (N, C_t, H, W).
            student_importance, teacher_importance: per level, (N, H, W) from
                :meth:`importance`.

        Returns:
            Scalar: weight * the mean over levels of :func:`imitation_loss`.
        """
        losses = []
        for s, t, i_s, i_t in zip(student_features, teacher_features, student_importance,
                                  teacher_importance, strict=True):
            areas = select_areas(i_t, i_s, key_ratio=self.key_ratio, weak_ratio=self.weak_ratio)
            losses.append(imitation_loss(self.adapter(s), t.detach(), areas, alpha=self.alpha,
                                         beta=self.beta, gamma=self.gamma))
        return self.weight * torch.stack(losses).mean()
