"""Rasterising the synthetic world's objects: category table, shape masks and object patches.

Every category is a plain-words name made of a colour and a shape ("red ring"). Novel
categories reuse a colour of one base category and the shape of another, so a detector
trained on base boxes alone cannot tell them apart without the language prior that CLIP adds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (214, 40, 40),
    "blue": (40, 82, 214),
    "green": (46, 160, 60),
    "yellow": (232, 206, 40),
    "purple": (136, 58, 186),
    "orange": (240, 136, 30),
    "cyan": (40, 196, 206),
    "pink": (238, 128, 178),
    "white": (236, 236, 236),
    "brown": (128, 78, 40),
    "gray": (128, 128, 128),
}


@dataclass(frozen=True)
class Category:
    """One synthetic object category.

    Attributes:
        id: COCO category id (1-based).
        colour: key of COLOURS.
        shape: key of SHAPES.
        split: "base" (boxes available in training) or "novel" (never annotated in training).
    """

    id: int
    colour: str
    shape: str
    split: str

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


CATEGORIES: tuple[Category, ...] = tuple(
    Category(i + 1, colour, shape, split)
    for i, (colour, shape, split) in enumerate(
        [
            ("red", "disk", "base"),
            ("blue", "square", "base"),
            ("green", "triangle", "base"),
            ("yellow", "star", "base"),
            ("purple", "ring", "base"),
            ("orange", "cross", "base"),
            ("cyan", "diamond", "base"),
            ("pink", "heart", "base"),
            ("white", "arrow", "base"),
            ("brown", "hexagon", "base"),
            ("gray", "crescent", "base"),
            # Novel: colour of one base class, shape of another.
            ("red", "ring", "novel"),
            ("blue", "star", "novel"),
            ("green", "cross", "novel"),
            ("orange", "heart", "novel"),
            ("white", "hexagon", "novel"),
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


# Each shape: list of (polygon-or-"ellipse", fill) drawn in order on a [-1, 1]^2 canvas;
# fill 0 cuts a hole (ring, crescent).
SHAPES: dict[str, list[tuple[object, int]]] = {
    "disk": [("ellipse", 255)],
    "ring": [("ellipse", 255), (("ellipse", 0.55), 0)],
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
    "crescent": [("ellipse", 255), (("shifted", 0.45), 0)],
}

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
        if geom == "ellipse":
            draw.ellipse([half * 0.02, half * 0.02, side - half * 0.02, side - half * 0.02], fill=fill)
        elif isinstance(geom, tuple) and geom[0] == "ellipse":
            r = geom[1] * half
            draw.ellipse([half - r, half - r, half + r, half + r], fill=fill)
        elif isinstance(geom, tuple) and geom[0] == "shifted":
            r = 0.8 * half
            c = half + geom[1] * half
            draw.ellipse([c - r, half - r * 1.05, c + r, half + r * 1.05], fill=fill)
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
