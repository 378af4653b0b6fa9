"""EZSD stages 2-3 as commands (`ovd proposals`, `ovd targets`: sharded, resumable, split
across processes), the stage gates (`ovd gates`) and the whole chain (`ovd pipeline`)."""

from __future__ import annotations

import argparse
import logging
from dataclasses import asdict, replace
from pathlib import Path

from ovd.models.manifest import strict_json

from ..progress import progress
from .options import launcher_parent, run_of, run_parent, train_data

logger = logging.getLogger("ovd")


def cmd_proposals(args: argparse.Namespace) -> int:
    from ..proposals import ProposalConfig, proposals_worker
    from ..shards import launch_stage

    cfg, layout = run_of(args)
    pcfg = ProposalConfig.from_config(cfg, args, ("mode", "filter", "batch_size"))
    if args.paper_density:
        from ..proposals import PAPER_DENSITY

        pcfg = replace(pcfg, **PAPER_DENSITY)
    json_file, image_root = train_data(cfg, layout, args)
    clip = args.clip or str(layout.clip_renorm)
    out = args.out or str(layout.proposals)
    launch_stage(proposals_worker, args, (clip, str(json_file), str(image_root), out,
                                           asdict(pcfg), args.max_images, args.overwrite, _part(args)))
    return 0


def cmd_targets(args: argparse.Namespace) -> int:
    from ..shards import launch_stage
    from ..targets import TargetsConfig, targets_worker

    cfg, layout = run_of(args)
    tcfg = TargetsConfig.from_config(cfg, args, ("max_proposals", "batch_size"))
    json_file, image_root = train_data(cfg, layout, args)
    clip = args.clip or str(layout.clip_renorm)
    proposals = None if args.gt_only else args.proposals or str(layout.proposals)
    out = args.out or str(layout.targets(args.gt_only))
    launch_stage(targets_worker, args, (clip, str(json_file), str(image_root), proposals, out,
                                         asdict(tcfg), args.max_images, args.overwrite, _part(args)))
    return 0


def _part(args: argparse.Namespace) -> tuple[int, int] | None:
    """(--shard-index, --num-shards) of an independent job, or None."""
    if args.num_shards is None:
        if args.shard_index is not None:
            raise ValueError("--shard-index needs --num-shards")
        return None
    return (args.shard_index if args.shard_index is not None else 0), args.num_shards


def cmd_gates(args: argparse.Namespace) -> int:
    from ..gates import format_gates
    from ..pipeline import run_gates

    cfg, layout = run_of(args)
    gates = run_gates(cfg, layout, detector=args.detector or True, heldout_json=args.heldout_json,
                      heldout_images=args.heldout_images, eval_json=args.eval_json,
                      eval_images=args.eval_images, parent_clip=args.parent_clip, clip=args.clip,
                      proposals=args.proposals, targets=args.targets)
    out = Path(args.out) if args.out else layout.gates
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(strict_json(gates, indent=2))
    print(format_gates(gates))
    logger.info("gates written to %s", out)
    return 0


def cmd_pipeline(args: argparse.Namespace) -> int:
    """Every stage on the built-in default, in order (training/pipeline.py: STAGES)."""
    from ..pipeline import Pipeline

    cfg, layout = run_of(args)
    Pipeline(cfg, layout, workers=args.workers, progress=progress, report=print).run()
    return 0


