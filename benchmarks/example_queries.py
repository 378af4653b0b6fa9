"""Query by example (`python benchmarks/example_queries.py`): one example box vs the name.

    python benchmarks/example_queries.py                 # val: every variant, the shift chosen
    python benchmarks/example_queries.py --split test    # test: the name vs the chosen default

For every model the EZSD ablation trained (benchmarks/ezsd_variants.py; each `<row>/seed<k>`
folder one paired unit), the val images are encoded once and classified against the 20 val
categories, with each **novel** category's row taken from:

- `name`: its name's text embedding (the baseline);
- `example_shift<s>`: one example box, the detector's own region embedding of the proposal
  overlapping it most, moved by the fraction s of the modality gap (models/examples.py: what
  the API and service do, with the s chosen here; s=0 is the raw embedding);
- `clip_crop`: the model's CLIP image tower on EZSD's crop of the box (the alternative the issue
  proposed: an image tower in the export), and `clip_crop_shifted`: the same, shifted by CLIP's
  own gap (mean CLIP embedding of the crops of the example image's first 64 proposals).

Base categories keep their names in every variant, so the generalized AP (`ovd eval`'s: top
300 per image, no floor, pycocotools) also shows whether example rows crowd out the others.
Examples are drawn (seeded, `--draws` per model, the same boxes for every variant) from val
objects of >= 16x16 px on images *outside* the evaluated ones. Calibration: the fraction of
(region, novel row) pairs whose per-name score is >= 0.3 (for names it is ~1%).

Results: benchmarks/results/example_queries.{json,md}, with the machine and the command.
On val the choice is made (which embedding, how far to shift): the shift with the highest mean
AP50 over all classes is reported as chosen. `--split test` reports that choice (the API's
GAP_SHIFT, models/examples.py) against the name only, on test images, with examples drawn from
other test images: example_queries_test.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np
import torch
from ablation_models import ablation_models, measure_each
from host_info import run_stamp, stamp_lines
from PIL import Image
from score_modes import load_model

from ovd.models.examples import GAP_SHIFT, as_numpy, example_rows
from ovd.models.runtime import Preprocessing
from ovd.training.evaluate import EVAL_MAX_DETECTIONS, group_ap, tier_groups
from ovd.training.protocol import flat_metrics, mean_ci, verdict

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
#: Fractions of the modality gap an example row is moved by (models/examples.py GAP_SHIFT).
SHIFTS = (0.0, 0.25, 0.5, 0.75, 1.0)
VARIANTS = ("name", *(f"example_shift{s:g}" for s in SHIFTS), "clip_crop", "clip_crop_shifted")
#: On test only the val choice is reported, against the name.
TEST_VARIANTS = ("name", f"example_shift{GAP_SHIFT:g}")
MIN_EXAMPLE_SIDE = 16
CLIP_GAP_PROPOSALS = 64
CALIBRATION_SCORE = 0.3
MAX_CANDIDATES = 5000
HEADLINE = ("ap50_novel", "ap50_novel_comp", "ap50_novel_shape", "ap50_novel_both", "ap50_base", "ap50_all")


def _unit(v: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(v, dim=-1)


def draw_examples(coco: dict, novel_ids: list[int], exclude: set[int], draws: int, seed: int) -> list[dict]:
    """Per draw {category_id: annotation}: one val object of each novel class, >= 16 px a side,
    from an image not evaluated."""
    pool: dict[int, list[dict]] = {}
    for a in coco["annotations"]:
        if a["image_id"] not in exclude and min(a["bbox"][2:]) >= MIN_EXAMPLE_SIDE and a["category_id"] in novel_ids:
            pool.setdefault(a["category_id"], []).append(a)
    rng = random.Random(seed)
    return [{c: rng.choice(pool[c]) for c in novel_ids} for _ in range(draws)]


def measure_model(folder: Path, coco: dict, image_root: Path, gt_json: Path, n_images: int, draws: int,
                  variants: tuple[str, ...] = VARIANTS) -> dict:
    model, clip, cfg = load_model(folder)
    predictor = model.roi_heads.box_predictor
    prep = Preprocessing(cfg.INPUT.FORMAT, cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)
    cats = coco["categories"]
    names = [c["name"] for c in cats]
    novel = [k for k, c in enumerate(cats) if c.get("tier", "base") != "base"]
    images = coco["images"][:n_images]
    evaluated = {i["id"] for i in images}
    by_id = {i["id"]: i for i in coco["images"]}
    examples = draw_examples(coco, [cats[k]["id"] for k in novel], evaluated, draws, seed=0)

    def load(info: dict) -> np.ndarray:
        return np.asarray(Image.open(image_root / info["file_name"]).convert("RGB"))

    def encode(rgb: np.ndarray) -> tuple[dict, list, list]:
        x = prep(rgb)
        inputs = [{**x, "image": torch.as_tensor(x["image"])}]
        return x, inputs, model.encode(inputs)

    with torch.inference_mode():
        text = clip.text_embeddings(names, cfg.MODEL.OVD.PROMPT_TEMPLATE)
        text_mean = as_numpy(_unit(text.mean(0)))
        queries: dict[str, list[torch.Tensor]] = {"name": [text]}
        shifts = [s for s in SHIFTS if f"example_shift{s:g}" in variants]
        clip_rows = "clip_crop" in variants
        for draw in examples:
            rows = {v: text.clone() for v in variants[1:]}
            for k in novel:
                a = draw[cats[k]["id"]]
                x0, y0, w, h = a["bbox"]
                box = [x0, y0, x0 + w, y0 + h]
                rgb = load(by_id[a["image_id"]])
                x, _, regions = encode(rgb)
                for shift in shifts:
                    (r,) = example_rows(regions[0], x, [box], text_mean, shift=shift)
                    rows[f"example_shift{shift:g}"][k] = torch.as_tensor(r.row)
                if not clip_rows:
                    continue
                image = torch.as_tensor(rgb).permute(2, 0, 1)
                crop = clip.encode_images(clip.crop_boxes(image, torch.tensor([box], dtype=torch.float32)))[0]
                rows["clip_crop"][k] = crop
                scale = rgb.shape[0] / x["image"].shape[1]
                context = clip.encode_images(clip.crop_boxes(
                    image, regions[0].proposals[:CLIP_GAP_PROPOSALS].float() * scale))
                rows["clip_crop_shifted"][k] = _unit(crop - _unit(context.mean(0)) + text.new_tensor(text_mean))
            for v in variants[1:]:
                queries.setdefault(v, []).append(rows[v])
        results = {v: [[] for _ in qs] for v, qs in queries.items()}
        above = {v: [] for v in queries}
        t0 = time.perf_counter()
        for info in images:
            x, inputs, regions = encode(load(info))
            for v, qs in queries.items():
                for d, q in enumerate(qs):
                    found = model.to_original_size(predictor.classify(
                        regions, q, score_thresh=0.0, max_detections=EVAL_MAX_DETECTIONS, score_mode="per_name",
                        max_candidates=MAX_CANDIDATES), inputs)[0]["instances"]
                    for box, score, c in zip(found.pred_boxes.tensor.tolist(), found.scores.tolist(),
                                             found.pred_classes.tolist(), strict=True):
                        x1, y1, x2, y2 = box
                        results[v][d].append({"image_id": info["id"], "category_id": cats[c]["id"],
                                              "bbox": [x1, y1, x2 - x1, y2 - y1], "score": score})
                    logits = predictor.classifier(regions[0].embeddings, q[novel])
                    above[v].append(float((torch.sigmoid(logits[:, :-1] - logits[:, -1:]) >= CALIBRATION_SCORE)
                                          .float().mean()))
        seconds = time.perf_counter() - t0
    groups = {"all": [c["id"] for c in cats], "novel": [cats[k]["id"] for k in novel],
              "base": [c["id"] for k, c in enumerate(cats) if k not in novel], **tier_groups(gt_json)}
    subset = {**coco, "images": images, "annotations": [a for a in coco["annotations"] if a["image_id"] in evaluated]}
    sub_json = RESULTS / ".example_queries_gt.json"
    sub_json.write_text(json.dumps(subset))
    try:
        ap = {v: [flat_metrics(group_ap(sub_json, dets, groups)) for dets in per_draw] for v, per_draw in results.items()}
    finally:
        sub_json.unlink()
    # A model's figure is the mean over its draws (the draws share the model's randomness).
    mean_ap = {v: {m: float(np.mean([d[m] for d in per])) for m in per[0]} for v, per in ap.items()}
    return {"model": f"{folder.parent.name}/{folder.name}", "images": n_images, "draws": draws,
            "seconds": round(seconds, 1), "ap_per_draw": ap, "ap": mean_ap,
            "pairs_above": {v: float(np.mean(a)) for v, a in above.items()},
            "examples": [{str(c): a["id"] for c, a in d.items()} for d in examples]}


def summarise(per_model: list[dict], variants: tuple[str, ...] = VARIANTS) -> dict:
    def ci(values) -> list[float]:
        mean, (lo, hi) = mean_ci(values)
        return [round(mean, 2), round(lo, 2), round(hi, 2)]

    rows = {v: {m: ci(p["ap"][v][m] for p in per_model) for m in HEADLINE} for v in variants}
    for v in variants:
        rows[v]["pairs_above"] = ci(100 * p["pairs_above"][v] for p in per_model)
    contrasts = {}
    chosen = max((v for v in variants if v.startswith("example_shift")), key=lambda v: rows[v]["ap50_all"][0])
    pairs = (("name", chosen), ("example_shift0", chosen), ("example_shift1", chosen), ("clip_crop", chosen),
             ("clip_crop_shifted", chosen), ("name", "clip_crop"))
    for a, b in ((a, b) for a, b in pairs if a in variants and b in variants and a != b):
        contrasts[f"{b} - {a}"] = {}
        for m in HEADLINE:
            diff, (lo, hi) = mean_ci(p["ap"][b][m] - p["ap"][a][m] for p in per_model)
            contrasts[f"{b} - {a}"][m] = {"diff_mean": round(diff, 2), "diff_ci95": [round(lo, 2), round(hi, 2)],
                                          "verdict": verdict(diff, (lo, hi))}
    return {"rows": rows, "contrasts": contrasts, "chosen_shift": chosen}


def format_md(report: dict) -> str:
    s = report["summary"]
    variants = tuple(s["rows"])
    lines = [f"# Query by example ({report['split']}, {report['images']} images, {len(report['models'])} models x "
             f"{report['draws']} example draws)", "", *stamp_lines(report),
             "Each novel category queried by one example box instead of its name (base categories keep their "
             "names); generalized AP50 over the 20 categories, mean [95% CI] over models (each model one "
             "paired unit, its draws averaged). `pairs >= 0.3`: % of (region, novel row) pairs whose per-name "
             "score is >= 0.3 (calibration: a name's is ~1%).", "",
             "| novel rows from | AP50 novel | N-comp | N-shape | N-both | AP50 base | AP50 all | pairs >= 0.3 (%) |",
             "|---|---|---|---|---|---|---|---|"]
    for v, r in s["rows"].items():
        cells = [f"{r[m][0]:.1f} [{r[m][1]:.1f}, {r[m][2]:.1f}]" for m in (*HEADLINE, "pairs_above")]
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    if report["split"] == "val":
        lines += ["", f"Chosen (highest mean AP50 all, which counts both the example's own objects and the other "
                  f"classes it may crowd out of the top 300): **{s['chosen_shift']}**."]
    else:
        lines += ["", f"The example row is the API's default ({s['chosen_shift']}, chosen on val)."]
    lines += ["", "Contrasts (paired over models; a claim only where the CI excludes 0):", ""]
    for name, c in s["contrasts"].items():
        lines.append(f"- {name}: " + "; ".join(f"{m} {v['verdict']}" for m, v in c.items()))
    lines += ["", "Per model (AP50 novel, mean over draws):", "", "| model | " + " | ".join(variants) + " |",
              "|---|" + "---|" * len(variants)]
    for p in report["models"]:
        lines.append(f"| {p['model']} | " + " | ".join(f"{p['ap'][v]['ap50_novel']:.1f}" for v in variants) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="runs/bench/ezsd/models_100x200",
                   help="folder of <row>/seed<k> trained models (benchmarks/ezsd_variants.py)")
    p.add_argument("--rows", nargs="+", default=["base_only", "gt_raw_lambda0.03", "gt_renorm_lambda0.03"],
                   help="rows of the ablation whose models are measured")
    p.add_argument("--world", default="runs/synthetic/world", help="world v2 folder (ovd data synth)")
    p.add_argument("--split", choices=["val", "test"], default="val",
                   help="val: every variant, the shift chosen; test: the name vs the chosen default")
    p.add_argument("--images", type=int, default=200, help="first N images of the split are evaluated")
    p.add_argument("--draws", type=int, default=3, help="example draws per model")
    p.add_argument("--work", default="runs/bench/example_queries", help="finished models' results (resumable)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    world = Path(args.world) / "detection"
    gt_json = world / "annotations" / f"{args.split}.json"
    coco = json.loads(gt_json.read_text())
    variants = VARIANTS if args.split == "val" else TEST_VARIANTS
    folders = ablation_models(args.models, args.rows)
    tag = f"{args.images}x{args.draws}" + ("" if args.split == "val" else f"_{args.split}")
    per_model = measure_each(folders, args.work, tag, lambda folder: measure_model(
        folder, coco, world / args.split, gt_json, args.images, args.draws, variants))
    report = {**run_stamp("example_queries.py", argv), "images": args.images, "draws": args.draws,
              "split": args.split, "models": per_model, "summary": summarise(per_model, variants)}
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = "example_queries" if args.split == "val" else f"example_queries_{args.split}"
    (RESULTS / f"{stem}.json").write_text(json.dumps(report, indent=1) + "\n")
    (RESULTS / f"{stem}.md").write_text(format_md(report))
    print(format_md(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
