"""`ovd`: the offline pipeline, one subcommand per stage.

    ovd data synth       generate the synthetic world (detection scenes + caption corpus)
    ovd data preview     draw a few scenes with boxes and a category legend to a PNG
    ovd data check       validate a COCO-format annotation file
    ovd data ov-coco     build the OV-COCO 48/17 split from official COCO annotations
    ovd data ov-lvis     build the OV-LVIS base/novel split from official LVIS annotations
    ovd clip pretrain    train a small CLIP on the world's caption corpus
    ovd clip eval        zero-shot accuracy of a CLIP on caption-style and detection GT crops
    ovd clip renorm      EZSD stage 1: tune only CLIP's LayerNorms on base GT crops
    ovd proposals        EZSD stage 2: CLIP proposals (dense anchors or the cheap mode)
    ovd targets          EZSD stage 3: CLIP embeddings of GT boxes and proposals
    ovd train            EZSD stage 4: train the detector (Detectron2)
    ovd compress         distil a trained detector into a lighter student (TID, CID, Light-ML)
    ovd eval             generalized zero-shot AP50 / AP on novel, base and all classes
    ovd gates            did each EZSD stage do its job? (measured on held-out annotations)
    ovd export           EZSD stage 6: the deployable artifact (safetensors + manifest)
    ovd pipeline         the whole chain on the built-in default: every stage above, cached
    ovd demo             serve an export and query it with novel class names
    ovd serve            the detection service (HTTP API + web page) for an export
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path

from .config import DEFAULT_CONFIG, load_config
from .layout import RunLayout, eval_dir, final_weights
from .progress import progress as _progress

logger = logging.getLogger("ovd")


# --------------------------------------------------------------------------- helpers

def _world_config(cfg: dict, args: argparse.Namespace):
    from .data.synthetic import WorldConfig

    return WorldConfig.from_config(cfg, args, ("seed", "num_train", "num_val", "num_test", "num_captions",
                                               "image_size"))


def _pretrain_config(cfg: dict, args: argparse.Namespace):
    from .clip_pretrain import PretrainConfig

    return PretrainConfig.from_config(cfg, args, ("steps", "batch_size", "threads"))


# --------------------------------------------------------------------------- data

def cmd_data_synth(args: argparse.Namespace) -> int:
    from .data.preview import write_preview
    from .data.synthetic import generate_world

    cfg = load_config(args.config)
    world_dir = Path(args.out) if args.out else RunLayout.of(cfg, args).world
    wcfg = _world_config(cfg, args)
    t0 = time.time()
    path = generate_world(world_dir, wcfg, workers=args.workers, progress=_progress)
    world = json.loads(path.read_text())
    logger.info("synthetic world written to %s in %.0f s (fingerprint %s)", world_dir,
                time.time() - t0, world["fingerprint"][:12])
    tiers = Counter(c["tier"] for c in world["categories"])
    logger.info("  detection: %d train (base boxes only) + %d val + %d test images",
                wcfg.num_train, wcfg.num_val, wcfg.num_test)
    logger.info("  categories: %s", ", ".join(f"{n} {t}" for t, n in tiers.items()))
    logger.info("  captions:  %d pretraining pairs, %d held-out evaluation images",
                wcfg.num_captions, wcfg.num_caption_eval)
    if args.preview:
        logger.info("  preview:   %s", write_preview(world_dir, args.preview))
    return 0


def cmd_data_preview(args: argparse.Namespace) -> int:
    from .data.preview import write_preview

    logger.info("preview written to %s", write_preview(args.world, args.out, num_scenes=args.scenes))
    return 0


def cmd_data_check(args: argparse.Namespace) -> int:
    from .data.coco_format import category_split, load_coco_json

    coco = load_coco_json(args.json)
    base, novel = category_split(coco)
    print(f"{args.json}: OK — {len(coco['images'])} images, {len(coco['annotations'])} boxes, "
          f"{len(base)} base + {len(novel)} novel categories")
    return 0


def cmd_data_split(args: argparse.Namespace) -> int:
    from .data.ov_splits import build_split_cli

    out = build_split_cli(args.kind, args.input, args.out, args.split)
    logger.info("%s %s split written to %s", args.kind, args.split, out)
    return 0


# --------------------------------------------------------------------------- clip

def cmd_clip_pretrain(args: argparse.Namespace) -> int:
    from .clip_pretrain import pretrain_clip

    cfg = load_config(args.config)
    layout = RunLayout.of(cfg, args)
    world_dir, clip_dir = layout.world, layout.clip_pretrained
    world_dir = Path(args.world) if args.world else world_dir
    clip_dir = Path(args.out) if args.out else clip_dir
    pcfg = _pretrain_config(cfg, args)
    clip = pretrain_clip(world_dir, clip_dir, pcfg, progress=_progress)
    logger.info("CLIP checkpoint written to %s (%s)", clip_dir, clip.manifest["weights"]["sha256"][:12])
    _report(clip, world_dir, clip_dir)
    return 0


def _report(clip, world_dir: Path, clip_dir: Path) -> dict:
    """Print (and cache next to the weights) a CLIP's zero-shot accuracy table."""
    from .clip_eval import format_report
    from .pipeline import zero_shot

    report = zero_shot(clip, world_dir, clip_dir)
    print(format_report(report, f"CLIP zero-shot accuracy ({clip_dir}, template {report['template']!r})"))
    logger.info("accuracy table: %s", clip_dir / "zero_shot.json")
    return report


