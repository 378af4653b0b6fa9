"""Everything an onnxruntime client needs besides the graphs, in one file with no project
imports: the detector's input transform, CLIP's tokenizer, and boxes back to the original
image. It imports numpy and PIL, and `tokenizers` + `ftfy` for text.

`ovd export --onnx` copies this file into the export as ``portable.py`` (listed in the manifest
with its sha256), so a client with onnxruntime alone runs the export::

    import importlib.util, json, sys, numpy as np, onnxruntime as ort
    from PIL import Image
    spec = importlib.util.spec_from_file_location("portable", "EXPORT/portable.py")
    portable = sys.modules["portable"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(portable)
    manifest = json.load(open("EXPORT/manifest.json"))
    prep = portable.Preprocessing.from_manifest(manifest)
    tokens = portable.Tokenizer.from_manifest("EXPORT", manifest)(["a photo of a red ring"])
    text = ort.InferenceSession("EXPORT/text_encoder.onnx").run(None, {"tokens": tokens})[0]
    x = prep(np.asarray(Image.open("photo.jpg").convert("RGB")))
    boxes, scores, classes = ort.InferenceSession("EXPORT/detector.onnx").run(
        None, {"image": x["image"], "text": text})
    boxes, keep = portable.to_original_boxes(boxes, x)   # pixels of photo.jpg

The project's own runtimes (models/runtime.py, models/onnx_runtime.py) import these very
classes, so the shipped file is the code that was tested.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

START, END = "<start_of_text>", "<end_of_text>"
#: The size divisor of an export whose manifest predates the field (every shipped detector
#: so far is an FPN, which pads to multiples of 32).
DEFAULT_SIZE_DIVISIBILITY = 32


@dataclass(frozen=True)
class Preprocessing:
    """The detector's test-time input transform, read from its manifest.

    Attributes:
        input_format: "RGB" or "BGR", the channel order the network expects.
        min_size, max_size: Detectron2's ResizeShortestEdge test sizes, pixels.
        size_divisibility: the backbone pads a batch to multiples of this.
    """

    input_format: str
    min_size: int
    max_size: int
    size_divisibility: int = DEFAULT_SIZE_DIVISIBILITY

    @classmethod
    def from_manifest(cls, manifest: dict) -> Preprocessing:
        spec = manifest["input"]
        return cls(str(spec["format"]), int(spec["min_size_test"]), int(spec["max_size_test"]),
                   int(spec.get("size_divisibility", DEFAULT_SIZE_DIVISIBILITY)))

    def resized_shape(self, height: int, width: int) -> tuple[int, int]:
        """(h, w) after the shortest-edge resize (Detectron2's rounding, exactly)."""
        scale = self.min_size / min(height, width)
        h, w = (self.min_size, scale * width) if height < width else (scale * height, self.min_size)
        if max(h, w) > self.max_size:
            shrink = self.max_size / max(h, w)
            h, w = h * shrink, w * shrink
        return int(h + 0.5), int(w + 0.5)

    def __call__(self, rgb: np.ndarray) -> dict:
        """Model input of one (H, W, 3) uint8 RGB image.

        Returns:
            {"image": (3, h, w) uint8 array in `input_format` order, "height": H, "width": W}
            (Detectron2's input dict, numpy so the onnxruntime runtime needs no torch;
            height/width are the original size boxes come back in).
        """
        height, width = rgb.shape[:2]
        h, w = self.resized_shape(height, width)
        resized = rgb if (h, w) == (height, width) else np.asarray(
            Image.fromarray(rgb).resize((w, h), Image.BILINEAR))
        if self.input_format == "BGR":
            resized = resized[:, :, ::-1]
        return {"image": np.ascontiguousarray(resized.transpose(2, 0, 1)), "height": height, "width": width}

    def batch_key(self, model_input: dict) -> tuple[int, int]:
        """The padded (h, w) of an input: only inputs with one key are encoded together, since
        the detector's GroupNorm sees the padding (a mixed batch would change detections)."""
        _, h, w = model_input["image"].shape
        d = max(self.size_divisibility, 1)
        return math.ceil(h / d) * d, math.ceil(w / d) * d


def to_original_boxes(boxes: np.ndarray, model_input: dict) -> tuple[np.ndarray, np.ndarray]:
    """Boxes in the resized input's pixels -> the original image's.

    Scales by original / resized size and clips to the image, as Detectron2's
    `detector_postprocess` does.

    Returns:
        ((N, 4) float32 XYXY boxes, (N,) bool mask of those still non-empty: keep these).
    """
    _, h, w = model_input["image"].shape
    height, width = int(model_input["height"]), int(model_input["width"])
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4) * np.array(
        [width / w, height / h, width / w, height / h], np.float32)
    boxes[:, 0::2] = boxes[:, 0::2].clip(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clip(0, height)
    return boxes, (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])


class Tokenizer:
    """CLIP's tokenizer from an export's tokenizer.json, returning numpy token ids: open_clip's
    SimpleTokenizer reproduced (ftfy + HTML unescape, whitespace collapsed by the BPE's
    pre-tokenizer, lower case, [start] + ids + [end], truncated with the end kept, zero-padded)."""

    def __init__(self, path: str | Path, context_length: int):
        from tokenizers import Tokenizer as HFTokenizer

        self.tokenizer = HFTokenizer.from_file(str(path))
        self.context_length = int(context_length)
        self.start = self.tokenizer.token_to_id(START)
        self.end = self.tokenizer.token_to_id(END)
        if self.start is None or self.end is None:
            raise ValueError(f"{path} lacks CLIP's {START} / {END} tokens")

    @classmethod
    def from_manifest(cls, folder: str | Path, manifest: dict) -> Tokenizer:
        """The tokenizer of an ONNX export folder (its file and context length per manifest)."""
        return cls(Path(folder) / manifest["files"]["tokenizer"]["file"],
                   manifest["onnx"]["text"]["context_length"])

    @staticmethod
    def clean(text: str) -> str:
        """open_clip's basic clean: ftfy's fixes and HTML entities (twice), stripped."""
        import ftfy

        return html.unescape(html.unescape(ftfy.fix_text(text))).strip()

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        """(N, context_length) int64 token ids of texts."""
        out = np.zeros((len(texts), self.context_length), np.int64)
        for i, enc in enumerate(self.tokenizer.encode_batch([self.clean(t) for t in texts],
                                                            add_special_tokens=False)):
            ids = [self.start, *enc.ids, self.end][:self.context_length]
            ids[-1] = self.end
            out[i, :len(ids)] = ids
        return out


