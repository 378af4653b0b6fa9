"""The Python API: load a detector export, ask it for classes in plain words.

    import ovd

    det = ovd.Detector.load("default")               # or an `ovd export` folder
    found = det("photo.jpg", ["red ring", "blue star"], threshold=0.3)
    found.to_json(); found.to_coco(image_id=1); found.draw(PIL.Image.open("photo.jpg"))

    # query by example: "things like the object in this box" (models/examples.py)
    found = det("photo.jpg", examples=[ovd.Example([40, 60, 90, 110], "part")])

Images may be paths, PIL images or (H, W, 3) uint8 RGB arrays, or a list of them (then a
list of `Detections` comes back). Files and PIL images are turned upright by their EXIF
orientation, as the service does, so boxes match the image a viewer shows.
"""

from __future__ import annotations

import os
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from .detections import Detections
from .examples import (
    as_numpy,
    category_text_mean,
    example_inputs,
    example_rows,
    prototypes,
    weak_example_warnings,
)
from .model_card import model_card, warnings_for
from .registry import REGISTERED, registered_or_path
from .runtime import DEFAULT_SCORE_MODE, ClassifyOptions, Runtime, batches, load_runtime
from .tiling import DEFAULT_TILES, merge_tiles, plan_tiles

ImageLike = str | os.PathLike | Image.Image | np.ndarray

class UnknownWordWarning(UserWarning):
    """A class name has words the model's text encoder never read."""


class WeakExampleWarning(UserWarning):
    """An example box that no region of the detector matches well (IoU < 0.5)."""


@dataclass(frozen=True)
class Example:
    """An example box: look for objects like the one inside `box`.

    Attributes:
        box: [x1, y1, x2, y2] pixels of `image` (its upright orientation).
        label: the name its detections get; examples sharing a label are averaged.
        image: a path, PIL image or array; None: the image being searched (one image only).
    """

    box: Sequence[float]
    label: str = "example"
    image: ImageLike | None = None


@dataclass(frozen=True)
class ExampleQueries:
    """Example boxes embedded once (`Detector.embed_examples`), to search many images with.

    Attributes:
        labels: the distinct labels, one class each.
        rows: (L, D) float32 normalised query rows, one per label.
    """

    labels: tuple[str, ...]
    rows: np.ndarray


def resolve_model(name_or_path: str | os.PathLike) -> Path:
    """An export folder from a registered name or a path, with a message naming the fix."""
    path = registered_or_path(name_or_path)
    if str(name_or_path) in REGISTERED:
        if not (path / "manifest.json").is_file():
            raise FileNotFoundError(f"model {str(name_or_path)!r} ships with the repository checkout "
                                    f"({path}) and is not here; pass the folder of an `ovd export`")
    elif not path.is_dir():
        raise FileNotFoundError(f"no detector export at {path} (expected a folder written by "
                                f"`ovd export`, or one of the names {sorted(REGISTERED)})")
    return path


def read_image(image: ImageLike) -> np.ndarray:
    """(H, W, 3) uint8 RGB of a path, PIL image or array (grey and RGBA are converted).

    Raises:
        FileNotFoundError / ValueError: a missing file, a file that is no image, or an array
            that is not uint8 with 2 dims or 3 dims and 1, 3 or 4 channels.
    """
    if isinstance(image, str | os.PathLike):
        path = Path(image)
        if not path.is_file():
            raise FileNotFoundError(f"no image file at {path}")
        try:
            with Image.open(path) as im:
                return np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
        except (OSError, SyntaxError) as e:  # PIL's UnidentifiedImageError is an OSError
            raise ValueError(f"{path} is not an image PIL can read: {e}") from e
    if isinstance(image, Image.Image):
        return np.asarray(ImageOps.exif_transpose(image).convert("RGB"))
    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise ValueError(f"an image array must be uint8 RGB (H, W, 3), not {array.dtype}; "
                         "scale floats in [0, 1] with (a * 255).round().astype(np.uint8)")
    if array.ndim == 2 or (array.ndim == 3 and array.shape[2] == 1):
        return np.repeat(array.reshape(*array.shape[:2], 1), 3, axis=2)
    if array.ndim == 3 and array.shape[2] in (3, 4):
        return np.ascontiguousarray(array[:, :, :3])
    raise ValueError(f"an image array must be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4); got {array.shape}")