def cmd_clip_eval(args: argparse.Namespace) -> int:
    from ovd.models.clip.model import load_clip

    cfg = load_config(args.config)
    world_dir = Path(args.world) if args.world else RunLayout.of(cfg, args).world
    clip_path = args.clip or str(RunLayout.of(cfg, args).clip_pretrained)
    clip = load_clip(clip_path, args.pretrained)
    out_dir = Path(clip_path) if Path(clip_path).is_dir() else Path(args.out or ".")
    _report(clip, world_dir, out_dir)
    return 0


# --------------------------------------------------------------------------- detector

def _detector_cfg(cfg: dict, args: argparse.Namespace, config_file: str | None = None):
    """`detector_config` of the pipeline config with this command's flags."""
    from .train_detector import detector_config

    return detector_config(cfg, RunLayout.of(cfg, args), config_file=config_file or args.detector_config,
                           opts=args.opts or [])


def _register(dcfg) -> None:
    from .data.coco_format import register_from_spec

    for spec in dcfg.DATASETS.REGISTER:
        register_from_spec(spec, overwrite=True)


def cmd_train(args: argparse.Namespace) -> int:
    from ovd.models.clip.model import load_clip

    from .train_detector import launch_training, prepare

    cfg = load_config(args.config)
    layout = RunLayout.of(cfg, args)
    dcfg = _detector_cfg(cfg, args)
    dcfg.OUTPUT_DIR = str(args.out or layout.detector)
    dcfg.MODEL.OVD.TRAIN_VOCABULARY = args.vocabulary
    if args.no_distill:
        dcfg.MODEL.OVD.DISTILL_WEIGHT = 0.0
    elif not dcfg.DATASETS.DISTILL_TARGETS:
        dcfg.DATASETS.DISTILL_TARGETS = str(args.targets or layout.targets())
    _register(dcfg)
    clip_path = args.clip or str(layout.clip_renorm)
    if not Path(clip_path).is_dir():
        clip_path = str(layout.clip_pretrained)
    clip = load_clip(clip_path)
    dcfg = prepare(dcfg, clip)
    logger.info("training %s on %s (vocabulary: %d %s classes, CLIP %s, distillation: %s) -> %s",
                dcfg.MODEL.META_ARCHITECTURE, dcfg.DATASETS.TRAIN[0], dcfg.MODEL.ROI_HEADS.NUM_CLASSES,
                args.vocabulary, clip_path, dcfg.DATASETS.DISTILL_TARGETS if dcfg.MODEL.OVD.DISTILL_WEIGHT
                else "off", dcfg.OUTPUT_DIR)
    final = launch_training(dcfg, resume=not args.restart, num_gpus=args.num_gpus,
                            num_machines=args.num_machines, machine_rank=args.machine_rank,
                            dist_url=args.dist_url)
    logger.info("weights: %s", final)
    return 0


