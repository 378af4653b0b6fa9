"""The synthetic open-vocabulary world: detection scenes and a "web" image-caption corpus.

Two visual domains are generated from one seed, deterministically (each sample has its own
RNG seeded by (seed, domain, index), so the output does not depend on the worker count):

* **Captions** ("web photos", CLIP's pretraining data): one or two large objects on varied
  backgrounds with some clutter, and a free-text caption naming them. Half the objects are
  categories; the others are any colour on any shape, held-out attributes included, and some
  captions name only the shape ("a bolt") or only the colour ("something magenta"), as web
  text names things.
* **Detection** ("drone-like scenes"): many objects per image, mostly small, on textured
  terrain with clutter, neighbours, partial occlusion and a camera (haze, desaturation,
  contrast, gamma, colour cast, blur, sensor noise). Clutter never takes a held-out colour or
  shape (shapes.py), so held-out attributes reach a detector only through novel objects,
  which are present in training images but never annotated there (the EZSD setting).

Splits: ``train`` (annotated twice: base boxes only, and all boxes for the oracle), ``val``
(every choice is made here) and ``test`` (reported numbers only). The camera is the gap
between the two domains that CLIP re-normalisation later closes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from ..config import SectionConfig
from .shapes import (
    CATEGORIES,
    COLOURS,
    DISTRACTOR_SHAPES,
    HELD_OUT_COLOURS,
    SEEN_COLOURS,
    SHAPES,
    Category,
    object_texture,
    polygon_mask,
    shape_mask,
)

logger = logging.getLogger(__name__)

WORLD_FORMAT = "ovd-synthetic-world/2"
DETECTION_SPLITS = ("train", "val", "test")
# Random clutter colours closer than this (RGB units) to a held-out colour are redrawn.
CLUTTER_MIN_DISTANCE = 110.0


@dataclass
class WorldConfig(SectionConfig):
    """Sizes and difficulty of the synthetic world (the `world:` section of a config file).

    Attributes:
        seed: master seed; everything generated is a pure function of this config.
        image_size: detection image side in pixels.
        num_train / num_val / num_test: detection images per split (val for every choice,
            test for reported numbers; ~3 novel objects per image).
        objects_per_image: inclusive range of objects per detection image.
        object_size: inclusive range of an object's longer side in detection images, pixels
            (sampled log-uniformly, so small objects dominate as in drone imagery).
        distractors_per_image: inclusive range of non-category clutter shapes per scene.
        max_occlusion: largest fraction of an object a later object may cover.
        caption_image_size: side of caption-corpus images in pixels.
        num_captions: caption-corpus samples for CLIP pretraining.
        num_caption_eval: held-out single-object caption-style images for zero-shot accuracy.
        caption_category_fraction: share of caption objects drawn from the category table; the
            rest are any colour on any shape.
        caption_attribute_only: share of single-object captions that name only the shape or
            only the colour.
        colour_jitter: per-instance std of object colour, in 0..255 units.
        colour_cast: detection images get per-channel gains in [1 - c, 1 + c].
        haze: largest blend fraction of a detection image towards a bright haze colour.
        desaturation: largest fraction of colour saturation removed from a detection image.
        gamma: range of the detection camera's gamma (intensity**gamma on [0, 1]).
        blur: largest Gaussian blur radius of a detection image, pixels.
        noise: range of the sensor noise std of a detection image, 0..255 units.
    """

    SECTION = "world"

    seed: int = 0
    image_size: int = 256
    num_train: int = 600
    num_val: int = 400
    num_test: int = 400
    objects_per_image: tuple[int, int] = (4, 10)
    object_size: tuple[int, int] = (12, 64)
    distractors_per_image: tuple[int, int] = (6, 16)
    max_occlusion: float = 0.35
    caption_image_size: int = 64
    num_captions: int = 30000
    num_caption_eval: int = 1600
    caption_category_fraction: float = 0.5
    caption_attribute_only: float = 0.2
    colour_jitter: float = 14.0
    colour_cast: float = 0.25
    haze: float = 0.3
    desaturation: float = 0.4
    gamma: tuple[float, float] = (0.7, 1.4)
    blur: float = 0.8
    noise: tuple[float, float] = (4.0, 12.0)

    def __post_init__(self) -> None:
        problems = []
        if min(self.num_train, self.num_val, self.num_test, self.num_captions,
               self.num_caption_eval) < 1:
            problems.append("every image count must be >= 1")
        if not 1 <= self.objects_per_image[0] <= self.objects_per_image[1]:
            problems.append(f"objects_per_image {self.objects_per_image} must be 1 <= lo <= hi")
        if not 4 <= self.object_size[0] <= self.object_size[1] <= self.image_size:
            problems.append(f"object_size {self.object_size} must satisfy 4 <= lo <= hi <= "
                            f"image_size ({self.image_size})")
        if not 0 <= self.distractors_per_image[0] <= self.distractors_per_image[1]:
            problems.append(f"distractors_per_image {self.distractors_per_image} must be 0 <= lo <= hi")
        if self.caption_image_size < 16:
            problems.append("caption_image_size must be >= 16")
        if not 0.0 <= self.max_occlusion < 1.0:
            problems.append("max_occlusion must be in [0, 1)")
        if not (0.0 <= self.caption_category_fraction <= 1.0 and 0.0 <= self.caption_attribute_only <= 1.0):
            problems.append("caption_category_fraction and caption_attribute_only must be in [0, 1]")
        if not 0.0 < self.gamma[0] <= self.gamma[1]:
            problems.append(f"gamma {self.gamma} must satisfy 0 < lo <= hi")
        if problems:
            raise ValueError("invalid world config: " + "; ".join(problems))



@dataclass
class SynthObject:
    category: Category
    box: tuple[float, float, float, float]  # x1, y1, x2, y2 in pixels, exclusive end
    alpha: np.ndarray = field(repr=False)
    offset: tuple[int, int] = (0, 0)  # top-left of the alpha patch in the image


def _rng(seed: int, domain: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, domain, index])


# --------------------------------------------------------------------------- backgrounds

def _smooth_noise(rng: np.random.Generator, size: int, cells: int, channels: int) -> np.ndarray:
    """Low-frequency noise (size, size, channels) in [0, 1] by bicubic upsampling of a grid."""
    grid = rng.random((cells, cells, channels)).astype(np.float32)
    img = Image.fromarray((grid * 255).astype(np.uint8).squeeze() if channels == 1 else
                          (grid * 255).astype(np.uint8))
    up = np.asarray(img.resize((size, size), Image.BICUBIC), np.float32) / 255.0
    return up.reshape(size, size, channels)


def terrain_background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Aerial-looking terrain: blended earthy palette, fields, roads and grain. (size, size, 3)."""
    palette = np.array([[96, 112, 70], [140, 128, 96], [88, 96, 92], [120, 134, 84],
                        [150, 146, 130], [72, 84, 60]], np.float32)
    cols = palette[rng.choice(len(palette), 3, replace=False)] + rng.normal(0, 10, (3, 3))
    w = _smooth_noise(rng, size, int(rng.integers(3, 7)), 3)
    w = (w + 1e-3) / (w + 1e-3).sum(-1, keepdims=True)
    img = np.einsum("hwk,kc->hwc", w, cols)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    for _ in range(int(rng.integers(0, 3))):  # striped fields
        theta, period = rng.uniform(0, math.pi), rng.uniform(4, 12)
        mask = _smooth_noise(rng, size, 3, 1)[..., 0] > 0.55
        stripes = np.sin((np.cos(theta) * xx + np.sin(theta) * yy) * 2 * math.pi / period)
        img += (mask * stripes * rng.uniform(6, 16))[..., None]
    for _ in range(int(rng.integers(0, 3))):  # roads
        theta = rng.uniform(0, math.pi)
        c = rng.uniform(0.2, 0.8) * size
        d = np.abs(np.cos(theta) * (xx - c) + np.sin(theta) * (yy - c))
        road = np.clip(rng.uniform(2, 6) - d, 0, 1)[..., None]
        img = img * (1 - road) + road * rng.uniform(150, 190)
    img += rng.normal(0, 5, img.shape)
    return img


