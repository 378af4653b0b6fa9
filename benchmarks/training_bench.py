"""What the training benchmarks (ezsd_variants.py, compress_students.py) share: logging, the
pipeline's cached front stages, stage timing that survives a rerun, training subsets, and a
results file whose hand-written analysis survives a rerun."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from host_info import host_line

ANALYSIS = "## Analysis"


def setup_logging() -> None:
    """INFO from the project's loggers, warnings only from Detectron2's."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for name in ("ovd",):
        logging.getLogger(name).setLevel(logging.INFO)
    logging.getLogger("detectron2").setLevel(logging.WARNING)


def pipeline_front(config: str, pipeline_root: str | None):
    """(pipeline config dict, ovd.training.pipeline.Pipeline) of a pipeline config file; its
    root is `pipeline_root`, default the config's own output root. The benchmarks use its
    first stages (world, CLIP, re-normalised CLIP) with their reuse rules."""
    from ovd.training.config import load_config
    from ovd.training.layout import RunLayout
    from ovd.training.pipeline import Pipeline
    from ovd.training.progress import progress

    cfg = load_config(config)
    layout = RunLayout(Path(pipeline_root)) if pipeline_root else RunLayout.of(cfg)
    return cfg, Pipeline(cfg, layout, progress=progress)


class Timed:
    """Runs a stage once and remembers its measured wall time in <folder>/timing.json; a rerun
    whose output exists returns the stored time, flagged as cached."""

    def __init__(self, folder: Path):
        self.folder = folder

    def __call__(self, fn, done: bool) -> tuple[float, bool]:
        path = self.folder / "timing.json"
        if done and path.is_file():
            return json.loads(path.read_text())["seconds"], True
        t0 = time.time()
        fn()
        seconds = time.time() - t0
        self.folder.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"seconds": seconds, "machine": host_line()}))
        return seconds, False


def subset_json(src: Path, dst: Path, n: int) -> Path:
    """The first n images (by id) of a COCO json with their annotations."""
    if dst.is_file():
        return dst
    data = json.loads(src.read_text())
    images = sorted(data["images"], key=lambda im: im["id"])[:n]
    ids = {im["id"] for im in images}
    data["images"] = images
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] in ids]
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(dst)
    return dst


def write_markdown(path: Path, text: str) -> None:
    """Write a results file, keeping the hand-written "## Analysis" section (what the numbers
    mean) of the file it replaces."""
    previous = path.read_text() if path.is_file() else ""
    analysis = previous[previous.index(ANALYSIS):] if ANALYSIS in previous else ""
    path.write_text(text + ("\n" + analysis if analysis else ""))
