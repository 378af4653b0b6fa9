#!/usr/bin/env python
"""Compression under the protocol (training/protocol.py): what do TID, CID and Light-ML buy a
small student, per novel tier, with paired seeds and 95% intervals?

    .venv/bin/python benchmarks/compress_students.py --phase select --split val --commit  # first
    .venv/bin/python benchmarks/compress_students.py --commit              # the table (test)
    .venv/bin/python benchmarks/compress_students.py --max-cells 4 --commit # a session's share
    .venv/bin/python benchmarks/compress_students.py --phase budget --commit # AP vs iterations
    .venv/bin/python benchmarks/compress_students.py --phase latency         # one timing loop
    .venv/bin/python benchmarks/compress_students.py --phase ship --commit   # artifacts/student
    .venv/bin/python benchmarks/compress_students.py --summary-only          # tables from cells
    .venv/bin/python benchmarks/compress_students.py --train-images 600 --iters 900 \
        --students no_kd all --max-cells 2 --commit     # KD at the shipped schedule, seed by seed

Rows (one teacher; every student has the same network, data, schedule and seeds, only the
named distillation terms change):

    teacher            the shipped detector (--teacher, default artifacts/default), evaluated
    no_kd              configs/compress/synthetic_student_r18_narrow.yaml with TID, CID and
                       Light-ML off: base boxes + EZSD region distillation
    tid                + TID (localisation from each model's predicted boxes)
    cid                + CID (centerness-weighted, per-instance normalised; box KD on
                       foreground RoIs)
    cid_no_instnorm    + CID without the per-instance normalisation
    cid_lightml        + CID + Light-ML as published
    cid_lightml_zero   + CID + Light-ML with zero-initialised gains (ours)
    all                TID + CID + Light-ML: the student config, whose Light-ML form
                       (published or zero-init gains) is chosen on val by `--phase select`
                       (cid_lightml vs cid_lightml_zero, 2 seeds, mean AP all); its rows and
                       the budget curve wait for that choice, and stop if the config's
                       MODEL.KD.LIGHT_ML.ZERO_INIT disagrees with it

Contrasts (B - A, paired over seeds): TID (no_kd -> tid), CID (no_kd -> cid), per-instance
normalisation (cid_no_instnorm -> cid), Light-ML as published (cid -> cid_lightml) and with
zero-init gains (cid -> cid_lightml_zero). Rows in a contrast get 5 seeds, the others 3; the
student config over no KD (no_kd -> all) is reported on the 3 seeds both have.

Every number reported is on the test split; choices (the schedule, KD weights) are made on val
(`--split val`). Cells (one row x one seed x one split) are cached under
benchmarks/results/cells/compress_students/ with the digest of their recipe and committed one by
one (`--commit`), so the table fills over several sessions. Trained students stay under --root
(reused while they exist).

Columns: AP50 / AP per novel tier, novel, base and all, AP on small objects (all), parameters,
training seconds; from the latency phase, the median single-image latency of every row's
student and the teacher timed in one loop on test images, and its ratio to the teacher's. The
budget phase trains the student config for several iteration budgets (the curve of student AP
vs training budget, for "what does reaching the teacher take"; `--train-images 600` for the
shipped student's data).

Rows of another schedule are their own rows ("no_kd_600x900"); the summary reports no_kd and
all at the shipped student's schedule (all_600x900 seed 0 is the shipped model) and their paired
contrast: what the distillation terms buy once the student has the teacher's data and
iterations.

The ship phase trains the student config once (seed 0) on the teacher's data and schedule (all
training images, the config's 900 iterations), exports it with float16 weights (--ship-out;
`artifacts/student` is a copy) and judges the export against the teacher's on test: AP of both
exports as a deployment runs them, and the latency of `ovd.Detector` calls on the same images
with the same 20 names, the two models alternating in one loop. The bar: at most 10% relative
AP loss (all classes) at no more than 0.5x the teacher's latency. Writes
<results>/compress_student.json.

Shared stages come from the pipeline root (`ovd pipeline` writes them; computed here when
absent): the world, the pretrained CLIP and the re-normalised CLIP, which must be the CLIP the
teacher was trained with (its sha256 is in the teacher's manifest). The students train on the
first --train-images base-annotated training images, with distillation targets from cheap-mode
CLIP proposals on those images (the teacher's recipe).

Writes <results>/compress_students.{json,md}.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

import torch  # noqa: E402
import yaml  # noqa: E402
from host_info import host_info, host_line  # noqa: E402
from training_bench import Timed, pipeline_front, setup_logging, subset_json, write_markdown  # noqa: E402

from ovd.training.layout import final_weights  # noqa: E402
from ovd.training.proposals import without_neutral  # noqa: E402
from ovd.training.protocol import (  # noqa: E402
    CellStore,
    commit_cell,
    flat_metrics,
    paired_contrast,
    recipe_digest,
    summarise_row,
    verdict,
)

logger = logging.getLogger("bench")
CELLS = REPO / "benchmarks" / "results" / "cells" / "compress_students"


@dataclass(frozen=True)
class Student:
    """One student row: which distillation terms are on."""

    key: str
    label: str
    tid: bool
    cid: bool
    light_ml: bool
    light_ml_zero_init: bool | None = False  # None: the student config's (chosen on val)
    instance_normalise: bool = True


STUDENTS = [
    Student("no_kd", "student, no KD", False, False, False),
    Student("tid", "+ TID", True, False, False),
    Student("cid", "+ CID", False, True, False),
    Student("cid_no_instnorm", "+ CID without per-instance normalisation", False, True, False,
            instance_normalise=False),
    Student("cid_lightml", "+ CID + Light-ML (published)", False, True, True),
    Student("cid_lightml_zero", "+ CID + Light-ML, zero-init gains (ours)", False, True, True,
            light_ml_zero_init=True),
    Student("all", "TID + CID + Light-ML (the student config)", True, True, True,
            light_ml_zero_init=None),
]
BY_KEY = {s.key: s for s in STUDENTS}
#: (name, row A, row B): B - A is the effect of what B adds.
CONTRASTS = (("TID", "no_kd", "tid"), ("CID", "no_kd", "cid"),
             ("per-instance normalisation", "cid_no_instnorm", "cid"),
             ("Light-ML (published)", "cid", "cid_lightml"),
             ("Light-ML (zero-init gains)", "cid", "cid_lightml_zero"))
#: Reported too, over the seeds both rows have (it sets no seed count): the student config
#: against the same network without distillation.
SUMMARY_CONTRASTS = (*CONTRASTS, ("TID + CID + Light-ML", "no_kd", "all"))
CONTRAST_SEEDS = 5
OTHER_SEEDS = 3
#: The Light-ML form of the student config is chosen on val (`--phase select`): these two rows,
#: these seeds, by mean AP over all classes (what "within 10% of the teacher" is judged on).
SELECTION_ROWS = ("cid_lightml", "cid_lightml_zero")
SELECTION_SEEDS = (0, 1)
#: Iteration budgets of the student config for the budget curve (the table's is --iters).
BUDGETS = (150, 300, 600, 900)
#: The table's schedule (training images, iterations): the default of --train-images / --iters.
#: Its rows are named by the student alone, rows of any other schedule (the budget curve, the
#: shipped student) carry theirs ("all_600x900"), so no two schedules share a cell file.
TABLE_SCHEDULE = (200, 300)
#: The shipped student must keep this much of the teacher's AP (all classes, test) ...
SHIP_MAX_AP_LOSS = 0.10
#: ... at no more than this fraction of its single-image latency (same images and names).
SHIP_MAX_LATENCY_RATIO = 0.5
#: Columns of the tables (percent).
COLUMNS = ("ap50_novel_comp", "ap50_novel_shape", "ap50_novel_both", "ap50_novel", "ap50_base",
           "ap50_all", "ap_novel_comp", "ap_novel_shape", "ap_novel_both", "ap_novel", "ap_base",
           "ap_all", "aps_all")


def seeds_of(key: str) -> range:
    return range(CONTRAST_SEEDS if any(key in (a, b) for _, a, b in CONTRASTS) else OTHER_SEEDS)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(REPO / "configs" / "synthetic.yaml"),
                   help="pipeline config (world, CLIP and stage settings)")
    p.add_argument("--pipeline-root", default=None, help="shared stages (default: the config's root)")
    p.add_argument("--teacher", default=str(REPO / "artifacts" / "default"),
                   help="the teacher: an export folder or a training output folder")
    p.add_argument("--student-config", default=str(REPO / "configs" / "compress" /
                                                   "synthetic_student_r18_narrow.yaml"))
    p.add_argument("--root", default="runs/bench/compress", help="trained students, proposals, targets")
    p.add_argument("--results", default=str(REPO / "benchmarks" / "results"))
    p.add_argument("--cells", default=str(CELLS), help="finished cells (commit these)")
    p.add_argument("--split", choices=["val", "test"], default="test",
                   help="test for the table; val for choices (schedule, KD weights)")
    p.add_argument("--train-images", type=int, default=TABLE_SCHEDULE[0])
    p.add_argument("--iters", type=int, default=TABLE_SCHEDULE[1], help="training iterations per student")
    p.add_argument("--phase", choices=["select", "report", "budget", "latency", "ship"], default="report",
                   help="select: the Light-ML form on val (run first); report: the table; budget: "
                        "the student config vs iterations; latency: one timing loop; ship: the "
                        "student config at the teacher's schedule, exported and judged")
    p.add_argument("--ship-images", type=int, default=None,
                   help="ship: training images (default: all, as the teacher)")
    p.add_argument("--ship-iters", type=int, default=None,
                   help="ship: iterations (default: the student config's SOLVER.MAX_ITER, the teacher's)")
    p.add_argument("--ship-out", default="runs/bench/compress/student_export",
                   help="ship: where the float16 export goes (artifacts/student is a copy of it)")
    p.add_argument("--students", nargs="*", default=[s.key for s in STUDENTS])
    p.add_argument("--max-cells", type=int, default=None, help="stop after this many new cells")
    p.add_argument("--latency-images", type=int, default=20, help="test images timed per model")
    p.add_argument("--latency-repeats", type=int, default=5, help="passes over them per model")
    p.add_argument("--commit", action="store_true", help="git-commit each finished cell file")
    p.add_argument("--summary-only", action="store_true", help="no training: tables from cells")
    args = p.parse_args(argv)
    if args.phase == "select" and args.split != "val":
        p.error("--phase select chooses on val: add --split val")
    setup_logging()
    bench = Bench(args)
    if not args.summary_only:
        {"select": bench.run_select, "report": bench.run_report, "budget": bench.run_budget,
         "latency": bench.run_latency, "ship": bench.run_ship}[args.phase]()
    report = bench.summary()
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    (results / "compress_students.json").write_text(json.dumps(report, indent=2) + "\n")
    write_markdown(results / "compress_students.md", format_report(report))
    print(format_report(report))
    return 0


class Bench:
    """The shared stages, the teacher and the cells of one compression run."""

    def __init__(self, args: argparse.Namespace):
        from ovd.training.compress import teacher_clip_sha256
        from ovd.training.data.coco_format import register_ov_dataset
        from ovd.training.data.synthetic import world_datasets
        from ovd.training.progress import progress as _progress
        from ovd.training.proposals import ProposalConfig, run_proposals
        from ovd.training.targets import TargetsConfig, run_targets

        self.args = args
        self.root = Path(args.root)
        self.store = CellStore(args.cells)
        self.new_cells = 0
        self.cfg, self.front = pipeline_front(args.config, args.pipeline_root)
        self.world, _ = self.front.world()
        self.clip = self.front.renorm(self.front.clip(self.world)[0])[0]
        want, have = teacher_clip_sha256(args.teacher), self.clip.manifest["weights"]["sha256"]
        if want and want != have:
            raise SystemExit(f"the teacher {args.teacher} was trained with CLIP {want[:12]}, but the "
                             f"pipeline's re-normalised CLIP is {have[:12]}: retrain the teacher on this "
                             "pipeline (`make pipeline`) or point --pipeline-root at the stages that made it")
        ann = self.front.world_dir / "detection" / "annotations"
        image_root = self.front.world_dir / "detection" / "train"
        # Everything that depends on the training subset is named by its size, so a run with
        # another --train-images (the shipped student's) never reuses the table's targets.
        n = args.train_images
        train_json = subset_json(ann / "train_base.json", self.root / "data" / f"first{n}.json", n)
        self.train_dataset = f"bench_train_first{n}"
        register_ov_dataset(self.train_dataset, train_json, image_root, overwrite=True)
        self.datasets = [f"{name}={json_file}:{folder}" for name, (json_file, folder) in
                         {**world_datasets(self.front.world_dir), self.train_dataset: (train_json, image_root)}.items()]
        self.pcfg = ProposalConfig.from_dict({**(self.cfg.get("proposals") or {}), "mode": "cheap"})
        self.tcfg = TargetsConfig.from_config(self.cfg)
        proposals_dir, self.targets_dir = self.root / f"proposals_first{n}", self.root / f"targets_first{n}"
        # stage -> (its folder, what computes it)
        self.stages = {
            "proposals (cheap)": (proposals_dir, lambda: run_proposals(
                self.clip, train_json, image_root, proposals_dir, self.pcfg, progress=_progress)),
            "targets": (self.targets_dir, lambda: run_targets(
                self.clip, train_json, image_root, proposals_dir, self.targets_dir, self.tcfg, progress=_progress))}

    def prepare_training(self) -> None:
        """The cheap proposals and distillation targets of the training subset, computed once
        (kept under --root) when a cell first needs them: a summary never does."""
        for folder, fn in self.stages.values():
            Timed(folder)(fn, done=(folder / "timing.json").is_file())

    def stage_seconds(self) -> dict[str, float]:
        """Measured seconds of the shared stages that have run."""
        return {name: round(json.loads((folder / "timing.json").read_text())["seconds"])
                for name, (folder, _) in self.stages.items() if (folder / "timing.json").is_file()}

    # ------------------------------------------------------------------ the teacher

    @functools.cached_property
    def teacher_sha(self) -> str:
        from ovd.training.compress import teacher_weights_sha256

        sha = teacher_weights_sha256(self.args.teacher)
        if sha is None:
            raise SystemExit(f"--teacher {self.args.teacher}: no weights (an export folder or a training "
                             "folder with model_final.pth)")
        return sha

    @functools.cached_property
    def text(self) -> torch.Tensor:
        from detectron2.data import MetadataCatalog

        from ovd.training.compress import teacher_config

        names = list(MetadataCatalog.get(f"synth_{self.args.split}").thing_classes)
        return self.clip.text_embeddings(names, teacher_config(self.args.teacher).MODEL.OVD.PROMPT_TEMPLATE)

    def teacher_cell(self) -> dict:
        """The teacher's metrics on the split (deterministic: one cell, seed 0)."""
        from ovd.training.compress import load_teacher, teacher_config

        recipe = recipe_digest({"teacher": self.teacher_sha, "split": self.args.split,
                                "world": self.world["fingerprint"]})
        cell = self.store.get(self.args.split, "teacher", 0, recipe)
        if cell is not None:
            return cell["metrics"]
        model = load_teacher(self.args.teacher)
        metrics = self.evaluate(model, teacher_config(self.args.teacher), self.root / "teacher_eval")
        metrics["params_m"] = round(sum(q.numel() for q in model.parameters()) / 1e6, 2)
        self.put("teacher", 0, recipe, metrics, label=f"teacher ({Path(self.args.teacher).name})")
        return metrics

    # ------------------------------------------------------------------ cells

    def recipe(self, s: Student, seed: int, iters: int, split: str | None = None) -> str:
        return recipe_digest({
            "student": {**asdict(s), "light_ml_zero_init": self.zero_init_of(s)},
            "seed": seed, "split": split or self.args.split, "iters": iters,
            "train_images": self.args.train_images, "world": self.world["fingerprint"],
            "clip": self.clip.manifest["weights"]["sha256"], "teacher": self.teacher_sha,
            "student_config": self.student_recipe,
            "proposals": without_neutral(asdict(self.pcfg)), "targets": asdict(self.tcfg)})

    @functools.cached_property
    def student_cfg(self):
        """The student's Detectron2 config as `train_student` starts from it: its YAML with
        every _BASE_ merged and the pipeline config's detector opts (e.g. the distillation
        weight). Built once: every cell's recipe reads it."""
        from ovd.training.train_detector import build_config

        return build_config(self.args.student_config, list((self.cfg.get("detector") or {}).get("opts", [])))

    @functools.cached_property
    def student_recipe(self) -> dict:
        """`student_cfg`, parsed (a change to the teacher's base YAML thus makes the cells stale too)."""
        config = yaml.safe_load(self.student_cfg.dump())
        # Each row's Light-ML form is in its recipe (zero_init_of), so setting the config's
        # ZERO_INIT to the val choice leaves every other row's cells current.
        del config["MODEL"]["KD"]["LIGHT_ML"]["ZERO_INIT"]
        return config

    def zero_init_of(self, s: Student) -> bool:
        """The Light-ML form a row trains with: its own, or (the `all` row) the config's."""
        return self.config_zero_init if s.light_ml_zero_init is None else s.light_ml_zero_init

    def model_dir(self, s: Student, seed: int, iters: int) -> Path:
        return self.root / f"students_{self.args.train_images}x{iters}" / s.key / f"seed{seed}"

    def row_name(self, s: Student, iters: int) -> str:
        images = self.args.train_images
        return s.key if (images, iters) == TABLE_SCHEDULE else f"{s.key}_{images}x{iters}"

    def cell(self, s: Student, seed: int, iters: int | None = None, *, need_model: bool = False) -> dict | None:
        """Metrics of one cell, trained and evaluated unless stored; None when --max-cells is spent.
        need_model: the trained model must be on disk too (a stored cell without it, e.g. from
        another machine, is trained and measured again, and the new measurement replaces it)."""
        iters = iters or self.args.iters
        row, recipe = self.row_name(s, iters), self.recipe(s, seed, iters)
        cell = self.store.get(self.args.split, row, seed, recipe)
        if cell is not None and (not need_model or final_weights(self.model_dir(s, seed, iters)).is_file()):
            return cell["metrics"]
        if self.args.max_cells is not None and self.new_cells >= self.args.max_cells:
            return None
        logger.info("cell %s/%s seed %d (%d iterations)", self.args.split, row, seed, iters)
        out = self.model_dir(s, seed, iters)
        self.prepare_training()
        seconds, _ = Timed(out)(lambda: train_student(s, self, out, iters, seed), done=final_weights(out).is_file())
        model = load_student(out)
        from ovd.training.train_detector import build_config

        metrics = self.evaluate(model, build_config(out / "config.yaml"), out / f"eval_{self.args.split}")
        metrics.update(params_m=round(sum(q.numel() for q in model.parameters()) / 1e6, 2),
                       train_seconds=round(seconds))
        self.put(row, seed, recipe, metrics, label=s.label, iters=iters)
        return metrics

    def put(self, row: str, seed: int, recipe: str, metrics: dict, **info) -> None:
        path = self.store.put(self.args.split, row, seed, recipe, metrics, machine=host_line(),
                              train_images=self.args.train_images, **info)
        self.new_cells += 1
        if self.args.commit:
            commit_cell(path, f"compress_students cell {self.args.split}/{row} seed {seed}")

    def evaluate(self, model, dcfg, out: Path) -> dict:
        from ovd.training.evaluate import evaluate

        result = evaluate(dcfg, model, f"synth_{self.args.split}", self.text, out)
        return {**flat_metrics(result), "aps_all": round(float(result["all"]["APs"]), 3)}

    def run_select(self) -> None:
        self.teacher_cell()
        for seed in SELECTION_SEEDS:
            for key in SELECTION_ROWS:
                if self.cell(BY_KEY[key], seed) is None:
                    return
        if conflict := self.light_ml_conflict():  # the results are still written; report and budget stop
            logger.warning(conflict)

    def light_ml_conflict(self) -> str | None:
        """What to change when the val choice of the Light-ML form and the student config
        disagree, else None (also while the choice is pending)."""
        chosen = self.light_ml_choice()["zero_init"]
        if chosen is None or chosen == self.config_zero_init:
            return None
        return (f"val chose Light-ML ZERO_INIT {chosen}, but {self.args.student_config} says {not chosen}: "
                f"set MODEL.KD.LIGHT_ML.ZERO_INIT {chosen} there before the student config's rows")

    def check_student_config(self) -> bool:
        """True when the val selection is complete and the student config follows it; stops
        with the fix when it does not (the `all` row and the budget curve train that config)."""
        if self.light_ml_choice()["zero_init"] is None:
            logger.warning("the Light-ML form is not chosen on val yet (`--phase select --split val`): "
                           "the student config's rows wait")
            return False
        if conflict := self.light_ml_conflict():
            raise SystemExit(conflict)
        return True

    def run_report(self) -> None:
        self.teacher_cell()
        config_ready = self.check_student_config()
        for seed in range(CONTRAST_SEEDS):  # seed-major: an early stop still leaves paired rows
            for s in STUDENTS:
                if s.light_ml_zero_init is None and not config_ready:
                    continue
                if s.key in self.args.students and seed in seeds_of(s.key) and self.cell(s, seed) is None:
                    return

    def run_budget(self) -> None:
        self.teacher_cell()
        if not self.check_student_config():
            return
        for seed in range(OTHER_SEEDS):
            for iters in BUDGETS:
                if self.cell(BY_KEY["all"], seed, iters) is None:
                    return

    def run_latency(self) -> None:
        """Every row's student (its lowest trained seed on disk) and the teacher, timed in one
        loop; written as a cell of its own (row "latency")."""
        from ovd.training.compress import load_teacher

        models, seeds = {"teacher": load_teacher(self.args.teacher)}, {}
        for s in STUDENTS:
            for seed in seeds_of(s.key):
                out = self.model_dir(s, seed, self.args.iters)
                if final_weights(out).is_file():
                    models[s.key], seeds[s.key] = load_student(out), seed
                    break
        missing = [s.key for s in STUDENTS if s.key not in models]
        if missing:
            logger.warning("latency: no trained student on disk for %s (train the report cells first)", missing)
        inputs = [{"image": torch.as_tensor(image.transpose(2, 0, 1).copy()), "height": image.shape[0],
                   "width": image.shape[1]} for image in self.split_images(self.args.latency_images)]
        ms = time_calls({k: functools.partial(lambda m, x: m([x], text=self.text), m) for k, m in models.items()},
                        inputs, self.args.latency_repeats)
        metrics = {f"{k}_ms": round(v, 2) for k, v in ms.items()}
        recipe = recipe_digest({"rows": sorted(models), "teacher": self.teacher_sha, "when": time.time()})
        self.put("latency", 0, recipe, metrics, seeds=seeds, images=self.args.latency_images,
                 repeats=self.args.latency_repeats, machine_info=host_info())

    def on_images(self, images: int) -> Bench:
        """This run, or one like it on the first `images` training images (cells and models
        of every schedule are named by their images, so the two never share a file)."""
        return self if images == self.args.train_images else Bench(
            argparse.Namespace(**{**vars(self.args), "train_images": images, "max_cells": None}))

    @functools.cached_property
    def table_schedule(self) -> Bench:
        """A Bench on the table's schedule (TABLE_SCHEDULE), where the Light-ML form is chosen."""
        return self.on_images(TABLE_SCHEDULE[0])

    @functools.cached_property
    def ship_schedule(self) -> tuple[Bench, int]:
        """The shipped student's schedule: a Bench on --ship-images training images (default
        all of them, the teacher's data) and --ship-iters iterations (default the student
        config's, the teacher's schedule)."""
        ann = self.front.world_dir / "detection" / "annotations" / "train_base.json"
        images = self.args.ship_images or len(json.loads(ann.read_text())["images"])
        iters = self.args.ship_iters or int(self.student_cfg.SOLVER.MAX_ITER)
        return self.on_images(images), iters

    def split_images(self, n: int) -> list:
        """The first n images of the split, (H, W, 3) uint8 RGB."""
        from detectron2.data import DatasetCatalog
        from detectron2.data import detection_utils as utils

        return [utils.read_image(rec["file_name"], format="RGB")
                for rec in DatasetCatalog.get(f"synth_{self.args.split}")[:n]]

    def run_ship(self) -> None:
        """The student worth shipping: the student config (seed 0) trained on --ship-images
        training images for --ship-iters iterations (default: the teacher's data and schedule),
        exported with float16 weights to --ship-out, and judged against the teacher on test,
        both as the files a deployment runs: AP of each export (`ovd eval --export`'s path) and
        the latency of `ovd.Detector` calls (every test image with all 20 names, the two models
        alternating in one loop). Writes <results>/compress_student.json."""
        from detectron2.data import MetadataCatalog

        import ovd
        from ovd.models.runtime import load_runtime
        from ovd.training.evaluate import evaluate_runtime
        from ovd.training.export import export_detector

        if self.args.split != "test":
            raise SystemExit("--phase ship reports on test: drop --split val")
        if not self.check_student_config():
            return
        ship, iters = self.ship_schedule
        images = ship.args.train_images
        student = BY_KEY["all"]
        if ship.cell(student, 0, iters, need_model=True) is None:
            return
        out = Path(self.args.ship_out)
        export_detector(ship.model_dir(student, 0, iters), out, name="ovd-synthetic-student",
                        version="0.1.0", dtype="float16")
        exports = {"teacher": Path(self.args.teacher), "student": out}
        ap = {k: flat_metrics(evaluate_runtime(load_runtime(folder), "synth_test", self.root / f"ship_eval_{k}"))
              for k, folder in exports.items()}
        detectors = {k: ovd.Detector.load(folder) for k, folder in exports.items()}
        names = list(MetadataCatalog.get("synth_test").thing_classes)
        ms = time_calls({k: functools.partial(lambda d, image: d(image, names), d) for k, d in detectors.items()},
                        self.split_images(self.args.latency_images), self.args.latency_repeats)
        loss = 1 - ap["student"]["ap_all"] / ap["teacher"]["ap_all"]
        ratio = ms["student"] / ms["teacher"]
        report = {
            "command": " ".join([Path(sys.executable).name, *sys.argv]), "machine": host_line(),
            "machine_info": host_info(), "date": time.strftime("%Y-%m-%d"), "split": "test",
            "train_images": images, "iters": iters, "seed": 0, "export": str(out),
            "teacher": str(self.args.teacher), "ap": ap,
            "latency_ms": {k: round(v, 2) for k, v in ms.items()},
            "latency": {"images": self.args.latency_images, "repeats": self.args.latency_repeats,
                        "names": len(names), "call": "ovd.Detector(image, names), models alternating"},
            "relative_ap_loss": round(loss, 4), "latency_ratio": round(ratio, 3),
            "params_m": {k: round(sum(q.numel() for q in d.runtime.model.parameters()) / 1e6, 2)
                         for k, d in detectors.items()},
            "meets": {"ap": loss <= SHIP_MAX_AP_LOSS, "latency": ratio <= SHIP_MAX_LATENCY_RATIO},
            "bar": {"max_relative_ap_loss": SHIP_MAX_AP_LOSS, "max_latency_ratio": SHIP_MAX_LATENCY_RATIO},
        }
        path = Path(self.args.results) / "compress_student.json"
        path.write_text(json.dumps(report, indent=2) + "\n")
        logger.info("shipped student %s: AP all %.1f vs teacher %.1f (%.1f%% loss), latency %.1f vs %.1f ms "
                    "(%.2fx) -> %s", out, ap["student"]["ap_all"], ap["teacher"]["ap_all"], 100 * loss,
                    ms["student"], ms["teacher"], ratio, path)

    # ------------------------------------------------------------------ tables

    def stored_row(self, s: Student, iters: int, seeds, split: str | None = None) -> dict[int, dict]:
        row, split = self.row_name(s, iters), split or self.args.split
        return {k: c["metrics"] for k in seeds
                if (c := self.store.get(split, row, k, self.recipe(s, k, iters, split))) is not None}

    def light_ml_choice(self) -> dict:
        """The val selection of the Light-ML form: per row its val summary, and the chosen
        zero-init flag (None while a cell is missing)."""
        table = self.table_schedule  # the choice is made there, whatever schedule this run trains
        rows = {key: table.stored_row(BY_KEY[key], TABLE_SCHEDULE[1], SELECTION_SEEDS, "val") for key in SELECTION_ROWS}
        out: dict = {"rows": {k: summarise_row(v) for k, v in rows.items() if v}, "zero_init": None}
        if all(len(v) == len(SELECTION_SEEDS) for v in rows.values()):
            mean = {k: sum(m["ap_all"] for m in v.values()) / len(v) for k, v in rows.items()}
            out["zero_init"] = BY_KEY[max(mean, key=mean.get)].light_ml_zero_init
        return out

    @property
    def config_zero_init(self) -> bool:
        return bool(self.student_cfg.MODEL.KD.LIGHT_ML.ZERO_INIT)

    def summary(self) -> dict:
        teacher = self.store.get(self.args.split, "teacher", 0, recipe_digest(
            {"teacher": self.teacher_sha, "split": self.args.split, "world": self.world["fingerprint"]}))
        latency_path = self.store.path(self.args.split, "latency", 0)
        latency = json.loads(latency_path.read_text()) if latency_path.is_file() else None
        rows = {}
        for s in STUDENTS:
            per_seed = self.stored_row(s, self.args.iters, seeds_of(s.key))
            if per_seed:
                rows[s.key] = {"label": s.label, **summarise_row(per_seed)}
                if latency and f"{s.key}_ms" in latency["metrics"] and "teacher_ms" in latency["metrics"]:
                    rows[s.key]["latency_ratio"] = round(
                        latency["metrics"][f"{s.key}_ms"] / latency["metrics"]["teacher_ms"], 3)
        contrasts = {}
        for name, a, b in SUMMARY_CONTRASTS:
            if a in rows and b in rows:
                contrasts[name] = {"a": a, "b": b, **contrast_of(rows[a], rows[b])}
        budget = {}
        for iters in BUDGETS:
            per_seed = self.stored_row(BY_KEY["all"], iters, range(OTHER_SEEDS))
            if per_seed:
                budget[str(iters)] = summarise_row(per_seed)
        # The KD terms at the shipped student's schedule: its row (`all`, seed 0 is the shipped
        # model) against the student without KD, trained like it (`--train-images 600 --iters
        # 900 --students no_kd all`).
        ship, ship_iters = self.ship_schedule
        at_ship = {}
        for key in ("no_kd", "all"):
            if per_seed := ship.stored_row(BY_KEY[key], ship_iters, seeds_of(key)):
                at_ship[key] = {"label": BY_KEY[key].label, **summarise_row(per_seed)}
        if len(at_ship) == 2:
            if (contrast := contrast_of(at_ship["no_kd"], at_ship["all"]))["seeds"]:
                at_ship["contrast"] = {"a": "no_kd", "b": "all", **contrast}
        student = rows.get("all", {})
        shipped_path = Path(self.args.results) / "compress_student.json"
        shipped = json.loads(shipped_path.read_text()) if shipped_path.is_file() else None
        return {
            "command": " ".join([Path(sys.executable).name, *sys.argv]), "machine": host_line(),
            "date": time.strftime("%Y-%m-%d"), "split": self.args.split,
            "protocol": "training/protocol.py: paired seeds, mean and 95% Student-t CI per row; "
                        "per contrast the mean paired difference and its CI",
            "teacher": {"path": str(self.args.teacher), "metrics": teacher["metrics"] if teacher else None},
            "train_images": self.args.train_images, "iters": self.args.iters,
            "world": self.world["fingerprint"][:12], "stages_seconds": self.stage_seconds(),
            "light_ml_selection_val": self.light_ml_choice(),
            "latency": latency, "rows": rows, "contrasts": contrasts, "budget": budget,
            "at_ship_schedule": at_ship and {"train_images": ship.args.train_images, "iters": ship_iters, **at_ship},
            "student_config": {"ap_all": student.get("mean", {}).get("ap_all"),
                               "latency_ratio": student.get("latency_ratio")},
            # The shipped student (--phase ship): the student config at the teacher's schedule.
            "shipped_student": shipped and {
                k: shipped[k] for k in ("train_images", "iters", "seed", "date", "machine", "relative_ap_loss",
                                        "latency_ratio", "latency_ms", "meets", "bar")} | {
                "ap_all": {k: v["ap_all"] for k, v in shipped["ap"].items()}},
        }