def cmd_compress(args: argparse.Namespace) -> int:
    from ovd.models.clip.model import load_clip

    from .compress import launch_compression, prepare_student, teacher_config

    cfg = load_config(args.config)
    layout = RunLayout.of(cfg, args)
    teacher = Path(args.teacher or layout.detector)
    t_cfg = teacher_config(teacher)
    dcfg = _detector_cfg(cfg, args, config_file=args.student_config)
    dcfg.OUTPUT_DIR = str(args.out or layout.student)
    if args.no_distill:
        dcfg.MODEL.OVD.DISTILL_WEIGHT = 0.0
    elif not dcfg.DATASETS.DISTILL_TARGETS:
        dcfg.DATASETS.DISTILL_TARGETS = str(args.targets or layout.targets())
    _register(dcfg)
    # The student must share the teacher's text embeddings: default to the teacher's CLIP.
    clip_path = args.clip or t_cfg.MODEL.OVD.CLIP
    if not args.clip and not Path(clip_path).is_dir():
        clip_path = str(layout.clip_renorm)
        if not Path(clip_path).is_dir():
            clip_path = str(layout.clip_pretrained)
    dcfg = prepare_student(dcfg, load_clip(clip_path), teacher)
    kd = dcfg.MODEL.KD
    logger.info("compressing %s into %s (%s backbone, FPN %d; TID %s, CID %s, Light-ML %s; region "
                "distillation: %s) -> %s", teacher, dcfg.MODEL.META_ARCHITECTURE, dcfg.MODEL.BACKBONE.NAME,
                dcfg.MODEL.FPN.OUT_CHANNELS, "on" if kd.TID.ENABLED else "off",
                "on" if kd.CID.ENABLED else "off", "on" if kd.LIGHT_ML.ENABLED else "off",
                dcfg.DATASETS.DISTILL_TARGETS if dcfg.MODEL.OVD.DISTILL_WEIGHT else "off", dcfg.OUTPUT_DIR)
    final = launch_compression(dcfg, resume=not args.restart, num_gpus=args.num_gpus,
                               num_machines=args.num_machines, machine_rank=args.machine_rank,
                               dist_url=args.dist_url)
    logger.info("student weights: %s (export it with ovd export --model-dir %s)", final, dcfg.OUTPUT_DIR)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.modeling import build_model

    from ovd.models.clip.model import load_clip
    from ovd.models.exported import load_export

    from .data.synthetic import world_specs
    from .evaluate import evaluate, format_metrics
    from .train_detector import build_config

    cfg = load_config(args.config)
    if args.export:  # the deployable artifact itself: its weights (e.g. float16) and text tower
        exported = load_export(args.export)
        model, embed, model_dir = exported.model, exported.text_embeddings, Path(args.export)
        dcfg = build_config(model_dir / "detector.yaml", args.opts)
        dcfg.DATASETS.REGISTER = world_specs(RunLayout.of(cfg, args).world)  # an export names no dataset files
    else:
        model_dir = Path(args.model_dir or RunLayout.of(cfg, args).detector)
        dcfg = build_config(model_dir / "config.yaml", args.opts)
        model = build_model(dcfg)
        DetectionCheckpointer(model).load(args.weights or str(final_weights(model_dir)))
        clip = load_clip(args.clip or dcfg.MODEL.OVD.CLIP)

        def embed(names):
            return clip.text_embeddings(names, dcfg.MODEL.OVD.PROMPT_TEMPLATE)
    _register(dcfg)
    if args.json:  # the user's own COCO json (categories may carry "split": "base" | "novel")
        from .data.coco_format import register_ov_dataset

        json_file = Path(args.json)
        dataset = register_ov_dataset(f"eval_{json_file.stem}", json_file,
                                      Path(args.image_root) if args.image_root else json_file.parent,
                                      overwrite=True)
    else:
        dataset = args.dataset or (dcfg.DATASETS.TEST[0] if dcfg.DATASETS.TEST else "synth_val")
    if dataset not in DatasetCatalog.list():
        raise ValueError(f"dataset {dataset!r} is not registered (generate the world with `ovd data "
                         f"synth`, or evaluate your own COCO json with --json FILE --image-root DIR)")
    names = list(MetadataCatalog.get(dataset).thing_classes)
    out = Path(args.out or eval_dir(model_dir, dataset))
    result = evaluate(dcfg, model, dataset, embed(names), out)
    print(format_metrics(result, f"generalized zero-shot detection, {model_dir.name}"))
    logger.info("metrics written to %s", out / "metrics.json")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from ovd.models.exported import verify_export

    from .export import export_detector

    if args.from_export:  # an existing export folder: only the ONNX graphs are added
        if not args.onnx:
            raise ValueError("--from-export only adds ONNX graphs: give --onnx too")
        from ovd.models.onnx_export import export_onnx

        out = Path(args.out or args.from_export)
        manifest = export_onnx(args.from_export, out)
    else:
        cfg = load_config(args.config)
        layout = RunLayout.of(cfg, args)
        model_dir = Path(args.model_dir or layout.detector)
        out = Path(args.out or layout.export)
        manifest = export_detector(model_dir, out, name=args.name, version=args.version,
                                   weights=args.weights, dtype=args.dtype)
        if args.onnx:
            from ovd.models.onnx_export import export_onnx

            export_onnx(out)
    m = verify_export(out)
    logger.info("exported %s %s to %s (%d files verified; trained on %d classes)", m["name"],
                m["version"], out, len(m["files"]), len(m.get("trained_on", {}).get("classes", [])))
    logger.info("manifest: %s", manifest)
    return 0


# --------------------------------------------------------------------------- gates

def _gates(cfg: dict, args: argparse.Namespace, *, detector: bool = True) -> dict:
    """The gates of the run under the output root (flags override each input's default);
    ``detector=False`` leaves the detector gate out."""
    from .gates import HeldOut, stage_gates
    from .proposals import ProposalConfig

    layout = RunLayout.of(cfg, args)
    world_dir = layout.world
    det = world_dir / "detection"
    heldout_json = getattr(args, "heldout_json", None) or det / "annotations" / "train_all.json"
    heldout_images = getattr(args, "heldout_images", None) or det / "train"
    eval_json = getattr(args, "eval_json", None) or det / "annotations" / "val.json"
    eval_images = getattr(args, "eval_images", None) or det / "val"
    heldout = HeldOut.load(heldout_json, heldout_images) if Path(heldout_json).is_file() else None
    eval_set = HeldOut.load(eval_json, eval_images) if Path(eval_json).is_file() else None
    return stage_gates(
        heldout=heldout, eval_set=eval_set,
        parent_clip=getattr(args, "parent_clip", None) or layout.clip_pretrained,
        clip=getattr(args, "clip", None) or layout.clip_renorm,
        proposals=getattr(args, "proposals", None) or layout.proposals,
        targets=getattr(args, "targets", None) or layout.targets(),
        detector=(getattr(args, "detector", None) or final_weights(layout.detector))
        if detector else None,
        template=ProposalConfig.from_config(cfg).template)


