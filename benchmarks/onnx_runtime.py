"""onnxruntime vs PyTorch on the shipped detector (`python benchmarks/onnx_runtime.py`).

Adds the ONNX graphs to a copy of the export (`ovd.models.onnx_export.export_onnx`, validated
against PyTorch) unless --export already has them, then measures the two runtimes the service and
`ovd.Detector` use (`ovd.models.runtime`; the onnxruntime one runs the two ONNX halves under
CPUExecutionProvider and never imports torch):
- start-up, in a fresh interpreter per runtime: seconds to import and load the export, seconds
  to the first detection, and the process's peak RSS after it;
- an int8 copy (`ovd export --onnx --quantize int8`), its AP on the world's val split against
  the float32 graphs (unless --no-int8);
- throughput, in one process, side by side: `encode` + `classify` per image at the export's test
  size and at 640 px (the shortest edge the network sees), for a 10- and a 1000-name
  vocabulary, with 1 and 8 images per call (`torch.utils.benchmark`, blocked_autorange, median,
  after a warm-up call).
Results go to stdout and to benchmarks/results/onnx_runtime.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from host_info import host_info, host_line

from ovd.models.onnx_export import export_onnx, random_vocabularies
from ovd.models.registry import DEFAULT_MODEL

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def world_scenes(size: int, count: int = 4, seed: int = 2026) -> list:
    """(size, size, 3) RGB scenes of the synthetic world's validation split (a fresh seed)."""
    from ovd.training.data.synthetic import WorldConfig, detection_sample

    cfg = WorldConfig.from_dict({"seed": seed, "image_size": size})
    return [detection_sample(cfg, "val", i)[0] for i in range(count)]


def time_runtimes(folder: Path, *, classes: int, size: int, batch: int, min_run_time: float,
                  threads: int = 0, int8: Path | None = None) -> dict:
    """Median seconds per image of `encode` + `classify` in the PyTorch and the onnxruntime
    runtime of one export, and of its int8 copy when given (same process, same scenes resized
    to a `size` px shortest edge, `batch` images per call, random C-name text)."""
    import dataclasses

    import torch
    from torch.utils import benchmark

    from ovd.models.runtime import ClassifyOptions, load_runtime
    from ovd.service.settings import Settings

    # Bounded like the service (OVD_MAX_CLASSIFY_CANDIDATES): per-name scores put most of the
    # 1000 x regions pairs above the threshold, and an unbounded NMS over them takes minutes.
    options = ClassifyOptions(max_candidates=Settings.model_fields["max_classify_candidates"].default)
    if threads:
        torch.set_num_threads(threads)
    runtimes = {name: load_runtime(folder, backend=name, threads=threads) for name in ("torch", "onnx")}
    if int8 is not None:
        runtimes["int8"] = load_runtime(int8, backend="onnx", threads=threads)
    prep = dataclasses.replace(runtimes["torch"].preprocessing, min_size=size, max_size=max(size, 1333))
    inputs = [prep(rgb) for rgb in world_scenes(size, count=8)]
    text = random_vocabularies(int(runtimes["torch"].manifest["embed_dim"]), (classes,))[0]
    names = [f"class {i}" for i in range(classes)]
    calls = [inputs[i:i + batch] for i in range(0, len(inputs), batch)]
    seconds = {}
    for name, rt in runtimes.items():
        def detect(rt=rt):
            for xs in calls:
                rt.classify(rt.encode(xs), text, xs, names, options)

        detect()  # warm-up
        timer = benchmark.Timer(stmt="detect()", globals={"detect": detect}, num_threads=torch.get_num_threads())
        measurement = timer.blocked_autorange(min_run_time=min_run_time)
        seconds[name] = measurement.median / len(inputs)
        repeats = len(measurement.times)
    h, w = inputs[0]["image"].shape[-2:]
    return {"torch_s": seconds["torch"], "onnx_s": seconds["onnx"], "speedup": seconds["torch"] / seconds["onnx"],
            "int8_s": seconds.get("int8"),
            "repeats": repeats, "classes": classes, "batch": batch, "max_candidates": options.max_candidates, "image_size": [int(h), int(w)],
            "threads": threads or torch.get_num_threads()}


