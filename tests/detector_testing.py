"""Inputs for detector tests on 64 px random images (shared by the teacher and student tests),
and a tolerance match of two detection lists (shared by the service and ONNX tests)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from detectron2.structures import Boxes, Instances

# The categories of the random tiny detector exports (`write_tiny_export`).
EXPORT_CATEGORIES = [{"name": "red ring", "split": "novel"}, {"name": "blue disk", "split": "base"},
                     {"name": "green cross", "split": "novel"}]


def random_image(seed: int, size: int = 64) -> dict:
    """A Detectron2 input: random uint8 (3, size, size) image, original size = size."""
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.randint(0, 255, (3, size, size), generator=g, dtype=torch.uint8),
            "height": size, "width": size}


def training_batch(embed_dim: int, first_box: tuple[float, float, float, float]) -> list[dict]:
    """Two 64 px images, each with GT boxes (first_box: class 0, a fixed box: class 2) and two
    distillation regions (first_box with weight 1, a larger box with weight 0.4) whose CLIP
    embeddings are random (drawn from torch's global generator)."""
    batch = []
    for seed in range(2):
        d = random_image(seed)
        inst = Instances((64, 64))
        inst.gt_boxes = Boxes(torch.tensor([list(first_box), [30.0, 32, 60, 62]]))
        inst.gt_classes = torch.tensor([0, 2])
        dist = Instances((64, 64))
        dist.boxes = Boxes(torch.tensor([list(first_box), [10.0, 10, 50, 50]]))
        dist.embeddings = F.normalize(torch.randn(2, embed_dim), dim=1)
        dist.weights = torch.tensor([1.0, 0.4])
        d.update(instances=inst, distill=dist)
        batch.append(d)
    return batch


def same_detections(got: list[dict], want: list[dict], *, box_tol: float = 1e-3,
                    score_tol: float = 1e-4) -> bool:
    """One-to-one match of detections (same class, boxes and scores within tolerance).

    For images encoded in a batch of several: batched convolutions round differently from a
    batch of one (about 1e-5 here), which may reorder near-equal scores.
    """
    if len(got) != len(want):
        return False
    free = list(got)
    for w in want:
        match = next((g for g in free if g["class_index"] == w["class_index"]
                      and abs(g["score"] - w["score"]) <= score_tol
                      and max(abs(a - b) for a, b in zip(g["box"], w["box"], strict=True)) <= box_tol),
                     None)
        if match is None:
            return False
        free.remove(match)
    return True


def write_tiny_export(out, opts: list, *, temperature: float | None = None):
    """Export a random tiny detector (64-96 px inputs, EXPORT_CATEGORIES, ovd-vit-tiny-64's
    text tower, torch seed 0) to `out`, with extra Detectron2 KEY VALUE `opts`; `temperature`
    replaces the classifier's tau. Returns out."""
    import math

    from detectron2.modeling import build_model

    from ovd.models.clip.model import architecture_config, load_clip
    from ovd.models.exported import write_export
    from ovd.training.train_detector import build_config

    torch.manual_seed(0)
    arch = "ovd-vit-tiny-64"
    clip = load_clip(arch)
    cfg = build_config("configs/detector/synthetic_r18_fpn.yaml", [
        "MODEL.OVD.EMBED_DIM", clip.embed_dim, "MODEL.ROI_HEADS.NUM_CLASSES", len(EXPORT_CATEGORIES),
        "INPUT.MIN_SIZE_TEST", 64, "INPUT.MAX_SIZE_TEST", 96, *opts])
    model = build_model(cfg).eval()
    if temperature is not None:
        model.roi_heads.box_predictor.classifier.log_temperature.data.fill_(math.log(temperature))
    model.train_text = F.normalize(torch.randn(len(EXPORT_CATEGORIES), clip.embed_dim), dim=1)
    write_export(out, model=model, cfg=cfg, clip=clip, clip_arch=architecture_config(arch),
                 manifest_fields={"name": "ovd-test", "version": "0.0.1", "categories": EXPORT_CATEGORIES,
                                  "metrics": {}})
    return out