def cmd_gates(args: argparse.Namespace) -> int:
    from .gates import format_gates

    cfg = load_config(args.config)
    gates = _gates(cfg, args)
    out = Path(args.out) if args.out else RunLayout.of(cfg, args).gates
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(gates, indent=2))
    print(format_gates(gates))  # noqa: T201
    logger.info("gates written to %s", out)
    return 0


# --------------------------------------------------------------------------- the whole chain

def cmd_pipeline(args: argparse.Namespace) -> int:
    """Every stage on the built-in default, in order. Each stage is cached or resumable: a
    finished stage whose inputs did not change is reused, an interrupted one resumes."""
    from .clip_renorm import RenormConfig
    from .data.preview import write_preview
    from .gates import format_gates
    from .pipeline import Front
    from .proposals import ProposalConfig, run_proposals
    from .targets import TargetsConfig, run_targets

    cfg = load_config(args.config)
    layout = RunLayout.of(cfg, args)
    front = Front(layout, _world_config(cfg, args), _pretrain_config(cfg, args),
                  RenormConfig.from_config(cfg), workers=args.workers, progress=_progress)
    renorm_dir = front.renorm_dir
    t0 = time.time()
    steps = 8

    def stage(k: int, text: str, reused: bool | None = None) -> None:
        status = {True: "reused", False: "done", None: "..."}[reused]
        logger.info("[%d/%d] %s: %s  (%.1f min so far)", k, steps, text, status, (time.time() - t0) / 60)

    world, reused = front.world()
    stage(1, f"synthetic world {front.world_dir}", reused)
    logger.info("      preview: %s", write_preview(front.world_dir, front.world_dir / "preview.png"))
    train_json, train_root = front.train_split()
    clip, reused = front.clip(world)
    stage(2, f"CLIP pretraining {front.clip_dir}", reused)
    _report(clip, front.world_dir, front.clip_dir)
    renormed, reused = front.renorm(clip)
    stage(3, f"CLIP re-normalisation (LayerNorms only) {renorm_dir}", reused)
    _report(renormed, front.world_dir, renorm_dir)

    pcfg = ProposalConfig.from_config(cfg)
    stage(4, f"CLIP proposals ({pcfg.mode} mode) -> {layout.proposals}")
    run_proposals(renormed, train_json, train_root, layout.proposals, pcfg, overwrite=True,
                  progress=_progress)
    stage(5, f"distillation targets -> {layout.targets()}")
    run_targets(renormed, train_json, train_root, layout.proposals, layout.targets(),
                TargetsConfig.from_config(cfg), overwrite=True, progress=_progress)

    # The detector gate waits for this run's detector (a previous run's may still be there).
    logger.info("gates before training:\n%s", format_gates(_gates(cfg, args, detector=False)))

    stage(6, f"detector training -> {layout.detector}")
    train_args = argparse.Namespace(
        config=args.config, root=args.root, detector_config=None, opts=[], out=None,
        vocabulary="base", no_distill=False, targets=None, clip=str(renorm_dir), restart=False,
        num_gpus=1, num_machines=1, machine_rank=0, dist_url="auto")
    cmd_train(train_args)
    # The shipped model's reported numbers come from the test split (every choice that made
    # its recipe was taken on val).
    stage(7, "generalized zero-shot evaluation on synth_test")
    cmd_eval(argparse.Namespace(config=args.config, root=args.root, model_dir=None, weights=None,
                                dataset="synth_test", json=None, image_root=None, clip=None, export=None,
                                out=None, opts=[]))
    gates = _gates(cfg, args)
    layout.gates.write_text(json.dumps(gates, indent=2))
    logger.info("gates (also in %s):\n%s", layout.gates, format_gates(gates))
    stage(8, f"export -> {layout.export}")
    cmd_export(argparse.Namespace(config=args.config, root=args.root, model_dir=None, weights=None,
                                  out=None, name="ovd-synthetic", version="0.1.0", dtype="float32",
                                  onnx=False, from_export=None))
    logger.info("pipeline finished in %.1f min; outputs under %s", (time.time() - t0) / 60, layout.root)
    return 0


# --------------------------------------------------------------------------- stages 1-3