def contrast_of(a: dict, b: dict) -> dict:
    """`paired_contrast` (B - A) of two summarised rows, over the seeds both have."""
    return paired_contrast(*({r["seed"]: r for r in row["seeds"]} for row in (a, b)), COLUMNS)


def train_student(s: Student, bench: Bench, out: Path, iters: int, seed: int) -> None:
    """Train one student with `ovd compress`'s trainer (Detectron2, resumable)."""
    from ovd.training.compress import launch_compression, prepare_student
    from ovd.training.layout import RunLayout
    from ovd.training.train_detector import detector_config

    dcfg = detector_config(bench.cfg, RunLayout.of(bench.cfg), config_file=bench.args.student_config)
    # Registered in this process by Bench; recorded so that the output folder exports
    # (`ovd export --model-dir`) and evaluates in a new process.
    dcfg.DATASETS.REGISTER = bench.datasets
    dcfg.DATASETS.TRAIN = (bench.train_dataset,)
    dcfg.DATASETS.DISTILL_TARGETS = str(bench.targets_dir)
    dcfg.MODEL.KD.TID.ENABLED = s.tid
    dcfg.MODEL.KD.CID.ENABLED = s.cid
    dcfg.MODEL.KD.CID.INSTANCE_NORMALISE = s.instance_normalise
    dcfg.MODEL.KD.LIGHT_ML.ENABLED = s.light_ml
    if s.light_ml_zero_init is not None:
        dcfg.MODEL.KD.LIGHT_ML.ZERO_INIT = s.light_ml_zero_init
    dcfg.SOLVER.MAX_ITER = iters
    dcfg.SOLVER.STEPS = tuple(int(iters * f) for f in (2 / 3, 8 / 9))
    dcfg.SOLVER.WARMUP_ITERS = min(dcfg.SOLVER.WARMUP_ITERS, max(iters // 6, 1))
    dcfg.SOLVER.CHECKPOINT_PERIOD = max(iters // 3, 1)
    dcfg.SEED = seed  # initialisation and data order: the pairing of seeds across rows
    dcfg.OUTPUT_DIR = str(out)
    launch_compression(prepare_student(dcfg, bench.clip, bench.args.teacher))


def load_student(out: Path):
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    from ovd.training.train_detector import build_config

    dcfg = build_config(out / "config.yaml")
    dcfg.MODEL.KD.TEACHER = ""  # inference needs no teacher
    dcfg.MODEL.OVD.TRAIN_TEXT_EMBEDDINGS = ""  # nor the training vocabulary (text comes per call)
    model = build_model(dcfg)
    DetectionCheckpointer(model).load(str(final_weights(out)))
    return model.eval()


@torch.inference_mode()
def time_calls(calls: dict, inputs: list, repeats: int) -> dict[str, float]:
    """Median milliseconds of one call per input, per named callable.

    Each repeat times every callable over the same inputs in turn (after one untimed warm-up
    pass over two inputs each), so load from other processes falls on all of them alike and
    the ratios hold.
    """
    times: dict[str, list[float]] = {k: [] for k in calls}
    for call in calls.values():
        for x in inputs[:2]:
            call(x)
    for _ in range(repeats):
        for key, call in calls.items():
            for x in inputs:
                t0 = time.perf_counter()
                call(x)
                times[key].append(1000 * (time.perf_counter() - t0))
    return {k: statistics.median(v) for k, v in times.items()}


def _cell_text(row: dict, key: str) -> str:
    mean, (lo, hi) = row["mean"][key], row["ci95"][key]
    return f"{mean:.1f}" if len(row["seeds"]) < 2 else f"{mean:.1f} [{lo:.1f}, {hi:.1f}]"


def format_report(r: dict) -> str:
    teacher = r["teacher"]["metrics"]
    lines = ["# Compressing the open-vocabulary detector (TID, CID, Light-ML) under the protocol", "",
             f"Command: `{r['command']}`  ", f"Machine: {r['machine']}  ", f"Date: {r['date']}  ",
             f"Split: {r['split']}. Protocol: {r['protocol']}.  ",
             f"Teacher: `{r['teacher']['path']}`. Students: {r['iters']} iterations (batch 4, 256 px) on "
             f"the first {r['train_images']} base-annotated training images of world {r['world']}; "
             "metrics in % (generalized over all classes, pycocotools), mean [95% CI] over seeds.", "",
             "| row | n | " + " | ".join(COLUMNS) + " | / teacher latency | params (M) | training (s) |",
             "|---|---|" + "---|" * len(COLUMNS) + "---|---|---|"]
    if teacher:
        lines.append("| teacher | 1 | " + " | ".join(f"{teacher.get(k, float('nan')):.1f}" for k in COLUMNS)
                     + f" | 1.00 | {teacher.get('params_m', '—')} | — |")
    for row in r["rows"].values():
        ratio = row.get("latency_ratio")
        lines.append(f"| {row['label']} | {len(row['seeds'])} | " + " | ".join(_cell_text(row, k) for k in COLUMNS)
                     + f" | {'—' if ratio is None else f'{ratio:.2f}'} | {row['mean'].get('params_m', '—')} | "
                     f"{row['mean'].get('train_seconds', float('nan')):.0f} |")
    if r["contrasts"]:
        lines += ["", "Contrasts (B - A, paired over seeds; a claim only where the CI excludes 0):", "",
                  "| contrast | seeds | AP all | APs all | AP50 novel |", "|---|---|---|---|---|"]
        for name, c in r["contrasts"].items():
            cells = [verdict(c["diff_mean"][k], tuple(c["diff_ci95"][k])) for k in ("ap_all", "aps_all", "ap50_novel")]
            lines.append(f"| {name} ({c['b']} - {c['a']}) | {len(c['seeds'])} | " + " | ".join(cells) + " |")
    sel = r.get("light_ml_selection_val") or {}
    if sel.get("rows"):
        lines += ["", "Light-ML form of the student config, chosen on val by mean AP all "
                  f"(zero-init: {sel['zero_init']}):", "", "| row | n | AP all | AP50 all |", "|---|---|---|---|"]
        for key, row in sel["rows"].items():
            lines.append(f"| {key} | {len(row['seeds'])} | {_cell_text(row, 'ap_all')} | {_cell_text(row, 'ap50_all')} |")
    if r["budget"]:
        lines += ["", "Student config vs training iterations (the budget curve):", "",
                  "| iterations | n | AP all | AP50 all | relative AP loss vs teacher |", "|---|---|---|---|---|"]
        for iters, row in r["budget"].items():
            loss = (f"{100 * (1 - row['mean']['ap_all'] / teacher['ap_all']):.1f}%"
                    if teacher and teacher.get("ap_all") else "—")
            lines.append(f"| {iters} | {len(row['seeds'])} | {_cell_text(row, 'ap_all')} | {_cell_text(row, 'ap50_all')} | {loss} |")
    if ship := r.get("shipped_student"):
        lines += ["", f"The shipped student (`--phase ship`, {ship['date']}, {ship['machine']}): the student "
                  f"config on {ship['train_images']} images x {ship['iters']} iterations (seed {ship['seed']}), "
                  f"float16 export: AP all {ship['ap_all']['student']:.1f} vs the teacher's "
                  f"{ship['ap_all']['teacher']:.1f} (relative loss {100 * ship['relative_ap_loss']:.1f}%, bar "
                  f"{100 * ship['bar']['max_relative_ap_loss']:.0f}%), latency {ship['latency_ms']['student']:.0f} vs "
                  f"{ship['latency_ms']['teacher']:.0f} ms ({ship['latency_ratio']:.2f}x, bar "
                  f"{ship['bar']['max_latency_ratio']:.1f}x); benchmarks/results/compress_student.json."]
    if at := r.get("at_ship_schedule"):
        lines += ["", f"At the shipped student's schedule ({at['train_images']} images x {at['iters']} iterations), "
                  "what the distillation terms buy:", "",
                  "| row | n | AP50 novel | AP50 base | AP50 all | AP all | APs all |", "|---|---|---|---|---|---|---|"]
        for key in ("no_kd", "all"):
            if row := at.get(key):
                lines.append(f"| {row['label']} | {len(row['seeds'])} | " + " | ".join(
                    _cell_text(row, k) for k in ("ap50_novel", "ap50_base", "ap50_all", "ap_all", "aps_all")) + " |")
        if c := at.get("contrast"):
            lines.append("")
            lines.append(f"TID + CID + Light-ML over no KD, {len(c['seeds'])} paired seed(s): " + "; ".join(
                f"{k} {verdict(c['diff_mean'][k], tuple(c['diff_ci95'][k]))}" for k in ("ap_all", "aps_all", "ap50_novel"))
                + ".")
    if r["latency"]:
        lat = r["latency"]
        lines += ["", f"Latency ({lat['finished']}, {lat.get('machine', '')}): median of {lat['repeats']} x "
                  f"{lat['images']} single-image calls, every model in one loop: "
                  + ", ".join(f"{k[:-3]} {v:.1f} ms" for k, v in lat["metrics"].items()) + "."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
