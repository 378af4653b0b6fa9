"""Score modes and NMS options on val (`python benchmarks/score_modes.py`): which default?

Two questions, answered on the val split of world v2 with the models the EZSD ablation trained
(benchmarks/ezsd_variants.py, `--models`: every `<row>/seed<k>` folder found, each one a
paired unit; a choice, so val only):

1. **Generalized AP per option set.** Each val image is encoded once per model and classified
   under every option set (score mode x per-class / class-agnostic NMS), over all val
   categories, and again with 100 unrelated names added (LVIS category names, seeded draw):
   what a user sending a long list of words gets. AP as `ovd eval` computes it (top 300 per
   image, no score floor, pycocotools). Contrasts are paired over models.
2. **How much one name's score moves when other names are added.** For every region whose
   score for a val novel name alone is >= 0.3, the same region's score for that name once 1,
   10 or 100 other names (LVIS, seeded) are sent with it; mean absolute change per mode.

Results: benchmarks/results/score_modes.{json,md}, with the machine and the command.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from ablation_models import ablation_models, measure_each
from host_info import run_stamp, stamp_lines
from PIL import Image

from ovd.models.runtime import ClassifyOptions, Preprocessing
from ovd.training.evaluate import EVAL_MAX_DETECTIONS, group_ap, tier_groups
from ovd.training.protocol import flat_metrics, mean_ci, verdict

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

#: The option sets compared (every one at the generalized evaluation's 300 per image, no floor).
OPTION_SETS = {
    "softmax": ClassifyOptions(score_mode="softmax"),
    "per_name": ClassifyOptions(score_mode="per_name"),
    "softmax_agnostic": ClassifyOptions(score_mode="softmax", class_agnostic=True),
    "per_name_agnostic": ClassifyOptions(score_mode="per_name", class_agnostic=True),
}
DISTRACTORS = 100
MOVE_SIZES = (1, 10, 100)
MOVE_FLOOR = 0.3
#: Pairs kept before NMS (`ClassifyOptions.max_candidates`): with no score floor, 120 names x
#: 1000 proposals would give NMS 120,000 boxes per image; the best 5,000 leave the top 300
#: after NMS all but unchanged, for every option set alike.
MAX_CANDIDATES = 5000
HEADLINE = ("ap50_novel", "ap50_base", "ap50_all", "ap_all")


def lvis_names(exclude: set[str], seed: int = 0) -> list[str]:
    """LVIS v1 category names (Detectron2's list) in a seeded order, minus `exclude`."""
    from detectron2.data.datasets.lvis_v1_categories import LVIS_CATEGORIES

    names = [c["name"].replace("_", " ") for c in LVIS_CATEGORIES]
    names = [n for n in dict.fromkeys(names) if n not in exclude]
    random.Random(seed).shuffle(names)
    return names


def load_model(folder: Path):
    """(eval-mode model, text CLIP, config) of a trained ablation cell."""
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    from ovd.models.clip.model import load_clip
    from ovd.training.layout import final_weights
    from ovd.training.train_detector import build_config

    cfg = build_config(folder / "config.yaml")
    model = build_model(cfg)
    DetectionCheckpointer(model).load(str(final_weights(folder)))
    return model.eval(), load_clip(cfg.MODEL.OVD.CLIP), cfg


def region_scores(predictor, regions, text: torch.Tensor, mode: str) -> torch.Tensor:
    """(R, C) scores of every region for every row of text, under a score mode."""
    logits = predictor.classifier(regions.embeddings, text)
    if mode == "per_name":
        return torch.sigmoid(logits[:, :-1] - logits[:, -1:])
    return torch.softmax(logits, dim=-1)[:, :-1]


def measure_model(folder: Path, coco: dict, image_root: Path, gt_json: Path, n_images: int) -> dict:
    model, clip, cfg = load_model(folder)
    predictor = model.roi_heads.box_predictor
    prep = Preprocessing(cfg.INPUT.FORMAT, cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)
    cats = coco["categories"]
    names = [c["name"] for c in cats]
    novel = [k for k, c in enumerate(cats) if c.get("split", "base") == "novel" or c.get("tier", "base") != "base"]
    pool = lvis_names(set(names))
    template = cfg.MODEL.OVD.PROMPT_TEMPLATE
    with torch.inference_mode():
        text = clip.text_embeddings(names, template)
        extra = clip.text_embeddings(pool[:DISTRACTORS], template)
    vocabularies = {"val": text, "val+100": torch.cat([text, extra])}
    results: dict[str, list] = {f"{v}/{o}": [] for v in vocabularies for o in OPTION_SETS}
    moves: dict[str, dict[int, list]] = {m: {k: [] for k in MOVE_SIZES} for m in ("softmax", "per_name")}
    rng = random.Random(1)
    t0 = time.perf_counter()
    for info in coco["images"][:n_images]:
        rgb = np.asarray(Image.open(image_root / info["file_name"]).convert("RGB"))
        x = prep(rgb)
        inputs = [{**x, "image": torch.as_tensor(x["image"])}]
        with torch.inference_mode():
            regions = model.encode(inputs)
            for vname, vtext in vocabularies.items():
                for oname, options in OPTION_SETS.items():
                    kw = {**options.model_kwargs(), "score_thresh": 0.0, "max_detections": EVAL_MAX_DETECTIONS,
                          "max_candidates": MAX_CANDIDATES}
                    found = model.to_original_size(predictor.classify(regions, vtext, **kw), inputs)[0]["instances"]
                    for box, score, c in zip(found.pred_boxes.tensor.tolist(), found.scores.tolist(),
                                             found.pred_classes.tolist(), strict=True):
                        if c < len(cats):  # a distractor's detection is a false positive of no class
                            x1, y1, x2, y2 = box
                            results[f"{vname}/{oname}"].append(
                                {"image_id": info["id"], "category_id": cats[c]["id"],
                                 "bbox": [x1, y1, x2 - x1, y2 - y1], "score": score})
            for mode in moves:
                for k in novel:
                    alone = region_scores(predictor, regions[0], text[k:k + 1], mode)[:, 0]
                    keep = alone >= MOVE_FLOOR
                    if not keep.any():
                        continue
                    for size in MOVE_SIZES:
                        others = torch.cat([text[k:k + 1], extra[rng.sample(range(len(extra)), size)]])
                        among = region_scores(predictor, regions[0], others, mode)[:, 0]
                        moves[mode][size].extend((among[keep] - alone[keep]).abs().tolist())
    seconds = time.perf_counter() - t0
    groups = {"all": [c["id"] for c in cats], "base": [c["id"] for c in cats if c["id"] not in
                                                      {cats[k]["id"] for k in novel}],
              "novel": [cats[k]["id"] for k in novel], **tier_groups(gt_json)}
    image_ids = {i["id"] for i in coco["images"][:n_images]}
    subset = {**coco, "images": [i for i in coco["images"] if i["id"] in image_ids],
              "annotations": [a for a in coco["annotations"] if a["image_id"] in image_ids]}
    sub_json = RESULTS / ".score_modes_gt.json"
    sub_json.write_text(json.dumps(subset))
    try:
        ap = {key: flat_metrics(group_ap(sub_json, dets, groups)) for key, dets in results.items()}
    finally:
        sub_json.unlink()
    return {"model": f"{folder.parent.name}/{folder.name}", "images": n_images, "seconds": round(seconds, 1), "ap": ap,
            "score_move": {m: {str(k): {"mean_abs": float(np.mean(v)) if v else float("nan"), "regions": len(v)}
                               for k, v in per.items()} for m, per in moves.items()}}


def summarise(per_model: list[dict]) -> dict:
    """Per option set: mean and CI over models; contrasts against softmax (same vocabulary)."""
    def row(key: str, metric: str) -> list[float]:
        mean, (lo, hi) = mean_ci(p["ap"][key][metric] for p in per_model)
        return [round(mean, 2), round(lo, 2), round(hi, 2)]

    def contrast(a: str, b: str, metrics: tuple[str, ...]) -> dict:
        out = {}
        for m in metrics:
            diff, ci = mean_ci(p["ap"][b][m] - p["ap"][a][m] for p in per_model)
            out[m] = {"diff_mean": round(diff, 2), "diff_ci95": [round(ci[0], 2), round(ci[1], 2)],
                      "verdict": verdict(diff, ci)}
        return out

    keys = list(per_model[0]["ap"])
    rows = {k: {m: row(k, m) for m in per_model[0]["ap"][k]} for k in keys}
    contrasts = {f"{k} - {k.split('/')[0]}/softmax": contrast(f"{k.split('/')[0]}/softmax", k, HEADLINE)
                 for k in keys if not k.endswith("/softmax")}
    for mode in ("softmax", "per_name"):
        contrasts[f"val+100/{mode} - val/{mode}"] = contrast(f"val/{mode}", f"val+100/{mode}", HEADLINE)
    move = {mode: {size: round(float(np.nanmean([p["score_move"][mode][size]["mean_abs"] for p in per_model])), 4)
                   for size in per_model[0]["score_move"][mode]} for mode in ("softmax", "per_name")}
    return {"rows": rows, "contrasts": contrasts, "score_move_mean_abs": move}


def format_md(report: dict) -> str:
    s = report["summary"]
    lines = [f"# Score modes and NMS options (val, {report['images']} images, {len(report['models'])} models)", "",
             *stamp_lines(report),
             "Generalized AP (mean [95% CI] over models; each model one paired unit; top 300 per image, no floor).",
             "`val`: the 20 val categories; `val+100`: the same plus 100 LVIS names nobody annotated.", "",
             "| vocabulary / options | AP50 novel | AP50 base | AP50 all | AP all |", "|---|---|---|---|---|"]
    for k, r in s["rows"].items():
        cells = [f"{r[m][0]:.1f} [{r[m][1]:.1f}, {r[m][2]:.1f}]" for m in ("ap50_novel", "ap50_base", "ap50_all", "ap_all")]
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    lines += ["", "Contrasts (paired over models):", ""]
    for name, c in s["contrasts"].items():
        lines.append(f"- {name}: " + "; ".join(f"{m} {v['verdict']}" for m, v in c.items()))
    lines += ["", f"Mean absolute change of a region's score for a novel name (regions scoring >= {MOVE_FLOOR} "
              "alone) when other names are sent with it:", "", "| mode | +1 | +10 | +100 |", "|---|---|---|---|"]
    for mode, per in s["score_move_mean_abs"].items():
        lines.append(f"| {mode} | " + " | ".join(f"{per[str(k)]:.3f}" for k in MOVE_SIZES) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="runs/bench/ezsd/models_100x200",
                   help="folder of <row>/seed<k> trained models (benchmarks/ezsd_variants.py)")
    p.add_argument("--rows", nargs="+", default=None, help="only these rows (default: every row found)")
    p.add_argument("--world", default="runs/synthetic/world", help="world v2 folder (ovd data synth)")
    p.add_argument("--images", type=int, default=200, help="first N val images")
    p.add_argument("--work", default="runs/bench/score_modes", help="finished models' results (resumable)")
    args = p.parse_args(argv)
    world = Path(args.world) / "detection"
    gt_json = world / "annotations" / "val.json"
    coco = json.loads(gt_json.read_text())
    folders = ablation_models(args.models, args.rows)
    per_model = measure_each(folders, args.work, str(args.images), lambda folder: measure_model(
        folder, coco, world / "val", gt_json, args.images))
    report = {**run_stamp("score_modes.py", argv), "images": args.images, "split": "val",
              "option_sets": {k: asdict(v) for k, v in OPTION_SETS.items()}, "distractors": DISTRACTORS,
              "max_candidates": MAX_CANDIDATES,
              "models": per_model, "summary": summarise(per_model)}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "score_modes.json").write_text(json.dumps(report, indent=1) + "\n")
    (RESULTS / "score_modes.md").write_text(format_md(report))
    print(format_md(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
