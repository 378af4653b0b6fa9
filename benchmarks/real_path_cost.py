#!/usr/bin/env python
"""What the offline EZSD stages cost at real CLIP size, per unit, and what that projects to for
OV-COCO / OV-LVIS on GPUs.

    .venv/bin/python benchmarks/real_path_cost.py            # ~3 min on 2 cores

Measured here, in one process, with a random-weight ViT-B/32 at 224 px (speed does not depend
on weight values) and 640x480 JPEGs like COCO's:

* decode: one image read as every stage reads it (`read_dataset_image`: Detectron2's reader,
  EXIF applied), ms/image;
* crop: EZSD crops cut from one decoded image in batches (`crop_and_resize`: RoIAlign), crops/s;
* encode: CLIP image forwards in batches, fp32 and bf16 autocast, crops/s;
* renorm step: a stage-1 training step (forward + backward, LayerNorms only), crops/s;
* anchors per image: the stored-image grid and the paper's (`--paper-density`).

Timing is `torch.utils.benchmark` (blocked_autorange), every unit in the same process one
after the other. The projection multiplies the per-image crop counts by the number of training
images and divides by a GPU throughput: the CPU's own measured figure, and the published
ViT-B/32 CLIP inference throughput of timm's benchmark (RTX 4090, AMP, batch 1024: 10,127
images/s; huggingface/pytorch-image-models results/benchmark-infer-amp-nchw-pt240-cu124-rtx4090.csv,
row vit_base_patch32_clip_224), labelled as an estimate. Crop cutting on the GPU (RoIAlign) and
decoding in other threads (ReadAhead) are assumed hidden behind the encoder there.

Writes benchmarks/results/real_path_cost.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.utils.benchmark as tb  # noqa: E402
from host_info import host_line  # noqa: E402
from training_bench import write_markdown  # noqa: E402

#: Published ViT-B/32 CLIP inference throughput (see the module docstring), images/s.
TIMM_VIT_B32_RTX4090_AMP = 10127.52
#: Training images: OV-COCO's train split (COCO 2017 train images with a base box, the usual
#: 48/17 protocol) and all of LVIS v1 train (an upper bound for OV-LVIS).
DATASETS = {"OV-COCO": 107_761, "OV-LVIS": 100_170}
#: Crops per image beyond the candidates: the 1.2x re-encoding of at most pre_filter_topk (1000)
#: NMS survivors (never more than the candidates) and, for the cheap mode, its prior's ViT
#: windows (9 for a 640x480 image and a 224-px CLIP).
RECROPS = 1000
CHEAP_WINDOWS = 9
#: The detector's own training, for scale: Detectron2's R50-FPN Faster R-CNN 1x (90k iterations
#: of 16 images = 1.44M images, the EZSD OV-COCO schedule's 360k x 4) at 0.210 s/iteration on 8
#: V100s (Detectron2 MODEL_ZOO.md), in V100-hours.
DETECTOR_1X_V100_HOURS = 0.210 * 90_000 * 8 / 3600


def timed(stmt, units: int, min_run_time: float) -> float:
    """Units per second of `stmt()` (median of torch.utils.benchmark's blocked_autorange)."""
    m = tb.Timer(stmt="f()", globals={"f": stmt}).blocked_autorange(min_run_time=min_run_time)
    return units / m.median


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clip", default="ViT-B-32", help="open_clip architecture (random weights)")
    p.add_argument("--batch", type=int, default=64, help="crops per CLIP forward")
    p.add_argument("--min-run-time", type=float, default=5.0, help="seconds per measurement")
    p.add_argument("--results", default=str(REPO / "benchmarks" / "results"))
    args = p.parse_args(argv)

    from PIL import Image

    from ovd.models.clip.model import load_clip
    from ovd.training.clip_pretrain import bf16_supported
    from ovd.training.clip_renorm import renorm_loss, trainable_parameter_names
    from ovd.training.data.coco_format import read_dataset_image
    from ovd.training.proposals import PAPER_DENSITY, AnchorGrid, ProposalConfig

    t_start = time.time()
    folder = REPO / "runs" / "bench" / "real_path_cost"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    # A photo-like JPEG (smooth gradients + noise) at COCO's most common size.
    yy, xx = np.mgrid[0:480, 0:640]
    pixels = np.stack([(xx / 640 * 255), (yy / 480 * 255), ((xx + yy) % 256)], axis=2)
    pixels = np.clip(pixels + rng.normal(0, 20, pixels.shape), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(folder / "photo.jpg", quality=90)
    record = {"file_name": "photo.jpg", "width": 640, "height": 480}

    clip = load_clip(args.clip)
    image = read_dataset_image(folder, record)
    grid_boxes = AnchorGrid.from_config(ProposalConfig()).anchors((480, 640))
    paper_boxes = AnchorGrid.from_config(ProposalConfig(**PAPER_DENSITY)).anchors((480, 640))
    boxes = grid_boxes[torch.randperm(len(grid_boxes), generator=torch.Generator().manual_seed(0))[:args.batch]]
    crops = clip.crop_boxes(image, boxes, enlarge=1.0)

    units = {"decode_ms_per_image": 1000 / timed(lambda: read_dataset_image(folder, record), 1, args.min_run_time),
             "crop_per_s": timed(lambda: clip.crop_boxes(image, boxes, enlarge=1.0), args.batch, args.min_run_time)}
    with torch.inference_mode():
        units["encode_fp32_per_s"] = timed(lambda: clip.encode_images(crops), args.batch, args.min_run_time)
        if bf16_supported():
            def encode_bf16():
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    return clip.encode_images(crops)
            units["encode_bf16_per_s"] = timed(encode_bf16, args.batch, args.min_run_time)

    model = clip.model.train()
    names = set(trainable_parameter_names(model, "vision"))
    for n, param in model.named_parameters():
        param.requires_grad_(n in names)
    text = torch.nn.functional.normalize(torch.randn(48, clip.embed_dim), dim=-1)
    labels = torch.randint(0, 48, (args.batch,))

    def renorm_step():
        loss = renorm_loss(model.encode_image(crops), text, labels, 100.0)
        loss.backward()

    units["renorm_step_per_s"] = timed(renorm_step, args.batch, args.min_run_time)
    units = {k: round(v, 2) for k, v in units.items()}

    per_image = {"dense (stored grid)": len(grid_boxes) + RECROPS,
                 "dense (paper density)": len(paper_boxes) + RECROPS,
                 "cheap (top 1000)": CHEAP_WINDOWS + 1000 + min(RECROPS, 1000),
                 "cheap (top 100)": CHEAP_WINDOWS + 100 + min(RECROPS, 100)}
    cpu_rate = 1 / (1 / units["crop_per_s"] + 1 / units.get("encode_bf16_per_s", units["encode_fp32_per_s"]))
    projection = {ds: {mode: {"crops_per_image": n,
                              "cpu_process_hours": round(images * n / cpu_rate / 3600, 1),
                              "gpu_hours_estimate": round(images * n / TIMM_VIT_B32_RTX4090_AMP / 3600, 1),
                              "vs_detector_training": round(images * n / TIMM_VIT_B32_RTX4090_AMP / 3600
                                                            / DETECTOR_1X_V100_HOURS, 3)}
                           for mode, n in per_image.items()}
                  for ds, images in DATASETS.items()}
    report = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "machine": host_line(),
              "date": time.strftime("%Y-%m-%d"), "clip": args.clip, "batch": args.batch,
              "units": units, "anchors_640x480": {"stored grid": len(grid_boxes), "paper density": len(paper_boxes)},
              "cpu_crops_per_s_end_to_end": round(cpu_rate, 2),
              "gpu_throughput_estimate": {"images_per_s": TIMM_VIT_B32_RTX4090_AMP,
                                          "source": "timm results/benchmark-infer-amp-nchw-pt240-cu124-rtx4090.csv, "
                                                    "vit_base_patch32_clip_224 (RTX 4090, AMP, batch 1024)"},
              "detector_1x_v100_hours": DETECTOR_1X_V100_HOURS,
              "projection": projection, "seconds": round(time.time() - t_start, 1)}
    results = Path(args.results)
    (results / "real_path_cost.json").write_text(json.dumps(report, indent=2) + "\n")
    write_markdown(results / "real_path_cost.md", format_report(report))
    print(format_report(report))
    return 0


def format_report(r: dict) -> str:
    u = r["units"]
    lines = [f"# Offline stages at real CLIP size ({r['clip']}, 224 px, random weights)", "",
             f"Command: `{r['command']}`  ", f"Machine: {r['machine']}  ", f"Date: {r['date']}", "",
             "| unit (this CPU, one process) | value |", "|---|---:|",
             f"| decode a 640x480 JPEG | {u['decode_ms_per_image']:.1f} ms |",
             f"| cut EZSD crops (RoIAlign, batch {r['batch']}) | {u['crop_per_s']:.0f} crops/s |",
             f"| CLIP encode, fp32 | {u['encode_fp32_per_s']:.1f} crops/s |"]
    if "encode_bf16_per_s" in u:
        lines.append(f"| CLIP encode, bf16 autocast | {u['encode_bf16_per_s']:.1f} crops/s |")
    lines += [f"| stage-1 training step (LayerNorms, forward + backward) | {u['renorm_step_per_s']:.1f} crops/s |",
              f"| anchors of a 640x480 image: stored grid / paper density | "
              f"{r['anchors_640x480']['stored grid']} / {r['anchors_640x480']['paper density']} |", "",
              "Projection: hours = training images x crops per image / crops per second. CPU: this "
              f"process's crop + encode rate ({r['cpu_crops_per_s_end_to_end']:.1f} crops/s). GPU "
              f"(**estimate**): {r['gpu_throughput_estimate']['images_per_s']:,.0f} crops/s, "
              f"{r['gpu_throughput_estimate']['source']}.", "",
              f"Detector training for scale: {r['detector_1x_v100_hours']:.0f} V100-hours (Detectron2's "
              "R50-FPN 1x, MODEL_ZOO.md: 0.210 s/iteration x 90k on 8 V100s; EZSD's OV-COCO schedule sees "
              "as many images). The last column divides 4090-hours by V100-hours: on equal GPUs the "
              "stage-2 side would grow by the 4090 / V100 speed ratio, which is not measured here.", "",
              "| dataset | stage-2 mode | crops / image | CPU process-hours | GPU-hours (estimate) | / detector training |",
              "|---|---|---:|---:|---:|---:|"]
    for ds, modes in r["projection"].items():
        for mode, v in modes.items():
            lines.append(f"| {ds} | {mode} | {v['crops_per_image']:,} | {v['cpu_process_hours']:,} | "
                         f"{v['gpu_hours_estimate']} | {v['vs_detector_training']:.2f}x |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
