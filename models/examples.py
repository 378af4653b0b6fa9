"""Query by example: a box around an object becomes a query row, classified like a name's text.

The detector's region embeddings were distilled into CLIP's image space and are classified
against CLIP text embeddings. An example box is turned into a row of that classifier in three
steps, all on numpy so both runtimes (PyTorch and onnxruntime) share them:

1. **Encode the example's image** with the detector's own encode pass (the same one detection
   runs, so it is batched, priced and cached like any image) and take the region embedding of
   the proposal that overlaps the box most (IoU). OWL-ViT's image-guided queries pick their
   query the same way. The detector's embedding, not a CLIP image-tower crop, because it is the
   space the classifier compares against: on val (benchmarks/results/example_queries.md) it
   beats a CLIP crop of the box by +2.3 [+1.7, +3.0] novel AP50, and it needs no second image
   tower in the export.
2. **Move it toward text space.** Image embeddings of any two objects are far more alike than
   an image and a caption (CLIP's "modality gap"), so a raw example row scores nearly every
   region of a scene above 0.3 against the background vector the classifier learnt on text
   rows, and its detections crowd every other class out of an image's top detections. The row
   is moved by a fraction s of the gap, q = normalise(e + s (mean_text - mean_image)), where
   mean_image is the mean region embedding of the example's own image (its proposals) and
   mean_text the mean text embedding of the model's categories. s = 0.75 (GAP_SHIFT) was chosen
   on val for the best AP over all classes: the whole gap (s = 1) calibrates best but ranks an
   example's own objects worse (-1.3 novel AP50), s <= 0.5 leaves them crowding out the rest.
3. **Average** the rows of several examples with one label (a prototype).

Boxes are `[x1, y1, x2, y2]` pixels of the example's original (upright) image. An example in
a large image (one the model's resize would shrink more than `tiling.AUTO_SHRINK` times) is
encoded in a window around its box (`example_inputs`), at the scale the detector was trained
at, as sliced inference sees objects.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .runtime import Preprocessing
from .tiling import AUTO_SHRINK

#: The fraction of the modality gap an example row is moved by (`example_rows`), chosen on val.
GAP_SHIFT = 0.75
#: Below this IoU between an example box and its best proposal the example is answered with a
#: warning: the region embedding is of something else (e.g. a box around several objects).
MIN_EXAMPLE_IOU = 0.5


@dataclass(frozen=True)
class ExampleRow:
    """One example box turned into a query row.

    Attributes:
        row: (D,) float32, L2-normalised, in the classifier's (text) space.
        iou: IoU of the box with the proposal whose embedding was taken.
        box: the example box, pixels of its original image.
    """

    row: np.ndarray
    iou: float
    box: tuple[float, float, float, float]


def category_text_mean(runtime) -> np.ndarray:
    """(D,) normalised mean text embedding of a runtime's categories (its manifest's; "object"
    when it lists none): where text rows sit, the target of an example row's shift."""
    names = [c["name"] for c in runtime.manifest.get("categories", [])] or ["object"]
    return _normalise(as_numpy(runtime.text_embeddings(names)).mean(axis=0)).astype(np.float32)


def as_numpy(x) -> np.ndarray:
    """float32 numpy of a torch tensor or array."""
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, np.float32)


def _normalise(v: np.ndarray) -> np.ndarray:
    return v / max(float(np.linalg.norm(v)), 1e-12)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, M) IoU of XYXY boxes a (N, 4) and b (M, 4)."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(axis=2)
    area = lambda x: np.clip(x[:, 2] - x[:, 0], 0, None) * np.clip(x[:, 3] - x[:, 1], 0, None)  # noqa: E731
    return inter / np.maximum(area(a)[:, None] + area(b)[None, :] - inter, 1e-12)


def check_box(box: Sequence[float], width: int, height: int) -> tuple[float, float, float, float]:
    """The box as 4 floats, or ValueError naming what is wrong with it."""
    try:
        x1, y1, x2, y2 = (float(v) for v in box)
    except (TypeError, ValueError) as e:
        raise ValueError(f"an example box is [x1, y1, x2, y2] in pixels, not {box!r}") from e
    if not all(np.isfinite([x1, y1, x2, y2])):
        raise ValueError(f"example box {box!r} has a non-finite coordinate")
    x1, y1, x2, y2 = max(x1, 0.0), max(y1, 0.0), min(x2, float(width)), min(y2, float(height))
    if x2 - x1 < 1 or y2 - y1 < 1:
        raise ValueError(f"example box {list(box)} is empty inside the {width}x{height} image "
                         "(boxes are [x1, y1, x2, y2] pixels, x2 > x1 and y2 > y1)")
    return x1, y1, x2, y2


