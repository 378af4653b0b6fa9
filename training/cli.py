"""`ovd`: the offline pipeline, one subcommand per stage.

    ovd data synth       generate the synthetic world (detection scenes + caption corpus)
    ovd data preview     draw a few scenes with boxes and a category legend to a PNG
    ovd data check       validate a COCO-format annotation file
    ovd data ov-coco     build the OV-COCO 48/17 split from official COCO annotations
    ovd data ov-lvis     build the OV-LVIS base/novel split from official LVIS annotations
    ovd clip pretrain    train a small CLIP on the world's caption corpus
    ovd clip eval        zero-shot accuracy of a CLIP on caption-style and detection GT crops
    ovd demo             the main job on the built-in default: every stage above, cached
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from tqdm import tqdm

from .config import DEFAULT_CONFIG, load_config

logger = logging.getLogger("ovd")


# --------------------------------------------------------------------------- helpers

def _progress(desc: str, total: int, initial: int = 0):
    """tqdm progress with ETA on stderr; returns `advance(n, postfix=None)`."""
    bar = tqdm(total=total, initial=initial, desc=desc, unit="it", dynamic_ncols=True,
               mininterval=1.0, file=sys.stderr, disable=None)

    def advance(n: int, postfix: dict | None = None) -> None:
        if postfix:
            bar.set_postfix(postfix, refresh=False)
        bar.update(n)
        if bar.n >= bar.total:
            bar.close()

    return advance


def _paths(cfg: dict, args: argparse.Namespace) -> tuple[Path, Path]:
    root = Path(getattr(args, "root", None) or cfg.get("paths", {}).get("root", "runs/synthetic"))
    return root / "world", root / "clip" / "pretrained"


def _world_config(cfg: dict, args: argparse.Namespace):
    from .data.synthetic import WorldConfig

    world = dict(cfg.get("world", {}))
    for key in ("seed", "num_train", "num_val", "num_captions", "image_size"):
        value = getattr(args, key, None)
        if value is not None:
            world[key] = value
    return WorldConfig.from_dict(world)


def _pretrain_config(cfg: dict, args: argparse.Namespace):
    from .clip_pretrain import PretrainConfig

    section = dict(cfg.get("clip_pretrain", {}))
    for key in ("steps", "batch_size", "threads"):
        value = getattr(args, key, None)
        if value is not None:
            section[key] = value
    return PretrainConfig.from_dict(section)


# --------------------------------------------------------------------------- data

def cmd_data_synth(args: argparse.Namespace) -> int:
    from .data.preview import write_preview
    from .data.synthetic import generate_world

    cfg = load_config(args.config)
    world_dir = Path(args.out) if args.out else _paths(cfg, args)[0]
    wcfg = _world_config(cfg, args)
    t0 = time.time()
    path = generate_world(world_dir, wcfg, workers=args.workers, progress=_progress)
    world = json.loads(path.read_text())
    logger.info("synthetic world written to %s in %.0f s (fingerprint %s)", world_dir,
                time.time() - t0, world["fingerprint"][:12])
    logger.info("  detection: %d train (base boxes only) + %d val images, %d categories (%d novel)",
                wcfg.num_train, wcfg.num_val, len(world["categories"]),
                sum(c["split"] == "novel" for c in world["categories"]))
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
    world_dir, clip_dir = _paths(cfg, args)
    world_dir = Path(args.world) if args.world else world_dir
    clip_dir = Path(args.out) if args.out else clip_dir
    pcfg = _pretrain_config(cfg, args)
    clip = pretrain_clip(world_dir, clip_dir, pcfg, progress=_progress)
    logger.info("CLIP checkpoint written to %s (%s)", clip_dir, clip.manifest["weights"]["sha256"][:12])
    _report(clip, world_dir, clip_dir)
    return 0


def _report(clip, world_dir: Path, clip_dir: Path) -> dict:
    from .clip_eval import format_report, zero_shot_report

    report = zero_shot_report(clip, world_dir)
    print(format_report(report, f"CLIP zero-shot accuracy ({clip_dir}, template {report['template']!r})"))
    out = clip_dir / "zero_shot.json"
    out.write_text(json.dumps(report, indent=2))
    logger.info("accuracy table written to %s", out)
    return report


def cmd_clip_eval(args: argparse.Namespace) -> int:
    from models.clip.model import load_clip

    cfg = load_config(args.config)
    world_dir = Path(args.world) if args.world else _paths(cfg, args)[0]
    clip_path = args.clip or str(_paths(cfg, args)[1])
    clip = load_clip(clip_path, args.pretrained)
    out_dir = Path(clip_path) if Path(clip_path).is_dir() else Path(args.out or ".")
    _report(clip, world_dir, out_dir)
    return 0


# --------------------------------------------------------------------------- demo

def cmd_demo(args: argparse.Namespace) -> int:
    """Every stage on the built-in default; a stage whose output exists is reused."""
    from models.clip.model import ClipCheckpointError, load_clip

    from .clip_pretrain import pretrain_clip
    from .data.preview import write_preview
    from .data.synthetic import generate_world, load_world, register_world

    cfg = load_config(args.config)
    world_dir, clip_dir = _paths(cfg, args)
    t0 = time.time()
    wcfg = _world_config(cfg, args)
    try:
        world = load_world(world_dir)
        if world["config"] != json.loads(json.dumps(_asdict(wcfg))):
            raise ValueError("config changed")
        logger.info("[1/2] synthetic world: reusing %s", world_dir)
    except (FileNotFoundError, ValueError):
        logger.info("[1/2] synthetic world -> %s", world_dir)
        generate_world(world_dir, wcfg, workers=args.workers, progress=_progress)
        world = load_world(world_dir)
    preview = write_preview(world_dir, world_dir / "preview.png")
    logger.info("      preview: %s", preview)
    logger.info("      Detectron2 datasets: %s", ", ".join(register_world(world_dir, overwrite=True)))
    try:
        clip = load_clip(str(clip_dir))
        if clip.manifest["training"]["data"]["fingerprint"] != world["fingerprint"]:
            raise ClipCheckpointError("trained on another world")
        logger.info("[2/2] CLIP pretraining: reusing %s", clip_dir)
    except (ClipCheckpointError, KeyError):
        logger.info("[2/2] CLIP pretraining -> %s", clip_dir)
        clip = pretrain_clip(world_dir, clip_dir, _pretrain_config(cfg, args), progress=_progress)
    _report(clip, world_dir, clip_dir)
    logger.info("demo finished in %.1f min; outputs under %s", (time.time() - t0) / 60, world_dir.parent)
    return 0


def _asdict(obj) -> dict:
    from dataclasses import asdict

    return asdict(obj)


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

    p = sub.add_parser("demo", help="the main job on the built-in default (every stage, cached)",
                       description="Run every pipeline stage on the built-in default (the "
                                   "synthetic world); a stage whose output exists is reused.")
    common(p)
    p.add_argument("--workers", type=int, default=2)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("PIL", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
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
