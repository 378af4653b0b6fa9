"""onnxruntime vs PyTorch per image on the shipped detector (`python benchmarks/onnx_runtime.py`).

Adds the ONNX graphs to a copy of the export (`ovd.models.onnx_export.export_onnx`, validated
against PyTorch) unless --export already has them, then times `detector.onnx` under
onnxruntime (CPUExecutionProvider) against the PyTorch model (`model([inputs], text=T)`), in
the same process, on synthetic scenes at the export's test size, for a 16- and a 1000-name
vocabulary (`ovd.models.onnx_export.time_onnx_vs_torch`: median over repeats after a warm-up).
Results go to stdout and to benchmarks/results/onnx_runtime.md.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from host_info import host_info, host_line

from ovd.models.onnx_export import export_onnx, time_onnx_vs_torch
from ovd.models.registry import DEFAULT_MODEL

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


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
        "by both runtimes). One image per call, the full detector (backbone, RPN, box head, "
        "classification, NMS); median seconds over the repeats after one warm-up call, same process.",
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
    p.add_argument("--repeats", type=int, default=20, help="timed calls per runtime and vocabulary")
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
        rows = [time_onnx_vs_torch(folder, repeats=args.repeats, classes=c, threads=args.threads)
                for c in (16, 1000)]
    command = "python benchmarks/onnx_runtime.py" + (f" --threads {args.threads}" if args.threads else "")
    host["torch_threads"] = rows[0]["threads"]  # as timed (host_info ran before --threads applied)
    text = report(rows, host, args.export, manifest, command)
    print(text)
    Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
