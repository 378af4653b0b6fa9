#!/usr/bin/env python
"""The EZSD stage gates on the shipped world: did each stage do its job, before any detector?

    .venv/bin/python benchmarks/ezsd_gates.py                      # the committed results
    .venv/bin/python benchmarks/ezsd_gates.py --images 4 --root /tmp/g   # quick

Measured (training/gates.py has the definitions and the statistics):

* renorm: CLIP zero-shot accuracy on the val split's GT crops (base and novel) before and after
  re-normalisation, paired (McNemar) on the same crops;
* proposals: for the config's grid, its coverage ceiling over every training object; then dense
  and cheap mode run **side by side on the same images** (alternating which goes first, image
  by image, so load drift hits both), with novel recall and precision at IoU 0.5 against the
  held-out novel annotations (train_all.json; the stage itself reads base boxes only) and
  images per second of each; the paper's grid's coverage for comparison;
* targets and detector: read from the pipeline's folders when they exist.

The proposal images are training images [--offset, --offset + --images): the cheap mode's
settings were chosen on images [0, --offset), so the reported ones did not choose them.

Writes <results>/ezsd_gates.json (with the command, machine and date).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import replace
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

import torch  # noqa: E402
from host_info import host_line  # noqa: E402
from training_bench import pipeline_front, setup_logging  # noqa: E402

logger = logging.getLogger("bench")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(REPO / "configs" / "synthetic.yaml"))
    p.add_argument("--pipeline-root", default=None, help="shared stages (default: the config's root)")
    p.add_argument("--results", default=str(REPO / "benchmarks" / "results"))
    p.add_argument("--images", type=int, default=16, help="training images for dense vs cheap")
    p.add_argument("--offset", type=int, default=24,
                   help="first of them (images before it chose the cheap settings)")
    args = p.parse_args(argv)
    setup_logging()

    from ovd.training.gates import (
        HeldOut,
        detector_gate,
        format_gates,
        grid_coverage,
        proposal_quality,
        renorm_gate,
        targets_gate,
    )
    from ovd.training.layout import final_weights
    from ovd.training.proposals import (
        AnchorGrid,
        ProposalConfig,
        TrainingImages,
        autocast,
        propose_image,
    )
    from ovd.training.targets import load_targets

    t_start = time.time()
    cfg, front = pipeline_front(args.config, args.pipeline_root)
    world, _ = front.world()
    raw = front.clip(world)[0]
    clip = front.renorm(raw)[0]
    det = front.world_dir / "detection"
    train_json, image_root = front.train_split()
    heldout = HeldOut.load(det / "annotations" / "train_all.json", det / "train")
    val = HeldOut.load(det / "annotations" / "val.json", det / "val")
    pcfg = ProposalConfig.from_config(cfg)
    report: dict = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": host_line(),
        "date": date.today().isoformat(),
        "world": str(front.world_dir),
    }

    logger.info("renorm gate on %s", val.json_file)
    report["renorm"] = renorm_gate(raw, clip, val, template=pcfg.template)
    report["renorm"]["config"] = clip.manifest["training"]["config"]
    report["renorm"]["steps"] = clip.manifest["training"]["steps"]

    data = TrainingImages.load(train_json, image_root)
    grid = AnchorGrid.from_config(pcfg, data.non_crowd_gt())
    paper = AnchorGrid.from_config(ProposalConfig())
    logger.info("grid coverage (%s anchors)", grid.sizes)
    proposals: dict = {
        "grid": {"sizes": grid.sizes, "strides": grid.strides, "ratios": grid.ratios},
        "grid_coverage50": grid_coverage(grid, heldout),
        "paper_grid_coverage50": grid_coverage(paper, heldout),
    }
    text = clip.text_embeddings(data.vocabulary, pcfg.template).float()
    modes = {m: replace(pcfg, mode=m) for m in ("dense", "cheap")}
    ids = data.image_ids[args.offset:args.offset + args.images]
    boxes = {m: {} for m in modes}
    seconds = {m: 0.0 for m in modes}
    forwards = {m: 0 for m in modes}
    for k, image_id in enumerate(ids):
        image = data.read(image_id)
        order = list(modes) if k % 2 == 0 else list(reversed(modes))
        for m in order:
            t0 = time.perf_counter()
            with torch.inference_mode(), autocast(clip, modes[m].precision):
                rec, stats = propose_image(clip, image, text, data.is_base, data.gt[image_id],
                                           modes[m], image_id, grid)
            seconds[m] += time.perf_counter() - t0
            forwards[m] += stats["clip_crops"] + stats["prior_forwards"]
            boxes[m][image_id] = rec["boxes"]
        logger.info("image %d/%d: dense %.1f s, cheap %.1f s so far", k + 1, len(ids),
                    seconds["dense"], seconds["cheap"])
    for m in modes:
        q = proposal_quality(boxes[m], heldout)
        q.update(images_per_s=len(ids) / seconds[m], clip_forwards_per_image=forwards[m] / len(ids),
                 config=json.loads(json.dumps(modes[m].identity())))
        proposals[m] = q
    proposals["image_ids"] = ids
    proposals["cheap_speedup"] = seconds["dense"] / seconds["cheap"]
    proposals["cheap_recall_ratio"] = (proposals["cheap"]["novel_recall50"]
                                       / max(proposals["dense"]["novel_recall50"], 1e-9))
    report["proposals"] = proposals

    if (front.layout.targets() / "manifest.json").is_file():
        report["targets"] = targets_gate(load_targets(front.layout.targets()), heldout)
    weights = final_weights(front.layout.detector)
    if weights.is_file():
        report["detector"] = detector_gate(weights)
    report["seconds"] = round(time.time() - t_start, 1)

    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    (results / "ezsd_gates.json").write_text(json.dumps(report, indent=2))
    print(format_gates({**report, "proposals": {**proposals["dense"],
                                                "grid_coverage50": proposals["grid_coverage50"],
                                                "mode": "dense"}}))
    print(format_gates({"proposals": {**proposals["cheap"], "mode": "cheap",
                                      "grid_coverage50": proposals["grid_coverage50"]}}))
    print(f"cheap: {proposals['cheap_speedup']:.1f}x dense's images/s at "
          f"{proposals['cheap_recall_ratio']:.0%} of its novel recall")
    return 0


if __name__ == "__main__":
    sys.exit(main())