def _sharded_stage_parent() -> argparse.ArgumentParser:
    """Flags of the sharded stages (proposals, targets): data, CLIP, size and recomputation."""
    p = argparse.ArgumentParser(add_help=False, parents=[run_parent(), launcher_parent()])
    p.add_argument("--clip", default=None,
                   help="CLIP checkpoint folder or open_clip name (default: <root>/clip/renorm)")
    p.add_argument("--train-json", default=None,
                   help="COCO training json, base boxes only (default: the run's dataset)")
    p.add_argument("--image-root", default=None, help="image folder of --train-json")
    p.add_argument("--max-images", type=int, default=None, help="only the first N images by id")
    p.add_argument("--batch-size", type=int, default=None, help="CLIP crops per forward")
    p.add_argument("--overwrite", action="store_true",
                   help="recompute an output folder that holds a run with another config")
    p.add_argument("--num-shards", type=int, default=None, metavar="N",
                   help="independent jobs (e.g. a SLURM array) sharing the output folder, no process "
                        "group: this job computes the shards k with k %% N == --shard-index")
    p.add_argument("--shard-index", type=int, default=None, metavar="I", help="this job's index in [0, N)")
    return p


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add `proposals` and `targets` to the `ovd` sub-command table."""
    p = sub.add_parser(
        "proposals", parents=[_sharded_stage_parent()],
        help="EZSD stage 2: CLIP proposals of the training images (resumable)",
        description="EZSD stage 2: score dense anchors (or, --mode cheap, the top-K of a "
                    "one-forward ViT token prior) with CLIP over base+novel names, objectness "
                    "log C - H, NMS, base-GT and base-class filters; sharded safetensors "
                    "output, resumable, split across processes with --num-gpus/--num-machines.")
    p.add_argument("--out", default=None, help="output shard folder (default: <root>/proposals)")
    p.add_argument("--mode", default=None, help="dense (the paper) or cheap (top-K token prior)")
    p.add_argument("--filter", default=None, help="coco or lvis filtering")
    p.add_argument("--paper-density", action="store_true",
                   help="the paper's anchor grid: stride 32, sizes 32-512, laid on the image resized to "
                        "short side 800 / long side <= 1333 (proposals.anchor_resize), not on the image "
                        "as stored (12,750 anchors for a 640x480 image instead of 4,365)")
    p.set_defaults(func=cmd_proposals)

    p = sub.add_parser(
        "targets", parents=[_sharded_stage_parent()],
        help="EZSD stage 3: CLIP distillation targets per training image (resumable)",
        description="EZSD stage 3: CLIP embeddings of base GT boxes (1.2x crops, weight 1) and "
                    "of up to --max-proposals stage-2 proposals (weight = confidence), stored "
                    "per image in sharded safetensors; resumable, split across processes.")
    p.add_argument("--proposals", default=None, help="stage-2 folder (default: <root>/proposals)")
    p.add_argument("--gt-only", action="store_true",
                   help="no proposals: GT targets only (the ViLD-like variant)")
    p.add_argument("--max-proposals", type=int, default=None, help="proposals per image (200)")
    p.add_argument("--out", default=None,
                   help="output shard folder (default: <root>/targets, <root>/targets_gt with --gt-only)")
    p.set_defaults(func=cmd_targets)


def add_run_commands(sub: argparse._SubParsersAction) -> None:
    """Add `gates` and `pipeline` to the `ovd` sub-command table."""
    p = sub.add_parser("gates", parents=[run_parent()],
                       help="did each EZSD stage do its job? (held-out annotations)",
                       description="Measure, from a run's stage folders, what each EZSD stage is "
                                   "for: CLIP crop accuracy before/after re-normalisation "
                                   "(paired test), novel recall and precision of the proposals "
                                   "and their grid's coverage, target weights on novel objects, "
                                   "the detector's background vector and tau. Written to each "
                                   "stage's gates.json and to --out. Works on any COCO dataset "
                                   "whose categories carry \"split\": \"novel\".")
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

    p = sub.add_parser("pipeline", parents=[run_parent()],
                       help="the whole chain, on your dataset or the built-in world (cached stages)",
                       description="Run every pipeline stage, from data to export, on the config's "
                                   "dataset: section (your COCO jsons) or, without one, on the "
                                   "built-in synthetic world. A stage whose output exists and whose "
                                   "inputs did not change is reused; one whose inputs changed is "
                                   "recomputed (training/pipeline.py lists the rules).")
    p.add_argument("--workers", type=int, default=2, help="world render processes")
    p.set_defaults(func=cmd_pipeline)
