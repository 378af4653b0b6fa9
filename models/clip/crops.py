"""EZSD's CLIP crop of a box: floor its size, enlarge, clip to the image, pad to a centred
square with black, resize, normalise.

Done for a whole batch of boxes at once with torchvision's RoIAlign, which samples (and so
anti-aliases) every output pixel bilinearly; pixels of the square outside the clipped crop
are set to black *before* normalisation, as the EZSD authors' code pads the image with zeros
before it normalises.
"""

from __future__ import annotations

import torch
from torchvision.ops import roi_align


def square_crop_boxes(boxes: torch.Tensor, image_hw: tuple[int, int], *, enlarge: float = 1.2,
                      min_size: float = 10.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Geometry of EZSD crops.

    Args:
        boxes: (N, 4) float, [x1, y1, x2, y2] in pixels.
        image_hw: (H, W) of the image the boxes live in.
        enlarge: scale factor of the box about its centre (1.2 for GT distillation crops,
            1.0 for proposal anchors).
        min_size: the box's own width and height are floored at this many pixels *before* the
            enlargement (EZSD's order: a 4 px box becomes a 10 px box, then a 12 px crop).

    Returns:
        crop: (N, 4) the enlarged box clipped to the image (the pixels CLIP sees).
        square: (N, 4) the square, centred on `crop`, of side max(crop w, crop h).
    """
    H, W = image_hw
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    w = (boxes[:, 2] - boxes[:, 0]).clamp(min=min_size) * enlarge
    h = (boxes[:, 3] - boxes[:, 1]).clamp(min=min_size) * enlarge
    crop = torch.stack([(cx - w / 2).clamp(0, W), (cy - h / 2).clamp(0, H),
                        (cx + w / 2).clamp(0, W), (cy + h / 2).clamp(0, H)], dim=1)
    side = torch.maximum(crop[:, 2] - crop[:, 0], crop[:, 3] - crop[:, 1]).clamp(min=1.0)
    ccx, ccy = (crop[:, 0] + crop[:, 2]) / 2, (crop[:, 1] + crop[:, 3]) / 2
    square = torch.stack([ccx - side / 2, ccy - side / 2, ccx + side / 2, ccy + side / 2], dim=1)
    return crop, square


def crop_and_resize(image: torch.Tensor, boxes: torch.Tensor, *, out_size: int,
                    mean: tuple[float, ...], std: tuple[float, ...], enlarge: float = 1.2,
                    min_size: float = 10.0, sampling_ratio: int = 2) -> torch.Tensor:
    """CLIP-ready crops of many boxes of one image.

    Args:
        image: (3, H, W) uint8 or float in [0, 255], RGB.
        boxes: (N, 4) float [x1, y1, x2, y2] in pixels of `image`.
        out_size: CLIP input side S.
        mean, std: CLIP normalisation, for pixel values scaled to [0, 1].
        enlarge, min_size: see `square_crop_boxes`.
        sampling_ratio: RoIAlign samples per output pixel and axis.

    Returns:
        (N, 3, S, S) float32, normalised. The square's padding is black before normalisation
        (``-mean / std`` after it), as in EZSD's code.
    """
    if boxes.numel() == 0:
        return image.new_zeros((0, 3, out_size, out_size), dtype=torch.float32)
    H, W = image.shape[-2:]
    crop, square = square_crop_boxes(boxes.float().to(image.device), (H, W), enlarge=enlarge,
                                     min_size=min_size)
    m = torch.tensor(mean, dtype=torch.float32, device=image.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=image.device).view(1, 3, 1, 1)
    img = image.float().unsqueeze(0) / 255.0
    rois = torch.cat([square.new_zeros(len(square), 1), square], dim=1)
    out = roi_align(img, rois, (out_size, out_size), spatial_scale=1.0,
                    sampling_ratio=sampling_ratio, aligned=True)
    # Output pixel centres in image coordinates; black out what falls outside the clipped crop.
    t = (torch.arange(out_size, dtype=torch.float32, device=image.device) + 0.5) / out_size
    side = (square[:, 2] - square[:, 0]).unsqueeze(1)
    xs = square[:, 0:1] + t * side
    ys = square[:, 1:2] + t * side
    inside_x = (xs >= crop[:, 0:1]) & (xs <= crop[:, 2:3])
    inside_y = (ys >= crop[:, 1:2]) & (ys <= crop[:, 3:4])
    mask = (inside_y.unsqueeze(2) & inside_x.unsqueeze(1)).unsqueeze(1)
    return (out * mask - m) / s
