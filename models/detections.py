"""`Detections`: what every detector runtime returns for one image, as plain numpy.

Boxes are ``[x1, y1, x2, y2]`` in pixels of the original (upright) image, scores in [0, 1],
and class indices into the vocabulary the detector was asked for. The value converts to the
service's JSON, to COCO results, to a drawn PIL image and (when installed) to
``supervision.Detections``; no Detectron2 type crosses this boundary.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont


@dataclass(frozen=True)
class Detections:
    """Detections of one image.

    Attributes:
        boxes: (N, 4) float32, [x1, y1, x2, y2] pixels of the original image.
        scores: (N,) float32 in [0, 1], sorted high to low.
        class_indices: (N,) int64 rows of `classes`.
        classes: the vocabulary the detector was asked for.
        image_size: (height, width) of the original image, pixels.
    """

    boxes: np.ndarray
    scores: np.ndarray
    class_indices: np.ndarray
    classes: tuple[str, ...]
    image_size: tuple[int, int]

    def __post_init__(self) -> None:
        n = len(self.scores)
        if self.boxes.shape != (n, 4) or self.class_indices.shape != (n,):
            raise ValueError(f"Detections: boxes {self.boxes.shape}, scores {self.scores.shape} and "
                             f"class_indices {self.class_indices.shape} disagree")

    def __len__(self) -> int:
        return len(self.scores)

    @property
    def labels(self) -> list[str]:
        """The class name of each detection."""
        return [self.classes[int(i)] for i in self.class_indices]

    def above(self, threshold: float) -> Detections:
        """The detections scoring at least `threshold`."""
        keep = self.scores >= threshold
        return Detections(self.boxes[keep], self.scores[keep], self.class_indices[keep], self.classes,
                          self.image_size)

    def to_json(self) -> list[dict]:
        """[{"box": [x1, y1, x2, y2], "score", "label", "class_index"}, ...] (the service's shape)."""
        return [{"box": [float(v) for v in box], "score": float(score),
                 "label": self.classes[int(c)], "class_index": int(c)}
                for box, score, c in zip(self.boxes, self.scores, self.class_indices, strict=True)]

    def to_coco(self, image_id: int, category_ids: Mapping[str, int] | Sequence[int] | None = None) -> list[dict]:
        """COCO results ({image_id, category_id, bbox [x, y, w, h], score}) for pycocotools.

        Args:
            image_id: the image's id in the COCO json it will be scored against.
            category_ids: a class's category id, by name (a mapping) or by class index (a
                sequence); default: class index + 1.
        """
        def category(c: int) -> int:
            if category_ids is None:
                return c + 1
            if isinstance(category_ids, Mapping):
                return int(category_ids[self.classes[c]])
            return int(category_ids[c])

        return [{"image_id": image_id, "category_id": category(int(c)),
                 "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)], "score": float(s)}
                for (x1, y1, x2, y2), s, c in zip(self.boxes, self.scores, self.class_indices, strict=True)]

    def draw(self, image: Image.Image | np.ndarray, *, palette: Sequence[tuple[int, int, int]] | None = None
             ) -> Image.Image:
        """A copy of `image` with every box and a "label score" tag, one colour per class;
        line width and font grow with the image so labels stay readable on a 4000 px photo."""
        canvas = (Image.fromarray(np.asarray(image, np.uint8)) if isinstance(image, np.ndarray)
                  else image.convert("RGB")).copy()
        draw = ImageDraw.Draw(canvas)
        side = max(canvas.size)
        width = max(1, round(side / 400))
        font = ImageFont.load_default(size=max(10, round(side / 60)))
        colours = palette or _PALETTE
        for box, score, c in zip(self.boxes, self.scores, self.class_indices, strict=True):
            colour = colours[int(c) % len(colours)]
            x1, y1, x2, y2 = (float(v) for v in box)
            draw.rectangle([x1, y1, x2, y2], outline=colour, width=width)
            text = f"{self.classes[int(c)]} {score:.2f}"
            left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
            th, tw = bottom - top + 2 * width, right - left + 2 * width
            ty = y1 - th if y1 - th >= 0 else y1  # above the box, or inside it at the top edge
            draw.rectangle([x1, ty, x1 + tw, ty + th], fill=colour)
            draw.text((x1 + width, ty + width - top), text, fill=_contrast(colour), font=font)
        return canvas

    def to_supervision(self):
        """These detections as `supervision.Detections` (the optional `supervision` extra),
        class names under ``data["class_name"]``."""
        try:
            import supervision as sv
        except ImportError as e:
            raise ImportError("to_supervision() needs the supervision package: "
                              "pip install 'ovd[supervision]' (or pip install supervision)") from e
        return sv.Detections(xyxy=self.boxes.astype(np.float32), confidence=self.scores.astype(np.float32),
                             class_id=self.class_indices.astype(int),
                             data={"class_name": np.array(self.labels, dtype=object)})


# Tableau-like colours, distinct on terrain and on white.
_PALETTE = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
            (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207))


def _contrast(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    """Black or white, whichever reads better on `rgb` (relative luminance)."""
    return (0, 0, 0) if 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2] > 150 else (255, 255, 255)
