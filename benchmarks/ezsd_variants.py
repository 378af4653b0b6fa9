#!/usr/bin/env python
"""EZSD ablation on the synthetic world: which part of the method buys novel-class AP?

    .venv/bin/python benchmarks/ezsd_variants.py            # the committed table
    .venv/bin/python benchmarks/ezsd_variants.py --iters 60 --train-images 24 --root /tmp/b  # quick

Rows (same seed, schedule, training images and validation set; only the named part changes):

    base-only            base boxes, no distillation (text classifier from raw CLIP)
    + GT distil (raw)    + L1 distillation of raw-CLIP embeddings of base GT boxes (ViLD-like)
    + renorm CLIP        the same with the re-normalised CLIP (EZSD stage 1)
    + proposals (dense)  + CLIP proposals on novel-looking regions (EZSD stages 2-3, the paper)
    + semantic reg.      + the semantic regressor (full EZSD)
    cheap proposals      full EZSD with our cheap proposal mode instead of the dense one
    oracle               novel boxes too, no distillation: what boxes would give
    lambda 0.1           full EZSD with a 10x smaller distillation weight (a diagnostic row)

Shared stages come from the pipeline root (`ovd pipeline` writes them; computed here when
absent): the world, the pretrained CLIP and the re-normalised CLIP. Everything this script
computes goes under --root and is reused on a rerun (per-stage wall times are stored when
measured and reported with "(cached)" when reused). The detectors train on the first
--train-images base-annotated images so that the dense proposal stage (~1200 CLIP crops per
image) fits the time budget; every row uses the same images.

Writes <results>/ezsd_variants.{md,json} (table), ezsd_variants_ap50.png (bar chart) and
ezsd_variants_detections.png (val images with each row's detections; novel classes marked).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from host_info import host_line  # noqa: E402
from training_bench import Timed, pipeline_front, setup_logging, subset_json, write_markdown  # noqa: E402

logger = logging.getLogger("bench")


@dataclass(frozen=True)
class Variant:
    """One row: a detector trained with these choices."""

    key: str
    label: str
    clip: str                    # "raw" or "renorm": the CLIP of the text classifier and targets
    targets: str | None          # None, "gt", "dense" or "cheap"
    semantic_regressor: bool = False
    vocabulary: str = "base"     # "all" = oracle
    distill_weight: float = 1.0  # lambda (the paper's 1 unless a row says otherwise)


VARIANTS = [
    Variant("base_only", "base-only, no distillation", "raw", None),
    Variant("gt_raw", "+ GT distillation, raw CLIP (ViLD-like)", "raw", "gt"),
    Variant("gt_renorm", "+ re-normalised CLIP", "renorm", "gt"),
    Variant("dense", "+ CLIP proposals, dense (EZSD)", "renorm", "dense"),
    Variant("dense_semreg", "+ semantic regressor (full EZSD)", "renorm", "dense", True),
    Variant("cheap_semreg", "full EZSD, cheap proposals", "renorm", "cheap", True),
    Variant("oracle", "oracle: novel boxes, no distillation", "renorm", None, vocabulary="all"),
    # Not a row of the paper: tests whether the distillation term drowns the detection losses
    # at this short schedule (see the analysis in the results file).
    Variant("dense_semreg_w01", "full EZSD, lambda 0.1 instead of 1", "renorm", "dense", True,
            distill_weight=0.1),
]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(REPO / "configs" / "synthetic.yaml"),
                   help="pipeline config (world, CLIP and stage settings)")
    p.add_argument("--pipeline-root", default=None, help="shared stages (default: the config's root)")
    p.add_argument("--root", default="runs/bench/ezsd", help="this benchmark's outputs")
    p.add_argument("--results", default=str(REPO / "benchmarks" / "results"))
    p.add_argument("--train-images", type=int, default=100)
    p.add_argument("--iters", type=int, default=250, help="detector iterations per row")
    p.add_argument("--variants", nargs="*", default=[v.key for v in VARIANTS])
    args = p.parse_args(argv)
    setup_logging()

    from training.cli import _progress
    from training.data.coco_format import register_ov_dataset
    from training.pipeline import zero_shot
    from training.proposals import ProposalConfig, run_proposals
    from training.targets import TargetsConfig, run_targets

    t_start = time.time()
    cfg, front = pipeline_front(args.config, args.pipeline_root)
    root = Path(args.root)
    results_dir = Path(args.results)
    results_dir.mkdir(parents=True, exist_ok=True)

    world, _ = front.world()
    clips = {"raw": front.clip(world)[0]}
    clips["renorm"] = front.renorm(clips["raw"])[0]
    accuracy = {k: zero_shot(c, front.world_dir, front.clip_dir if k == "raw" else front.renorm_dir)
                for k, c in clips.items()}

    # The training subset every row uses (base boxes; all boxes for the oracle).
    ann = front.world_dir / "detection" / "annotations"
    image_root = front.world_dir / "detection" / "train"
    train_json = subset_json(ann / "train_base.json", root / "data" / "train_base.json", args.train_images)
    train_all_json = subset_json(ann / "train_all.json", root / "data" / "train_all.json", args.train_images)
    register_ov_dataset("bench_train", train_json, image_root, overwrite=True)
    register_ov_dataset("bench_train_all", train_all_json, image_root, overwrite=True)

    # Distillation targets, computed once per kind.
    wanted = [v for v in VARIANTS if v.key in args.variants]
    stage_seconds: dict[str, tuple[float, bool]] = {}
    target_dirs: dict[tuple[str, str], Path] = {}
    tcfg = TargetsConfig.from_config(cfg)
    for clip_key, kind in sorted({(v.clip, v.targets) for v in wanted if v.targets}):
        clip = clips[clip_key]
        proposals_dir = None
        if kind in ("dense", "cheap"):
            pcfg = ProposalConfig.from_dict({**(cfg.get("proposals") or {}), "mode": kind})
            proposals_dir = root / f"proposals_{kind}"
            stage_seconds[f"proposals ({kind})"] = Timed(proposals_dir)(
                lambda pcfg=pcfg, out=proposals_dir, clip=clip: run_proposals(
                    clip, train_json, image_root, out, pcfg, progress=_progress),
                done=(proposals_dir / "timing.json").is_file())
        out = root / f"targets_{clip_key}_{kind}"
        stage_seconds[f"targets ({clip_key} CLIP, {kind})"] = Timed(out)(
            lambda clip=clip, pdir=proposals_dir, out=out: run_targets(
                clip, train_json, image_root, pdir, out, tcfg, progress=_progress),
            done=(out / "timing.json").is_file())
        target_dirs[(clip_key, kind)] = out

    previous = results_dir / "ezsd_variants_v1.json"
    before = {r["key"]: r for r in json.loads(previous.read_text())["rows"]} if previous.is_file() else {}
    rows = []
    report = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": host_line(),
        "train_images": args.train_images,
        "iters": args.iters,
        "clip_accuracy": {k: {d: {g: round(100 * a[d][g], 1) for g in ("base", "novel", "all")}
                              for d in ("caption_crops", "detection_gt_crops")}
                          for k, a in accuracy.items()},
        "stages": {k: {"seconds": round(s, 1), "cached": c} for k, (s, c) in stage_seconds.items()},
        "rows": rows,
        "before": before,
    }
    for v in wanted:
        logger.info("variant %s: %s", v.key, v.label)
        out = root / "detectors" / v.key
        seconds, cached = Timed(out)(lambda v=v, out=out: train_and_eval(
            v, cfg, clips[v.clip], target_dirs.get((v.clip, v.targets)), out, args.iters),
            done=(out / "eval" / "metrics.json").is_file())
        metrics = json.loads((out / "eval" / "metrics.json").read_text())
        rows.append({"key": v.key, "label": v.label, "seconds": round(seconds, 1), "cached": cached,
                     **{g: {k: round(metrics[g][k], 1) for k in ("AP50", "AP", "APs")}
                        for g in ("novel", "base", "all")}})
        # Written after every row, so an interrupted run leaves its finished rows behind.
        report["total_seconds_this_run"] = round(time.time() - t_start, 1)
        (results_dir / "ezsd_variants.json").write_text(json.dumps(report, indent=2))
        write_markdown(results_dir / "ezsd_variants.md", format_report(report))
    text = format_report(report)
    print(text)
    bar_chart(rows, results_dir / "ezsd_variants_ap50.png")
    detections_figure([v for v in wanted], root, front.world_dir, clips,
                      results_dir / "ezsd_variants_detections.png")
    return 0


def train_and_eval(v: Variant, cfg: dict, clip, targets_dir: Path | None, out: Path, iters: int) -> None:
    """Train one row's detector (Detectron2, resumable) and evaluate it on synth_val."""
    from detectron2.data import MetadataCatalog

    from training.cli import _detector_cfg
    from training.evaluate import evaluate
    from training.train_detector import launch_training, prepare

    dcfg = _detector_cfg(cfg, argparse.Namespace(config=None, root=None, detector_config=None, opts=[]))
    dcfg.DATASETS.REGISTER = []  # registered in this process by main()
    dcfg.DATASETS.TRAIN = ("bench_train_all" if v.vocabulary == "all" else "bench_train",)
    dcfg.MODEL.OVD.TRAIN_VOCABULARY = v.vocabulary
    dcfg.MODEL.OVD.SEMANTIC_REGRESSOR = v.semantic_regressor
    dcfg.MODEL.OVD.DISTILL_WEIGHT = v.distill_weight if targets_dir else 0.0
    dcfg.DATASETS.DISTILL_TARGETS = str(targets_dir) if targets_dir else ""
    steps = tuple(int(iters * f) for f in (2 / 3, 8 / 9))
    dcfg.SOLVER.MAX_ITER = iters
    dcfg.SOLVER.STEPS = steps
    dcfg.SOLVER.CHECKPOINT_PERIOD = max(iters // 3, 1)
    dcfg.OUTPUT_DIR = str(out)
    dcfg = prepare(dcfg, clip)
    launch_training(dcfg)
    model = load_trained(dcfg, out)
    names = list(MetadataCatalog.get("synth_val").thing_classes)
    evaluate(dcfg, model, "synth_val", clip.text_embeddings(names, dcfg.MODEL.OVD.PROMPT_TEMPLATE),
             out / "eval")


def load_trained(dcfg, out: Path):
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    model = build_model(dcfg)
    DetectionCheckpointer(model).load(str(out / "model_final.pth"))
    return model.eval()


def format_report(r: dict) -> str:
    lines = ["# EZSD ablation on the synthetic world", "",
             f"Command: `{r['command']}`  ", f"Machine: {r['machine']}  ",
             f"Detectors: {r['iters']} iterations on the first {r['train_images']} training images "
             "(base boxes), evaluated on synth_val over all 16 classes (generalized).", "",
             "## CLIP zero-shot crop accuracy (%)", "",
             "| CLIP | caption crops base | novel | detection GT crops base | novel |",
             "|---|---|---|---|---|"]
    for k, a in r["clip_accuracy"].items():
        lines.append(f"| {k} | {a['caption_crops']['base']} | {a['caption_crops']['novel']} | "
                     f"{a['detection_gt_crops']['base']} | {a['detection_gt_crops']['novel']} |")
    lines += ["", "## Stages computed for the table", "", "| stage | wall time |", "|---|---|"]
    for k, s in r["stages"].items():
        lines.append(f"| {k} | {s['seconds'] / 60:.1f} min{' (cached)' if s['cached'] else ''} |")
    lines += ["", "## Detectors (AP in %; in brackets the same row before the EZSD fixes, "
              "`ezsd_variants_v1.json`)", "",
              "| variant | AP50 novel | AP50 base | AP50 all | AP novel | AP all | APs all | train+eval |",
              "|---|---|---|---|---|---|---|---|"]
    before = r.get("before", {})
    for row in r["rows"]:
        old = before.get(row["key"])

        def cell(g: str, k: str, row=row, old=old) -> str:
            return f"{row[g][k]}" + (f" ({old[g][k]})" if old else "")

        lines.append(f"| {row['label']} | {cell('novel', 'AP50')} | {cell('base', 'AP50')} | "
                     f"{cell('all', 'AP50')} | {cell('novel', 'AP')} | {cell('all', 'AP')} | "
                     f"{cell('all', 'APs')} | {row['seconds'] / 60:.1f} min"
                     f"{' (cached)' if row['cached'] else ''} |")
    lines += ["", f"This run took {r['total_seconds_this_run'] / 60:.1f} min (cached parts excluded)."]
    return "\n".join(lines) + "\n"


def bar_chart(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4.2))
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [r["novel"]["AP50"] for r in rows], 0.4, label="novel", color="#d62728")
    ax.bar([i + 0.2 for i in x], [r["base"]["AP50"] for r in rows], 0.4, label="base", color="#1f77b4")
    ax.set_xticks(list(x), [r["label"].replace(", ", ",\n").replace(" (", "\n(") for r in rows], fontsize=7)
    ax.set_ylabel("AP50 (%)")
    ax.set_title("EZSD ablation on the synthetic world (generalized, synth_val)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def detections_figure(variants: list[Variant], root: Path, world_dir: Path, clips: dict, path: Path,
                      n_images: int = 3, score: float = 0.3, max_boxes: int = 15) -> None:
    """Rows: val images; columns: ground truth, then each variant's detections (score >= 0.3,
    the 15 best).
    Novel classes are drawn in red with a '*'; base classes in blue."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data import detection_utils as utils

    from training.train_detector import build_config

    meta = MetadataCatalog.get("synth_val")
    names = list(meta.thing_classes)
    novel = set(meta.novel_classes)
    records = DatasetCatalog.get("synth_val")[:n_images]
    images = [utils.read_image(rec["file_name"], format="RGB") for rec in records]
    columns = [("ground truth", [[(a["bbox"], names[a["category_id"]], None) for a in rec["annotations"]]
                                 for rec in records])]
    for v in variants:  # each model is loaded once, then run on every image
        out = root / "detectors" / v.key
        dcfg = build_config(out / "config.yaml")
        model = load_trained(dcfg, out)
        text = clips[v.clip].text_embeddings(names, dcfg.MODEL.OVD.PROMPT_TEMPLATE)
        per_image = []
        for image in images:
            with torch.inference_mode():
                inst = model([{"image": torch.as_tensor(image.transpose(2, 0, 1).copy()),
                               "height": image.shape[0], "width": image.shape[1]}], text=text)[0]["instances"]
            keep = (inst.scores >= score).nonzero().flatten()[:max_boxes]  # sorted by score
            per_image.append([(b.tolist(), names[c], s) for b, c, s in
                              zip(inst.pred_boxes.tensor[keep], inst.pred_classes[keep].tolist(),
                                  inst.scores[keep].tolist(), strict=True)])
        columns.append((v.label, per_image))
    fig, axes = plt.subplots(n_images, len(columns), figsize=(2.6 * len(columns), 2.7 * n_images),
                             squeeze=False)
    for c, (title, per_image) in enumerate(columns):
        for r, image in enumerate(images):
            ax = axes[r][c]
            ax.imshow(image)
            ax.set_axis_off()
            if r == 0:
                ax.set_title(title, fontsize=6)
            for box, name, s in per_image[r]:
                if s is None:  # GT is XYWH
                    x0, y0, w, h = box
                else:
                    x0, y0, w, h = box[0], box[1], box[2] - box[0], box[3] - box[1]
                colour = "#ff2020" if name in novel else "#2060ff"
                ax.add_patch(plt.Rectangle((x0, y0), w, h, fill=False, color=colour, lw=1))
                label = ("*" if name in novel else "") + name + (f" {s:.2f}" if s is not None else "")
                ax.text(x0, y0, label, fontsize=3.5, color="white",
                        bbox={"facecolor": colour, "alpha": 0.7, "pad": 0.5, "lw": 0})
    fig.suptitle("synth_val: red * = novel class (never boxed in training), blue = base", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
