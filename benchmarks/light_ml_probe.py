#!/usr/bin/env python
"""How much does Light-ML rewrite the box head's branch vectors of a trained student?

    .venv/bin/python benchmarks/light_ml_probe.py runs/bench/compress/students/cid_lightml-seed0

For each student folder (a training output of `ovd compress` or benchmarks/compress_students.py
with Light-ML on), runs the first --images synth_val images through backbone, RPN and box head
and prints, over all proposals, ||lift|| / ||branch|| and the mean cosine between the lift and
the branch vector, for the classification and the regression branch (lift = Light-ML's output
minus its input), and the share of zero (ReLU-dead) entries of each branch vector. Used for the
analysis in benchmarks/results/compress_students_world_v1.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("students", nargs="+", type=Path, help="student training output folders")
    p.add_argument("--world", type=Path, default=REPO / "runs" / "synthetic" / "world")
    p.add_argument("--images", type=int, default=8)
    args = p.parse_args(argv)

    from compress_students import load_student
    from detectron2.data import DatasetCatalog
    from detectron2.data import detection_utils as utils

    from ovd.training.data.synthetic import register_world

    register_world(args.world, overwrite=True)
    inputs = []
    for rec in DatasetCatalog.get("synth_val")[:args.images]:
        image = utils.read_image(rec["file_name"], format="RGB")
        inputs.append({"image": torch.as_tensor(image.transpose(2, 0, 1).copy()),
                       "height": image.shape[0], "width": image.shape[1]})
    for folder in args.students:
        model = load_student(folder)
        predictor = model.roi_heads.box_predictor
        if predictor.light_ml is None:
            print(f"{folder}: no Light-ML")
            continue
        with torch.inference_mode():
            images = model.preprocess_image(inputs)
            features = model.backbone(images.tensor)
            proposals, _ = model.proposal_generator(images, features, None)
            x = model.roi_heads.box_features(features, [q.proposal_boxes for q in proposals]).flatten(1)
            branches = (predictor.cls_branch(x), predictor.reg_branch(x))
            lifted = predictor.light_ml(*branches)
        parts = []
        for name, f, g in zip(("cls", "reg"), branches, lifted, strict=True):
            lift = g - f
            parts.append(f"{name}: |lift|/|branch| {float(lift.norm() / f.norm()):.2f}, "
                         f"cos {float(F.cosine_similarity(lift, f).mean()):.2f}, "
                         f"zero entries {float((f == 0).float().mean()):.2f}")
        print(f"{folder} ({len(x)} proposals): " + "; ".join(parts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
