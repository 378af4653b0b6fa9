"""What every `ovd` command group shares: the parent parsers of the run flags and of the
launcher flags, and the reading of a config with its command-line overrides.

Only the standard library and the config module are imported here: building the whole parser
must stay fast (`ovd --help`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..config import DEFAULT_CONFIG, load_config
from ..layout import RunLayout


def run_parent() -> argparse.ArgumentParser:
    """--config and --root: which pipeline config, and which run folder to read and write."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--config", default=None,
                   help=f"pipeline config YAML (default: {DEFAULT_CONFIG.relative_to(DEFAULT_CONFIG.parents[1])})")
    p.add_argument("--root", default=None, help="output root folder (overrides paths.root)")
    return p


def launcher_parent() -> argparse.ArgumentParser:
    """Detectron2's launcher flags (as its `default_argument_parser`)."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--num-gpus", type=int, default=1,
                   help="processes per machine: one per GPU with CUDA, else CPU processes (gloo)")
    p.add_argument("--num-machines", type=int, default=1, help="total number of machines")
    p.add_argument("--machine-rank", type=int, default=0, help="the rank of this machine")
    p.add_argument("--dist-url", default="auto",
                   help="process-group URL, e.g. tcp://host:port ('auto': a free local port, one machine)")
    return p


def launcher(args: argparse.Namespace) -> dict:
    """The launcher flags as keyword arguments of the training launchers."""
    return {"num_gpus": args.num_gpus, "num_machines": args.num_machines,
            "machine_rank": args.machine_rank, "dist_url": args.dist_url}


def run_of(args: argparse.Namespace) -> tuple[dict, RunLayout]:
    """(pipeline config, run folder) of a command's --config and --root."""
    cfg = load_config(args.config)
    return cfg, RunLayout.of(cfg, args)


def train_data(cfg: dict, layout: RunLayout, args: argparse.Namespace) -> tuple[Path, Path]:
    """--train-json / --image-root, defaulting to the run's dataset's training split (the
    config's `dataset:` section, else the synthetic world)."""
    if args.train_json:
        return Path(args.train_json), Path(args.image_root) if args.image_root else Path(args.train_json).parent
    from ..data.dataset import dataset_of

    train = dataset_of(cfg, layout).train
    return train.json_file, Path(args.image_root) if args.image_root else train.image_root