STARTUP = """
import sys, time
t0 = time.perf_counter()
from ovd.models.runtime import load_runtime
import numpy as np
rt = load_runtime(sys.argv[1], backend=sys.argv[2], threads=int(sys.argv[3]))
loaded = time.perf_counter() - t0
x = rt.preprocessing(np.full((256, 256, 3), 127, np.uint8))
text = rt.encode_text(["a red ring", "a blue star"])
rt.classify(rt.encode([x]), text, [x], ["red ring", "blue star"])
first = time.perf_counter() - t0
# VmHWM, not ru_maxrss: Linux keeps ru_maxrss across execve, so it would report the parent's peak.
hwm = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(loaded, first, hwm, "torch" in sys.modules)
"""


def startup(folder: Path, backend: str, threads: int) -> dict:
    """A fresh interpreter: seconds to import + load the export, seconds to the first detection
    (text encoding included), peak RSS (bytes), and whether torch was imported."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", STARTUP, str(folder), backend, str(threads)],
                         capture_output=True, text=True, check=True)
    loaded, first, rss, torch_imported = out.stdout.split()[-4:]
    return {"backend": backend, "load_s": float(loaded), "first_detection_s": float(first),
            "peak_rss_bytes": int(rss), "imports_torch": torch_imported == "True"}


def int8_copy(folder: Path, out: Path, config: str, tolerance: float) -> dict:
    """`ovd export --onnx --quantize int8` on a copy of the export: its quantization record
    (AP50/AP of the float32 and int8 graphs on the world's val split)."""
    import shutil
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from training_bench import pipeline_front

    from ovd.training.data.coco_format import load_coco_json
    from ovd.training.export import quantize_export

    _, front = pipeline_front(config, None)
    front.world()  # registers synth_train / synth_val / synth_test
    train = front.world_dir / "detection" / "annotations" / "train_base.json"
    images = front.world_dir / "detection" / "train"
    calibration = [images / im["file_name"] for im in load_coco_json(train)["images"][:32]]
    shutil.copytree(folder, out)
    return quantize_export(out, dataset="synth_val", calibration=calibration, tolerance=tolerance)


def report(rows: list[dict], starts: list[dict], host: dict, export: str, manifest: dict, command: str,
           quantization: dict | None = None) -> str:
    """The results as a markdown document: machine, command, tables, validation."""
    validation, dtype = manifest["onnx"]["validation"], manifest.get("weights_dtype", "float32")
    lines = [
        "# onnxruntime vs PyTorch",
        "",
        f"Machine: {host_line(host)}, load average {host['load_avg_1m_at_start']:.2f} at start "
        f"({host['platform']}, Python {host['python']}); "
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC.",
        "",
        f"Command: `{command}`. Export: `{export}` (weights stored in {dtype}, computed in float32 "
        "by both runtimes).",
        "",
        "## Start-up (a fresh interpreter per runtime)",
        "",
        "| runtime | import + load s | to first detection s | peak RSS MiB | imports torch |",
        "|---|---:|---:|---:|---|",
    ]
    for s in starts:
        lines.append(f"| {s['backend']} | {s['load_s']:.2f} | {s['first_detection_s']:.2f} | "
                     f"{s['peak_rss_bytes'] / 2**20:.0f} | {'yes' if s['imports_torch'] else 'no'} |")
    lines += [
        "",
        "## Per image (same process, side by side)",
        "",
        "`encode` + `classify` through `ovd.models.runtime` (backbone, RPN, box head, classification, "
        "NMS) on 8 world scenes resized to the shortest edge shown, `batch` images per call; "
        "`torch.utils.benchmark` median per image after one warm-up call; repeats = measured "
        "passes over the 8 images. The onnxruntime graphs take one image: a batch of 8 is 8 calls. "
        f"Classification at the default options, candidates bounded at {rows[0]['max_candidates']} as in the service.",
        "",
        "| vocabulary | image | batch | threads | PyTorch ms | onnxruntime ms | speed-up | int8 ms | int8 speed-up | repeats |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        h, w = r["image_size"]
        int8 = (f"{1000 * r['int8_s']:.1f} | {r['torch_s'] / r['int8_s']:.2f}x" if r.get("int8_s") else "— | —")
        lines.append(f"| {r['classes']} names | {h} x {w} | {r['batch']} | {r['threads']} | "
                     f"{1000 * r['torch_s']:.1f} | {1000 * r['onnx_s']:.1f} | {r['speedup']:.2f}x | {int8} | {r['repeats']} |")
    size = rows[0]["image_size"]
    best = {name: max(1 / r[f"{name}_s"] for r in rows if r["image_size"] == size and r.get(f"{name}_s"))
            for name in ("torch", "onnx", "int8") if any(r.get(f"{name}_s") for r in rows)}
    lines += ["", f"Images per second at the best batch ({size[0]} x {size[1]}, any vocabulary size): "
              + ", ".join(f"{name} {v:.2f}" for name, v in best.items()) + "."]
    if quantization:
        v = quantization["validation"]
        lines += ["", f"## int8 (`ovd export --onnx --quantize int8`: {quantization['method']}, "
                  f"{quantization['calibration_images']} calibration images)", "",
                  f"AP on {v['dataset']} through onnxruntime (`evaluate_runtime`), float32 vs int8 graphs; "
                  f"kept because AP50 (all) fell by at most {v['tolerance_ap50_all']} points:", "",
                  "| graphs | AP50 all | AP50 novel | AP50 base | AP all |", "|---|---:|---:|---:|---:|"]
        for name in ("fp32", "int8"):
            lines.append(f"| {name} | {v[f'all_AP50_{name}']:.2f} | {v[f'novel_AP50_{name}']:.2f} | "
                         f"{v[f'base_AP50_{name}']:.2f} | {v[f'all_AP_{name}']:.2f} |")
    lines += ["", "Validation of the graphs against PyTorch at export (`manifest.json` → `onnx.validation`): "
              f"{validation['comparisons']} comparisons, {validation['detections']} detections, max box "
              f"difference {validation['max_box_diff_px']:.2g} px, max score difference "
              f"{validation['max_score_diff']:.2g}.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--export", default=str(DEFAULT_MODEL), help="export folder (ONNX added to a copy if absent)")
    p.add_argument("--min-run-time", type=float, default=3.0, help="seconds timed per runtime and setting")
    p.add_argument("--threads", type=int, default=0, help="intra-op threads of both (0: library defaults)")
    p.add_argument("--out", default=str(RESULTS / "onnx_runtime.md"))
    p.add_argument("--no-int8", dest="int8", action="store_false", help="skip the int8 copy")
    p.add_argument("--int8-tolerance", type=float, default=1.0, help="AP50 (all) points the int8 graphs may lose")
    p.add_argument("--config", default=str(ROOT / "configs" / "synthetic.yaml"),
                   help="pipeline config whose world's val split measures the int8 AP")
    args = p.parse_args(argv)
    host = host_info()
    with tempfile.TemporaryDirectory(prefix="ovd-onnx-") as tmp:
        folder = Path(args.export)
        manifest = json.loads((folder / "manifest.json").read_text())
        if "onnx" not in manifest:
            folder = Path(tmp) / "export"
            manifest = json.loads(export_onnx(args.export, folder).read_text())
        int8, quantization = None, None
        if args.int8:
            int8 = Path(tmp) / "int8"
            quantization = int8_copy(folder, int8, args.config, args.int8_tolerance)
        starts = [startup(folder, backend, args.threads) for backend in ("torch", "onnx")]
        if int8 is not None:
            starts.append({**startup(int8, "onnx", args.threads), "backend": "onnx int8"})
        size = int(manifest["input"]["min_size_test"])
        rows = [time_runtimes(folder, classes=c, size=s, batch=b, min_run_time=args.min_run_time,
                              threads=args.threads, int8=int8)
                for s in (size, 640) for c in (10, 1000) for b in (1, 8)]
    command = " ".join(["python benchmarks/onnx_runtime.py", *(sys.argv[1:] if argv is None else argv)])
    host["torch_threads"] = rows[0]["threads"]  # as timed (host_info ran before --threads applied)
    text = report(rows, starts, host, args.export, manifest, command, quantization)
    print(text)
    Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