#: The window around an example box in a large image is this many times the box's longer side
#: (at least the model's input size): enough context for the detector's proposals.
WINDOW_CONTEXT = 4.0


def example_inputs(rgb: np.ndarray, boxes: Sequence[Sequence[float]], preprocessing: Preprocessing
                   ) -> list[tuple[dict, list[int], list[tuple[float, float, float, float]]]]:
    """The model inputs that embed the example boxes of one (H, W, 3) uint8 RGB image.

    Returns:
        [(model input, indices into boxes, those boxes in the input's original pixels)]: one
        input for the whole image, or, when the model's resize would shrink it more than
        AUTO_SHRINK times, one window per box of side max(min_size, WINDOW_CONTEXT x its longer
        side), centred on it and kept inside the image.

    Raises:
        ValueError: a box that is not 4 finite numbers or is empty inside the image.
    """
    height, width = rgb.shape[:2]
    checked = [check_box(b, width, height) for b in boxes]
    if min(height, width) / preprocessing.min_size <= AUTO_SHRINK:
        return [(preprocessing(rgb), list(range(len(checked))), checked)]
    out = []
    for k, (x1, y1, x2, y2) in enumerate(checked):
        side = int(max(preprocessing.min_size, WINDOW_CONTEXT * max(x2 - x1, y2 - y1)))
        wx0 = int(min(max((x1 + x2 - side) / 2, 0), max(width - side, 0)))
        wy0 = int(min(max((y1 + y2 - side) / 2, 0), max(height - side, 0)))
        wx1, wy1 = min(wx0 + side, width), min(wy0 + side, height)
        out.append((preprocessing(rgb[wy0:wy1, wx0:wx1]), [k], [(x1 - wx0, y1 - wy0, x2 - wx0, y2 - wy0)]))
    return out


def example_rows(regions, model_input: dict, boxes: Sequence[Sequence[float]], text_mean: np.ndarray,
                 *, shift: float = GAP_SHIFT) -> list[ExampleRow]:
    """Query rows of example boxes on one encoded image.

    Args:
        regions: the image's encoded regions (`Runtime.encode` output for it): `.proposals`
            (R, 4) pixels of the resized input and `.embeddings` (R, D) normalised.
        model_input: the image's preprocessed input (its resized "image" and original
            "height"/"width"), as given to `Runtime.encode`.
        boxes: K example boxes, [x1, y1, x2, y2] pixels of the original image.
        text_mean: (D,) the normalised mean text embedding of the model's categories.
        shift: the fraction of the modality gap the row is moved by (module docstring,
            step 2): 0 keeps the raw region embedding, 1 moves it by the whole gap.

    Returns:
        One ExampleRow per box.
    """
    _, h, w = model_input["image"].shape
    height, width = int(model_input["height"]), int(model_input["width"])
    checked = [check_box(b, width, height) for b in boxes]
    proposals = as_numpy(regions.proposals)
    embeddings = as_numpy(regions.embeddings)
    if len(proposals) == 0:
        raise ValueError("the detector found no region at all in the example's image")
    scale = np.array([w / width, h / height, w / width, h / height], np.float32)
    iou = box_iou(np.asarray(checked, np.float32) * scale, proposals)
    best = iou.argmax(axis=1)
    image_mean = _normalise(embeddings.mean(axis=0))
    out = []
    for k, box in enumerate(checked):
        e = embeddings[best[k]]
        row = _normalise(e + shift * (text_mean - image_mean))
        out.append(ExampleRow(row.astype(np.float32), float(iou[k, best[k]]), box))
    return out


def prototypes(labels: Sequence[str], rows: Sequence[ExampleRow]) -> tuple[list[str], np.ndarray]:
    """(distinct labels in first-seen order, (L, D) normalised mean row per label)."""
    order: dict[str, list[np.ndarray]] = {}
    for label, r in zip(labels, rows, strict=True):
        order.setdefault(label, []).append(r.row)
    return list(order), np.stack([_normalise(np.mean(v, axis=0)) for v in order.values()]).astype(np.float32)


def weak_example_warnings(labels: Sequence[str], rows: Sequence[ExampleRow]) -> list[dict]:
    """[{"name", "unknown_words": [], "message"}] for examples no proposal matches well
    (IoU < MIN_EXAMPLE_IOU), in the shape of the service's per-name warnings."""
    return [{"name": label, "unknown_words": [],
             "message": f"example box {[round(v, 1) for v in r.box]} of {label!r} overlaps the detector's best "
                        f"region by IoU {r.iou:.2f} only: draw it tightly around one whole object"}
            for label, r in zip(labels, rows, strict=True) if r.iou < MIN_EXAMPLE_IOU]
