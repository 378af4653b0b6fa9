"""Sliced inference for images much larger than the model's input (numpy only).

The detector resizes every image so its short side is the model's `min_size_test` (256 px for
the shipped model): a 3000 x 2000 aerial photo goes in at 384 x 256 and a 30 px object becomes
4 px. Sliced inference (as SAHI popularised it) runs the model on overlapping windows at the
model's own scale, plus once on the whole image (for objects larger than a window), and merges
the detections:

    plan = plan_tiles(height, width, preprocessing, tiles="auto")   # windows, whole image last
    crops = [rgb[y0:y1, x0:x1] for x0, y0, x1, y1 in plan.windows]
    found = merge_tiles([detections of each crop], plan, options)   # -> one Detections

Windows are `tile` pixels square (default: the model's min_size_test, so a window is seen at
its native resolution), `overlap` of a side shared with the next, the last of a row or column
flush with the image edge. A window's detection that touches one of its *cut* edges (an edge
inside the image) is a piece of an object the window cut through: it is dropped, since the
neighbouring window (objects up to the overlap in size) or the whole-image pass (larger ones)
sees it whole. The rest are shifted into image pixels and merged by NMS (per class, or across
classes when the request asks for class-agnostic NMS) at the request's NMS IoU.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .detections import Detections
from .runtime import ClassifyOptions, Preprocessing

TILE_MODES = ("auto", "on", "off")
#: What every entry point (Python API, `ovd detect`, HTTP) does when not told.
DEFAULT_TILES = "auto"
#: `tiles="auto"` slices an image whose resize would shrink it more than this factor.
AUTO_SHRINK = 2.0
#: The NMS IoU that merges the windows' detections when the request gives none.
MERGE_IOU = 0.5
#: Pixels from a cut edge within which a window's box counts as cut.
EDGE_MARGIN = 2.0


@dataclass(frozen=True)
class TilePlan:
    """Where to run the model on one image.

    Attributes:
        windows: (x0, y0, x1, y1) pixel windows of the original image; the last one is the
            whole image (the ordinary, downscaled pass).
        image_size: (height, width) of the original image.
    """

    windows: tuple[tuple[int, int, int, int], ...]
    image_size: tuple[int, int]

    @property
    def tiled(self) -> bool:
        return len(self.windows) > 1


def _starts(length: int, tile: int, step: int) -> list[int]:
    """Window starts along one side: every `step`, the last flush with the end."""
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile, step))
    return [*starts, length - tile]


def plan_tiles(height: int, width: int, preprocessing: Preprocessing, tiles: str = "auto", *,
               tile: int | None = None, overlap: float = 0.2, max_tiles: int = 64) -> TilePlan:
    """The windows to run on an image of (height, width) pixels.

    Args:
        preprocessing: the model's input transform (its min_size is the default tile).
        tiles: "auto" (slice when the resize would shrink the image more than AUTO_SHRINK
            times), "on" (slice whenever the image is larger than a tile) or "off".
        tile: window side in pixels (default: the model's min_size_test).
        overlap: fraction of a window shared with its neighbour, in [0, 0.9].
        max_tiles: at most this many windows besides the whole image; a larger image gets
            larger windows (each then downscaled by the model), so the cost stays bounded.
    """
    if tiles not in TILE_MODES:
        raise ValueError(f"tiles {tiles!r} is not one of {TILE_MODES}")
    if not 0.0 <= overlap <= 0.9:
        raise ValueError(f"overlap must be in [0, 0.9], not {overlap}")
    if max_tiles < 1:
        raise ValueError(f"max_tiles must be >= 1, not {max_tiles}")
    whole = ((0, 0, width, height),)
    side = int(tile or preprocessing.min_size)
    if side < 1:
        raise ValueError(f"tile must be >= 1 pixel, not {side}")
    shrink = min(height, width) / preprocessing.min_size
    if tiles == "off" or (tiles == "auto" and shrink <= AUTO_SHRINK) or max(height, width) <= side:
        return TilePlan(whole, (height, width))
    while True:
        step = max(1, int(side * (1.0 - overlap)))
        xs, ys = _starts(width, side, step), _starts(height, side, step)
        if len(xs) * len(ys) <= max_tiles:
            break
        side = math.ceil(side * 1.25)
    windows = tuple((x, y, min(x + side, width), min(y + side, height)) for y in ys for x in xs)
    return TilePlan(windows + whole, (height, width))


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float, max_keep: int | None = None) -> np.ndarray:
    """Greedy NMS: indices of the kept boxes, best first (boxes (N, 4) XYXY); stops once
    `max_keep` are kept (greedy NMS keeps best first, so those are the first max_keep of all)."""
    order = np.argsort(-scores, kind="stable")
    area = (boxes[:, 2] - boxes[:, 0]).clip(0) * (boxes[:, 3] - boxes[:, 1]).clip(0)
    keep = []
    while len(order) and (max_keep is None or len(keep) < max_keep):
        i, rest = order[0], order[1:]
        keep.append(i)
        w = (np.minimum(boxes[i, 2], boxes[rest, 2]) - np.maximum(boxes[i, 0], boxes[rest, 0])).clip(0)
        h = (np.minimum(boxes[i, 3], boxes[rest, 3]) - np.maximum(boxes[i, 1], boxes[rest, 1])).clip(0)
        inter = w * h
        overlap = inter / np.maximum(area[i] + area[rest] - inter, 1e-9)
        order = rest[overlap <= iou]
    return np.asarray(keep, np.int64)


def _cut(boxes: np.ndarray, window: tuple[int, int, int, int], image_size: tuple[int, int]) -> np.ndarray:
    """(N,) True where a box (window pixels) touches a window edge that lies inside the image."""
    x0, y0, x1, y1 = window
    height, width = image_size
    w, h = x1 - x0, y1 - y0
    near = EDGE_MARGIN
    cut = np.zeros(len(boxes), bool)
    if x0 > 0:
        cut |= boxes[:, 0] <= near
    if y0 > 0:
        cut |= boxes[:, 1] <= near
    if x1 < width:
        cut |= boxes[:, 2] >= w - near
    if y1 < height:
        cut |= boxes[:, 3] >= h - near
    return cut


def merge_tiles(found: Sequence[Detections], plan: TilePlan, options: ClassifyOptions | None = None,
                max_detections: int | None = None) -> Detections:
    """One image's detections from its windows' (in `plan.windows` order).

    Args:
        found: detections of each window's crop, in that crop's pixels.
        options: the request's (NMS IoU and class-agnostic NMS merge the windows).
        max_detections: keep at most this many (default: options.max_detections, else all).
    """
    if len(found) != len(plan.windows):
        raise ValueError(f"{len(found)} detection sets for {len(plan.windows)} windows")
    if not plan.tiled:
        return found[0]
    options = options or ClassifyOptions()
    boxes, scores, classes = [], [], []
    for d, window in zip(found, plan.windows, strict=True):
        keep = ~_cut(d.boxes, window, plan.image_size)  # the whole image has no cut edge
        boxes.append(d.boxes[keep] + np.array(window[:2] * 2, np.float32))
        scores.append(d.scores[keep])
        classes.append(d.class_indices[keep])
    boxes, scores, classes = np.concatenate(boxes), np.concatenate(scores), np.concatenate(classes)
    iou = MERGE_IOU if options.nms_threshold is None else options.nms_threshold
    limit = max_detections if max_detections is not None else options.max_detections
    if options.class_agnostic:
        keep = nms(boxes, scores, iou, limit)
    else:  # per class: each NMS scans only its class's boxes; the best `limit` of the union are kept
        keep = np.concatenate([np.flatnonzero(classes == c)[nms(boxes[classes == c], scores[classes == c], iou, limit)]
                               for c in np.unique(classes)] or [np.zeros(0, np.int64)])
        keep = keep[np.argsort(-scores[keep], kind="stable")][:limit]
    return Detections(boxes[keep], scores[keep], classes[keep], found[0].classes, plan.image_size)