def cmd_clip_renorm(args: argparse.Namespace) -> int:
    """`ovd clip renorm`: train, then print and save the before/after zero-shot tables."""
    from ovd.models.clip.model import load_clip

    from .clip_eval import format_report, zero_shot_report
    from .clip_renorm import RenormConfig, renorm_clip
    from .data.synthetic import world_datasets

    cfg = load_config(args.config)
    layout = RunLayout.of(cfg, args)
    world_dir = Path(args.world) if args.world else layout.world
    parent = args.clip or str(layout.clip_pretrained)
    out_dir = Path(args.out) if args.out else layout.clip_renorm
    default_json, default_images = world_datasets(world_dir)["synth_train"]
    json_file = Path(args.train_json) if args.train_json else default_json
    image_root = Path(args.image_root) if args.image_root else default_images
    rcfg = RenormConfig.from_config(cfg, args, ("tune", "epochs", "batch_size", "threads"))

    clip = renorm_clip(parent, json_file, image_root, out_dir, rcfg, progress=_progress,
                       pretrained=args.pretrained)
    training = clip.manifest["training"]
    logger.info("re-normalised CLIP written to %s (%s) in %.0f s; loss per epoch %s", out_dir,
                clip.manifest["weights"]["sha256"][:12], training["seconds"],
                ", ".join(f"{v:.4f}" for v in training["epoch_losses"]))
    before = zero_shot_report(load_clip(parent, args.pretrained), world_dir, template=rcfg.template)
    after = zero_shot_report(clip, world_dir, template=rcfg.template)
    print(format_report(before, f"before: parent {parent}"))
    print(format_report(after, f"after: re-normalised ({rcfg.tune} LayerNorms) {out_dir}"))
    out = out_dir / "zero_shot.json"
    out.write_text(json.dumps({"parent": {"clip": str(parent), **before},
                               "renorm": {"clip": str(out_dir), **after}}, indent=2))
    logger.info("accuracy tables written to %s", out)
    from .gates import HeldOut, format_gates, renorm_gate

    val = world_dir / "detection" / "annotations" / "val.json"
    gate = renorm_gate(load_clip(parent, args.pretrained), clip,
                       HeldOut.load(val, world_dir / "detection" / "val"), template=rcfg.template)
    (out_dir / "gates.json").write_text(json.dumps(gate, indent=2))
    print(format_gates({"renorm": gate}))
    return 0


def _add_renorm_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "renorm", help="stage 1: tune only CLIP's LayerNorms on base GT crops (resumable)",
        description="EZSD stage 1: fine-tune only the LayerNorm gains and biases of a CLIP on "
                    "crops of base-class ground-truth boxes (sigmoid BCE over base classes, "
                    "frozen logit scale), then print the zero-shot accuracy before and after.")
    p.add_argument("--config", default=None,
                   help="pipeline config YAML (default: "
                        f"{DEFAULT_CONFIG.relative_to(DEFAULT_CONFIG.parents[1])})")
    p.add_argument("--root", default=None, help="output root folder (overrides paths.root)")
    p.add_argument("--clip", default=None,
                   help="parent: checkpoint folder or open_clip model name "
                        "(default: <root>/clip/pretrained)")
    p.add_argument("--pretrained", default=None, help="open_clip pretrained tag or file")
    p.add_argument("--world", default=None,
                   help="world folder for the defaults and the evaluation (default: <root>/world)")
    p.add_argument("--train-json", default=None,
                   help="training json, base boxes used (default: the world's train_base.json)")
    p.add_argument("--image-root", default=None,
                   help="its image folder (default: the world's detection/train)")
    p.add_argument("--out", default=None, help="checkpoint folder (default: <root>/clip/renorm)")
    p.add_argument("--tune", default=None,
                   help="LayerNorms to train: vision or vision+text (default from config: vision+text)")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.set_defaults(func=cmd_clip_renorm)


def _train_data(cfg: dict, args: argparse.Namespace) -> tuple[Path, Path]:
    """--train-json / --image-root, defaulting to the synthetic world's `synth_train`."""
    from .data.synthetic import world_datasets

    json_file, image_root = world_datasets(RunLayout.of(cfg, args).world)["synth_train"]
    return (Path(args.train_json) if args.train_json else json_file,
            Path(args.image_root) if args.image_root else image_root)


def _stage_args(p: argparse.ArgumentParser) -> None:
    """Flags of the sharded stages (proposals, targets): config, data, CLIP, output, launcher."""
    p.add_argument("--config", default=None, help="pipeline config YAML (default: configs/synthetic.yaml)")
    p.add_argument("--root", default=None, help="output root folder (overrides paths.root)")
    p.add_argument("--clip", default=None,
                   help="CLIP checkpoint folder or open_clip name (default: <root>/clip/renorm)")
    p.add_argument("--train-json", default=None,
                   help="COCO training json, base boxes only (default: the world's synth_train)")
    p.add_argument("--image-root", default=None, help="image folder of --train-json")
    p.add_argument("--max-images", type=int, default=None, help="only the first N images by id")
    p.add_argument("--batch-size", type=int, default=None, help="CLIP crops per forward")
    p.add_argument("--overwrite", action="store_true",
                   help="recompute an output folder that holds a run with another config")
    _launcher_args(p)


def cmd_proposals(args: argparse.Namespace) -> int:
    from .proposals import ProposalConfig, proposals_worker
    from .shards import launch_stage

    cfg = load_config(args.config)
    pcfg = ProposalConfig.from_config(cfg, args, ("mode", "filter", "batch_size"))
    layout = RunLayout.of(cfg, args)
    json_file, image_root = _train_data(cfg, args)
    clip = args.clip or str(layout.clip_renorm)
    out = args.out or str(layout.proposals)
    launch_stage(proposals_worker, args, (clip, str(json_file), str(image_root), out,
                                           asdict(pcfg), args.max_images, args.overwrite))
    return 0


