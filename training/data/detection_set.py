"""A COCO detection dataset, parsed once: the one reader of a detection json for every stage
and gate (re-normalisation crops, proposals and targets, CLIP crop accuracy, the gates).

Pixels come from `coco_format.read_dataset_image` (Detectron2's reader, EXIF orientation
applied, checked against the json's size), so every stage crops the pixels the detector trains
on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from .coco_format import SPLIT_KEY, load_coco_json, read_dataset_image


@dataclass
class DetectionSet:
    """The images and boxes of one COCO json.

    Attributes:
        json_file, image_root: where they come from (images default to the json's folder).
        categories: the json's category entries, sorted by id (Detectron2's contiguous order).
        images: image entries (id, file_name, height, width), sorted by id.
        boxes: image id -> (G, 4) float32 xyxy boxes, pixels (every annotation of the image).
        labels: image id -> (G,) int64 index into `categories`.
        crowd: image id -> (G,) bool iscrowd flags.
    """

    json_file: Path
    image_root: Path
    categories: list[dict]
    images: list[dict]
    boxes: dict[int, torch.Tensor]
    labels: dict[int, torch.Tensor]
    crowd: dict[int, torch.Tensor]
    _by_id: dict[int, dict] = field(default_factory=dict, repr=False)

    @classmethod
    def load(cls, json_file: str | Path, image_root: str | Path | None = None, *,
             max_images: int | None = None) -> DetectionSet:
        """Read and validate a COCO json (`coco_format.load_coco_json`); only its first
        ``max_images`` images by id when given.

        Raises:
            DatasetFormatError: invalid json. FileNotFoundError: no such json or image folder.
        """
        json_file = Path(json_file)
        image_root = Path(image_root) if image_root else json_file.parent
        coco = load_coco_json(json_file)
        if not image_root.is_dir():
            raise FileNotFoundError(f"image root {image_root} (of {json_file}) is not a folder")
        categories = sorted(coco["categories"], key=lambda c: c["id"])
        index = {c["id"]: i for i, c in enumerate(categories)}
        images = sorted(coco["images"], key=lambda im: im["id"])
        if max_images is not None:
            images = images[:max(0, int(max_images))]
        rows: dict[int, list] = {int(im["id"]): [] for im in images}
        for a in coco["annotations"]:
            if a["image_id"] in rows:
                x, y, w, h = a["bbox"]
                rows[a["image_id"]].append((x, y, x + w, y + h, index[a["category_id"]], bool(a.get("iscrowd", 0))))
        return cls(
            json_file=json_file, image_root=image_root, categories=categories, images=images,
            boxes={i: torch.tensor([r[:4] for r in v], dtype=torch.float32).reshape(-1, 4) for i, v in rows.items()},
            labels={i: torch.tensor([r[4] for r in v], dtype=torch.int64) for i, v in rows.items()},
            crowd={i: torch.tensor([r[5] for r in v], dtype=torch.bool) for i, v in rows.items()})

    @property
    def names(self) -> list[str]:
        """Category names in contiguous (id) order."""
        return [c["name"] for c in self.categories]

    @property
    def is_novel(self) -> torch.Tensor:
        """(C,) bool: the category is marked ``"split": "novel"`` (no ``split`` counts as base)."""
        return torch.tensor([c.get(SPLIT_KEY, "base") == "novel" for c in self.categories], dtype=torch.bool)

    @property
    def tiers(self) -> list[str]:
        """Per category its ``tier`` tag where the json has one (the synthetic world's
        novel_comp / novel_shape / novel_both), else its split."""
        return [c.get("tier", c.get(SPLIT_KEY, "base")) for c in self.categories]

    @property
    def image_ids(self) -> list[int]:
        return [int(im["id"]) for im in self.images]

    def image(self, image_id: int) -> dict:
        """The json's entry of one image."""
        if not self._by_id:
            self._by_id = {int(im["id"]): im for im in self.images}
        return self._by_id[image_id]

    def read(self, image_id: int) -> torch.Tensor:
        """The stored image as (3, H, W) uint8 RGB (see `read_dataset_image`)."""
        return read_dataset_image(self.image_root, self.image(image_id), json_file=self.json_file)

    def annotations(self, image_id: int, categories: torch.Tensor | None = None, *,
                    crowd: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(boxes (G, 4) xyxy, labels (G,)) of one image, restricted to the categories whose
        entry in the (C,) bool mask ``categories`` is True, crowd boxes left out unless
        ``crowd``."""
        keep = torch.ones_like(self.labels[image_id], dtype=torch.bool) if crowd else ~self.crowd[image_id]
        if categories is not None:
            keep &= categories[self.labels[image_id]]
        return self.boxes[image_id][keep], self.labels[image_id][keep]
