#!/usr/bin/env python
"""EZSD ablation on world v2 under the protocol (training/protocol.py): which part of the
method buys novel-class AP, per novel tier, with paired seeds and 95% intervals?

    .venv/bin/python benchmarks/ezsd_variants.py                      # select on val, report on test
    .venv/bin/python benchmarks/ezsd_variants.py --max-cells 4 --commit  # a session's share
    .venv/bin/python benchmarks/ezsd_variants.py --summary-only       # tables from finished cells

Rows (same training images, schedule and seeds; only the named part changes):

    base_only      base boxes, no distillation (text classifier from raw CLIP)
    gt_raw         + L1 distillation of raw-CLIP embeddings of base GT boxes (ViLD-like)
    gt_renorm      the same with the re-normalised CLIP (EZSD stage 1)
    dense          + CLIP proposals on novel-looking regions, dense (EZSD stages 2-3)
    dense_semreg   + the semantic regressor (full EZSD)
    cheap_semreg   full EZSD with the cheap proposal mode instead of the dense one
    oracle         novel boxes too, no distillation: what boxes would give

Phase 1 (`select`, val split): lambda over {0.03, 0.1, 0.3, 1}, walked upwards until the mean
has fallen twice in a row, for the ViLD-like row (gt_raw, its lambda also serves gt_renorm)
and the full-EZSD row (dense_semreg, its lambda serves dense and cheap_semreg), 2 seeds each,
by mean novel AP50. Phase 2 (`report`, test split): 5 seeds for the rows of the four contrasts
(renorm, proposals, semantic regressor, cheap vs dense; a fifth, full EZSD over the ViLD-like
row, pairs two of those rows), 3 for base_only and oracle. Each (row, lambda, seed) model is
trained once: the selection run of the chosen lambda is reused for the report, evaluated on
test.

Cells are cached in benchmarks/results/cells/ezsd_variants/<split>/<row>/seed<k>.json (with the
recipe digest that made them) and the trained models under --root, so the table is completed
over several sessions; --commit commits each finished cell. Shared stages (world, CLIP,
re-normalised CLIP) come from the pipeline root (`ovd pipeline` writes them; computed here
when absent); proposals and targets for the training subset are computed once under --root.

The schedule check (`--phase schedule`, val, seed 0) trains base_only and gt_renorm with the
table's schedule and with the shipped one (600 images, 900 iterations) and records whether the
two schedules order the rows the same way.

Writes <results>/ezsd_variants.{json,md}, ezsd_variants_ap50.png (bar chart with CI
whiskers per tier) and ezsd_variants_detections.png (test images, tier of each novel box).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

import torch  # noqa: E402
import yaml  # noqa: E402
from host_info import host_line  # noqa: E402
from training_bench import Timed, pipeline_front, setup_logging, subset_json, write_markdown  # noqa: E402

from ovd.training.layout import eval_dir, final_weights  # noqa: E402
from ovd.training.proposals import without_neutral  # noqa: E402
from ovd.training.protocol import (  # noqa: E402
    HEADLINE,
    CellStore,
    commit_cell,
    flat_metrics,
    paired_contrast,
    recipe_digest,
    summarise_row,
)

logger = logging.getLogger("bench")
CELLS = REPO / "benchmarks" / "results" / "cells" / "ezsd_variants"


@dataclass(frozen=True)
class Variant:
    """One row: a detector trained with these choices."""

    key: str
    label: str
    clip: str                    # "raw" or "renorm": the CLIP of the text classifier and targets
    targets: str | None          # None, "gt", "dense" or "cheap"
    semantic_regressor: bool = False
    vocabulary: str = "base"     # "all" = oracle
    lambda_from: str | None = None  # which selection picks its distillation weight


VARIANTS = [
    Variant("base_only", "base-only, no distillation", "raw", None),
    Variant("gt_raw", "+ GT distillation, raw CLIP (ViLD-like)", "raw", "gt", lambda_from="vild"),
    Variant("gt_renorm", "+ re-normalised CLIP", "renorm", "gt", lambda_from="vild"),
    Variant("dense", "+ CLIP proposals, dense", "renorm", "dense", lambda_from="ezsd"),
    Variant("dense_semreg", "+ semantic regressor (full EZSD)", "renorm", "dense", True, lambda_from="ezsd"),
    Variant("cheap_semreg", "full EZSD, cheap proposals", "renorm", "cheap", True, lambda_from="ezsd"),
    Variant("oracle", "oracle: novel boxes, no distillation", "renorm", None, vocabulary="all"),
]
BY_KEY = {v.key: v for v in VARIANTS}
LAMBDAS = (0.03, 0.1, 0.3, 1.0)
SELECTION_ROWS = {"vild": "gt_raw", "ezsd": "dense_semreg"}
SELECTION_SEEDS = (0, 1)
#: (name, row A, row B): B - A is the effect of the part that B adds.
CONTRASTS = (("renorm", "gt_raw", "gt_renorm"), ("proposals", "gt_renorm", "dense"),
             ("semantic regressor", "dense", "dense_semreg"), ("cheap vs dense", "dense_semreg", "cheap_semreg"),
             # The method as a whole against the ViLD-like baseline it extends (rows already in
             # the four contrasts above, so it costs no cell).
             ("EZSD over ViLD-like", "gt_raw", "dense_semreg"))
CONTRAST_SEEDS = 5
OTHER_SEEDS = 3
#: The shipped model's schedule (configs/detector/synthetic_r18_fpn.yaml on all training
#: images), and the two rows on which the table's shorter schedule is checked against it.
SHIPPED_SCHEDULE = (600, 900)
SCHEDULE_ROWS = ("base_only", "gt_renorm")


def selection_done(means: list[float]) -> bool:
    """True once the mean val novel AP50 of successive lambdas has fallen twice in a row."""
    return len(means) >= 3 and means[-1] < means[-2] < means[-3]


def report_seeds(key: str) -> range:
    in_contrast = any(key in (a, b) for _, a, b in CONTRASTS)
    return range(CONTRAST_SEEDS if in_contrast else OTHER_SEEDS)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(REPO / "configs" / "synthetic.yaml"),
                   help="pipeline config (world, CLIP and stage settings)")
    p.add_argument("--pipeline-root", default=None, help="shared stages (default: the config's root)")
    p.add_argument("--root", default="runs/bench/ezsd", help="models, proposals and targets")
    p.add_argument("--results", default=str(REPO / "benchmarks" / "results"))
    p.add_argument("--cells", default=str(CELLS), help="finished cells (commit these)")
    p.add_argument("--train-images", type=int, default=100)
    p.add_argument("--iters", type=int, default=200, help="detector iterations per cell")
    p.add_argument("--phase", choices=["select", "report", "schedule", "all"], default="all",
                   help="all = select then report (the schedule check only on request)")
    p.add_argument("--max-cells", type=int, default=None, help="stop after this many new cells")
    p.add_argument("--rows", nargs="+", choices=[v.key for v in VARIANTS], default=None,
                   help="only these rows: in select, only the selections these rows name (gt_raw, "
                        "dense_semreg); in report, only these rows (rows whose lambda is not chosen yet wait)")
    p.add_argument("--commit", action="store_true", help="git-commit each finished cell file")
    p.add_argument("--summary-only", action="store_true", help="no training: tables from cells")
    args = p.parse_args(argv)
    setup_logging()
    bench = Bench(args)
    if not args.summary_only:
        bench.run_cells()
    report = bench.summary()
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    (results / "ezsd_variants.json").write_text(json.dumps(report, indent=2) + "\n")
    write_markdown(results / "ezsd_variants.md", format_report(report))
    bar_chart(report, results / "ezsd_variants_ap50.png")
    print(format_report(report))
    if not args.summary_only and bench.complete(report):
        detections_figure(bench, report, results / "ezsd_variants_detections.png")
    return 0


class Bench:
    """The shared stages and the cells of one ablation run."""

    def __init__(self, args: argparse.Namespace):
        from ovd.training.targets import TargetsConfig

        self.args = args
        self.root = Path(args.root)
        self.store = CellStore(args.cells)
        self.cfg, self.front = pipeline_front(args.config, args.pipeline_root)
        self.world, _ = self.front.world()
        self.clips = {"raw": self.front.clip(self.world)[0]}
        self.clips["renorm"] = self.front.renorm(self.clips["raw"])[0]
        self.tcfg = TargetsConfig.from_config(self.cfg)
        ann = self.front.world_dir / "detection" / "annotations"
        self.image_root = self.front.world_dir / "detection" / "train"
        data = self.root / "data" / f"first{args.train_images}"
        self.train_json = subset_json(ann / "train_base.json", data / "train_base.json", args.train_images)
        self.train_all_json = subset_json(ann / "train_all.json", data / "train_all.json", args.train_images)
        self.stage_seconds: dict[str, dict] = {}
        self.new_cells = 0

    # ------------------------------------------------------------------ stages

    def proposals_config(self, kind: str):
        from ovd.training.proposals import ProposalConfig

        return ProposalConfig.from_dict({**(self.cfg.get("proposals") or {}), "mode": kind})

    def targets_dir(self, v: Variant) -> Path | None:
        """The row's distillation targets for the training subset, computed once per kind."""
        if v.targets is None:
            return None
        from ovd.training.progress import progress as _progress
        from ovd.training.proposals import run_proposals
        from ovd.training.targets import run_targets

        clip = self.clips[v.clip]
        proposals_dir = None
        if v.targets in ("dense", "cheap"):
            proposals_dir = self.root / f"proposals_{v.targets}_{self.args.train_images}"
            seconds, cached = Timed(proposals_dir)(
                lambda: run_proposals(clip, self.train_json, self.image_root, proposals_dir,
                                      self.proposals_config(v.targets), progress=_progress),
                done=(proposals_dir / "timing.json").is_file())
            self.stage_seconds[f"proposals ({v.targets})"] = {"seconds": round(seconds), "cached": cached}
        out = self.root / f"targets_{v.clip}_{v.targets}_{self.args.train_images}"
        seconds, cached = Timed(out)(
            lambda: run_targets(clip, self.train_json, self.image_root, proposals_dir, out, self.tcfg,
                                progress=_progress),
            done=(out / "timing.json").is_file())
        self.stage_seconds[f"targets ({v.clip} CLIP, {v.targets})"] = {"seconds": round(seconds), "cached": cached}
        return out

    # ------------------------------------------------------------------ cells

    def recipe(self, v: Variant, lam: float | None, seed: int, split: str) -> str:
        return recipe_digest({
            "variant": asdict(v), "lambda": lam, "seed": seed, "split": split,
            "iters": self.args.iters, "train_images": self.args.train_images,
            "world": self.world["fingerprint"],
            "clip": self.clips[v.clip].manifest["weights"]["sha256"],
            "targets": asdict(self.tcfg) if v.targets else None,
            "proposals": without_neutral(asdict(self.proposals_config(v.targets)))
            if v.targets in ("dense", "cheap") else None,
            "detector": self.detector_recipe,
        })

    @functools.cached_property
    def detector_recipe(self) -> list:
        """The detector's Detectron2 files, parsed (so a comment edit does not make every
        finished cell stale), and the config's opts but the distillation weight (every cell
        sets its own lambda; the shipped default's, chosen here, lives in those opts)."""
        from ovd.training.train_detector import detector_config_file

        detector_file = detector_config_file(self.cfg)
        opts = list((self.cfg.get("detector") or {}).get("opts", []))
        pairs = [opts[i:i + 2] for i in range(0, len(opts), 2)]
        return [yaml.safe_load(detector_file.read_text()),
                yaml.safe_load((detector_file.parent / "Base-OVD-RCNN-FPN.yaml").read_text()),
                [x for k, v in pairs if k != "MODEL.OVD.DISTILL_WEIGHT" for x in (k, v)]]

    def model_dir(self, v: Variant, lam: float | None, seed: int) -> Path:
        name = v.key if lam is None else f"{v.key}_lambda{lam:g}"
        return self.root / f"models_{self.args.train_images}x{self.args.iters}" / name / f"seed{seed}"

    def stored(self, v: Variant, lam: float | None, seed: int, split: str, row: str | None = None
               ) -> dict | None:
        """Metrics of a finished, current cell, else None."""
        cell = self.store.get(split, row or v.key, seed, self.recipe(v, lam, seed, split))
        return cell["metrics"] if cell else None

    def cell(self, v: Variant, lam: float | None, seed: int, split: str, row: str | None = None) -> dict | None:
        """Metrics of one cell, trained and evaluated unless already stored. None when
        --max-cells is spent."""
        row = row or v.key
        done = self.stored(v, lam, seed, split, row)
        if done is not None or (self.args.max_cells is not None and self.new_cells >= self.args.max_cells):
            return done
        recipe = self.recipe(v, lam, seed, split)
        logger.info("cell %s/%s seed %d (lambda %s)", split, row, seed, lam)
        out = self.model_dir(v, lam, seed)
        t0 = time.time()
        train(v, lam, seed, self, out)
        result = evaluate_on(out, self.clips[v.clip], f"synth_{split}")
        path = self.store.put(split, row, seed, recipe, flat_metrics(result), label=v.label,
                              **{"lambda": lam}, iters=self.args.iters, train_images=self.args.train_images,
                              seconds=round(time.time() - t0), machine=host_line())
        self.new_cells += 1
        if self.args.commit:
            commit_cell(path, f"ezsd_variants cell {split}/{row} seed {seed}")
        return flat_metrics(result)

    def chosen_lambdas(self, run: bool) -> dict[str, float | None]:
        """{"vild": lambda, "ezsd": lambda} by mean val novel AP50 over the selection seeds
        (None while a selection is incomplete). The grid is walked upwards and left once the
        mean has fallen at two grid points in a row (the larger lambdas only strengthen the
        term that is already hurting; gt_raw fell 13.4 -> 12.1 -> 11.1 before lambda 1's 3.7)."""
        chosen: dict[str, float | None] = {}
        for name, key in SELECTION_ROWS.items():
            v = BY_KEY[key]
            wanted = run and (not self.args.rows or key in self.args.rows)
            chosen[name] = None
            means: list[float] = []
            for lam in LAMBDAS:
                row = f"{key}_lambda{lam:g}"
                look = self.cell if wanted else self.stored
                got = [look(v, lam, s, "val", row) for s in SELECTION_SEEDS]
                if any(g is None for g in got):
                    break
                means.append(sum(g["ap50_novel"] for g in got) / len(got))
                if len(means) == len(LAMBDAS) or selection_done(means):
                    chosen[name] = LAMBDAS[max(range(len(means)), key=means.__getitem__)]
                    break
        return chosen

    def schedule_check(self, run: bool) -> dict:
        """Seed-0 val metrics of SCHEDULE_ROWS under the table's and the shipped schedule,
        and whether both order the rows alike (empty until the ViLD lambda is chosen)."""
        lam = self.chosen_lambdas(run=False)["vild"]
        if lam is None:
            return {}
        out: dict = {}
        for images, iters in ((self.args.train_images, self.args.iters), SHIPPED_SCHEDULE):
            bench = self if (images, iters) == (self.args.train_images, self.args.iters) else Bench(
                argparse.Namespace(**{**vars(self.args), "train_images": images, "iters": iters}))
            name = f"{images}x{iters}"
            for key in SCHEDULE_ROWS:
                v = BY_KEY[key]
                look = bench.cell if run else bench.stored
                m = look(v, lam if v.lambda_from else None, 0, "val", f"schedule_{name}_{key}")
                if m is not None:
                    out.setdefault(name, {})[key] = {k: m[k] for k in ("ap50_novel", "ap50_base", "ap_all")}
        if len(out) == 2 and all(len(rows) == len(SCHEDULE_ROWS) for rows in out.values()):
            a, b = SCHEDULE_ROWS
            signs = {name: [rows[b][k] > rows[a][k] for k in ("ap50_novel", "ap50_base", "ap_all")]
                     for name, rows in out.items()}
            out["same_order"] = len({tuple(v) for v in signs.values()}) == 1
        return out

    def run_cells(self) -> None:
        if self.args.phase == "schedule":
            self.schedule_check(run=True)
            return
        chosen = self.chosen_lambdas(run=self.args.phase in ("select", "all"))
        if self.args.phase == "select":
            return
        for seed in range(CONTRAST_SEEDS):  # seed-major: early stops still give paired rows
            for v in VARIANTS:
                if seed not in report_seeds(v.key) or (self.args.rows and v.key not in self.args.rows):
                    continue
                lam = chosen.get(v.lambda_from) if v.lambda_from else None
                if v.lambda_from and lam is None:
                    continue  # its lambda is not chosen yet
                if self.cell(v, lam, seed, "test") is None:
                    return

    # ------------------------------------------------------------------ tables

    def summary(self) -> dict:
        chosen = self.chosen_lambdas(run=False)
        selection = {}
        for key in SELECTION_ROWS.values():
            v = BY_KEY[key]
            for lam in LAMBDAS:
                row = f"{key}_lambda{lam:g}"
                seeds = {s: m for s in SELECTION_SEEDS if (m := self.stored(v, lam, s, "val", row)) is not None}
                if seeds:
                    selection[row] = {"lambda": lam, **summarise_row(seeds)}
        rows = {}
        for v in VARIANTS:
            lam = chosen.get(v.lambda_from) if v.lambda_from else None
            if v.lambda_from and lam is None:
                continue
            current = {s: m for s in range(CONTRAST_SEEDS)
                       if (m := self.stored(v, lam, s, "test")) is not None}
            if current:
                rows[v.key] = {"label": v.label, "lambda": lam, **summarise_row(current)}
        contrasts = {}
        for name, a, b in CONTRASTS:
            if a in rows and b in rows:
                per_seed = {k: {r["seed"]: r for r in rows[k]["seeds"]} for k in (a, b)}
                contrasts[name] = {"a": a, "b": b, **paired_contrast(per_seed[a], per_seed[b])}
        return {
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "machine": host_line(),
            "date": time.strftime("%Y-%m-%d"),
            "protocol": "training/protocol.py: paired seeds, mean and 95% Student-t CI per row; "
                        "per contrast the mean paired difference and its CI",
            "train_images": self.args.train_images, "iters": self.args.iters,
            "world": self.world["fingerprint"][:12],
            "clip_accuracy": self.clip_accuracy(),
            "stages": self.stage_seconds,
            "lambda_grid": list(LAMBDAS), "chosen_lambda": chosen, "selection_val": selection,
            "schedule_check": self.schedule_check(run=False),
            "rows": rows, "contrasts": contrasts,
        }

    def clip_accuracy(self) -> dict:
        from ovd.training.pipeline import zero_shot

        dirs = {"raw": self.front.clip_dir, "renorm": self.front.renorm_dir}
        return {k: {d: {g: round(100 * x, 1) for g, x in r.items() if g != "n"}
                    for d, r in zero_shot(c, self.front.world_dir, dirs[k]).items()
                    if d in ("caption_crops", "detection_gt_crops")}
                for k, c in self.clips.items()}

    def complete(self, report: dict) -> bool:
        return all(len(report["rows"].get(v.key, {}).get("seeds", [])) >= len(report_seeds(v.key))
                   for v in VARIANTS)


