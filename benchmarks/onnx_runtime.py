"""onnxruntime vs PyTorch per image on the shipped detector (`python benchmarks/onnx_runtime.py`).

Adds the ONNX graphs to a copy of the export (`ovd.models.onnx_export.export_onnx`, validated
against PyTorch) unless --export already has them, then times the two runtimes the service and
`ovd.Detector` use (`ovd.models.runtime`: `encode` + `classify` of one preprocessed image, the
onnxruntime one on the two ONNX halves under CPUExecutionProvider, the PyTorch detector never
loaded by it), in the same process, on synthetic-world scenes at the export's test size, for a
16- and a 1000-name vocabulary: `torch.utils.benchmark` (blocked_autorange, median) after a
warm-up call. Results go to stdout and to benchmarks/results/onnx_runtime.md.
"""

from __future__ import annotations

import argparse
import json
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


def time_runtimes(folder: Path, *, classes: int, min_run_time: float, threads: int = 0) -> dict:
    """Median seconds per image of `encode` + `classify` in the PyTorch and the onnxruntime
    runtime of one export (same process, same preprocessed scenes, random C-name text)."""
    import torch
    from torch.utils import benchmark

    from ovd.models.runtime import load_runtime

    if threads:
        torch.set_num_threads(threads)
    runtimes = {name: load_runtime(folder, backend=name, threads=threads) for name in ("torch", "onnx")}
    prep = runtimes["torch"].preprocessing
    inputs = [prep(rgb) for rgb in world_scenes(prep.min_size)]
    text = random_vocabularies(int(runtimes["torch"].manifest["embed_dim"]), (classes,))[0]
    names = [f"class {i}" for i in range(classes)]
    seconds = {}
    for name, rt in runtimes.items():
        def detect(rt=rt):
            for x in inputs:
                rt.classify(rt.encode([x]), text, [x], names)

        detect()  # warm-up
        timer = benchmark.Timer(stmt="detect()", globals={"detect": detect}, num_threads=torch.get_num_threads())
        measurement = timer.blocked_autorange(min_run_time=min_run_time)
        seconds[name] = measurement.median / len(inputs)
        repeats = len(measurement.times)
    h, w = inputs[0]["image"].shape[-2:]
    return {"torch_s": seconds["torch"], "onnx_s": seconds["onnx"], "speedup": seconds["torch"] / seconds["onnx"],
            "repeats": repeats, "classes": classes, "image_size": [int(h), int(w)],
            "threads": threads or torch.get_num_threads()}


def report(rows: list[dict], host: dict, export: str, manifest: dict, command: str) -> str:
    """The results as a markdown document: machine, command, table, validation."""
    validation, dtype = manifest["onnx"]["validation"], manifest.get("weights_dtype", "float32")
    lines = [
        "# onnxruntime vs PyTorch, per image",
        "",
        f"Machine: {host_line(host)}, load average {host['load_avg_1m_at_start']:.2f} at start "
        f"({host['platform']}, Python {host['python']}); "
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC.",
        "",
        f"Command: `{command}`. Export: `{export}` (weights stored in {dtype}, computed in float32 "
        "by both runtimes). One preprocessed image per call through `ovd.models.runtime` "
        "(`encode` + `classify`: backbone, RPN, box head, classification, NMS); "
        "`torch.utils.benchmark` median per image after one warm-up call, same process; "
        "repeats = measured blocks of 4 images.",
        "",
        "| vocabulary | image | threads | PyTorch ms | onnxruntime ms | speed-up | repeats |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        h, w = r["image_size"]
        lines.append(f"| {r['classes']} names | {h} x {w} | {r['threads']} | {1000 * r['torch_s']:.1f} | "
                     f"{1000 * r['onnx_s']:.1f} | {r['speedup']:.2f}x | {r['repeats']} |")
    lines += ["", "Validation of the graphs against PyTorch at export (`manifest.json` → `onnx.validation`): "
              f"{validation['comparisons']} comparisons, {validation['detections']} detections, max box "
              f"difference {validation['max_box_diff_px']:.2g} px, max score difference "
              f"{validation['max_score_diff']:.2g}.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--export", default=str(DEFAULT_MODEL), help="export folder (ONNX added to a copy if absent)")
    p.add_argument("--min-run-time", type=float, default=5.0, help="seconds timed per runtime and vocabulary")
    p.add_argument("--threads", type=int, default=0, help="intra-op threads of both (0: library defaults)")
    p.add_argument("--out", default=str(RESULTS / "onnx_runtime.md"))
    args = p.parse_args(argv)
    host = host_info()
    with tempfile.TemporaryDirectory(prefix="ovd-onnx-") as tmp:
        folder = Path(args.export)
        manifest = json.loads((folder / "manifest.json").read_text())
        if "onnx" not in manifest:
            folder = Path(tmp) / "export"
            manifest = json.loads(export_onnx(args.export, folder).read_text())
        rows = [time_runtimes(folder, classes=c, min_run_time=args.min_run_time, threads=args.threads)
                for c in (16, 1000)]
    command = "python benchmarks/onnx_runtime.py" + (f" --threads {args.threads}" if args.threads else "")
    host["torch_threads"] = rows[0]["threads"]  # as timed (host_info ran before --threads applied)
    text = report(rows, host, args.export, manifest, command)
    print(text)
    Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
