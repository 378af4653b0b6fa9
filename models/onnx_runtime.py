"""The detector under onnxruntime alone: numpy, onnxruntime, PIL and HF `tokenizers` — no
torch, no Detectron2, no open_clip import (a test asserts it).

An export written by `ovd export --onnx` holds everything it needs (models/manifest.py):

    detector_encode.onnx     image -> proposals, region embeddings, regression features, size
    detector_classify.onnx   those + text (C, D) -> boxes, scores, classes
    text_encoder.onnx        token ids (N, L) int64 -> L2-normalised text embeddings (N, D)
    tokenizer.json           CLIP's BPE as an HF `tokenizers` file (written from open_clip's)

The tokenizer reproduces open_clip's SimpleTokenizer: ftfy + HTML unescape, whitespace
collapsed, lower case, CLIP's split pattern, byte-level BPE with "</w>" word ends, then
[start] + ids + [end], truncated to the context length (end kept) and zero-padded. The export
checks it token for token against open_clip on probe strings, and the text graph against
PyTorch, before listing either file.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .detections import Detections
from .manifest import ONNX_FILES, ONNX_TEXT_FILES, ExportError, verify_export
from .portable import Tokenizer
from .runtime import SCORE_MODES, ClassifyOptions, Preprocessing, to_original


def session(path: str | Path, threads: int = 0):
    """An onnxruntime CPU session (threads: intra-op threads, 0 = its default)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # warnings about unused initializers etc. are expected
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class OnnxTextEncoder:
    """CLIP's text tower as ONNX plus its tokenizer: names -> normalised embeddings."""

    def __init__(self, folder: str | Path, manifest: dict, threads: int = 0):
        folder = Path(folder)
        self.session = session(folder / ONNX_TEXT_FILES["onnx_text"], threads)
        self.tokenizer = Tokenizer.from_manifest(folder, manifest)
        self.template = manifest["prompt_template"]
        self.embed_dim = int(manifest["embed_dim"])

    def encode_text(self, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
        """(N, D) float32 L2-normalised embeddings of texts."""
        out = [self.session.run(None, {"tokens": self.tokenizer(texts[i:i + batch_size])})[0]
               for i in range(0, len(texts), batch_size)]
        return np.concatenate(out) if out else np.zeros((0, self.embed_dim), np.float32)

    def text_embeddings(self, names: Sequence[str], template: str | None = None) -> np.ndarray:
        """(C, D) normalised embeddings of class names in a prompt template (default: the export's)."""
        return self.encode_text([(template or self.template).format(n) for n in names])


class OnnxRegions:
    """One image encoded by detector_encode.onnx (numpy arrays, see ONNX_CONTRACT)."""

    __slots__ = ("proposals", "embeddings", "reg_features", "image_size")

    def __init__(self, proposals, embeddings, reg_features, image_size):
        self.proposals, self.embeddings = proposals, embeddings
        self.reg_features, self.image_size = reg_features, image_size


class OnnxGraphs:
    """The detector's ONNX graphs under onnxruntime (CPUExecutionProvider).

    Attributes:
        manifest: the export's manifest.
        defaults: the option inputs' default values (`ClassifyOptions` fields left None).
    """

    def __init__(self, folder: str | Path, manifest: dict, threads: int = 0):
        self.folder, self.threads, self.manifest = Path(folder), threads, manifest
        self.encoder = session(self.folder / ONNX_FILES["onnx_encode"], threads)
        self.classifier = session(self.folder / ONNX_FILES["onnx_classify"], threads)
        self.defaults = dict(manifest["onnx"]["defaults"])
        self._detector = None

    @property
    def detector(self):
        """detector.onnx's session, created on first use (the runtime runs the two halves)."""
        if self._detector is None:
            self._detector = session(self.folder / ONNX_FILES["onnx_detector"], self.threads)
        return self._detector

    def _options(self, options: ClassifyOptions | None, graph) -> dict[str, np.ndarray]:
        """The option inputs of `graph` for `options`.

        Raises:
            ExportError: an option is off its default and the graph (exported before the
                option existed) has no input for it.
        """
        o = options or ClassifyOptions()
        values = {"score_threshold": np.array(self.defaults["score_threshold"] if o.score_threshold is None
                                              else o.score_threshold, np.float32),
                  "max_detections": np.array(self.defaults["max_detections"] if o.max_detections is None
                                             else o.max_detections, np.int64),
                  "nms_threshold": None if o.nms_threshold is None else np.array(o.nms_threshold, np.float32),
                  "class_agnostic": np.array(o.class_agnostic) if o.class_agnostic else None,
                  "score_mode": (np.array(SCORE_MODES.index(o.score_mode), np.int64)
                                 if o.score_mode != SCORE_MODES[0] else None),
                  "max_candidates": None if o.max_candidates is None else np.array(o.max_candidates, np.int64)}
        # onnxruntime lists an input with a default value (an initializer of the same name)
        # among the overridable initializers, not the inputs.
        inputs = {i.name for i in (*graph.get_inputs(), *graph.get_overridable_initializers())}
        missing = sorted(k for k, v in values.items() if v is not None and k not in inputs)
        if missing:
            raise ExportError(f"{self.folder} was exported before the options {missing} were graph "
                              f"inputs; re-export it: `ovd export --onnx --from-export {self.folder}`")
        return {k: v for k, v in values.items() if v is not None}

    def detect(self, image, text, options: ClassifyOptions | None = None):
        """detector.onnx on one (3, H, W) uint8 image: (boxes (N, 4), scores (N,), classes (N,))."""
        return tuple(self.detector.run(None, {"image": np.asarray(image, np.uint8),
                                              "text": np.asarray(text, np.float32),
                                              **self._options(options, self.detector)}))

    def encode(self, inputs: list[dict]) -> list[OnnxRegions]:
        """detector_encode.onnx per image of model inputs ({"image": (3, H, W) uint8})."""
        return [OnnxRegions(*self.encoder.run(None, {"image": np.asarray(x["image"], np.uint8)}))
                for x in inputs]

    def classify_one(self, region: OnnxRegions, text, options: ClassifyOptions | None = None
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """detector_classify.onnx on one encoded image: boxes (N, 4) xyxy in the resized
        input's pixels, scores (N,), class indices (N,) into text's rows."""
        return tuple(self.classifier.run(None, {
            "proposals": region.proposals, "embeddings": region.embeddings,
            "reg_features": region.reg_features, "image_size": region.image_size,
            "text": np.asarray(text, np.float32), **self._options(options, self.classifier)}))


class OnnxRuntime:
    """An export under onnxruntime alone (the `Runtime` protocol of models/runtime.py); text
    embeddings are numpy arrays. An export written before the text tower was exported falls
    back to the PyTorch text tower (and so imports torch)."""

    def __init__(self, folder: str | Path, manifest: dict, threads: int = 0, device: str = "cpu"):
        self.manifest = manifest
        self.graphs = OnnxGraphs(folder, manifest, threads)
        self.preprocessing = Preprocessing.from_manifest(manifest)
        if "text" in manifest["onnx"] and set(ONNX_TEXT_FILES) <= set(manifest["files"]):
            self.text = OnnxTextEncoder(folder, manifest, threads)
        else:
            from .exported import load_text_encoder

            self.text = load_text_encoder(folder, manifest, device=device)

    @property
    def max_detections(self) -> int:
        return int(self.graphs.defaults["max_detections"])

    def text_embeddings(self, names: Sequence[str], template: str | None = None):
        return self.text.text_embeddings(list(names), template or self.manifest["prompt_template"])

    def encode_text(self, prompts: Sequence[str]) -> np.ndarray:
        out = self.text.encode_text(list(prompts))
        return np.asarray(out.detach().float().cpu() if hasattr(out, "detach") else out, np.float32)

    def encode(self, inputs: list[dict]) -> list:
        return self.graphs.encode(inputs)

    def classify(self, regions: list, text, inputs: list[dict], names: Sequence[str],
                 options: ClassifyOptions | None = None) -> list[Detections]:
        text = np.asarray(text.detach().cpu() if hasattr(text, "detach") else text, np.float32)
        return [to_original(*self.graphs.classify_one(r, text, options), x, names)
                for r, x in zip(regions, inputs, strict=True)]


def load_onnx_runtime(folder: str | Path, *, threads: int = 0, device: str = "cpu") -> OnnxRuntime:
    """The ONNX runtime of an export folder, every file checked against the manifest first.

    Raises:
        ExportError: a file fails its sha256, or the export has no ONNX graphs.
    """
    manifest = verify_export(folder)
    missing = sorted(set(ONNX_FILES) - set(manifest["files"]))
    if missing or "onnx" not in manifest:
        raise ExportError(f"{folder} has no ONNX graphs (missing {missing}); "
                          f"write them with `ovd export --onnx --from-export {folder}`")
    return OnnxRuntime(folder, manifest, threads, device)