def train(v: Variant, lam: float | None, seed: int, bench: Bench, out: Path) -> None:
    """Train one cell's detector (Detectron2, resumable; skipped when already trained)."""
    from ovd.training.data.coco_format import register_ov_dataset
    from ovd.training.train_detector import detector_config, launch_training, prepare

    if final_weights(out).is_file():
        return
    args = bench.args
    dataset = f"bench_train_all_{args.train_images}" if v.vocabulary == "all" else f"bench_train_{args.train_images}"
    register_ov_dataset(dataset, bench.train_all_json if v.vocabulary == "all" else bench.train_json,
                        bench.image_root, overwrite=True)
    targets_dir = bench.targets_dir(v)
    dcfg = detector_config(bench.cfg, bench.front.layout)
    dcfg.DATASETS.REGISTER = []  # registered in this process
    dcfg.DATASETS.TRAIN = (dataset,)
    dcfg.MODEL.OVD.TRAIN_VOCABULARY = v.vocabulary
    dcfg.MODEL.OVD.SEMANTIC_REGRESSOR = v.semantic_regressor
    dcfg.MODEL.OVD.DISTILL_WEIGHT = lam if targets_dir else 0.0
    dcfg.DATASETS.DISTILL_TARGETS = str(targets_dir) if targets_dir else ""
    dcfg.SOLVER.MAX_ITER = args.iters
    dcfg.SOLVER.STEPS = tuple(int(args.iters * f) for f in (2 / 3, 8 / 9))
    dcfg.SOLVER.WARMUP_ITERS = min(dcfg.SOLVER.WARMUP_ITERS, args.iters // 5)
    dcfg.SOLVER.CHECKPOINT_PERIOD = max(args.iters // 3, 1)
    dcfg.SEED = seed  # initialisation and data order: the pairing of seeds across rows
    dcfg.OUTPUT_DIR = str(out)
    launch_training(prepare(dcfg, bench.clips[v.clip]))


def load_trained(out: Path):
    """(Detectron2 config, eval-mode model) of a trained cell."""
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    from ovd.training.train_detector import build_config

    dcfg = build_config(out / "config.yaml")
    model = build_model(dcfg)
    DetectionCheckpointer(model).load(str(final_weights(out)))
    return dcfg, model.eval()


def evaluate_on(out: Path, clip, dataset: str) -> dict:
    """Generalized evaluation of a trained cell on a registered split (all categories)."""
    from detectron2.data import MetadataCatalog

    from ovd.training.evaluate import evaluate

    dcfg, model = load_trained(out)
    names = list(MetadataCatalog.get(dataset).thing_classes)
    return evaluate(dcfg, model, dataset, clip.text_embeddings(names, dcfg.MODEL.OVD.PROMPT_TEMPLATE),
                    eval_dir(out, dataset))


# ---------------------------------------------------------------------- report

def _mean_ci(row: dict, metric: str) -> str:
    mean, (lo, hi) = row["mean"].get(metric), row["ci95"].get(metric, [float("nan")] * 2)
    if mean is None:
        return "-"
    return f"{mean:.1f}" if lo != lo else f"{mean:.1f} [{lo:.1f}, {hi:.1f}]"


def format_report(r: dict) -> str:
    lines = ["# EZSD ablation on world v2 (test split, generalized over all 20 classes)", "",
             f"Command: `{r['command']}`  ", f"Machine: {r['machine']}  ", f"Date: {r['date']}  ",
             f"Protocol: {r['protocol']}.  ",
             f"Detectors: {r['iters']} iterations on the first {r['train_images']} training images "
             f"(base boxes); world {r['world']}.  ",
             "What the intervals support, which of EZSD's claims did not reproduce here and why: "
             "docs/results.md, \"The ablation on test\".", "",
             "## CLIP zero-shot crop accuracy (%)", ""]
    tiers = ["base", "novel", "novel_comp", "novel_shape", "novel_both"]
    lines += ["| CLIP | domain | " + " | ".join(tiers) + " |", "|---|---|" + "---|" * len(tiers)]
    for k, a in r["clip_accuracy"].items():
        for d, acc in a.items():
            lines.append(f"| {k} | {d} | " + " | ".join(str(acc.get(t, "-")) for t in tiers) + " |")
    lines += ["", f"## Lambda chosen on val (mean novel AP50 over seeds {list(SELECTION_SEEDS)})", "",
              f"Chosen: {r['chosen_lambda']}", "", "| row | n | AP50 novel | AP50 base |", "|---|---|---|---|"]
    for key, s in r["selection_val"].items():
        lines.append(f"| {key} | {len(s['seeds'])} | {_mean_ci(s, 'ap50_novel')} | {_mean_ci(s, 'ap50_base')} |")
    if r["schedule_check"]:
        lines += ["", f"## Schedule check (val, seed 0): {list(SCHEDULE_ROWS)} under the table's and the "
                  f"shipped schedule; same order: {r['schedule_check'].get('same_order', 'incomplete')}", "",
                  "```", json.dumps({k: v for k, v in r["schedule_check"].items() if k != "same_order"},
                                    indent=1), "```"]
    lines += ["", "## Rows (test; mean [95% CI] over seeds, AP in %)", "",
              "| row | lambda | n | " + " | ".join(HEADLINE) + " |", "|---|---|---|" + "---|" * len(HEADLINE)]
    for row in r["rows"].values():
        lines.append(f"| {row['label']} | {row['lambda'] if row['lambda'] is not None else '-'} | "
                     f"{len(row['seeds'])} | " + " | ".join(_mean_ci(row, m) for m in HEADLINE) + " |")
    lines += ["", "## Contrasts (B - A, paired over seeds; a claim only where the CI excludes 0)", "",
              "| contrast | seeds | AP50 novel | AP50 novel_both | AP novel | AP50 base |", "|---|---|---|---|---|---|"]
    for name, c in r["contrasts"].items():
        lines.append(f"| {name} ({c['b']} - {c['a']}) | {len(c['seeds'])} | "
                     + " | ".join(c["verdict"][m] for m in ("ap50_novel", "ap50_novel_both", "ap_novel", "ap50_base"))
                     + " |")
    if r["stages"]:
        lines += ["", "## Stages computed for the table", "", "| stage | wall time |", "|---|---|"]
        for k, s in r["stages"].items():
            lines.append(f"| {k} | {s['seconds'] / 60:.1f} min{' (cached)' if s['cached'] else ''} |")
    return "\n".join(lines) + "\n"


def bar_chart(report: dict, path: Path) -> None:
    """AP50 per tier and row (test), whiskers = 95% CI over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = list(report["rows"].values())
    if not rows:
        return
    groups = (("ap50_novel_comp", "N-comp", "#ff9896"), ("ap50_novel_shape", "N-shape", "#d62728"),
              ("ap50_novel_both", "N-both", "#8c1a1a"), ("ap50_base", "base", "#1f77b4"))
    fig, ax = plt.subplots(figsize=(11, 4.4))
    width = 0.8 / len(groups)
    for g, (metric, label, colour) in enumerate(groups):
        x = np.arange(len(rows)) + (g - (len(groups) - 1) / 2) * width
        mean = np.array([r["mean"].get(metric, np.nan) for r in rows])
        ci = np.array([r["ci95"].get(metric, [np.nan, np.nan]) for r in rows])
        err = np.nan_to_num(np.abs(np.stack([mean - ci[:, 0], ci[:, 1] - mean])))
        ax.bar(x, mean, width, yerr=err, capsize=2, label=label, color=colour)
    ax.set_xticks(range(len(rows)), [r["label"].replace(", ", ",\n").replace(" (", "\n(") for r in rows],
                  fontsize=7)
    ax.set_ylabel("AP50 (%), test")
    ax.set_title("EZSD ablation on world v2: mean over seeds, 95% CI whiskers")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def detections_figure(bench: Bench, report: dict, path: Path, n_images: int = 3, score: float = 0.3,
                      max_boxes: int = 15) -> None:
    """Rows: test images; columns: ground truth, then the detections (score >= 0.3, the 15 best)
    of each row's lowest seed whose model is still on disk (cells outlive the run folders that
    held their models). Novel boxes are red and tagged with their tier (C/S/B); base boxes blue."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data import detection_utils as utils

    from ovd.training.data.preview import TIER_STYLE

    meta = MetadataCatalog.get("synth_test")
    names = list(meta.thing_classes)
    tag = {c["name"]: TIER_STYLE[c["tier"]][1] for c in bench.world["categories"]}
    records = DatasetCatalog.get("synth_test")[:n_images]
    images = [utils.read_image(rec["file_name"], format="RGB") for rec in records]
    columns = [("ground truth", [[(a["bbox"], names[a["category_id"]], None) for a in rec["annotations"]]
                                 for rec in records])]
    for key, row in report["rows"].items():
        v = BY_KEY[key]
        on_disk = [s["seed"] for s in row["seeds"] if final_weights(bench.model_dir(v, row["lambda"], s["seed"])).is_file()]
        if not on_disk:
            logger.warning("detections figure: no model of %s on disk, column left out", key)
            continue
        dcfg, model = load_trained(bench.model_dir(v, row["lambda"], on_disk[0]))
        text = bench.clips[v.clip].text_embeddings(names, dcfg.MODEL.OVD.PROMPT_TEMPLATE)
        per_image = []
        for image in images:
            with torch.inference_mode():
                inst = model([{"image": torch.as_tensor(image.transpose(2, 0, 1).copy()),
                               "height": image.shape[0], "width": image.shape[1]}], text=text)[0]["instances"]
            keep = (inst.scores >= score).nonzero().flatten()[:max_boxes]  # sorted by score
            per_image.append([(b.tolist(), names[c], s) for b, c, s in
                              zip(inst.pred_boxes.tensor[keep], inst.pred_classes[keep].tolist(),
                                  inst.scores[keep].tolist(), strict=True)])
        columns.append((f"{row['label']} (seed {on_disk[0]})", per_image))
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
                x0, y0, w, h = box if s is None else (box[0], box[1], box[2] - box[0], box[3] - box[1])
                colour = "#ff2020" if tag[name] else "#2060ff"
                ax.add_patch(plt.Rectangle((x0, y0), w, h, fill=False, color=colour, lw=1))
                label = (f"[{tag[name]}] " if tag[name] else "") + name + (f" {s:.2f}" if s is not None else "")
                ax.text(x0, y0, label, fontsize=3.5, color="white",
                        bbox={"facecolor": colour, "alpha": 0.7, "pad": 0.5, "lw": 0})
    fig.suptitle("synth_test: red = novel, tagged C (N-comp), S (N-shape), B (N-both); blue = base",
                 fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
