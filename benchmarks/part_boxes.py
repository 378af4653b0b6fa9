"""Where do nested part boxes come from? (`python benchmarks/part_boxes.py`)

A "part box" is a confident detection (score >= 0.3, the API's default threshold) that matches
no ground-truth box of its class (IoU < 0.5) but lies inside one (at least 80% of its area in
a box of the same class): an arc of a ring called "red ring". Counted per class group on val
scenes of world v2, for models of the EZSD ablation (`--models`), per-class NMS at the model's
IoU and class-agnostic NMS. If part boxes were an NMS artefact they would appear for base and
novel classes alike; the detector's classifier is trained on base boxes, where a part (IoU <
0.5 with its box) is background, while novel classes are learned only through CLIP, whose
embedding of a part crop resembles the whole object's.

Results: benchmarks/results/part_boxes.{json,md}.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from host_info import run_stamp, stamp_lines
from PIL import Image
from score_modes import load_model

from ovd.models.runtime import ClassifyOptions, Preprocessing

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
THRESHOLD = 0.3


def _iou_and_inside(det: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(D, G) IoU and share of each detection's area inside each GT box (XYXY)."""
    lt = np.maximum(det[:, None, :2], gt[None, :, :2])
    rb = np.minimum(det[:, None, 2:], gt[None, :, 2:])
    inter = np.prod((rb - lt).clip(0), axis=2)
    area_d = np.prod((det[:, 2:] - det[:, :2]).clip(0), axis=1)[:, None]
    area_g = np.prod((gt[:, 2:] - gt[:, :2]).clip(0), axis=1)[None, :]
    return inter / np.maximum(area_d + area_g - inter, 1e-9), inter / np.maximum(area_d, 1e-9)


def measure(folder: Path, coco: dict, image_root: Path, n_images: int) -> dict:
    model, clip, cfg = load_model(folder)
    predictor = model.roi_heads.box_predictor
    prep = Preprocessing(cfg.INPUT.FORMAT, cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)
    cats = coco["categories"]
    split = [c["split"] for c in cats]
    with torch.inference_mode():
        text = clip.text_embeddings([c["name"] for c in cats], cfg.MODEL.OVD.PROMPT_TEMPLATE)
    index = {c["id"]: k for k, c in enumerate(cats)}
    gts: dict[int, list] = {}
    for a in coco["annotations"]:
        x, y, w, h = a["bbox"]
        gts.setdefault(a["image_id"], []).append((x, y, x + w, y + h, index[a["category_id"]]))
    settings = {"per_class": ClassifyOptions(score_threshold=THRESHOLD),
                "class_agnostic": ClassifyOptions(score_threshold=THRESHOLD, class_agnostic=True)}
    counts = {s: {g: {"detections": 0, "true": 0, "part": 0, "other_false": 0} for g in ("base", "novel")}
              for s in settings}
    for info in coco["images"][:n_images]:
        x = prep(np.asarray(Image.open(image_root / info["file_name"]).convert("RGB")))
        inputs = [{**x, "image": torch.as_tensor(x["image"])}]
        gt = np.asarray(gts.get(info["id"], []), np.float64).reshape(-1, 5)
        with torch.inference_mode():
            regions = model.encode(inputs)
            for name, options in settings.items():
                found = model.to_original_size(predictor.classify(regions, text, **options.model_kwargs()),
                                               inputs)[0]["instances"]
                boxes = found.pred_boxes.tensor.numpy().astype(np.float64)
                labels = found.pred_classes.numpy()
                iou, inside = _iou_and_inside(boxes, gt[:, :4]) if len(gt) else (
                    np.zeros((len(boxes), 0)), np.zeros((len(boxes), 0)))
                for d, c in enumerate(labels):
                    same = gt[:, 4] == c
                    group = counts[name][split[c]]
                    group["detections"] += 1
                    if (iou[d][same] >= 0.5).any():
                        group["true"] += 1
                    elif (inside[d][same] >= 0.8).any():
                        group["part"] += 1
                    else:
                        group["other_false"] += 1
    for per in counts.values():
        for g in per.values():
            false = g["part"] + g["other_false"]
            g["part_share_of_false"] = round(g["part"] / false, 3) if false else None
    return {"model": f"{folder.parent.name}/{folder.name}", "images": n_images, "counts": counts}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["runs/bench/ezsd/models_100x200/gt_raw_lambda0.03/seed0",
                                                   "runs/bench/ezsd/models_100x200/gt_raw_lambda0.03/seed1"])
    p.add_argument("--world", default="runs/synthetic/world")
    p.add_argument("--images", type=int, default=100, help="first N val images")
    args = p.parse_args(argv)
    world = Path(args.world) / "detection"
    coco = json.loads((world / "annotations" / "val.json").read_text())
    per_model = [measure(Path(m), coco, world / "val", args.images) for m in args.models]
    report = {**run_stamp("part_boxes.py", argv), "split": "val", "threshold": THRESHOLD, "models": per_model}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "part_boxes.json").write_text(json.dumps(report, indent=1) + "\n")
    lines = [f"# Part boxes (val, {args.images} images, score >= {THRESHOLD})", "", *stamp_lines(report),
             "| model | NMS | group | detections | true (IoU >= 0.5) | part boxes | other false | part share of false |",
             "|---|---|---|---|---|---|---|---|"]
    for m in per_model:
        for nms, per in m["counts"].items():
            for g, c in per.items():
                lines.append(f"| {m['model']} | {nms} | {g} | {c['detections']} | {c['true']} | {c['part']} | "
                             f"{c['other_false']} | {c['part_share_of_false']} |")
    (RESULTS / "part_boxes.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