def _add_proposals_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "proposals", help="EZSD stage 2: CLIP proposals of the training images (resumable)",
        description="EZSD stage 2: score dense anchors (or, --mode cheap, the top-K of a "
                    "one-forward ViT token prior) with CLIP over base+novel names, objectness "
                    "log C - H, NMS, base-GT and base-class filters; sharded safetensors "
                    "output, resumable, split across processes with --num-gpus/--num-machines.")
    _stage_args(p)
    p.add_argument("--out", default=None, help="output shard folder (default: <root>/proposals)")
    p.add_argument("--mode", default=None, help="dense (the paper) or cheap (top-K token prior)")
    p.add_argument("--filter", default=None, help="coco or lvis filtering")
    p.set_defaults(func=cmd_proposals)


def cmd_targets(args: argparse.Namespace) -> int:
    from .shards import launch_stage
    from .targets import TargetsConfig, targets_worker

    cfg = load_config(args.config)
    tcfg = TargetsConfig.from_config(cfg, args, ("max_proposals", "batch_size"))
    layout = RunLayout.of(cfg, args)
    json_file, image_root = _train_data(cfg, args)
    clip = args.clip or str(layout.clip_renorm)
    if args.gt_only:
        proposals = None
    else:
        proposals = args.proposals or str(layout.proposals)
    out = args.out or str(layout.targets(args.gt_only))
    launch_stage(targets_worker, args, (clip, str(json_file), str(image_root), proposals, out,
                                         asdict(tcfg), args.max_images, args.overwrite))
    return 0


def _add_targets_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "targets", help="EZSD stage 3: CLIP distillation targets per training image (resumable)",
        description="EZSD stage 3: CLIP embeddings of base GT boxes (1.2x crops, weight 1) and "
                    "of up to --max-proposals stage-2 proposals (weight = confidence), stored "
                    "per image in sharded safetensors; resumable, split across processes.")
    _stage_args(p)
    p.add_argument("--proposals", default=None,
                   help="stage-2 folder (default: <root>/proposals)")
    p.add_argument("--gt-only", action="store_true",
                   help="no proposals: GT targets only (the ViLD-like variant)")
    p.add_argument("--max-proposals", type=int, default=None, help="proposals per image (200)")
    p.add_argument("--out", default=None,
                   help="output shard folder (default: <root>/targets, <root>/targets_gt with "
                        "--gt-only)")
    p.set_defaults(func=cmd_targets)


# --------------------------------------------------------------------------- detect

def cmd_detect(args: argparse.Namespace) -> int:
    from ovd.models.api import Detector
    from ovd.models.batch_detect import detect_files, expand_inputs

    files = expand_inputs(args.inputs)
    detector = Detector.load(args.model_dir, backend=args.backend)
    advance = _progress("detect", len(files))
    report = detect_files(detector, files, args.classes, threshold=args.threshold,
                          max_detections=args.max_detections, batch_size=args.batch_size,
                          coco=args.coco, draw_dir=Path(args.draw) if args.draw else None,
                          progress=advance)
    text = json.dumps(report, indent=1)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
        found = len(report["annotations"]) if args.coco else sum(len(i["detections"]) for i in report["images"])
        logger.info("%d detections in %d images written to %s%s", found, len(files), args.out,
                    f"; drawn images in {args.draw}" if args.draw else "")
    else:
        print(text)
    return 0


