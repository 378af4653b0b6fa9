#!/usr/bin/env python
"""Compression on the synthetic world: what do TID, CID and Light-ML buy a small student?

    .venv/bin/python benchmarks/compress_students.py          # the committed table (~50 min, 2 cores)
    .venv/bin/python benchmarks/compress_students.py --iters 20 --train-images 16 \
        --latency-images 4 --root /tmp/cb --results /tmp/cb/results        # a quick check

Rows (one teacher; every student has the same network, data and schedule, only the named
distillation terms change; each student row is trained once per --seeds value, so that a
difference between rows can be set against the spread between seeds):

    teacher                       the shipped detector (artifacts/default, R18-FPN, 13.9M
                                  parameters), evaluated only
    student, no KD                configs/compress/synthetic_student_r18_narrow.yaml with TID,
                                  CID and Light-ML off: base boxes + EZSD region distillation
    student + TID                 + task-integrated FPN feature imitation
    student + CID                 + centerness-weighted logit and box-delta distillation
    student + CID + Light-ML      + task-wise mutual lifting in the box head
    student + TID + CID + Light-ML  all three (the config's default)
    ... zero-init gains           a diagnostic: CID + Light-ML whose lifts start at 0
    all three, zero-init gains    what configs/compress/synthetic_student_r18_narrow.yaml trains

Columns: generalized AP50 on synth_val (novel / base / all, means over seeds, and each seed's
AP50 all), AP (IoU 0.5:0.95) and AP on small objects (COCO "small", < 32^2 px) over all
classes, inference latency per image (median over repeated single-image `model(inputs,
text=T)` calls on val images, every model timed in the same loop so that other load on the
machine hits them alike) and its ratio to the teacher's, parameter count, and the wall time of
a training run.

Shared stages come from the pipeline root (`ovd pipeline` writes them; computed here when
absent): the world, the pretrained CLIP and the re-normalised CLIP, which must be the CLIP the
teacher was trained with (its sha256 is in the teacher's manifest). The students train on the
first --train-images base-annotated images, with distillation targets from cheap-mode CLIP
proposals on those images; everything computed goes under --root and is reused on a rerun
(stored wall times are reported with "(cached)").

Writes <results>/compress_students.{md,json}; a hand-written "## Analysis" section of the .md
survives a rerun.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

import torch  # noqa: E402
from host_info import host_info, host_line  # noqa: E402
from training_bench import Timed, pipeline_front, setup_logging, subset_json, write_markdown  # noqa: E402

from ovd.training.layout import final_weights  # noqa: E402

logger = logging.getLogger("bench")


@dataclass(frozen=True)
class Student:
    """One student row: which distillation terms are on."""

    key: str
    label: str
    tid: bool
    cid: bool
    light_ml: bool
    light_ml_zero_init: bool = False


STUDENTS = [
    Student("no_kd", "student, no KD", False, False, False),
    Student("tid", "student + TID", True, False, False),
    Student("cid", "student + CID", False, True, False),
    Student("cid_lightml", "student + CID + Light-ML", False, True, True),
    Student("all", "student + TID + CID + Light-ML", True, True, True),
    # Not a row of the issue: Light-ML whose lifts start at 0 (MODEL.KD.LIGHT_ML.ZERO_INIT), a
    # diagnostic of why the paper's form did not help here (see the analysis).
    Student("cid_lightml_zero", "student + CID + Light-ML, zero-init gains (diagnostic)", False, True,
            True, light_ml_zero_init=True),
    Student("all_zero", "student + TID + CID + Light-ML, zero-init gains (the student config)", True,
            True, True, light_ml_zero_init=True),
]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(REPO / "configs" / "synthetic.yaml"),
                   help="pipeline config (world, CLIP and stage settings)")
    p.add_argument("--pipeline-root", default=None, help="shared stages (default: the config's root)")
    p.add_argument("--teacher", default=str(REPO / "artifacts" / "default"),
                   help="the teacher: an export folder or a training output folder")
    p.add_argument("--student-config", default=str(REPO / "configs" / "compress" /
                                                   "synthetic_student_r18_narrow.yaml"))
    p.add_argument("--root", default="runs/bench/compress", help="this benchmark's outputs")
    p.add_argument("--results", default=str(REPO / "benchmarks" / "results"))
    p.add_argument("--train-images", type=int, default=200)
    p.add_argument("--iters", type=int, default=300, help="training iterations per student")
    p.add_argument("--latency-images", type=int, default=20, help="val images timed per model")
    p.add_argument("--latency-repeats", type=int, default=5, help="passes over them per model")
    p.add_argument("--students", nargs="*", default=[s.key for s in STUDENTS])
    p.add_argument("--seeds", nargs="*", type=int, default=[0, 1],
                   help="each student is trained once per seed; the table shows the mean and each "
                        "seed's AP50, so a difference can be set against the seed-to-seed spread")
    args = p.parse_args(argv)
    setup_logging()

    from ovd.training.compress import load_teacher, teacher_clip_sha256, teacher_config
    from ovd.training.data.coco_format import register_ov_dataset
    from ovd.training.data.synthetic import world_datasets
    from ovd.training.progress import progress as _progress
    from ovd.training.proposals import ProposalConfig, run_proposals
    from ovd.training.targets import TargetsConfig, run_targets
    from ovd.training.train_detector import build_config

    t_start = time.time()
    machine = host_info()
    cfg, front = pipeline_front(args.config, args.pipeline_root)
    root = Path(args.root)
    results_dir = Path(args.results)
    results_dir.mkdir(parents=True, exist_ok=True)

    world, _ = front.world()
    clip = front.renorm(front.clip(world)[0])[0]
    want = teacher_clip_sha256(args.teacher)
    have = clip.manifest["weights"]["sha256"]
    if want and want != have:
        raise SystemExit(f"the teacher {args.teacher} was trained with CLIP {want[:12]}, but the "
                         f"pipeline's re-normalised CLIP is {have[:12]}: point --pipeline-root at "
                         "the stages that made the teacher")

    ann = front.world_dir / "detection" / "annotations"
    image_root = front.world_dir / "detection" / "train"
    train_json = subset_json(ann / "train_base.json", root / "data" / "train_base.json", args.train_images)
    register_ov_dataset("bench_train", train_json, image_root, overwrite=True)
    datasets = [f"{name}={json_file}:{folder}" for name, (json_file, folder) in
                {**world_datasets(front.world_dir), "bench_train": (train_json, image_root)}.items()]

    # EZSD distillation targets for the students: cheap CLIP proposals (the teacher's recipe).
    stage_seconds: dict[str, tuple[float, bool]] = {}
    pcfg = ProposalConfig.from_dict({**(cfg.get("proposals") or {}), "mode": "cheap"})
    proposals_dir, targets_dir = root / "proposals", root / "targets"
    stage_seconds["proposals (cheap)"] = Timed(proposals_dir)(
        lambda: run_proposals(clip, train_json, image_root, proposals_dir, pcfg, progress=_progress),
        done=(proposals_dir / "timing.json").is_file())
    stage_seconds["targets"] = Timed(targets_dir)(
        lambda: run_targets(clip, train_json, image_root, proposals_dir, targets_dir,
                            TargetsConfig.from_config(cfg), progress=_progress),
        done=(targets_dir / "timing.json").is_file())

    from detectron2.data import MetadataCatalog

    names = list(MetadataCatalog.get("synth_val").thing_classes)
    teacher = load_teacher(args.teacher)
    text = clip.text_embeddings(names, teacher_config(args.teacher).MODEL.OVD.PROMPT_TEMPLATE)
    models = {"teacher": teacher}
    rows = [{"key": "teacher", "label": f"teacher ({Path(args.teacher).name})", "seeds": [],
             "seconds": None, "cached": False,
             **_metrics([_evaluate_once(teacher, text, root / "teacher_eval", teacher_config(args.teacher))])}]
    for s in (s for s in STUDENTS if s.key in args.students):
        runs, seconds, cached = [], [], []
        for seed in args.seeds:
            logger.info("student %s, seed %d: %s", s.key, seed, s.label)
            out = root / "students" / f"{s.key}-seed{seed}"
            sec, was_cached = Timed(out)(lambda s=s, out=out, seed=seed: train_student(
                s, cfg, clip, args.teacher, args.student_config, targets_dir, datasets, out,
                args.iters, seed),
                done=final_weights(out).is_file())
            model = load_student(out)
            if seed == args.seeds[0]:
                models[s.key] = model  # the first seed's student is the one timed
            runs.append(_evaluate_once(model, text, out / "eval", build_config(out / "config.yaml")))
            seconds.append(sec)
            cached.append(was_cached)
        rows.append({"key": s.key, "label": s.label, "seeds": list(args.seeds),
                     "seconds": round(statistics.mean(seconds), 1), "cached": all(cached),
                     **_metrics(runs)})

    latency = measure_latency(models, text, args.latency_images, args.latency_repeats)
    for row in rows:
        model = models[row["key"]]
        row["params_m"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 2)
        row["latency_ms"] = round(latency[row["key"]], 1)
        row["latency_ratio"] = round(latency[row["key"]] / latency["teacher"], 2)

    report = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": host_line(machine),
        "load_avg_1m_at_start": machine["load_avg_1m_at_start"],
        "date": time.strftime("%Y-%m-%d"),
        "teacher": str(args.teacher),
        "train_images": args.train_images,
        "iters": args.iters,
        "seeds": list(args.seeds),
        "latency": {"images": args.latency_images, "repeats": args.latency_repeats,
                    "classes": len(names), "batch": 1},
        "stages": {k: {"seconds": round(s, 1), "cached": c} for k, (s, c) in stage_seconds.items()},
        "rows": rows,
        "total_seconds_this_run": round(time.time() - t_start, 1),
    }
    (results_dir / "compress_students.json").write_text(json.dumps(report, indent=2))
    text_report = format_report(report)
    write_markdown(results_dir / "compress_students.md", text_report)
    print(text_report)
    return 0


def train_student(s: Student, cfg: dict, clip, teacher: str, student_config: str, targets_dir: Path,
                  datasets: list[str], out: Path, iters: int, seed: int) -> None:
    """Train one student of a row with `ovd compress`'s trainer (Detectron2, resumable)."""
    from ovd.training.compress import launch_compression, prepare_student
    from ovd.training.layout import RunLayout
    from ovd.training.train_detector import detector_config

    dcfg = detector_config(cfg, RunLayout.of(cfg), config_file=student_config)
    # Registered in this process by main(); recorded so that the output folder exports
    # (`ovd export --model-dir`) and evaluates in a new process.
    dcfg.DATASETS.REGISTER = datasets
    dcfg.DATASETS.TRAIN = ("bench_train",)
    dcfg.DATASETS.DISTILL_TARGETS = str(targets_dir)
    dcfg.MODEL.KD.TID.ENABLED = s.tid
    dcfg.MODEL.KD.CID.ENABLED = s.cid
    dcfg.MODEL.KD.LIGHT_ML.ENABLED = s.light_ml
    dcfg.MODEL.KD.LIGHT_ML.ZERO_INIT = s.light_ml_zero_init
    dcfg.SOLVER.MAX_ITER = iters
    dcfg.SOLVER.STEPS = tuple(int(iters * f) for f in (2 / 3, 8 / 9))
    dcfg.SOLVER.WARMUP_ITERS = min(dcfg.SOLVER.WARMUP_ITERS, max(iters // 6, 1))
    dcfg.SOLVER.CHECKPOINT_PERIOD = max(iters // 3, 1)
    dcfg.SEED = seed
    dcfg.OUTPUT_DIR = str(out)
    dcfg = prepare_student(dcfg, clip, teacher)
    launch_compression(dcfg)


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


def _evaluate_once(model, text: torch.Tensor, out: Path, dcfg) -> dict:
    """synth_val metrics of a model (dcfg: its Detectron2 config), computed once and stored in
    out/metrics.json."""
    from ovd.training.evaluate import evaluate

    path = out / "metrics.json"
    if path.is_file():
        return json.loads(path.read_text())
    return evaluate(dcfg, model, "synth_val", text, out)


def _metrics(runs: list[dict]) -> dict:
    """Mean AP50 / AP / APs per group over runs (one per seed), and each run's AP50."""
    return {g: {**{k: round(statistics.mean(m[g][k] for m in runs), 1) for k in ("AP50", "AP", "APs")},
                "AP50_runs": [round(m[g]["AP50"], 1) for m in runs]}
            for g in ("novel", "base", "all")}


@torch.inference_mode()
def measure_latency(models: dict, text: torch.Tensor, n_images: int, repeats: int) -> dict[str, float]:
    """Median milliseconds of one single-image inference call per model.

    Each repeat times every model over the same val images in turn (after one untimed warm-up
    pass each), so load from other processes falls on all models alike and the ratios hold.
    """
    from detectron2.data import DatasetCatalog
    from detectron2.data import detection_utils as utils

    inputs = []
    for rec in DatasetCatalog.get("synth_val")[:n_images]:
        image = utils.read_image(rec["file_name"], format="RGB")
        inputs.append({"image": torch.as_tensor(image.transpose(2, 0, 1).copy()),
                       "height": image.shape[0], "width": image.shape[1]})
    times: dict[str, list[float]] = {k: [] for k in models}
    for model in models.values():
        for x in inputs[:2]:
            model([x], text=text)
    for _ in range(repeats):
        for key, model in models.items():
            for x in inputs:
                t0 = time.perf_counter()
                model([x], text=text)
                times[key].append(1000 * (time.perf_counter() - t0))
    return {k: statistics.median(v) for k, v in times.items()}


def format_report(r: dict) -> str:
    lat = r["latency"]
    lines = ["# Compressing the open-vocabulary detector (TID, CID, Light-ML)", "",
             f"Command: `{r['command']}`  ", f"Machine: {r['machine']}, load average "
             f"{r['load_avg_1m_at_start']:.1f} at start  ", f"Date: {r['date']}  ",
             f"Teacher: `{r['teacher']}`. Students: {r['iters']} iterations (batch 4, 256 px) on the "
             f"first {r['train_images']} base-annotated training images, same schedule, trained "
             f"once per seed ({', '.join(map(str, r['seeds']))}); evaluated on synth_val over all "
             "16 classes (generalized, pycocotools). AP columns are means over the seeds; the "
             "last AP50 column lists each seed's value.  ",
             f"Latency: median of {lat['repeats']} x {lat['images']} single-image calls "
             f"(256 px, {lat['classes']} classes, text embeddings cached, torch CPU) of the first "
             "seed's student, all models timed in one loop.", "",
             "| model | AP50 novel | AP50 base | AP50 all | AP all | APs all | AP50 all by seed | "
             "latency ms | / teacher | params | train (mean) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in r["rows"]:
        train = "—" if row["seconds"] is None else (
            f"{row['seconds'] / 60:.1f} min{' (cached)' if row['cached'] else ''}")
        by_seed = " / ".join(str(v) for v in row["all"]["AP50_runs"]) if row["seeds"] else "—"
        lines.append(f"| {row['label']} | {row['novel']['AP50']} | {row['base']['AP50']} | "
                     f"{row['all']['AP50']} | {row['all']['AP']} | {row['all']['APs']} | {by_seed} | "
                     f"{row['latency_ms']} | "
                     f"{row['latency_ratio']:.2f} | {row['params_m']}M | {train} |")
    lines += ["", "Stages computed for the students:", ""]
    for k, s in r["stages"].items():
        lines.append(f"- {k}: {s['seconds'] / 60:.1f} min{' (cached)' if s['cached'] else ''}")
    lines += ["", f"This run took {r['total_seconds_this_run'] / 60:.1f} min (cached parts excluded)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
