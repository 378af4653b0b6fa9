"""`ovd`: the command line, a thin layer over the library; one module per command group.

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
    ovd export           EZSD stage 6: the deployable artifact (safetensors + manifest)
    ovd detect           detect classes named in plain words in image files
    ovd gates            did each EZSD stage do its job? (measured on held-out annotations)
    ovd pipeline         the whole chain on the built-in default: every stage above, cached
    ovd serve            the detection service (HTTP API + web page) for an export
    ovd demo             serve an export and query it with novel class names
"""

from __future__ import annotations

import argparse
import logging
import sys

from . import clip, data, detector, stages

logger = logging.getLogger("ovd")

#: Imported only by the commands of the full install (training, evaluation, export, the PyTorch
#: backend); the serve-onnx install lacks them.
FULL_INSTALL_MODULES = {"torch", "torchvision", "detectron2", "open_clip", "pycocotools", "safetensors",
                        "matplotlib", "scipy", "onnx"}


def build_parser() -> argparse.ArgumentParser:
    """The whole `ovd` parser; each group module adds its commands (none imports torch here)."""
    from ovd.service.cli import add_commands as add_service_commands

    parser = argparse.ArgumentParser(prog="ovd", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (data.add_commands, clip.add_commands, stages.add_commands, detector.add_commands,
                stages.add_run_commands, add_service_commands):
        add(sub)
    return parser


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
    except ModuleNotFoundError as e:
        if e.name and e.name.split(".")[0] in FULL_INSTALL_MODULES:
            logger.error("`ovd %s` needs %s, which the full install provides (scripts/install.sh); "
                         "this environment has the serve-onnx install, which runs exports' ONNX graphs "
                         "only: `ovd serve` with OVD_BACKEND=onnx, `ovd detect --backend onnx`",
                         args.command, e.name)
            return 2
        raise
    except KeyboardInterrupt:
        logger.error("interrupted; run the same command again to resume")
        return 130


if __name__ == "__main__":
    sys.exit(main())
