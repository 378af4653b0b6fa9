#!/usr/bin/env python
"""EZSD stage 1's update budget, chosen by the renorm gate on a selection set.

    .venv/bin/python benchmarks/renorm_budget.py          # the committed results

Each row re-normalises the pipeline's pretrained CLIP (`training.clip_renorm.renorm_clip`) with
one (tune, lr, steps) budget and measures the renorm gate (`training.gates.renorm_gate`: paired
zero-shot accuracy over all category names, before vs after, per tier) on the **selection
set**: the GT crops of the first --images training images of train_all.json. Its novel crops
are never seen by re-normalisation (which trains on base boxes of train_base.json), and neither
val nor test is touched, so the choice does not leak into a reported number.

The rule: the row with the largest lower CI bound of the novel accuracy change; a row that
lowers base accuracy measurably (CI below 0) is not eligible. Writes
<results>/renorm_budget.json.
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

from host_info import host_line
from training_bench import pipeline_front, setup_logging

REPO = Path(__file__).resolve().parents[1]
logger = logging.getLogger("bench")

#: (tune, lr, steps): the configured budget first, then smaller ones and the vision-only recipe.
BUDGETS = (("vision+text", 1e-4, 200), ("vision+text", 3e-5, 200), ("vision+text", 1e-4, 50),
           ("vision", 1e-4, 200), ("vision", 3e-5, 200), ("vision", 1e-4, 50))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(REPO / "configs" / "synthetic.yaml"))
    p.add_argument("--pipeline-root", default=None, help="shared stages (default: the config's root)")
    p.add_argument("--root", default="runs/bench/renorm_budget", help="one CLIP folder per row")
    p.add_argument("--results", default=str(REPO / "benchmarks" / "results"))
    p.add_argument("--images", type=int, default=300, help="selection set: first N training images")
    args = p.parse_args(argv)
    setup_logging()

    from ovd.training.clip_renorm import RenormConfig, renorm_clip
    from ovd.training.gates import HeldOut, renorm_gate
    from ovd.training.progress import progress

    cfg, front = pipeline_front(args.config, args.pipeline_root)
    world, _ = front.world()
    parent = front.clip(world)[0]
    det = front.world_dir / "detection"
    selection = HeldOut.load(det / "annotations" / "train_all.json", det / "train")
    train_json, image_root = front.train_split()
    base_cfg = RenormConfig.from_config(cfg)
    report = {
        "what": "EZSD stage 1 update budget, chosen by the renorm gate on a selection set",
        "selection_set": f"GT crops (1.2x) of the first {args.images} training images of train_all.json",
        "parent": {"clip": str(front.clip_dir), "sha256": parent.manifest["weights"]["sha256"],
                   "steps": parent.manifest["training"]["config"]["steps"]},
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": host_line(), "date": date.today().isoformat(), "rows": [],
    }
    for tune, lr, steps in BUDGETS:
        rcfg = replace(base_cfg, tune=tune, lr=lr, epochs=1, min_steps=steps)
        out = Path(args.root) / f"{tune.replace('+', '_')}_lr{lr:g}_steps{steps}"
        t0 = time.time()
        clip = renorm_clip(front.clip_dir, train_json, image_root, out, rcfg, progress=progress)
        seconds = time.time() - t0
        gate = renorm_gate(parent, clip, selection, template=rcfg.template, max_images=args.images)
        row = {"tune": tune, "lr": lr, "steps": clip.manifest["training"]["steps"], "seconds": round(seconds),
               **{g: {k: gate[g][k] for k in ("acc_before", "acc_after", "diff", "diff_ci95", "n")}
                  for g in gate if isinstance(gate[g], dict) and "acc_before" in gate[g]}}
        report["rows"].append(row)
        logger.info("%s lr %g %d steps: base %+.1f%%, novel %+.1f%% %s", tune, lr, steps,
                    100 * row["base"]["diff"], 100 * row["novel"]["diff"],
                    [round(100 * x, 1) for x in row["novel"]["diff_ci95"]])
        Path(args.results).mkdir(parents=True, exist_ok=True)
        (Path(args.results) / "renorm_budget.json").write_text(json.dumps(report, indent=1) + "\n")
    eligible = [r for r in report["rows"] if r["base"]["diff_ci95"][1] >= 0]
    best = max(eligible, key=lambda r: r["novel"]["diff_ci95"][0]) if eligible else None
    report["chosen"] = ({k: best[k] for k in ("tune", "lr", "steps")} if best else None)
    report["rule"] = ("largest lower CI bound of the novel accuracy change among rows whose base "
                      "accuracy change is not measurably negative")
    (Path(args.results) / "renorm_budget.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report["chosen"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
