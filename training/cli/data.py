"""`ovd data`: the synthetic world, previews, COCO checks and the OV-COCO / OV-LVIS splits."""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections import Counter
from pathlib import Path

from ..progress import progress
from .options import run_of, run_parent

logger = logging.getLogger("ovd")

#: The world settings a flag of `ovd data synth` (and `ovd pipeline`) may override.
WORLD_FLAGS = ("seed", "num_train", "num_val", "num_test", "num_captions", "image_size")


def cmd_synth(args: argparse.Namespace) -> int:
    from ..data.preview import write_preview
    from ..data.synthetic import WorldConfig, generate_world

    cfg, layout = run_of(args)
    world_dir = Path(args.out) if args.out else layout.world
    wcfg = WorldConfig.from_config(cfg, args, WORLD_FLAGS)
    t0 = time.time()
    path = generate_world(world_dir, wcfg, workers=args.workers, progress=progress)
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


def cmd_preview(args: argparse.Namespace) -> int:
    from ..data.preview import write_preview

    logger.info("preview written to %s", write_preview(args.world, args.out, num_scenes=args.scenes))
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from ..data.coco_format import check_dataset

    report = check_dataset(args.json, args.image_root, progress=progress)
    print(f"{args.json}: {report['images']} images, {report['boxes']} boxes, {len(report['base'])} base "
          f"categories {report['base']}, {len(report['novel'])} novel {report['novel']}")
    for w in report["warnings"]:
        print(f"  warning: {w}")
    for e in report["errors"]:
        print(f"  error: {e}")
    if report["errors"]:
        counts = ", ".join(f"{n} {kind}" for kind, n in report["error_counts"].items())
        logger.error("%s is not usable as given: %s", args.json, counts)
        return 2
    print("OK")
    return 0


def cmd_split(args: argparse.Namespace) -> int:
    from ..data.ov_splits import build_split_cli

    out = build_split_cli(args.kind, args.input, args.out, args.split)
    logger.info("%s %s split written to %s", args.kind, args.split, out)
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add the `data` group to the `ovd` sub-command table."""
    data = sub.add_parser("data", help="datasets: the synthetic world and real COCO/LVIS splits")
    dsub = data.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")
    p = dsub.add_parser("synth", parents=[run_parent()],
                        help="generate the synthetic world (seeded, deterministic)",
                        description="Detection scenes (COCO json: train with base boxes only, "
                                    "val with all) and a caption corpus for CLIP pretraining.")
    p.add_argument("--out", default=None, help="world folder (default: <root>/world)")
    add_world_flags(p)
    p.add_argument("--preview", default=None, metavar="PNG", help="also write a preview image")
    p.set_defaults(func=cmd_synth)

    p = dsub.add_parser("preview", help="draw scenes with boxes and a category legend to a PNG",
                        description="Draw a few validation scenes of a world with their boxes "
                                    "(novel dashed), caption samples and a category legend.")
    p.add_argument("--world", required=True, help="world folder")
    p.add_argument("--out", required=True, metavar="PNG")
    p.add_argument("--scenes", type=int, default=4)
    p.set_defaults(func=cmd_preview)

    p = dsub.add_parser("check", help="validate a COCO dataset: json, image files, boxes, classes",
                        description="Validate a COCO-format annotation file and its images: the json's "
                                    "format (first bad entry named), every image file present, "
                                    "decodable and of the json's size, every box inside its image, "
                                    "categories without boxes, novel classes declared or not. Exits 2 "
                                    "on any error.")
    p.add_argument("json")
    p.add_argument("--image-root", default=None, help="the images' folder (default: the json's folder)")
    p.set_defaults(func=cmd_check)

    for kind, src in (("ov-coco", "COCO instances_{train,val}2017.json"), ("ov-lvis", "LVIS v1 json")):
        p = dsub.add_parser(kind, help=f"build the {kind.upper()} base/novel split from {src}",
                            description=f"Build the {kind.upper()} base/novel split from the "
                                        f"official {src}.")
        p.add_argument("--input", required=True, help=f"official {src}")
        p.add_argument("--out", required=True, help="output folder")
        p.add_argument("--split", required=True, choices=["train", "val"],
                       help="train keeps base boxes only; val keeps all")
        p.set_defaults(func=cmd_split, kind=kind)


def add_world_flags(p: argparse.ArgumentParser) -> None:
    """The flags of WORLD_FLAGS, and the number of render processes."""
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--num-train", type=int, default=None, help="training detection images")
    p.add_argument("--num-val", type=int, default=None, help="validation detection images")
    p.add_argument("--num-test", type=int, default=None, help="test detection images")
    p.add_argument("--num-captions", type=int, default=None, help="caption-corpus pairs")
    p.add_argument("--image-size", type=int, default=None, help="detection image side, pixels")
    p.add_argument("--workers", type=int, default=2, help="render processes (output independent of it)")