class Detector:
    """An open-vocabulary detector: `detector(images, classes)` -> `Detections`.

    Args:
        runtime: a `ovd.models.runtime.Runtime` (use `Detector.load`).
        text_cache: vocabularies whose text embeddings are kept (a new name costs one CLIP
            text encoding, ~0.2 ms on a CPU core, once).
    """

    def __init__(self, runtime: Runtime, *, text_cache: int = 32):
        self.runtime = runtime
        self._text: OrderedDict[tuple, object] = OrderedDict()  # torch tensors or numpy arrays
        self._text_cache = text_cache
        self._text_mean: np.ndarray | None = None

    @classmethod
    def load(cls, model: str | os.PathLike = "default", *, backend: str = "torch", device: str = "cpu",
             threads: int = 0) -> Detector:
        """Load an export folder, or a registered name ("default": the shipped model).

        Args:
            backend: "torch" or "onnx" (onnxruntime; needs `ovd export --onnx` graphs).
            device: torch device; threads: onnxruntime intra-op threads (0: its default).
        """
        return cls(load_runtime(resolve_model(model), backend=backend, device=device, threads=threads))

    @property
    def manifest(self) -> dict:
        """The export's manifest: name, version, categories it was evaluated on, metrics."""
        return self.runtime.manifest

    @property
    def card(self) -> dict:
        """What the model knows (models/model_card.py): training data, evaluated categories and
        metrics, and the words its text encoder can read."""
        return model_card(self.manifest)

    def warnings(self, classes: Sequence[str]) -> list[dict]:
        """[{"name", "unknown_words", "message"}] for class names with words the model's text
        encoder never read (their detections are not meaningful)."""
        return warnings_for(self.manifest, [str(c).strip() for c in classes])

    def text_embeddings(self, classes: Sequence[str], template: str | None = None):
        key = (tuple(classes), template)
        if key not in self._text:
            self._text[key] = self.runtime.text_embeddings(list(classes), template)
            while len(self._text) > self._text_cache:
                self._text.popitem(last=False)
        self._text.move_to_end(key)
        return self._text[key]

    @property
    def text_mean(self) -> np.ndarray:
        """(D,) normalised mean text embedding of the model's categories: where text rows sit
        (the target of an example row's modality-gap shift, models/examples.py)."""
        if self._text_mean is None:
            self._text_mean = category_text_mean(self.runtime)
        return self._text_mean

    def embed_examples(self, examples: Sequence[Example], default_image: np.ndarray | None = None
                       ) -> ExampleQueries:
        """The query rows of example boxes, one per distinct label (models/examples.py).

        Args:
            examples: the boxes; an Example without an image uses `default_image`.
            default_image: (H, W, 3) uint8 RGB of the image being searched, or None.
        """
        rows: list = [None] * len(examples)
        by_image: dict[int, list[int]] = {}
        images: dict[int, np.ndarray] = {}
        for k, ex in enumerate(examples):
            if ex.image is None and default_image is None:
                raise ValueError("an Example without an image needs exactly one image to search: give "
                                 "Example(box, label, image=...) when searching several images")
            key = id(ex.image) if ex.image is not None else -1
            if key not in images:
                images[key] = read_image(ex.image) if ex.image is not None else default_image
            by_image.setdefault(key, []).append(k)
        for key, members in by_image.items():
            parts = example_inputs(images[key], [examples[k].box for k in members], self.runtime.preprocessing)
            # Windows cut at an image's edge differ in size: encode them by batch key, as detection does.
            for chunk in batches(self.runtime.preprocessing, [x for x, _, _ in parts]):
                regions = self.runtime.encode([parts[i][0] for i in chunk])
                for (x, which, boxes), region in zip((parts[i] for i in chunk), regions, strict=True):
                    for k, r in zip(which, example_rows(region, x, boxes, self.text_mean), strict=True):
                        rows[members[k]] = r
        labels = [str(ex.label).strip() for ex in examples]
        for w in weak_example_warnings(labels, rows):
            warnings.warn(w["message"], WeakExampleWarning, stacklevel=3)
        distinct, matrix = prototypes(labels, rows)
        return ExampleQueries(tuple(distinct), matrix)

    def __call__(self, images: ImageLike | Sequence[ImageLike], classes: Sequence[str] = (), *,
                 examples: Sequence[Example] | ExampleQueries = (), threshold: float = 0.3, max_detections: int = 100, score_mode: str = DEFAULT_SCORE_MODE,
                 nms_threshold: float | None = None, class_agnostic: bool = False,
                 tiles: str = DEFAULT_TILES, tile_overlap: float = 0.2, max_tiles: int = 64,
                 max_candidates: int | None = 100_000, template: str | None = None,
                 batch_size: int = 4) -> Detections | list[Detections]:
        """Detect `classes` in one image or a list of images.

        Args:
            images: a path, PIL image or (H, W, 3) uint8 RGB array, or a list of them.
            classes: class names in plain words, e.g. ["red ring", "forklift"].
            examples: example boxes (`Example`), searched for beside or instead of names; each
                distinct label becomes one more class after the names. To search many images
                for the same examples, embed them once with `embed_examples` and pass that.
            threshold: the lowest score kept, in [0, 1].
            max_detections: the most detections kept per image.
            score_mode: "per_name" (each name against background alone: the same box scores
                the same whatever else is asked for; the default) or "softmax" (over the names
                given and background, the paper's: a name's score falls when similar names
                are added).
            nms_threshold: IoU above which the lower-scoring of two overlapping boxes is
                dropped (default: the model's, 0.5 for the shipped one).
            class_agnostic: NMS across names, so one object gets one label.
            tiles: sliced inference for large images (models/tiling.py): "auto" (when the
                model's resize would shrink the image more than 2x), "on" or "off".
            tile_overlap: fraction of a tile shared with its neighbour.
            max_tiles: at most this many tiles per image (larger images get larger tiles).
            max_candidates: at most this many (box, name) pairs, the best, go to NMS per image
                or tile (bounds the time of a call with thousands of names and a low threshold;
                per-name scores do not sum to one, so a threshold alone bounds nothing; None:
                no bound).
            template: CLIP prompt template with one "{}" (default: the export's).
            batch_size: images encoded together (images of one padded size only).

        Returns:
            `Detections` for a single image, a list of them (input order) for a list.
        """
        classes = [str(c).strip() for c in classes]
        if not classes and not examples:
            raise ValueError("give at least one class name or example box")
        labels = examples.labels if isinstance(examples, ExampleQueries) else [str(e.label).strip() for e in examples]
        if any(not c for c in classes) or any(not label for label in labels):
            raise ValueError("class names and example labels must not be empty")
        if len(set(classes)) != len(classes):
            raise ValueError(f"class names repeat: {classes}")
        clash = sorted(set(classes) & set(labels))
        if clash:
            raise ValueError(f"example labels {clash} are also class names: give the examples labels of their own")
        for w in self.warnings(classes):
            warnings.warn(w["message"], UnknownWordWarning, stacklevel=2)
        options = ClassifyOptions(score_threshold=threshold, max_detections=max_detections,
                                  score_mode=score_mode, nms_threshold=nms_threshold,
                                  class_agnostic=class_agnostic, max_candidates=max_candidates)
        single = not isinstance(images, list | tuple)
        batch = [images] if single else list(images)
        prep = self.runtime.preprocessing
        rgbs = [read_image(x) for x in batch]
        text = self.text_embeddings(classes, template) if classes else None
        if examples:
            queries = examples if isinstance(examples, ExampleQueries) else \
                self.embed_examples(examples, rgbs[0] if len(rgbs) == 1 else None)
            text = queries.rows if text is None else np.concatenate([as_numpy(text), queries.rows])
            classes = classes + list(queries.labels)
        plans = [plan_tiles(*rgb.shape[:2], prep, tiles, overlap=tile_overlap, max_tiles=max_tiles)
                 for rgb in rgbs]
        inputs = [prep(rgb[y0:y1, x0:x1]) for rgb, plan in zip(rgbs, plans, strict=True)
                  for x0, y0, x1, y1 in plan.windows]
        found: list[Detections | None] = [None] * len(inputs)
        for chunk in batches(prep, inputs, batch_size):
            regions = self.runtime.encode([inputs[i] for i in chunk])
            for i, d in zip(chunk, self.runtime.classify(regions, text, [inputs[i] for i in chunk], classes,
                                                         options), strict=True):
                found[i] = d
        out, start = [], 0
        for plan in plans:
            out.append(merge_tiles(found[start:start + len(plan.windows)], plan, options,
                                   max_detections=self.runtime.max_detections if max_detections is None
                                   else max_detections))
            start += len(plan.windows)
        return out[0] if single else out
