"""Rasterising the synthetic world's objects: colours, shapes, the category table, masks and
object patches.

Every category is a plain-words name made of a colour and a shape ("red ring"). The palette
and the shape set are split in two:

* **seen** attributes appear on base boxes, on detection clutter and in captions;
* **held-out** attributes (HELD_OUT_COLOURS, HELD_OUT_SHAPES) appear only in the caption
  corpus ("the web") and on the unannotated novel objects of detection scenes.

Novel categories come in three tiers, each tagged in the COCO json:

* ``novel_comp``: a seen colour on a seen shape, a new pairing ("red ring"). Text alone can
  transfer here, so this tier is the control;
* ``novel_shape``: a seen colour on a held-out shape ("red clover");
* ``novel_both``: a held-out colour on a held-out shape ("mint bolt"). Only a region
  embedding that learned the attribute from CLIP (distillation) can find these.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

# The seen palette is kept far apart (>= 94 RGB units from every held-out colour), so a
# held-out colour is not a jittered, colour-cast version of a seen one.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (214, 40, 40),
    "blue": (40, 82, 214),
    "green": (46, 160, 60),
    "yellow": (232, 206, 40),
    "purple": (136, 58, 186),
    "orange": (240, 136, 30),
    "white": (236, 236, 236),
    "brown": (128, 78, 40),
    # Held-out colours: captions and novel objects only.
    "cyan": (40, 200, 210),
    "magenta": (232, 40, 214),
    "mint": (150, 250, 200),
}
# Not black: EZSD pads every crop square with black pixels, so on small objects "black" named
# the padding rather than the object (measured: after re-normalisation half of all base
# crops of val were classified as "black bolt").
HELD_OUT_COLOURS: frozenset[str] = frozenset({"cyan", "magenta", "mint"})

TIERS: tuple[str, ...] = ("base", "novel_comp", "novel_shape", "novel_both")


@dataclass(frozen=True)
class Category:
    """One synthetic object category.

    Attributes:
        id: COCO category id (1-based).
        colour: key of COLOURS.
        shape: key of SHAPES.
        tier: one of TIERS; "base" categories have boxes in training, the others never do.
    """

    id: int
    colour: str
    shape: str
    tier: str

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"

    @property
    def split(self) -> str:
        """"base" or "novel" (the open-vocabulary split every dataset has)."""
        return "base" if self.tier == "base" else "novel"


CATEGORIES: tuple[Category, ...] = tuple(
    Category(i + 1, colour, shape, tier)
    for i, (colour, shape, tier) in enumerate(
        [
            ("red", "disk", "base"),
            ("blue", "square", "base"),
            ("green", "triangle", "base"),
            ("yellow", "star", "base"),
            ("purple", "ring", "base"),
            ("orange", "cross", "base"),
            ("white", "arrow", "base"),
            ("brown", "hexagon", "base"),
            ("purple", "diamond", "base"),
            ("green", "heart", "base"),
            ("yellow", "crescent", "base"),
            ("red", "ring", "novel_comp"),
            ("blue", "star", "novel_comp"),
            ("orange", "heart", "novel_comp"),
            ("red", "clover", "novel_shape"),
            ("blue", "bowtie", "novel_shape"),
            ("yellow", "bolt", "novel_shape"),
            ("cyan", "clover", "novel_both"),
            ("magenta", "bowtie", "novel_both"),
            ("mint", "bolt", "novel_both"),
        ]
    )
)


def _regular_polygon(n: int, radius: float = 1.0, phase: float = -math.pi / 2) -> list:
    return [
        (radius * math.cos(phase + 2 * math.pi * k / n), radius * math.sin(phase + 2 * math.pi * k / n))
        for k in range(n)
    ]


def _star(points: int = 5, inner: float = 0.45) -> list:
    outer = _regular_polygon(2 * points)
    return [(x * (1.0 if k % 2 == 0 else inner), y * (1.0 if k % 2 == 0 else inner))
            for k, (x, y) in enumerate(outer)]


def _heart(n: int = 48) -> list:
    pts = []
    for k in range(n):
        t = 2 * math.pi * k / n
        x = 16 * math.sin(t) ** 3
        y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
        pts.append((x / 17.0, -y / 17.0 + 0.1))
    return pts


# Each shape: (geometry, fill) parts drawn in order on a [-1, 1]^2 canvas, where geometry is a
# polygon (list of points) or ("circle", cx, cy, r); fill 0 cuts a hole (ring, crescent).
SHAPES: dict[str, list[tuple[object, int]]] = {
    "disk": [(("circle", 0, 0, 1), 255)],
    "ring": [(("circle", 0, 0, 1), 255), (("circle", 0, 0, 0.55), 0)],
    "square": [([(-0.85, -0.85), (0.85, -0.85), (0.85, 0.85), (-0.85, 0.85)], 255)],
    "triangle": [(_regular_polygon(3, 1.0), 255)],
    "star": [(_star(), 255)],
    "cross": [([(-0.3, -1), (0.3, -1), (0.3, -0.3), (1, -0.3), (1, 0.3), (0.3, 0.3), (0.3, 1),
                (-0.3, 1), (-0.3, 0.3), (-1, 0.3), (-1, -0.3), (-0.3, -0.3)], 255)],
    "diamond": [([(0, -1), (0.6, 0), (0, 1), (-0.6, 0)], 255)],
    "heart": [(_heart(), 255)],
    "arrow": [([(-1, -0.25), (0.2, -0.25), (0.2, -0.7), (1, 0), (0.2, 0.7), (0.2, 0.25),
                (-1, 0.25)], 255)],
    "hexagon": [(_regular_polygon(6, 1.0, 0.0), 255)],
    "crescent": [(("circle", 0, 0, 1), 255), (("circle", 0.45, 0, 0.82), 0)],
    # Held-out shapes: captions and novel objects only.
    "clover": [(("circle", 0, -0.48, 0.5), 255), (("circle", -0.46, 0.3, 0.5), 255),
               (("circle", 0.46, 0.3, 0.5), 255), (("circle", 0, 0, 0.3), 255)],
    "bowtie": [([(-1, -0.85), (0, -0.12), (1, -0.85), (1, 0.85), (0, 0.12), (-1, 0.85)], 255)],
    "bolt": [([(0.25, -1), (-0.65, 0.15), (-0.05, 0.15), (-0.3, 1), (0.65, -0.2),
               (0.05, -0.2)], 255)],
}
HELD_OUT_SHAPES: frozenset[str] = frozenset({"clover", "bowtie", "bolt"})
SEEN_COLOURS: tuple[str, ...] = tuple(c for c in COLOURS if c not in HELD_OUT_COLOURS)

# Non-category shapes used as clutter.
DISTRACTOR_SHAPES: list[list] = [
    _regular_polygon(4, 1.0, 0.3),
    _regular_polygon(5, 1.0),
    _regular_polygon(8, 1.0),
    [(-1, -0.2), (1, -0.2), (1, 0.2), (-1, 0.2)],
    [(-1, -1), (1, -0.6), (0.2, 1)],
]


def shape_mask(shape: str, width: int, height: int, angle_deg: float) -> np.ndarray:
    """Antialiased alpha mask of one shape.

    Args:
        shape: key of SHAPES.
        width, height: output size in pixels (>= 2).
        angle_deg: rotation, counter-clockwise, in degrees.

    Returns:
        float32 array (height, width) in [0, 1].
    """
    ss = 4  # supersampling factor for antialiasing
    side = max(width, height) * ss
    canvas = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(canvas)
    half = side / 2.0

    def to_px(points):
        return [(half + x * half * 0.98, half + y * half * 0.98) for x, y in points]

    for geom, fill in SHAPES[shape]:
        if geom[0] == "circle":
            _, cx, cy, r = geom
            draw.ellipse([half + (cx - r) * half * 0.98, half + (cy - r) * half * 0.98,
                          half + (cx + r) * half * 0.98, half + (cy + r) * half * 0.98], fill=fill)
        else:
            draw.polygon(to_px(geom), fill=fill)
    if angle_deg:
        canvas = canvas.rotate(angle_deg, resample=Image.BILINEAR)
    canvas = canvas.resize((width, height), resample=Image.BOX)
    return np.asarray(canvas, dtype=np.float32) / 255.0


def polygon_mask(points: list, width: int, height: int, angle_deg: float) -> np.ndarray:
    """Alpha mask (height, width) in [0, 1] of an arbitrary polygon on the [-1, 1]^2 canvas."""
    ss = 2
    side = max(width, height) * ss
    canvas = Image.new("L", (side, side), 0)
    half = side / 2.0
    ImageDraw.Draw(canvas).polygon([(half + x * half, half + y * half) for x, y in points], fill=255)
    canvas = canvas.rotate(angle_deg, resample=Image.BILINEAR).resize((width, height), Image.BOX)
    return np.asarray(canvas, dtype=np.float32) / 255.0


def object_texture(rgb: tuple[int, int, int], width: int, height: int, rng: np.random.Generator,
                   colour_jitter: float) -> np.ndarray:
    """Fill texture of an object: its colour, jittered per instance, with shading and grain.

    Returns:
        float32 array (height, width, 3) in [0, 255].
    """
    base = np.asarray(rgb, np.float32) + rng.normal(0.0, colour_jitter, 3)
    # Directional light: a linear brightness ramp across the object.
    theta = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    ramp = (np.cos(theta) * (xx / max(width - 1, 1) - 0.5) + np.sin(theta) * (yy / max(height - 1, 1) - 0.5))
    shade = 1.0 + rng.uniform(0.1, 0.35) * ramp
    tex = base[None, None, :] * shade[..., None] + rng.normal(0.0, 6.0, (height, width, 1))
    return np.clip(tex, 0, 255)
