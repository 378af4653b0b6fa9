"""`ovd clip`: CLIP pretraining on the caption corpus, zero-shot evaluation, and EZSD stage 1
(re-normalisation: only CLIP's LayerNorms tuned on base GT crops)."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from ovd.models.manifest import strict_json

from ..progress import progress
from .options import run_of, run_parent

logger = logging.getLogger("ovd")


def cmd_pretrain(args: argparse.Namespace) -> int:
    from ..clip_pretrain import PretrainConfig, pretrain_clip
    from ..pipeline import zero_shot_table

    cfg, layout = run_of(args)
    world_dir = Path(args.world) if args.world else layout.world
    clip_dir = Path(args.out) if args.out else layout.clip_pretrained
    pcfg = PretrainConfig.from_config(cfg, args, ("steps", "batch_size", "threads"))
    clip = pretrain_clip(world_dir, clip_dir, pcfg, progress=progress)
    logger.info("CLIP checkpoint written to %s (%s)", clip_dir, clip.manifest["weights"]["sha256"][:12])
    print(zero_shot_table(clip, world_dir, clip_dir))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from ovd.models.clip.model import load_clip

    from ..clip_eval import crop_report, format_report
    from ..pipeline import Pipeline

    cfg, layout = run_of(args)
    clip_path = args.clip or str(layout.clip_pretrained)
    clip = load_clip(clip_path, args.pretrained)
    if args.json:  # any COCO json: accuracy on its GT crops over its category names
        image_root = args.image_root or str(Path(args.json).parent)
        print(format_report(crop_report(clip, args.json, image_root), f"CLIP zero-shot accuracy on {args.json}"))
        return 0
    out_dir = Path(clip_path) if Path(clip_path).is_dir() else Path(args.out or ".")
    print(Pipeline(cfg, layout).zero_shot_table(clip, out_dir))
    return 0


def cmd_renorm(args: argparse.Namespace) -> int:
    """Train, then print the before/after zero-shot tables and the renorm gate, both on the
    run's dataset (its val split)."""
    from ovd.models.clip.model import load_clip

    from ..clip_eval import format_report
    from ..clip_renorm import RenormConfig, renorm_clip
    from ..gates import HeldOut, format_gates, renorm_gate
    from ..pipeline import Pipeline
    from ..shards import stage_device
    from .options import train_data

    cfg, layout = run_of(args)
    rcfg = RenormConfig.from_config(cfg, args, ("tune", "epochs", "batch_size", "threads"))
    pipe = Pipeline(cfg, layout, renorm_cfg=rcfg)
    if args.clip is None and not layout.clip_pretrained.is_dir():
        pipe.clip()  # the run's parent CLIP: the clip: section's model, or pretrained on the world
    parent = args.clip or str(layout.clip_pretrained)
    out_dir = Path(args.out) if args.out else layout.clip_renorm
    json_file, image_root = train_data(cfg, layout, args)

    clip = renorm_clip(parent, json_file, image_root, out_dir, rcfg, progress=progress,
                       pretrained=args.pretrained, device=stage_device())
    training = clip.manifest["training"]
    logger.info("re-normalised CLIP written to %s (%s) in %.0f s; loss per epoch %s", out_dir,
                clip.manifest["weights"]["sha256"][:12], training["seconds"],
                ", ".join(f"{v:.4f}" for v in training["epoch_losses"]))
    parent_clip = load_clip(parent, args.pretrained)
    before, after = pipe.zero_shot_report(parent_clip), pipe.zero_shot_report(clip)
    print(format_report(before, f"before: parent {parent}"))
    print(format_report(after, f"after: re-normalised ({rcfg.tune} LayerNorms) {out_dir}"))
    out = out_dir / "zero_shot.json"
    out.write_text(json.dumps({"parent": {"clip": str(parent), **before},
                               "renorm": {"clip": str(out_dir), **after}}, indent=2))
    logger.info("accuracy tables written to %s", out)
    val = pipe.data.val
    if val is None:
        logger.warning("the dataset has no val split: no renorm gate (it needs novel boxes the stage never saw)")
        return 0
    gate = renorm_gate(parent_clip, clip, HeldOut.load(val.json_file, val.image_root), template=rcfg.template)
    (out_dir / "gates.json").write_text(strict_json(gate, indent=2))
    print(format_gates({"renorm": gate}))
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add the `clip` group to the `ovd` sub-command table."""
    clip = sub.add_parser("clip", help="CLIP: pretraining on captions, zero-shot evaluation, re-normalisation")
    csub = clip.add_subparsers(dest="clip_command", required=True, metavar="SUBCOMMAND")
    p = csub.add_parser("pretrain", parents=[run_parent()],
                        help="train a small CLIP on the caption corpus (resumable)",
                        description="open_clip model + contrastive loss; writes safetensors + "
                                    "manifest, then prints the zero-shot accuracy table.")
    p.add_argument("--world", default=None, help="world folder (default: <root>/world)")
    p.add_argument("--out", default=None, help="checkpoint folder (default: <root>/clip/pretrained)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.set_defaults(func=cmd_pretrain)

    p = csub.add_parser("eval", parents=[run_parent()],
                        help="zero-shot accuracy on caption-style and detection GT crops",
                        description="Zero-shot accuracy of a CLIP on caption-style and detection "
                                    "GT crops, over base and novel categories.")
    p.add_argument("--clip", default=None,
                   help="checkpoint folder or open_clip model name (default: <root>/clip/pretrained)")
    p.add_argument("--pretrained", default=None, help="open_clip pretrained tag or file")
    p.add_argument("--json", default=None, help="a COCO json: accuracy on its GT crops (default: the run's dataset)")
    p.add_argument("--image-root", default=None, help="its image folder (default: the json's folder)")
    p.add_argument("--out", default=None, help="where to write zero_shot.json for a named model")
    p.set_defaults(func=cmd_eval)

    p = csub.add_parser(
        "renorm", parents=[run_parent()],
        help="stage 1: tune only CLIP's LayerNorms on base GT crops (resumable)",
        description="EZSD stage 1: fine-tune only the LayerNorm gains and biases of a CLIP on "
                    "crops of base-class ground-truth boxes (sigmoid BCE over base classes, "
                    "frozen logit scale), then print the zero-shot accuracy before and after.")
    p.add_argument("--clip", default=None,
                   help="parent: checkpoint folder or open_clip model name (default: <root>/clip/pretrained, "
                        "written first from the config's clip: section when absent)")
    p.add_argument("--pretrained", default=None, help="open_clip pretrained tag or file")
    p.add_argument("--train-json", default=None,
                   help="training json, base boxes used (default: the run's dataset)")
    p.add_argument("--image-root", default=None, help="its image folder (default: the json's folder)")
    p.add_argument("--out", default=None, help="checkpoint folder (default: <root>/clip/renorm)")
    p.add_argument("--tune", default=None,
                   help="LayerNorms to train: vision or vision+text (default: the config's)")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.set_defaults(func=cmd_renorm)