# --------------------------------------------------------------------------- parser

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ovd", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", default=None,
                       help=f"pipeline config YAML (default: {DEFAULT_CONFIG.relative_to(DEFAULT_CONFIG.parents[1])})")
        p.add_argument("--root", default=None, help="output root folder (overrides paths.root)")

    data = sub.add_parser("data", help="datasets: the synthetic world and real COCO/LVIS splits")
    dsub = data.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")
    p = dsub.add_parser("synth", help="generate the synthetic world (seeded, deterministic)",
                        description="Detection scenes (COCO json: train with base boxes only, "
                                    "val with all) and a caption corpus for CLIP pretraining.")
    common(p)
    p.add_argument("--out", default=None, help="world folder (default: <root>/world)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--num-train", type=int, default=None, help="training detection images")
    p.add_argument("--num-val", type=int, default=None, help="validation detection images")
    p.add_argument("--num-test", type=int, default=None, help="test detection images")
    p.add_argument("--num-captions", type=int, default=None, help="caption-corpus pairs")
    p.add_argument("--image-size", type=int, default=None, help="detection image side, pixels")
    p.add_argument("--workers", type=int, default=2, help="render processes (output independent of it)")
    p.add_argument("--preview", default=None, metavar="PNG", help="also write a preview image")
    p.set_defaults(func=cmd_data_synth)

    p = dsub.add_parser("preview", help="draw scenes with boxes and a category legend to a PNG",
                        description="Draw a few validation scenes of a world with their boxes "
                                    "(novel dashed), caption samples and a category legend.")
    p.add_argument("--world", required=True, help="world folder")
    p.add_argument("--out", required=True, metavar="PNG")
    p.add_argument("--scenes", type=int, default=4)
    p.set_defaults(func=cmd_data_preview)

    p = dsub.add_parser("check", help="validate a COCO-format annotation file",
                        description="Validate a COCO-format annotation file and summarise it; "
                                    "exits 2 naming the first bad entry.")
    p.add_argument("json")
    p.set_defaults(func=cmd_data_check)

    for kind, src in (("ov-coco", "COCO instances_{train,val}2017.json"), ("ov-lvis", "LVIS v1 json")):
        p = dsub.add_parser(kind, help=f"build the {kind.upper()} base/novel split from {src}",
                            description=f"Build the {kind.upper()} base/novel split from the "
                                        f"official {src}.")
        p.add_argument("--input", required=True, help=f"official {src}")
        p.add_argument("--out", required=True, help="output folder")
        p.add_argument("--split", required=True, choices=["train", "val"],
                       help="train keeps base boxes only; val keeps all")
        p.set_defaults(func=cmd_data_split, kind=kind)

    clip = sub.add_parser("clip", help="CLIP: pretraining on captions, zero-shot evaluation")
    csub = clip.add_subparsers(dest="clip_command", required=True, metavar="SUBCOMMAND")
    p = csub.add_parser("pretrain", help="train a small CLIP on the caption corpus (resumable)",
                        description="open_clip model + contrastive loss; writes safetensors + "
                                    "manifest, then prints the zero-shot accuracy table.")
    common(p)
    p.add_argument("--world", default=None, help="world folder (default: <root>/world)")
    p.add_argument("--out", default=None, help="checkpoint folder (default: <root>/clip/pretrained)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.set_defaults(func=cmd_clip_pretrain)

    p = csub.add_parser("eval", help="zero-shot accuracy on caption-style and detection GT crops",
                        description="Zero-shot accuracy of a CLIP on caption-style and detection "
                                    "GT crops, over base and novel categories.")
    common(p)
    p.add_argument("--clip", default=None,
                   help="checkpoint folder or open_clip model name (default: <root>/clip/pretrained)")
    p.add_argument("--pretrained", default=None, help="open_clip pretrained tag or file")
    p.add_argument("--world", default=None)
    p.add_argument("--out", default=None, help="where to write zero_shot.json for a named model")
    p.set_defaults(func=cmd_clip_eval)
    _add_renorm_parser(csub)

    _add_proposals_parser(sub)
    _add_targets_parser(sub)

    p = sub.add_parser("train", help="train the open-vocabulary detector (Detectron2, resumable)",
                       description="Train the EZSD detector: Faster R-CNN whose box head embeds "
                                   "regions into CLIP space, classified against text embeddings, "
                                   "with region distillation from `ovd targets`. A killed run "
                                   "resumes from its last checkpoint.")
    common(p)
    p.add_argument("--detector-config", default=None,
                   help="Detectron2 YAML (default: the config's detector.config)")
    p.add_argument("--clip", default=None, help="CLIP for the text embeddings (default: <root>/clip/renorm)")
    p.add_argument("--targets", default=None, help="`ovd targets` folder (default: <root>/targets)")
    p.add_argument("--no-distill", action="store_true", help="train without region distillation")
    p.add_argument("--vocabulary", choices=["base", "all"], default="base",
                   help="classes with boxes in training: base (open-vocabulary) or all (oracle)")
    p.add_argument("--out", default=None, help="output folder (default: <root>/detector)")
    p.add_argument("--restart", action="store_true", help="ignore an existing checkpoint")
    _launcher_args(p)
    p.add_argument("opts", nargs=argparse.REMAINDER, help="Detectron2 KEY VALUE overrides")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("compress", help="distil a trained detector into a lighter student (resumable)",
                       description="Train a smaller open-vocabulary student (by default a "
                                   "half-width ResNet-18 with a 64-channel FPN) from a frozen "
                                   "teacher: the usual detection and EZSD region-distillation "
                                   "losses plus TID feature distillation and CID region-logit and "
                                   "box distillation, with Light-ML in the box head (MODEL.KD.*). "
                                   "A killed run resumes from its last checkpoint; the output "
                                   "folder exports with ovd export like a teacher's.")
    common(p)
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
    _launcher_args(p)
    p.add_argument("opts", nargs=argparse.REMAINDER,
                   help="Detectron2 KEY VALUE overrides (e.g. MODEL.KD.TID.ENABLED False)")
    p.set_defaults(func=cmd_compress)

    p = sub.add_parser("eval", help="generalized zero-shot AP50/AP on novel, base and all classes",
                       description="Evaluate a trained detector over all categories of a dataset "
                                   "(COCOEvaluator / pycocotools), averaged over novel, base, all.")
    common(p)
    p.add_argument("--model-dir", default=None, help="training output (default: <root>/detector)")
    p.add_argument("--weights", default=None, help="checkpoint (default: <model-dir>/model_final.pth)")
    p.add_argument("--dataset", default=None, help="registered dataset (default: DATASETS.TEST[0])")
    p.add_argument("--json", default=None, help="evaluate on this COCO json instead (all its categories)")
    p.add_argument("--image-root", default=None, help="its image folder (default: the json's folder)")
    p.add_argument("--clip", default=None, help="CLIP for the text embeddings (default: the training one)")
    p.add_argument("--export", default=None,
                   help="evaluate an export folder instead (its own weights and text tower; the "
                        "dataset is registered from the config's world)")
    p.add_argument("--out", default=None, help="output folder (default: <model-dir>/eval_<dataset>)")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="Detectron2 KEY VALUE overrides")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("export", help="write the deployable detector (safetensors + manifest)",
                       description="Export a trained detector: weights as safetensors, its "
                                   "config, CLIP's text tower, and a manifest with categories, "
                                   "CLIP id and hash, prompt template, metrics and file hashes. "
                                   "--onnx adds ONNX graphs whose vocabulary is an input "
                                   "(models/onnx_export.py); `ovd export --onnx --from-export "
                                   "artifacts/default --out DIR` adds them to an existing export.")
    common(p)
    p.add_argument("--model-dir", default=None, help="training output (default: <root>/detector)")
    p.add_argument("--weights", default=None, help="checkpoint (default: <model-dir>/model_final.pth)")
    p.add_argument("--out", default=None, help="export folder (default: <root>/export)")
    p.add_argument("--name", default="ovd-synthetic", help="model name in the manifest")
    p.add_argument("--version", default="0.1.0", help="model version in the manifest")
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
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("gates", help="did each EZSD stage do its job? (held-out annotations)",
                       description="Measure, from a run's stage folders, what each EZSD stage is "
                                   "for: CLIP crop accuracy before/after re-normalisation "
                                   "(paired test), novel recall and precision of the proposals "
                                   "and their grid's coverage, target weights on novel objects, "
                                   "the detector's background vector and tau. Written to each "
                                   "stage's gates.json and to --out. Works on any COCO dataset "
                                   "whose categories carry \"split\": \"novel\".")
    common(p)
    p.add_argument("--heldout-json", default=None,
                   help="ALL annotations of the training images (default: the world's "
                        "train_all.json); read by the gates only, never by a stage")
    p.add_argument("--heldout-images", default=None, help="image folder of --heldout-json")
    p.add_argument("--eval-json", default=None,
                   help="an evaluation split with all annotations, for the renorm gate "
                        "(default: the world's val.json)")
    p.add_argument("--eval-images", default=None, help="image folder of --eval-json")
    p.add_argument("--parent-clip", default=None, help="CLIP before renorm (<root>/clip/pretrained)")
    p.add_argument("--clip", default=None, help="re-normalised CLIP (<root>/clip/renorm)")
    p.add_argument("--proposals", default=None, help="stage-2 folder (<root>/proposals)")
    p.add_argument("--targets", default=None, help="stage-3 folder (<root>/targets)")
    p.add_argument("--detector", default=None,
                   help="trained weights: .pth or an export's detector.safetensors "
                        "(<root>/detector/model_final.pth)")
    p.add_argument("--out", default=None, help="all gates as one json (<root>/gates.json)")
    p.set_defaults(func=cmd_gates)

    p = sub.add_parser("pipeline", help="the whole chain on the built-in default (cached stages)",
                       description="Run every pipeline stage on the built-in default (the "
                                   "synthetic world), from data to export; a stage whose output "
                                   "exists and whose inputs did not change is reused.")
    common(p)
    p.add_argument("--workers", type=int, default=2)
    p.set_defaults(func=cmd_pipeline)

    p = sub.add_parser("detect", help="detect classes named in plain words in image files",
                       description="Run a detector export over image files, folders or glob "
                                   "patterns; write per-image JSON (or COCO with --coco) and, with "
                                   "--draw, each image with its boxes.")
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR_OR_GLOB")
    p.add_argument("--classes", nargs="+", required=True, help='class names, e.g. "red ring" forklift')
    p.add_argument("--model-dir", default="default", help="export folder or registered name (default: the shipped model)")
    p.add_argument("--threshold", type=float, default=0.3, help="lowest score kept, 0..1")
    p.add_argument("--max-detections", type=int, default=100, help="per image")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--backend", choices=["torch", "onnx"], default="torch")
    p.add_argument("--out", default=None, metavar="JSON", help="results file (default: print to stdout)")
    p.add_argument("--coco", action="store_true", help="COCO layout: images, categories, annotations with scores")
    p.add_argument("--draw", default=None, metavar="DIR", help="write each image with its boxes here (PNG)")
    p.set_defaults(func=cmd_detect)

    from ovd.service.cli import add_commands as add_service_commands

    add_service_commands(sub)
    return parser


def _launcher_args(p: argparse.ArgumentParser) -> None:
    """Detectron2-style launcher flags (as its `default_argument_parser`)."""
    p.add_argument("--num-gpus", type=int, default=1,
                   help="processes per machine: one per GPU with CUDA, else CPU processes (gloo)")
    p.add_argument("--num-machines", type=int, default=1, help="total number of machines")
    p.add_argument("--machine-rank", type=int, default=0, help="the rank of this machine")
    p.add_argument("--dist-url", default="auto",
                   help="process-group URL, e.g. tcp://host:port ('auto': a free local port, one machine)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Root at WARNING keeps libraries' INFO chatter (open_clip logs to the root logger) out;
    # the project's own loggers and Detectron2's training log stay at INFO.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for name in ("ovd", "detectron2"):
        logging.getLogger(name).setLevel(logging.DEBUG if args.verbose else logging.INFO)
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError) as e:
        logger.error("%s", e)
        return 2
    except KeyboardInterrupt:
        logger.error("interrupted; run the same command again to resume")
        return 130


if __name__ == "__main__":
    sys.exit(main())
