"""Sliced inference on large scenes (`python benchmarks/tiling.py`): AP and latency, tiles off vs on.

Large scenes are mosaics of world v2's val scenes: k x k scenes (256 px each) pasted into one
image of 256k px (k = 4: 1024 px, k = 8: 2048 px) with their boxes shifted, so objects keep
their 10-50 px and the image is what a drone camera gives: large, with small objects. Each
model (`--models`: exports made here from the EZSD ablation's trained cells, each a paired
unit) detects every mosaic through `ovd.Detector` with `tiles="off"` (the whole image resized
to the model's 256 px) and `tiles="on"` (models/tiling.py: 256 px windows, overlap 0.2, at
most 64, plus the whole image), all val categories, no score floor, 300 detections per scene
(300 k^2 per mosaic). AP per group by pycocotools; latency per mosaic (the median over the
mosaics of one size, both settings timed in the same loop) in that AP setting and at the API's
defaults (score >= 0.3, 100 detections), what a user's call costs. The settings are the code's
defaults, not tuned here; the data is val.

Results: benchmarks/results/tiling.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
from host_info import run_stamp, stamp_lines
from PIL import Image

from ovd.models.api import Detector
from ovd.models.tiling import plan_tiles
from ovd.training.evaluate import EVAL_MAX_DETECTIONS, group_ap, tier_groups
from ovd.training.protocol import flat_metrics, mean_ci, verdict

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
HEADLINE = ("ap50_all", "ap50_novel", "ap50_base", "ap_all")


def make_mosaics(coco: dict, image_root: Path, k: int, count: int, out: Path) -> Path:
    """`count` mosaics of k x k val scenes (in file order) under `out`; returns their COCO json."""
    json_path = out / f"mosaics_{k}x{k}.json"
    if json_path.is_file():
        return json_path
    out.mkdir(parents=True, exist_ok=True)
    by_image: dict[int, list] = {}
    for a in coco["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    images, annotations = [], []
    scenes = coco["images"]
    for m in range(count):
        group = scenes[m * k * k:(m + 1) * k * k]
        if len(group) < k * k:
            raise SystemExit(f"val has {len(scenes)} scenes: not enough for {count} mosaics of {k}x{k}")
        side = group[0]["width"]
        canvas = Image.new("RGB", (side * k, side * k))
        for j, info in enumerate(group):
            dx, dy = (j % k) * side, (j // k) * side
            canvas.paste(Image.open(image_root / info["file_name"]).convert("RGB"), (dx, dy))
            for a in by_image.get(info["id"], []):
                x, y, w, h = a["bbox"]
                annotations.append({**a, "id": len(annotations) + 1, "image_id": m + 1, "bbox": [x + dx, y + dy, w, h]})
        name = f"mosaic_{k}x{k}_{m:03d}.png"
        canvas.save(out / name)
        images.append({"id": m + 1, "file_name": name, "width": side * k, "height": side * k})
    json_path.write_text(json.dumps({"images": images, "annotations": annotations,
                                     "categories": coco["categories"]}))
    return json_path


def export_model(folder: Path, out: Path, world: Path) -> Path:
    """An `ovd export` of a trained ablation cell (made once; its categories from world v2's val)."""
    from ovd.training.data.coco_format import register_ov_dataset
    from ovd.training.export import export_detector

    if not (out / "manifest.json").is_file():
        register_ov_dataset("synth_val", world / "annotations" / "val.json", world / "val", overwrite=True)
        export_detector(folder, out, name=f"{folder.parent.name}-{folder.name}", version="bench")
    return out


def measure(detector: Detector, mosaics: Path, image_root: Path, k: int) -> dict:
    coco = json.loads(mosaics.read_text())
    names = [c["name"] for c in coco["categories"]]
    limit = EVAL_MAX_DETECTIONS * k * k
    dets: dict[str, list] = {"off": [], "on": []}
    seconds: dict[str, list] = {"off": [], "on": []}
    default_seconds: dict[str, list] = {"off": [], "on": []}
    windows = 0
    for info in coco["images"]:
        rgb = np.asarray(Image.open(image_root / info["file_name"]).convert("RGB"))
        for mode in ("off", "on"):
            t0 = time.perf_counter()
            found = detector(rgb, names, threshold=0.0, max_detections=limit, tiles=mode, max_candidates=5000)
            seconds[mode].append(time.perf_counter() - t0)
            dets[mode] += found.to_coco(info["id"], [c["id"] for c in coco["categories"]])
            t0 = time.perf_counter()
            detector(rgb, names, tiles=mode)
            default_seconds[mode].append(time.perf_counter() - t0)
        windows = len(plan_tiles(info["height"], info["width"], detector.runtime.preprocessing, "on").windows)
    cats = coco["categories"]
    groups = {"all": [c["id"] for c in cats], "base": [c["id"] for c in cats if c.get("split", "base") == "base"],
              "novel": [c["id"] for c in cats if c.get("split") == "novel"], **tier_groups(mosaics)}
    return {"mosaics": len(coco["images"]), "windows": windows,
            **{mode: {**flat_metrics(group_ap(mosaics, dets[mode], groups, limit)),
                      "seconds_median": round(statistics.median(seconds[mode]), 2),
                      "default_seconds_median": round(statistics.median(default_seconds[mode]), 2)} for mode in dets}}


def _mean_ci(values: list[float]) -> list[float]:
    mean, (lo, hi) = mean_ci(values)
    return [round(mean, 2), round(lo, 2), round(hi, 2)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["runs/bench/ezsd/models_100x200/gt_raw_lambda0.03/seed0",
                                                   "runs/bench/ezsd/models_100x200/gt_raw_lambda0.03/seed1",
                                                   "runs/bench/ezsd/models_100x200/base_only/seed0"],
                   help="trained cells of benchmarks/ezsd_variants.py")
    p.add_argument("--world", default="runs/synthetic/world")
    p.add_argument("--work", default="runs/bench/tiling")
    p.add_argument("--sizes", nargs="+", type=int, default=[4, 8], help="k of the k x k mosaics")
    p.add_argument("--count", type=int, default=4, help="mosaics per size")
    args = p.parse_args(argv)
    world = Path(args.world) / "detection"
    coco = json.loads((world / "annotations" / "val.json").read_text())
    work = Path(args.work)
    mosaics = {k: make_mosaics(coco, world / "val", k, args.count, work / "mosaics") for k in args.sizes}
    per_model = []
    for folder in map(Path, args.models):
        done = work / f"{folder.parent.name}_{folder.name}_v2.json"  # v2: with the latency at defaults
        if not done.is_file():
            detector = Detector.load(export_model(folder, work / "exports" / f"{folder.parent.name}_{folder.name}",
                                                   world))
            result = {"model": f"{folder.parent.name}/{folder.name}",
                      "sizes": {str(k): measure(detector, path, work / "mosaics", k) for k, path in mosaics.items()}}
            done.write_text(json.dumps(result))
        per_model.append(json.loads(done.read_text()))
        print(f"{folder}: done", flush=True)
    summary = {}
    for k in map(str, args.sizes):
        rows = [m["sizes"][k] for m in per_model]
        summary[k] = {"side_px": 256 * int(k), "windows": rows[0]["windows"], "mosaics": rows[0]["mosaics"]}
        for mode in ("off", "on"):
            summary[k][mode] = {metric: _mean_ci([r[mode][metric] for r in rows])
                                for metric in (*HEADLINE, "seconds_median", "default_seconds_median")}
        for metric in HEADLINE:
            diff, ci = mean_ci(r["on"][metric] - r["off"][metric] for r in rows)
            summary[k].setdefault("on_minus_off", {})[metric] = {
                "diff_mean": round(diff, 2), "diff_ci95": [round(ci[0], 2), round(ci[1], 2)], "verdict": verdict(diff, ci)}
        summary[k]["latency_ratio_on_off"] = round(statistics.mean(
            r["on"]["seconds_median"] / r["off"]["seconds_median"] for r in rows), 1)
        summary[k]["default_latency_ratio_on_off"] = round(statistics.mean(
            r["on"]["default_seconds_median"] / r["off"]["default_seconds_median"] for r in rows), 1)
    report = {**run_stamp("tiling.py", argv), "split": "val", "models": per_model, "summary": summary}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "tiling.json").write_text(json.dumps(report, indent=1) + "\n")
    lines = [f"# Sliced inference on large scenes (val mosaics, {len(per_model)} models)", "", *stamp_lines(report),
             "Mean [95% CI] over models; latency: median seconds per mosaic (PyTorch, CPU), in the AP "
             "setting (no score floor) and at the API's defaults (score >= 0.3, 100 detections).", "",
             "| mosaic | tiles | windows | AP50 all | AP50 novel | AP50 base | AP all | s / image (AP setting) "
             "| s / image (defaults) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for k, s in summary.items():
        for mode in ("off", "on"):
            cells = " | ".join(f"{s[mode][m][0]:.1f} [{s[mode][m][1]:.1f}, {s[mode][m][2]:.1f}]"
                               for m in HEADLINE)
            lines.append(f"| {s['side_px']} px ({k}x{k} scenes) | {mode} | {s['windows'] if mode == 'on' else 1} | "
                         f"{cells} | {s[mode]['seconds_median'][0]:.2f} | {s[mode]['default_seconds_median'][0]:.2f} |")
    lines += [""] + [f"- {s['side_px']} px, on - off: " + "; ".join(f"{m} {v['verdict']}" for m, v in
                                                                  s["on_minus_off"].items())
                     + f"; latency x{s['latency_ratio_on_off']} (AP setting), x{s['default_latency_ratio_on_off']} "
                       "(defaults)" for s in summary.values()]
    (RESULTS / "tiling.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
