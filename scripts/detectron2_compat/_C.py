"""Pure-PyTorch stand-in for detectron2's compiled extension ``detectron2._C``.

Why this exists: detectron2 is not published on the package index under its own name, and the
only sdist of v0.6 there (``pb1-detectron2``) ships detectron2's Python code without the C++/CUDA
sources in ``detectron2/layers/csrc``. Rather than compiling kernels against our exact torch
build, ``scripts/detectron2_compat/install_detectron2.py`` installs that sdist without an
extension and copies this module in as ``detectron2/_C.py``.

Provided for real (vectorised PyTorch, any device):

* :func:`box_iou_rotated`: exact IoU of rotated rectangles (Sutherland-Hodgman clipping).
* :func:`nms_rotated`: greedy NMS on rotated boxes, same semantics as detectron2's kernel.
* :func:`get_compiler_version`, :func:`get_cuda_version`, :func:`has_cuda`: used by
  ``detectron2.utils.collect_env``.

Deformable convolution, ``ROIAlignRotated`` and the C++ ``COCOeval`` accelerator raise
``NotImplementedError`` naming the pure-Python / torchvision alternative. Nothing in the ovd
detectors needs them.

Box format everywhere: ``(x_center, y_center, width, height, angle_degrees)``, where a positive
angle rotates the box counter-clockwise on screen (image coordinates, y pointing down), exactly
as in detectron2's ``RotatedBoxes``.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

__ovd_compat__ = True

# Pairs clipped per vectorised batch; bounds peak memory to a few tens of MB.
_PAIRS_PER_CHUNK = 1 << 16
# detectron2's kernel treats boxes with area below this as empty (IoU 0).
_MIN_AREA = 1e-14


def get_compiler_version() -> str:
    """Compiler that built the extension: none, this module is plain Python."""
    return "none (pure-PyTorch detectron2._C from ovd)"


def get_cuda_version() -> str:
    """CUDA version the extension was compiled with; same string as a CPU-only official build."""
    return "not available"


def has_cuda() -> bool:
    """Whether the extension holds compiled CUDA kernels (never; GPU tensors still work)."""
    return False


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    dtype = functools.reduce(torch.promote_types, (t.dtype for t in tensors))
    if not dtype.is_floating_point or torch.finfo(dtype).bits < 32:
        return torch.float32
    return dtype


def _corner_offsets(boxes: torch.Tensor) -> torch.Tensor:
    """Corners of rotated boxes relative to their centres.

    Args:
        boxes: ``[K, 5]`` boxes ``(cx, cy, w, h, angle_degrees)``.

    Returns:
        ``[K, 4, 2]`` corner offsets ``(dx, dy)``, counter-clockwise in a y-up frame (positive
        shoelace area), which the clipping's inside test relies on.
    """
    theta = boxes[:, 4] * (math.pi / 180.0)
    cos, sin = torch.cos(theta)[:, None], torch.sin(theta)[:, None]
    half_w, half_h = boxes[:, 2:3] / 2, boxes[:, 3:4] / 2
    local_x = torch.cat([-half_w, half_w, half_w, -half_w], dim=1)
    local_y = torch.cat([-half_h, -half_h, half_h, half_h], dim=1)
    # Same rotation as detectron2's get_rotated_vertices: det = +1, so orientation is kept.
    return torch.stack([cos * local_x + sin * local_y, cos * local_y - sin * local_x], dim=-1)


def _half_extents(boxes: torch.Tensor) -> torch.Tensor:
    """``[K, 2]`` half width/height of each rotated box's axis-aligned bounding box."""
    theta = boxes[:, 4] * (math.pi / 180.0)
    cos, sin = torch.cos(theta).abs(), torch.sin(theta).abs()
    half_w, half_h = boxes[:, 2] / 2, boxes[:, 3] / 2
    return torch.stack([cos * half_w + sin * half_h, sin * half_w + cos * half_h], dim=1)


def _next_index(count: torch.Tensor, capacity: int) -> torch.Tensor:
    """``[P, capacity]`` index of the cyclic successor of each of the ``count`` valid vertices."""
    idx = torch.arange(capacity, device=count.device)
    return torch.where(idx + 1 < count[:, None], idx + 1, 0)


