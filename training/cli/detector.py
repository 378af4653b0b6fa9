"""The detector's commands: `ovd train` (EZSD stage 4), `ovd compress` (TID, CID, Light-ML),
`ovd eval`, `ovd export` (stage 6) and `ovd detect` (an export over image files)."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from ovd.models.runtime import DEFAULT_SCORE_MODE, SCORE_MODES
from ovd.models.tiling import DEFAULT_TILES, TILE_MODES

from ..progress import progress
from .options import launcher, launcher_parent, run_of, run_parent

logger = logging.getLogger("ovd")


def cmd_train(args: argparse.Namespace) -> int:
    from ..train_detector import run_training

    cfg, layout = run_of(args)
    final = run_training(cfg, layout, clip=args.clip, targets=args.targets, distill=not args.no_distill,
                         vocabulary=args.vocabulary, config_file=args.detector_config, opts=args.opts or [],
                         out=args.out, resume=not args.restart, **launcher(args))
    logger.info("weights: %s", final)
    return 0


def cmd_compress(args: argparse.Namespace) -> int:
    from ..compress import run_compression

    cfg, layout = run_of(args)
    final, out = run_compression(cfg, layout, teacher=args.teacher, student_config=args.student_config,
                                 clip=args.clip, targets=args.targets, distill=not args.no_distill,
                                 opts=args.opts or [], out=args.out, resume=not args.restart,
                                 **launcher(args))
    logger.info("student weights: %s (export it with ovd export --model-dir %s)", final, out)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from ovd.models.registry import registered_or_path

    from ..data.dataset import dataset_of
    from ..evaluate import evaluate_folder, format_metrics

    cfg, layout = run_of(args)
    folder = registered_or_path(args.export) if args.export else Path(args.model_dir or layout.detector)
    result, out = evaluate_folder(folder, dataset=args.dataset, json_file=args.json, image_root=args.image_root,
                                  weights=args.weights, clip=args.clip, opts=args.opts or [], out=args.out,
                                  data=None if args.json else dataset_of(cfg, layout), backend=args.backend)
    print(format_metrics(result, f"generalized zero-shot detection, {folder.name}"))
    logger.info("metrics written to %s", out / "metrics.json")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from ovd.models.exported import verify_export

    from ..pipeline import export_identity, sample_images

    cfg, layout = run_of(args)
    images = None
    if args.onnx_images:
        from ovd.models.batch_detect import expand_inputs

        images = expand_inputs(args.onnx_images)
    elif args.onnx:
        images = sample_images(cfg, layout) or None  # the dataset's own images, when a run has one
    if args.from_export:  # an existing export folder: only the ONNX graphs are added
        if not args.onnx:
            raise ValueError("--from-export only adds ONNX graphs: give --onnx too")
        from ovd.models.onnx_export import export_onnx

        out = Path(args.out or args.from_export)
        manifest = export_onnx(args.from_export, out, images=images)
    else:
        from ..export import export_detector

        name, version = export_identity(cfg, layout)
        out = Path(args.out or layout.export)
        manifest = export_detector(args.model_dir or layout.detector, out, name=args.name or name,
                                   version=args.version or version, weights=args.weights, dtype=args.dtype)
        if args.onnx:
            from ovd.models.onnx_export import export_onnx

            export_onnx(out, images=images)
    if args.quantize:
        if not args.onnx:
            raise ValueError("--quantize makes int8 ONNX graphs: give --onnx too")
        from ..data.coco_format import load_coco_json
        from ..data.dataset import dataset_of
        from ..export import quantize_export

        data = dataset_of(cfg, layout)
        data.register()
        if data.val is None:
            raise ValueError("--quantize measures AP on the run's val split, and this run has none: "
                             "give the config's dataset: section a val_json")
        train = data.train
        calibration = [train.image_root / im["file_name"]
                       for im in load_coco_json(train.json_file)["images"][:args.quantize_images]]
        quantize_export(out, dataset=data.val_name, calibration=calibration, tolerance=args.quantize_tolerance)
    m = verify_export(out)
    logger.info("exported %s %s to %s (%d files verified; trained on %d classes)", m["name"],
                m["version"], out, len(m["files"]), len(m.get("trained_on", {}).get("classes", [])))
    logger.info("manifest: %s", manifest)
    return 0


def _box_argument(text: str) -> list[float]:
    try:
        box = [float(v) for v in text.split(",")]
    except ValueError:
        box = []
    if len(box) != 4:
        raise SystemExit(f"ovd detect: --example box {text!r} must be X1,Y1,X2,Y2 in pixels, e.g. 10,20,60,80")
    return box


def cmd_detect(args: argparse.Namespace) -> int:
    from ovd.models.api import Detector, Example
    from ovd.models.batch_detect import detect_files, expand_inputs

    if not args.classes and not args.example:
        raise SystemExit("ovd detect: give --classes, or --example IMAGE X1,Y1,X2,Y2 LABEL (or both)")
    examples = [Example(_box_argument(box), label, image=image) for image, box, label in args.example]
    files = expand_inputs(args.inputs)
    detector = Detector.load(args.model_dir, backend=args.backend)
    report = detect_files(detector, files, args.classes, examples=examples, threshold=args.threshold,
                          max_detections=args.max_detections, score_mode=args.score_mode,
                          nms_threshold=args.nms_threshold, class_agnostic=args.class_agnostic,
                          tiles=args.tiles, tile_overlap=args.tile_overlap, max_tiles=args.max_tiles,
                          max_candidates=args.max_candidates, batch_size=args.batch_size, coco=args.coco,
                          draw_dir=Path(args.draw) if args.draw else None,
                          progress=progress("detect", len(files)))
    text = json.dumps(report, indent=1)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
        found = len(report["annotations"]) if args.coco else sum(len(i["detections"]) for i in report["images"])
        logger.info("%d detections in %d images written to %s%s", found, len(files), args.out,
                    f"; drawn images in {args.draw}" if args.draw else "")
    else:
        print(text)
    skipped = report["info"]["skipped"] if args.coco else report["skipped"]
    if skipped:
        logger.error("%d of %d inputs could not be read and were skipped (listed under \"skipped\")",
                     len(skipped), len(files))
        return 3
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add train, compress, eval, export and detect to the `ovd` sub-command table."""
    trains = [run_parent(), launcher_parent()]
    p = sub.add_parser("train", parents=trains,
                       help="train the open-vocabulary detector (Detectron2, resumable)",
                       description="Train the EZSD detector: Faster R-CNN whose box head embeds "
                                   "regions into CLIP space, classified against text embeddings, "
                                   "with region distillation from `ovd targets`. A killed run "
                                   "resumes from its last checkpoint.")
    p.add_argument("--detector-config", default=None,
                   help="Detectron2 YAML (default: the config's detector.config)")
    p.add_argument("--clip", default=None, help="CLIP for the text embeddings (default: <root>/clip/renorm)")
    p.add_argument("--targets", default=None, help="`ovd targets` folder (default: <root>/targets)")
    p.add_argument("--no-distill", action="store_true", help="train without region distillation")
    p.add_argument("--vocabulary", choices=["base", "all"], default="base",
                   help="classes with boxes in training: base (open-vocabulary) or all (oracle)")
    p.add_argument("--out", default=None, help="output folder (default: <root>/detector)")
    p.add_argument("--restart", action="store_true", help="ignore an existing checkpoint")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="Detectron2 KEY VALUE overrides")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("compress", parents=trains,
                       help="distil a trained detector into a lighter student (resumable)",
                       description="Train a smaller open-vocabulary student (by default a "
                                   "half-width ResNet-18 with a 64-channel FPN) from a frozen "
                                   "teacher: the usual detection and EZSD region-distillation "
                                   "losses plus TID feature distillation and CID region-logit and "
                                   "box distillation, with Light-ML in the box head (MODEL.KD.*). "
                                   "A killed run resumes from its last checkpoint; the output "
                                   "folder exports with ovd export like a teacher's.")
    p.add_argument("--teacher", default=None,
                   help="trained teacher: a training output folder (config.yaml + model_final.pth) "
                        "or an export folder (default: <root>/detector)")
    p.add_argument("--student-config", default="configs/compress/synthetic_student_r18_narrow.yaml",
                   help="Detectron2 YAML of the student (the config's detector.opts apply too)")
    p.add_argument("--clip", default=None,
                   help="CLIP for the text embeddings (default: the teacher's; it must be the teacher's)")
    p.add_argument("--targets", default=None, help="`ovd targets` folder (default: <root>/targets)")
    p.add_argument("--no-distill", action="store_true", help="train without EZSD region distillation")
    p.add_argument("--out", default=None, help="output folder (default: <root>/student)")
    p.add_argument("--restart", action="store_true", help="ignore an existing checkpoint")
    p.add_argument("opts", nargs=argparse.REMAINDER,
                   help="Detectron2 KEY VALUE overrides (e.g. MODEL.KD.TID.ENABLED False)")
    p.set_defaults(func=cmd_compress)

    p = sub.add_parser("eval", parents=[run_parent()],
                       help="generalized zero-shot AP50/AP on novel, base and all classes",
                       description="Evaluate a trained detector over all categories of a dataset "
                                   "(COCOEvaluator / pycocotools), averaged over novel, base, all.")
    p.add_argument("--model-dir", default=None, help="training output (default: <root>/detector)")
    p.add_argument("--weights", default=None, help="checkpoint (default: <model-dir>/model_final.pth)")
    p.add_argument("--dataset", default=None,
                   help="registered dataset, e.g. synth_test or <dataset.name>_val (default: DATASETS.TEST[0])")
    p.add_argument("--json", default=None, help="evaluate on this COCO json instead (all its categories)")
    p.add_argument("--image-root", default=None, help="its image folder (default: the json's folder)")
    p.add_argument("--clip", default=None, help="CLIP for the text embeddings (default: the training one)")
    p.add_argument("--export", default=None,
                   help="evaluate an export folder or a shipped model's name instead (its own weights and text tower; the "
                        "run's dataset is registered: the config's dataset: section, else the world)")
    p.add_argument("--out", default=None, help="output folder (default: <model-dir>/eval_<dataset>; for --export, ./eval_<export>_<dataset>)")
    p.add_argument("--backend", choices=["torch", "onnx"], default="torch",
                   help="with --export: run its PyTorch model, or its ONNX graphs under onnxruntime "
                        "(the AP of the files a deployment runs, e.g. an int8 export)")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="Detectron2 KEY VALUE overrides")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("export", parents=[run_parent()],
                       help="write the deployable detector (safetensors + manifest)",
                       description="Export a trained detector: weights as safetensors, its "
                                   "config, CLIP's text tower, and a manifest with categories, "
                                   "CLIP id and hash, prompt template, metrics and file hashes. "
                                   "--onnx adds ONNX graphs whose vocabulary is an input "
                                   "(models/onnx_export.py); `ovd export --onnx --from-export "
                                   "artifacts/default --out DIR` adds them to an existing export.")
    p.add_argument("--model-dir", default=None, help="training output (default: <root>/detector)")
    p.add_argument("--weights", default=None, help="checkpoint (default: <model-dir>/model_final.pth)")
    p.add_argument("--out", default=None, help="export folder (default: <root>/export)")
    p.add_argument("--name", default=None,
                   help="model name in the manifest (default: the config's export.name, else ovd-<dataset name>)")
    p.add_argument("--version", default=None, help="model version in the manifest (default: export.version, 0.1.0)")
    p.add_argument("--dtype", choices=("float32", "float16"), default="float32",
                   help="storage of the weights (float16: half the size, computed in float32)")
    p.add_argument("--onnx", action="store_true",
                   help="also write detector.onnx (image + text embeddings in, boxes/scores/classes "
                        "out, any vocabulary size) and its encode/classify halves, validated "
                        "against PyTorch with onnxruntime and listed in the manifest")
    p.add_argument("--from-export", default=None, metavar="EXPORT",
                   help="with --onnx: add the graphs to this existing export folder instead of "
                        "exporting a training output (written to --out if given, a copy; "
                        "else in place)")
    p.add_argument("--quantize", choices=["int8"], default=None,
                   help="with --onnx: make the image graphs int8 (static QDQ, calibrated on training "
                        "images) and keep them only if AP50 (all classes) on the run's val split falls by "
                        "at most --quantize-tolerance points (models/onnx_quantize.py)")
    p.add_argument("--quantize-tolerance", type=float, default=1.0, metavar="AP50_POINTS")
    p.add_argument("--quantize-images", type=int, default=32, help="training images for calibration")
    p.add_argument("--onnx-images", nargs="+", default=None, metavar="IMAGE_OR_DIR_OR_GLOB",
                   help="with --onnx: validate the graphs against PyTorch on these images of your "
                        "domain (default: three images of the run's dataset: section, else drawn scenes)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("detect", help="detect classes named in plain words in image files",
                       description="Run a detector export over image files, folders or glob "
                                   "patterns; write per-image JSON (or COCO with --coco) and, with "
                                   "--draw, each image with its boxes.")
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR_OR_GLOB")
    p.add_argument("--classes", nargs="+", default=[], help='class names, e.g. "red ring" forklift')
    p.add_argument("--example", nargs=3, action="append", default=[], metavar=("IMAGE", "X1,Y1,X2,Y2", "LABEL"),
                   help="query by example: find objects like the one in this box of IMAGE (pixels), labelled "
                        "LABEL; repeat for more (examples sharing a label are averaged)")
    p.add_argument("--model-dir", default="default",
                   help="export folder or registered name (default: the shipped model)")
    p.add_argument("--threshold", type=float, default=0.3, help="lowest score kept, 0..1")
    p.add_argument("--max-detections", type=int, default=100, help="per image")
    p.add_argument("--score-mode", choices=SCORE_MODES, default=DEFAULT_SCORE_MODE,
                   help="per_name: each name against background alone (scores do not depend on the other "
                        "names); softmax: over the names given and background (the paper's)")
    p.add_argument("--nms-threshold", type=float, default=None, metavar="IOU",
                   help="drop the lower-scoring of two boxes overlapping more (default: the model's)")
    p.add_argument("--class-agnostic", action="store_true",
                   help="NMS across names: one label per object")
    p.add_argument("--tiles", choices=TILE_MODES, default=DEFAULT_TILES,
                   help="sliced inference for large images (overlapping windows at the model's input size, "
                        "merged by NMS); auto: when the model's resize would shrink an image more than 2x")
    p.add_argument("--tile-overlap", type=float, default=0.2, help="fraction of a window shared with its neighbour")
    p.add_argument("--max-tiles", type=int, default=64,
                   help="windows per image at most (a larger image gets larger windows)")
    p.add_argument("--max-candidates", type=int, default=100_000, metavar="PAIRS",
                   help="at most this many (box, name) pairs, the best, go to NMS per image or window "
                        "(bounds the time of thousands of names at a low threshold)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--backend", choices=["torch", "onnx"], default="torch")
    p.add_argument("--out", default=None, metavar="JSON", help="results file (default: print to stdout)")
    p.add_argument("--coco", action="store_true", help="COCO layout: images, categories, annotations with scores")
    p.add_argument("--draw", default=None, metavar="DIR", help="write each image with its boxes here (PNG)")
    p.set_defaults(func=cmd_detect)