def web_background(rng: np.random.Generator, size: int) -> tuple[np.ndarray, str]:
    """A varied photo-like background and its one-word description. (size, size, 3), word."""
    kind = rng.choice(["plain", "gradient", "striped", "checkered", "noisy", "blurry"])
    c1, c2 = rng.uniform(20, 235, 3), rng.uniform(20, 235, 3)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    if kind == "plain":
        img = np.broadcast_to(c1, (size, size, 3)).copy()
    elif kind == "gradient":
        t = (xx * rng.uniform(-1, 1) + yy * rng.uniform(-1, 1))[..., None]
        t = (t - t.min()) / (np.ptp(t) + 1e-6)
        img = c1 * (1 - t) + c2 * t
    elif kind == "striped":
        theta, period = rng.uniform(0, math.pi), rng.uniform(0.08, 0.25)
        s = (np.sin((np.cos(theta) * xx + np.sin(theta) * yy) * 2 * math.pi / period) > 0)[..., None]
        img = np.where(s, c1, c2)
    elif kind == "checkered":
        p = rng.uniform(0.1, 0.25)
        s = (((xx // p) + (yy // p)) % 2 == 0)[..., None]
        img = np.where(s, c1, c2)
    elif kind == "noisy":
        img = c1 + rng.normal(0, 30, (size, size, 3))
    else:
        w = _smooth_noise(rng, size, 4, 1)
        img = c1 * (1 - w) + c2 * w
    return np.asarray(img, np.float32), str(kind)


def _paste(img: np.ndarray, patch: np.ndarray, alpha: np.ndarray, x: int, y: int) -> None:
    """Alpha-composite patch (h, w, 3) with alpha (h, w) into img at (x, y), clipped to img."""
    H, W = img.shape[:2]
    h, w = alpha.shape
    x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, W), min(y + h, H)
    if x0 >= x1 or y0 >= y1:
        return
    a = alpha[y0 - y:y1 - y, x0 - x:x1 - x, None]
    img[y0:y1, x0:x1] = img[y0:y1, x0:x1] * (1 - a) + patch[y0 - y:y1 - y, x0 - x:x1 - x] * a


def _add_distractors(img: np.ndarray, rng: np.random.Generator, count: int,
                     size_range: tuple[float, float]) -> None:
    size = img.shape[0]
    for _ in range(count):
        s = int(rng.uniform(*size_range))
        w, h = max(3, int(s * rng.uniform(0.5, 1.5))), max(3, int(s * rng.uniform(0.5, 1.5)))
        poly = DISTRACTOR_SHAPES[int(rng.integers(len(DISTRACTOR_SHAPES)))]
        alpha = polygon_mask(poly, w, h, rng.uniform(0, 360)) * rng.uniform(0.6, 1.0)
        # Clutter sometimes borrows a seen object colour, so colour alone is not a detector,
        # and never looks like a held-out colour, which only novel objects may show.
        rgb = COLOURS[SEEN_COLOURS[int(rng.integers(len(SEEN_COLOURS)))]] if rng.random() < 0.4 \
            else _clutter_colour(rng)
        patch = object_texture(rgb, w, h, rng, 20.0)
        _paste(img, patch, alpha, int(rng.integers(-w // 2, size - w // 2)),
               int(rng.integers(-h // 2, size - h // 2)))


def _clutter_colour(rng: np.random.Generator) -> tuple[float, float, float]:
    """A random RGB at least CLUTTER_MIN_DISTANCE from every held-out colour."""
    held_out = np.array([COLOURS[c] for c in sorted(HELD_OUT_COLOURS)], np.float32)
    while True:
        rgb = rng.uniform(30, 220, 3)
        if np.linalg.norm(held_out - rgb, axis=1).min() >= CLUTTER_MIN_DISTANCE:
            return tuple(rgb)


def _render_object(colour: str, shape: str, long_side: int, rng: np.random.Generator,
                   colour_jitter: float) -> tuple[np.ndarray, np.ndarray]:
    """Texture (h, w, 3) and alpha (h, w) of one object whose longer side is long_side px."""
    aspect = rng.uniform(0.8, 1.25)
    w = max(4, int(round(long_side * min(1.0, aspect))))
    h = max(4, int(round(long_side * min(1.0, 1 / aspect))))
    alpha = shape_mask(shape, w, h, rng.uniform(-30, 30))
    return object_texture(COLOURS[colour], w, h, rng, colour_jitter), alpha


def _tight_box(alpha: np.ndarray, x: int, y: int, W: int, H: int):
    ys, xs = np.nonzero(alpha > 0.5)
    if len(xs) == 0:
        return None
    x1, y1 = max(x + xs.min(), 0), max(y + ys.min(), 0)
    x2, y2 = min(x + xs.max() + 1, W), min(y + ys.max() + 1, H)
    if x2 - x1 < 2 or y2 - y1 < 2:
        return None
    return float(x1), float(y1), float(x2), float(y2)


# --------------------------------------------------------------------------- samples

def detection_sample(cfg: WorldConfig, split: str, index: int) -> tuple[np.ndarray, list[SynthObject]]:
    """One detection scene.

    Returns:
        image: uint8 (image_size, image_size, 3) RGB.
        objects: the visible category objects with tight boxes (x1, y1, x2, y2), pixels.
    """
    rng = _rng(cfg.seed, 1 + DETECTION_SPLITS.index(split), index)
    size = cfg.image_size
    img = terrain_background(rng, size)
    _add_distractors(img, rng, int(rng.integers(cfg.distractors_per_image[0],
                                                cfg.distractors_per_image[1] + 1)), (4, 28))
    n = int(rng.integers(cfg.objects_per_image[0], cfg.objects_per_image[1] + 1))
    coverage = np.zeros((size, size), np.float32)  # union of alphas placed so far
    objects: list[SynthObject] = []
    lo, hi = math.log(cfg.object_size[0]), math.log(cfg.object_size[1])
    for _ in range(n * 4):  # a few attempts per object to respect the occlusion bound
        if len(objects) == n:
            break
        cat = CATEGORIES[int(rng.integers(len(CATEGORIES)))]
        tex, alpha = _render_object(cat.colour, cat.shape, int(math.exp(rng.uniform(lo, hi))), rng,
                                    cfg.colour_jitter)
        h, w = alpha.shape
        x, y = int(rng.integers(0, size - w + 1)), int(rng.integers(0, size - h + 1))
        new_area = alpha.sum()
        # Reject placements that would hide too much of an earlier object, or sit under one.
        if (coverage[y:y + h, x:x + w] * alpha).sum() > cfg.max_occlusion * new_area:
            continue
        ok = True
        for o in objects:
            oy, ox = o.offset
            oh, ow = o.alpha.shape
            ix0, iy0, ix1, iy1 = max(x, ox), max(y, oy), min(x + w, ox + ow), min(y + h, oy + oh)
            if ix0 < ix1 and iy0 < iy1:
                hidden = (o.alpha[iy0 - oy:iy1 - oy, ix0 - ox:ix1 - ox]
                          * alpha[iy0 - y:iy1 - y, ix0 - x:ix1 - x]).sum()
                if hidden > cfg.max_occlusion * o.alpha.sum():
                    ok = False
                    break
        if not ok:
            continue
        box = _tight_box(alpha, x, y, size, size)
        if box is None:
            continue
        _paste(img, tex, alpha, x, y)
        coverage[y:y + h, x:x + w] = np.maximum(coverage[y:y + h, x:x + w], alpha)
        objects.append(SynthObject(cat, box, alpha, (y, x)))
    # Camera and atmosphere: haze, desaturation, contrast, gamma, per-image colour cast, blur,
    # noise. All but blur and noise are per-channel affine or monotone maps that a LayerNorm
    # on CLIP's tokens can partly undo (re-normalisation's job).
    haze = rng.uniform(0, cfg.haze)
    img = img * (1 - haze) + haze * rng.uniform(150, 210, 3)
    grey = img.mean(-1, keepdims=True)
    sat = 1 - rng.uniform(0, cfg.desaturation)
    img = grey + (img - grey) * sat
    mean = img.mean()
    img = (img - mean) * rng.uniform(0.7, 1.0) + mean
    img = 255.0 * (np.clip(img, 0, 255) / 255.0) ** rng.uniform(*cfg.gamma)
    img = img * rng.uniform(1 - cfg.colour_cast, 1 + cfg.colour_cast, 3)
    if cfg.blur > 0:
        img = np.asarray(Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).filter(
            ImageFilter.GaussianBlur(rng.uniform(0, cfg.blur))), np.float32)
    img = img + rng.normal(0, rng.uniform(*cfg.noise), img.shape)
    out = np.clip(img, 0, 255).astype(np.uint8)
    for o in objects:
        o.alpha = o.alpha[:0]  # free memory: only the box is kept
    return out, objects


_SINGLE_TEMPLATES = [
    "a photo of a {a}.", "a photo of a {a}", "a {a}", "a picture of a {a}.", "a {a} on a {bg} background",
    "a {size} {a}", "there is a {a} in this picture", "a close-up photo of the {a}", "{a}",
    "an image showing a {a}", "the {a} against a {bg} backdrop",
]
_PAIR_TEMPLATES = [
    "a {a} and a {b}", "a photo of a {a} and a {b}.", "a {a} next to a {b}",
    "a {b} beside a {a} on a {bg} background", "a picture with a {a} and a {b}",
]
_COLOUR_ONLY_TEMPLATES = ["something {c}", "a {c} object", "a {c} thing on a {bg} background",
                          "a photo of something {c}."]
_SHAPE_ONLY_TEMPLATES = ["a {s}", "a photo of a {s}.", "a {s} on a {bg} background", "the shape of a {s}"]
_SHAPE_NAMES = tuple(SHAPES)


def _caption_object(cfg: WorldConfig, rng: np.random.Generator, categories_only: bool
                    ) -> tuple[str, str, int | None]:
    """(colour, shape, category id or None) of one caption object: a category, or any colour
    on any shape (held-out attributes included)."""
    if categories_only or rng.random() < cfg.caption_category_fraction:
        cat = CATEGORIES[int(rng.integers(len(CATEGORIES)))]
        return cat.colour, cat.shape, cat.id
    colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
    shape = _SHAPE_NAMES[int(rng.integers(len(_SHAPE_NAMES)))]
    match = [c.id for c in CATEGORIES if (c.colour, c.shape) == (colour, shape)]
    return colour, shape, match[0] if match else None


def caption_sample(cfg: WorldConfig, index: int, *, domain: int = 10,
                   single: bool = False) -> tuple[np.ndarray, str, list[int]]:
    """One "web photo" with its caption.

    Args:
        cfg: world config.
        index: sample index within the domain.
        domain: RNG domain (10 = pretraining corpus, 11 = held-out evaluation crops).
        single: one category object, named in full (the evaluation crops).

    Returns:
        image: uint8 (caption_image_size, caption_image_size, 3).
        caption: free text naming the objects (or only an attribute of a single one).
        category_ids: ids of the shown objects that are categories (may be empty).
    """
    rng = _rng(cfg.seed, domain, index)
    size = cfg.caption_image_size
    img, bg_word = web_background(rng, size)
    _add_distractors(img, rng, int(rng.integers(0, 4)), (3, size * 0.25))
    n = 1 if single or rng.random() < 0.7 else 2
    objects = [_caption_object(cfg, rng, single) for _ in range(n)]
    names = [f"{colour} {shape}" for colour, shape, _ in objects]
    if n == 1:
        frac = rng.uniform(0.45, 0.9)
        colour, shape, _ = objects[0]
        tex, alpha = _render_object(colour, shape, int(size * frac), rng, cfg.colour_jitter)
        h, w = alpha.shape
        _paste(img, tex, alpha, int(rng.integers(0, size - w + 1)), int(rng.integers(0, size - h + 1)))
        attribute_only = not single and rng.random() < cfg.caption_attribute_only
        if attribute_only and rng.random() < 0.5:
            caption = str(rng.choice(_COLOUR_ONLY_TEMPLATES)).format(c=colour, bg=bg_word)
        elif attribute_only:
            caption = str(rng.choice(_SHAPE_ONLY_TEMPLATES)).format(s=shape, bg=bg_word)
        else:
            caption = str(rng.choice(_SINGLE_TEMPLATES)).format(
                a=names[0], bg=bg_word, size="large" if frac > 0.7 else "small")
    else:
        for k, (colour, shape, _) in enumerate(objects):
            tex, alpha = _render_object(colour, shape, int(size * rng.uniform(0.35, 0.55)), rng,
                                        cfg.colour_jitter)
            h, w = alpha.shape
            half = size // 2
            x = int(rng.integers(k * half - w // 3, max(k * half - w // 3 + 1, (k + 1) * half - w + w // 3)))
            _paste(img, tex, alpha, int(np.clip(x, 0, size - w)), int(rng.integers(0, size - h + 1)))
        if names[0] == names[1]:
            caption = f"two {names[0]}s"
        else:
            caption = str(rng.choice(_PAIR_TEMPLATES)).format(a=names[0], b=names[1], bg=bg_word)
    img = img + rng.normal(0, 2, img.shape)
    return (np.clip(img, 0, 255).astype(np.uint8), caption,
            [cid for _, _, cid in objects if cid is not None])


# --------------------------------------------------------------------------- writing

def _categories_json() -> list[dict]:
    return [{"id": c.id, "name": c.name, "supercategory": c.shape, "split": c.split, "tier": c.tier,
             "colour": c.colour, "shape": c.shape} for c in CATEGORIES]


def _write_json_atomic(path: Path, payload: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload))
    os.replace(tmp, path)


def _detection_job(args: tuple[WorldConfig, str, int, str]) -> list[dict]:
    cfg, split, index, image_dir = args
    img, objects = detection_sample(cfg, split, index)
    Image.fromarray(img).save(Path(image_dir) / f"{index:06d}.png", compress_level=1)
    return [{"category_id": o.category.id, "bbox": [o.box[0], o.box[1], o.box[2] - o.box[0],
             o.box[3] - o.box[1]]} for o in objects]


def _caption_job(args: tuple[WorldConfig, int, int, int, bool]) -> tuple[np.ndarray, list]:
    cfg, start, stop, domain, single = args
    images, rows = [], []
    for i in range(start, stop):
        img, caption, ids = caption_sample(cfg, i, domain=domain, single=single)
        images.append(img)
        rows.append({"index": i, "caption": caption, "category_ids": ids})
    return np.stack(images), rows


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def folder_digest(folder: Path, pattern: str = "*.png") -> str:
    """sha256 over the names and sha256s of the files of a folder matching pattern."""
    digest = hashlib.sha256()
    for p in sorted(folder.glob(pattern)):
        digest.update(p.name.encode() + bytes.fromhex(_sha256_file(p)))
    return digest.hexdigest()


def generate_world(out_dir: str | Path, cfg: WorldConfig, *, workers: int = 2,
                   progress: Callable[[str, int], Callable[[int], None]] | None = None) -> Path:
    """Write the synthetic world under out_dir and return the path of its world.json.

    Layout::

        out_dir/world.json                          config, categories, file sha256s
        out_dir/detection/{train,val,test}/000000.png
        out_dir/detection/annotations/train_base.json   base boxes only (EZSD training)
        out_dir/detection/annotations/train_all.json    all boxes (oracle)
        out_dir/detection/annotations/val.json          all boxes: every choice is made here
        out_dir/detection/annotations/test.json         all boxes: reported numbers only
        out_dir/captions/{pretrain,eval}.npy            uint8 (N, S, S, 3)
        out_dir/captions/{pretrain,eval}.jsonl          caption + category ids per row

    Args:
        out_dir: output folder (created).
        cfg: world config.
        workers: processes used for rendering; the output does not depend on it.
        progress: optional factory `progress(description, total) -> advance(n)`.
    """
    out = Path(out_dir)
    (out / "detection" / "annotations").mkdir(parents=True, exist_ok=True)
    (out / "captions").mkdir(parents=True, exist_ok=True)
    advance_noop = lambda n: None  # noqa: E731
    ctx = get_context("fork")
    files: dict[str, str] = {}
    with ctx.Pool(workers) as pool:
        per_split: dict[str, list[list[dict]]] = {}
        for split, count in (("train", cfg.num_train), ("val", cfg.num_val), ("test", cfg.num_test)):
            image_dir = out / "detection" / split
            image_dir.mkdir(parents=True, exist_ok=True)
            advance = progress(f"detection/{split}", count) if progress else advance_noop
            results = []
            for anns in pool.imap(_detection_job, [(cfg, split, i, str(image_dir)) for i in range(count)],
                                  chunksize=8):
                results.append(anns)
                advance(1)
            per_split[split] = results
        for name, domain, count, single in (("pretrain", 10, cfg.num_captions, False),
                                            ("eval", 11, cfg.num_caption_eval, True)):
            advance = progress(f"captions/{name}", count) if progress else advance_noop
            chunk = 500
            jobs = [(cfg, s, min(s + chunk, count), domain, single) for s in range(0, count, chunk)]
            arr = np.lib.format.open_memmap(out / "captions" / f"{name}.npy.tmp", mode="w+",
                                            dtype=np.uint8,
                                            shape=(count, cfg.caption_image_size, cfg.caption_image_size, 3))
            rows_all = []
            for (start, stop, *_), (images, rows) in zip(
                    [j[1:] for j in jobs], pool.imap(_caption_job, jobs), strict=True):
                arr[start:stop] = images
                rows_all.extend(rows)
                advance(stop - start)
            arr.flush()
            del arr
            os.replace(out / "captions" / f"{name}.npy.tmp", out / "captions" / f"{name}.npy")
            jsonl = out / "captions" / f"{name}.jsonl"
            tmp = jsonl.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in rows_all))
            os.replace(tmp, jsonl)

    base_ids = {c.id for c in CATEGORIES if c.split == "base"}
    for split, results in per_split.items():
        images, anns = [], []
        for i, objs in enumerate(results):
            images.append({"id": i + 1, "file_name": f"{i:06d}.png", "width": cfg.image_size,
                           "height": cfg.image_size})
            for o in objs:
                anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": o["category_id"],
                             "bbox": o["bbox"], "area": o["bbox"][2] * o["bbox"][3], "iscrowd": 0})
        variants = {split: anns} if split != "train" else {
            "train_all": anns, "train_base": [a for a in anns if a["category_id"] in base_ids]}
        for vname, vanns in variants.items():
            path = out / "detection" / "annotations" / f"{vname}.json"
            _write_json_atomic(path, {
                "info": {"description": f"ovd synthetic world, {vname}", "format": WORLD_FORMAT},
                "images": images, "annotations": vanns, "categories": _categories_json()})
    for p in sorted((out / "detection" / "annotations").glob("*.json")) + sorted(
            (out / "captions").glob("*.*")):
        files[str(p.relative_to(out))] = _sha256_file(p)
    for split in DETECTION_SPLITS:  # one digest per image folder keeps world.json short
        files[f"detection/{split}/*.png"] = folder_digest(out / "detection" / split)
    world = {
        "format": WORLD_FORMAT,
        "config": asdict(cfg),
        "categories": _categories_json(),
        "files": files,
        "fingerprint": hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest(),
    }
    path = out / "world.json"
    _write_json_atomic(path, world)
    return path


def load_world(world_dir: str | Path) -> dict:
    """Read world.json of a generated world, with a clear error if it is missing or foreign."""
    path = Path(world_dir) / "world.json"
    if not path.is_file():
        raise FileNotFoundError(f"no synthetic world at {world_dir} (missing {path}); "
                                f"run `ovd data synth --out {world_dir}` first")
    world = json.loads(path.read_text())
    if world.get("format") != WORLD_FORMAT:
        raise ValueError(f"{path} is not a {WORLD_FORMAT} file (format={world.get('format')!r})")
    return world


def world_datasets(world_dir: str | Path) -> dict[str, tuple[Path, Path]]:
    """Detectron2 dataset names of a world -> (json_file, image_root)."""
    root = Path(world_dir) / "detection"
    return {
        "synth_train": (root / "annotations" / "train_base.json", root / "train"),
        "synth_train_all": (root / "annotations" / "train_all.json", root / "train"),
        "synth_val": (root / "annotations" / "val.json", root / "val"),
        "synth_test": (root / "annotations" / "test.json", root / "test"),
    }


def register_world(world_dir: str | Path, *, overwrite: bool = False) -> list[str]:
    """Register a world's splits in Detectron2's DatasetCatalog / MetadataCatalog.

    Names: `synth_train` (base boxes only), `synth_train_all` (oracle: all boxes), `synth_val`
    and `synth_test` (all boxes), with base/novel metadata from the category split tags.
    """
    from .coco_format import register_ov_dataset

    return [register_ov_dataset(name, json_file, image_root, overwrite=overwrite)
            for name, (json_file, image_root) in world_datasets(world_dir).items()]