def _clip_half_plane(
    poly: torch.Tensor, count: torch.Tensor, a: torch.Tensor, b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One Sutherland-Hodgman step: keep the part of each polygon left of the line ``a -> b``.

    Args:
        poly: ``[P, K, 2]`` convex polygons; the first ``count[p]`` vertices are valid.
        count: ``[P]`` number of valid vertices (int64).
        a, b: ``[P, 2]`` clip-edge endpoints of a counter-clockwise clip polygon.

    Returns:
        ``(poly, count)`` of the clipped polygons, valid vertices compacted to the front and
        capacity trimmed to the largest count.
    """
    capacity = poly.shape[1]
    valid = torch.arange(capacity, device=poly.device) < count[:, None]
    nxt = _next_index(count, capacity)
    poly_next = torch.gather(poly, 1, nxt[..., None].expand(-1, -1, 2))

    edge = (b - a)[:, None, :]
    rel = poly - a[:, None, :]
    side = edge[..., 0] * rel[..., 1] - edge[..., 1] * rel[..., 0]  # > 0: left of the edge
    side_next = torch.gather(side, 1, nxt)
    inside, inside_next = side >= 0, side_next >= 0

    keep_vertex = valid & inside
    crossing = valid & (inside != inside_next)
    # Where crossing, exactly one of side/side_next is negative, so the denominator is nonzero.
    denom = torch.where(crossing, side - side_next, torch.ones_like(side))
    hit = poly + (side / denom)[..., None] * (poly_next - poly)

    # Each edge i -> i+1 emits its start vertex if inside, then its crossing point if any.
    candidates = torch.stack([poly, hit], dim=2).reshape(poly.shape[0], 2 * capacity, 2)
    keep = torch.stack([keep_vertex, crossing], dim=2).reshape(poly.shape[0], 2 * capacity)
    new_count = keep.sum(dim=1)
    new_capacity = max(int(new_count.max()), 1)
    order = torch.sort(keep.to(torch.uint8), dim=1, descending=True, stable=True).indices
    order = order[:, :new_capacity]
    return torch.gather(candidates, 1, order[..., None].expand(-1, -1, 2)), new_count


def _polygon_area(poly: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """``[P]`` shoelace area of the first ``count`` vertices of each ``[P, K, 2]`` polygon."""
    capacity = poly.shape[1]
    valid = torch.arange(capacity, device=poly.device) < count[:, None]
    nxt = torch.gather(poly, 1, _next_index(count, capacity)[..., None].expand(-1, -1, 2))
    cross = poly[..., 0] * nxt[..., 1] - poly[..., 1] * nxt[..., 0]
    return (cross * valid).sum(dim=1).clamp(min=0) / 2


def _intersection_area(
    offsets1: torch.Tensor, offsets2: torch.Tensor, shift: torch.Tensor
) -> torch.Tensor:
    """Intersection area of rectangle pairs.

    Args:
        offsets1, offsets2: ``[P, 4, 2]`` counter-clockwise corners relative to each box centre.
        shift: ``[P, 2]`` centre of box 2 minus centre of box 1.

    Returns:
        ``[P]`` intersection areas. Box 1 is clipped in a frame centred on itself, which keeps
        coordinates small for boxes far from the origin (same idea as detectron2's centre shift).
    """
    poly = offsets1
    count = torch.full((poly.shape[0],), 4, dtype=torch.int64, device=poly.device)
    clip = offsets2 + shift[:, None, :]
    for k in range(4):
        poly, count = _clip_half_plane(poly, count, clip[:, k], clip[:, (k + 1) % 4])
    return _polygon_area(poly, count)


def _overlapping_pairs(
    boxes1: torch.Tensor, boxes2: torch.Tensor, upper_triangle: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """IoU of every pair whose axis-aligned bounding boxes overlap; other pairs have IoU 0.

    Args:
        boxes1: ``[N, 5]`` and boxes2: ``[M, 5]`` rotated boxes, already in the compute dtype.
        upper_triangle: only pairs ``i < j`` (for ``boxes1 is boxes2`` in NMS).

    Returns:
        ``(i, j, iou)``: ``[P]`` int64 row/column indices and ``[P]`` IoUs.
    """
    area1 = boxes1[:, 2] * boxes1[:, 3]
    area2 = boxes2[:, 2] * boxes2[:, 3]
    gap = (boxes1[:, None, :2] - boxes2[None, :, :2]).abs()
    reach = _half_extents(boxes1)[:, None, :] + _half_extents(boxes2)[None, :, :]
    candidate = (gap <= reach).all(dim=-1)
    candidate &= (area1 >= _MIN_AREA)[:, None] & (area2 >= _MIN_AREA)[None, :]
    if upper_triangle:
        candidate = candidate.triu(diagonal=1)
    rows, cols = candidate.nonzero(as_tuple=True)

    offsets1, offsets2 = _corner_offsets(boxes1), _corner_offsets(boxes2)
    ious = []
    for start in range(0, rows.numel(), _PAIRS_PER_CHUNK):
        i = rows[start : start + _PAIRS_PER_CHUNK]
        j = cols[start : start + _PAIRS_PER_CHUNK]
        inter = _intersection_area(offsets1[i], offsets2[j], boxes2[j, :2] - boxes1[i, :2])
        union = area1[i] + area2[j] - inter
        ious.append(inter / union)
    iou = torch.cat(ious) if ious else boxes1.new_zeros(0)
    return rows, cols, iou


@torch.no_grad()
def box_iou_rotated(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU of rotated boxes (what ``detectron2.layers.pairwise_iou_rotated`` calls).

    Args:
        boxes1: ``[N, 5]`` boxes ``(cx, cy, w, h, angle_degrees)``.
        boxes2: ``[M, 5]`` boxes, same format and device.

    Returns:
        ``[N, M]`` IoU in ``[0, 1]``, dtype of the inputs (at least float32). Boxes with area
        below 1e-14 have IoU 0 with everything, as in detectron2's kernel.
    """
    if boxes1.ndim != 2 or boxes1.shape[-1] != 5 or boxes2.ndim != 2 or boxes2.shape[-1] != 5:
        raise ValueError(
            f"box_iou_rotated expects [N, 5] and [M, 5] boxes, got {tuple(boxes1.shape)} "
            f"and {tuple(boxes2.shape)}"
        )
    dtype = _compute_dtype(boxes1, boxes2)
    b1, b2 = boxes1.to(dtype), boxes2.to(dtype)
    out = b1.new_zeros(b1.shape[0], b2.shape[0])
    if out.numel() == 0:
        return out
    rows, cols, iou = _overlapping_pairs(b1, b2)
    out[rows, cols] = iou
    return out


@torch.no_grad()
def nms_rotated(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy non-maximum suppression of rotated boxes.

    Same semantics as detectron2's ``nms_rotated`` kernel: visit boxes by decreasing score and
    drop every later box whose IoU with a kept box is ``>= iou_threshold``. The angle is not
    otherwise considered (see ``detectron2.layers.nms_rotated``).

    Args:
        boxes: ``[N, 5]`` boxes ``(cx, cy, w, h, angle_degrees)``.
        scores: ``[N]`` scores.
        iou_threshold: IoU at or above which the lower-scoring box is suppressed.

    Returns:
        int64 ``[K]`` indices into ``boxes`` of the kept boxes, by decreasing score, on the
        device of ``boxes``.
    """
    if boxes.ndim != 2 or boxes.shape[-1] != 5 or scores.shape != boxes.shape[:1]:
        raise ValueError(
            f"nms_rotated expects [N, 5] boxes and [N] scores, got {tuple(boxes.shape)} "
            f"and {tuple(scores.shape)}"
        )
    if boxes.shape[0] == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    order = torch.sort(scores, descending=True, stable=True).indices
    if iou_threshold <= 0:
        # Every pair, even a disjoint one (IoU 0), reaches the threshold.
        return order[:1]

    ranked = boxes[order].to(_compute_dtype(boxes))
    rows, cols, iou = _overlapping_pairs(ranked, ranked, upper_triangle=True)
    hits = iou >= iou_threshold
    # The greedy pass is inherently sequential; run it on the (sparse) suppression graph.
    src = rows[hits].cpu().numpy()
    dst = cols[hits].cpu().numpy()
    by_src = np.argsort(src, kind="stable")
    src, dst = src[by_src], dst[by_src]
    n = ranked.shape[0]
    starts = np.searchsorted(src, np.arange(n + 1))
    suppressed = np.zeros(n, dtype=bool)
    kept = []
    for i in range(n):
        if suppressed[i]:
            continue
        kept.append(i)
        suppressed[dst[starts[i] : starts[i + 1]]] = True
    return order[torch.as_tensor(kept, dtype=torch.int64, device=order.device)]


def _unsupported(name: str, advice: str):
    message = (
        f"detectron2._C.{name} is a compiled C++/CUDA kernel, and this detectron2 was installed "
        f"by ovd with a pure-PyTorch detectron2._C that does not provide it. {advice}"
    )

    def kernel(*args, **kwargs):
        raise NotImplementedError(message)

    kernel.__name__ = kernel.__qualname__ = name
    kernel.__doc__ = (
        f"Not available in the pure-PyTorch build: raises NotImplementedError.\n\n{advice}"
    )
    return kernel


_DEFORM_ADVICE = (
    "Use torchvision.ops.deform_conv2d (it takes an optional modulation mask), or run "
    "detectron2's DeformConv on CPU, where detectron2 itself calls torchvision."
)
_ROI_ALIGN_ROTATED_ADVICE = (
    "Use axis-aligned pooling instead, e.g. MODEL.ROI_BOX_HEAD.POOLER_TYPE = 'ROIAlignV2' "
    "(torchvision.ops.roi_align), or install an official detectron2 build with compiled ops."
)
_COCOEVAL_ADVICE = (
    "Use COCOEvaluator(..., use_fast_impl=False), which runs pycocotools' official COCOeval."
)

deform_conv_forward = _unsupported("deform_conv_forward", _DEFORM_ADVICE)
deform_conv_backward_input = _unsupported("deform_conv_backward_input", _DEFORM_ADVICE)
deform_conv_backward_filter = _unsupported("deform_conv_backward_filter", _DEFORM_ADVICE)
modulated_deform_conv_forward = _unsupported("modulated_deform_conv_forward", _DEFORM_ADVICE)
modulated_deform_conv_backward = _unsupported("modulated_deform_conv_backward", _DEFORM_ADVICE)
roi_align_rotated_forward = _unsupported("roi_align_rotated_forward", _ROI_ALIGN_ROTATED_ADVICE)
roi_align_rotated_backward = _unsupported("roi_align_rotated_backward", _ROI_ALIGN_ROTATED_ADVICE)
InstanceAnnotation = _unsupported("InstanceAnnotation", _COCOEVAL_ADVICE)
COCOevalEvaluateImages = _unsupported("COCOevalEvaluateImages", _COCOEVAL_ADVICE)
COCOevalAccumulate = _unsupported("COCOevalAccumulate", _COCOEVAL_ADVICE)
