"""int8 variants of an export's detector graphs (`ovd export --onnx --quantize int8`).

onnxruntime's static quantizer rewrites `detector_encode.onnx` and `detector.onnx` in QDQ form:
weights int8 per output channel, activations uint8 with ranges calibrated on images of the
model's domain (the export validation's images), so onnxruntime's CPU provider runs the convolutions and
matrix products as int8 kernels. The small `detector_classify.onnx` (text products and NMS)
and the text tower stay float32. Why static and not dynamic: dynamic quantization turns the
backbone's convolutions into ConvInteger, which onnxruntime's CPU provider ran 3x slower than
float32 (432 vs 145 ms per 256 px image); restricted to MatMul/Gemm it changed little (109 vs
124 ms), and static QDQ ran at 74 vs 124 ms (one-off probes of the encode graph on a 2-core AMD
EPYC, 2026-12-04; `benchmarks/onnx_runtime.py` times the shipped int8 variant). float16 is not
offered: onnxruntime's float16 converter produced graphs the CPU provider refuses to load (type
errors at the Detectron2 constants), and that provider has few float16 kernels anyway.

Quantization moves region embeddings and boxes beyond the float32 validation's tolerances, so
an int8 export is judged by AP instead: `ovd eval --export DIR --backend onnx` on the float32
and the int8 graphs, and the export command refuses an int8 variant whose AP50 (all classes)
falls by more than its tolerance (training/export.py: quantize_export).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .manifest import ONNX_FILES

logger = logging.getLogger(__name__)

#: The graphs that are quantized (the costly, vocabulary-free part).
QUANTIZED_GRAPHS = ("onnx_encode", "onnx_detector")


class _Images:
    """onnxruntime's CalibrationDataReader over model inputs ({"image": (3, H, W) uint8})."""

    def __init__(self, inputs: Sequence[dict], text: np.ndarray | None):
        self.inputs, self.text, self.position = list(inputs), text, 0

    def get_next(self) -> dict | None:
        if self.position >= len(self.inputs):
            return None
        x = self.inputs[self.position]
        self.position += 1
        feed = {"image": np.asarray(x["image"], np.uint8)}
        if self.text is not None:
            feed["text"] = self.text
        return feed

    def rewind(self) -> None:
        self.position = 0


def quantize_graphs(folder: str | Path, inputs: Sequence[dict], text: np.ndarray) -> dict:
    """Replace the export's QUANTIZED_GRAPHS by static int8 (QDQ) versions, in place.

    Args:
        folder: an export folder with float32 ONNX graphs.
        inputs: calibration images as model inputs (preprocessed like the runtime does).
        text: (C, D) text embeddings fed to detector.onnx during calibration.

    Returns:
        The manifest's `onnx.quantization` record (method, calibration images, seconds).
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    folder = Path(folder)
    t0 = time.perf_counter()
    for key in QUANTIZED_GRAPHS:
        path = folder / ONNX_FILES[key]
        tmp = path.with_name(path.stem + ".int8.tmp.onnx")
        reader = _Images(inputs, np.asarray(text, np.float32) if key == "onnx_detector" else None)
        quantize_static(str(path), str(tmp), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                        weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8,
                        calibrate_method=CalibrationMethod.MinMax)
        tmp.replace(path)
    seconds = time.perf_counter() - t0
    logger.info("quantized %s to int8 (QDQ, calibrated on %d images) in %.0f s",
                ", ".join(ONNX_FILES[k] for k in QUANTIZED_GRAPHS), len(inputs), seconds)
    return {"precision": "int8", "graphs": [ONNX_FILES[k] for k in QUANTIZED_GRAPHS],
            "method": "onnxruntime quantize_static, QDQ, weights int8 per channel, activations uint8, "
                      "MinMax calibration", "calibration_images": len(inputs), "seconds": round(seconds, 1)}
