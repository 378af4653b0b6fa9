"""Zero-shot CLIP accuracy in the two domains of the world: caption-style crops and detection
GT crops (EZSD's 1.2x crop), over base and novel categories and per novel tier.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ovd.models.clip.model import DEFAULT_TEMPLATE, ClipModel

from .data.detection_set import DetectionSet


@torch.inference_mode()
def _accuracy(clip: ClipModel, images: torch.Tensor, labels: torch.Tensor, text: torch.Tensor,
              tiers: list[str]) -> dict:
    """Top-1 accuracy of images (N, 3, S, S) against text (C, D) for labels (N,) in [0, C).

    Returns accuracies in [0, 1] (nan where a group is empty) for "base", "novel", "all" and
    each tier of `tiers` (one per class) other than base, plus the sample count "n".
    """
    emb = clip.encode_images(images)
    correct = ((emb @ text.T).argmax(1) == labels).float()
    tier_of = np.array(tiers)[labels.numpy()]
    groups = {"base": tier_of == "base", "novel": tier_of != "base", "all": np.ones(len(labels), bool)}
    groups.update({t: tier_of == t for t in dict.fromkeys(tiers) if t != "base"})
    out = {k: correct[torch.from_numpy(m)].mean().item() if m.any() else float("nan")
           for k, m in groups.items()}
    return {**out, "n": int(len(labels))}


def detection_gt_crops(clip: ClipModel, json_file: Path, image_root: Path, *, enlarge: float = 1.2,
                       max_images: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """EZSD crops of every GT box of a COCO file.

    Returns:
        crops: (N, 3, S, S) normalised; category_ids: (N,) COCO category ids.
    """
    data = DetectionSet.load(json_file, image_root, max_images=max_images)
    crops, labels = _gt_crops(clip, data, enlarge)
    return crops, torch.tensor([c["id"] for c in data.categories])[labels]


def _gt_crops(clip: ClipModel, data: DetectionSet, enlarge: float = 1.2) -> tuple[torch.Tensor, torch.Tensor]:
    """(crops (N, 3, S, S), labels (N,) contiguous category index) of every GT box of `data`."""
    crops, labels = [], []
    for image_id in data.image_ids:
        boxes, index = data.annotations(image_id, crowd=True)
        if len(boxes):
            crops.append(clip.crop_boxes(data.read(image_id), boxes, enlarge=enlarge))
            labels.append(index)
    if not crops:
        raise ValueError(f"{data.json_file} has no annotation to crop")
    return torch.cat(crops), torch.cat(labels)


def zero_shot_report(clip: ClipModel, world_dir: str | Path, *, template: str = DEFAULT_TEMPLATE,
                     max_caption_images: int | None = None, max_detection_images: int | None = None
                     ) -> dict:
    """Accuracy table of a CLIP on a synthetic world.

    Returns:
        {"caption_crops": {...}, "detection_gt_crops": {...}, "chance": float}, each row with
        accuracies in [0, 1] over base, novel and all categories and per novel tier (a
        category without a tier counts as its split), and its sample count n.
    """
    world_dir = Path(world_dir)
    world = json.loads((world_dir / "world.json").read_text())
    cats = world["categories"]
    index = {c["id"]: i for i, c in enumerate(cats)}
    tiers = [c.get("tier", c["split"]) for c in cats]
    text = clip.text_embeddings([c["name"] for c in cats], template)

    cap_images = np.load(world_dir / "captions" / "eval.npy", mmap_mode="r")[:max_caption_images]
    rows = [json.loads(line) for line in (world_dir / "captions" / "eval.jsonl").read_text().splitlines()]
    cap_labels = torch.tensor([index[r["category_ids"][0]] for r in rows[:len(cap_images)]])
    caption = _accuracy(clip, clip.normalise(torch.from_numpy(np.array(cap_images))),
                        cap_labels, text, tiers)

    det = world_dir / "detection"
    crops, cat_ids = detection_gt_crops(clip, det / "annotations" / "val.json", det / "val",
                                        max_images=max_detection_images)
    detection = _accuracy(clip, crops, torch.tensor([index[int(c)] for c in cat_ids]), text, tiers)
    return {"caption_crops": caption, "detection_gt_crops": detection, "chance": 1.0 / len(cats),
            "template": template}


def crop_report(clip: ClipModel, json_file: str | Path, image_root: str | Path, *,
                template: str = DEFAULT_TEMPLATE, max_images: int | None = None) -> dict:
    """Accuracy of a CLIP on the GT crops (1.2x) of any COCO json, over all its category names
    (base, novel, all and per novel tier where the categories carry one).

    Returns:
        {"detection_gt_crops": {...}, "chance": float, "template": str}, as `zero_shot_report`
        without the caption row.
    """
    data = DetectionSet.load(json_file, image_root, max_images=max_images)
    crops, labels = _gt_crops(clip, data)
    detection = _accuracy(clip, crops, labels, clip.text_embeddings(data.names, template), data.tiers)
    return {"detection_gt_crops": detection, "chance": 1.0 / len(data.categories), "template": template}


def format_report(report: dict, title: str = "CLIP zero-shot accuracy") -> str:
    rows = [(k, label) for k, label in (("caption_crops", "caption-style crops"),
                                        ("detection_gt_crops", "detection GT crops")) if k in report]
    columns = [k for k in report[rows[0][0]] if k != "n"]
    width = max(map(len, columns)) + 2
    lines = [title, f"{'domain':<22}" + "".join(f"{c:>{width}}" for c in columns) + f"{'n':>8}"]
    for key, label in rows:
        r = report[key]
        lines.append(f"{label:<22}" + "".join(f"{r.get(c, float('nan')):>{width}.1%}" for c in columns)
                     + f"{r['n']:>8d}")
    lines.append(f"{'chance':<22}{report['chance']:>{width}.1%}")
    return "\n".join(lines)
