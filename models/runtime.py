"""Detector runtimes: one protocol, a PyTorch and an onnxruntime implementation.

A runtime owns everything between an RGB array and `Detections`:

    inputs  = [runtime.preprocessing(rgb) for rgb in images]    # resize + format, per manifest
    key     = runtime.preprocessing.batch_key(inputs[i])        # images that may share a batch
    regions = runtime.encode(inputs_with_one_key)               # vocabulary-independent, costly
    dets    = runtime.classify(regions, text, inputs, classes, options)  # per vocabulary, cheap

so the service's batcher, the Python API (`models/api.py`) and the benchmarks all run the
detector the same way. The onnxruntime runtime (models/onnx_runtime.py) loads only the ONNX
graphs, the text graph and the tokenizer: this module and it import neither torch nor
Detectron2 (TorchRuntime imports torch when it runs).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from .detections import Detections
from .portable import Preprocessing, to_original_boxes

if TYPE_CHECKING:
    import torch

#: How a (region, name) pair is scored. "softmax": over the request's names and background (the
#: EZSD paper's; a name's score falls as similar names are added). "per_name": each name against
#: background alone, sigmoid(logit_name - logit_background), i.e. the same softmax restricted
#: to {name, background}: a name's detections do not depend on the other names sent.
SCORE_MODES = ("softmax", "per_name")
#: What every entry point (Python API, `ovd detect`, HTTP, the page) uses when not told, decided
#: on val (benchmarks/results/score_modes.md): the two modes give the same generalized AP (no
#: measurable difference), and only per-name scores stay put when other names are added, so a
#: threshold means the same in every request. The model's own evaluation (`ovd eval`) and the
#: ONNX graphs' default input stay the paper's softmax.
DEFAULT_SCORE_MODE = "per_name"


@dataclass(frozen=True)
class ClassifyOptions:
    """How one vocabulary turns encoded regions into detections; every entry point (Python
    API, CLI, HTTP, ONNX graph inputs) carries the same fields.

    Attributes:
        score_threshold: keep (region, name) pairs scoring above this, in [0, 1]
            (None: the model's test threshold).
        max_detections: at most this many per image, best first (None: the model's default).
        score_mode: one of SCORE_MODES.
        nms_threshold: IoU in (0, 1] above which the lower-scoring of two boxes is dropped
            (None: the model's test value; 1 keeps all).
        class_agnostic: NMS across names (one label per object) instead of within each name.
        max_candidates: at most this many (region, name) pairs, the best, go to box
            regression and NMS (None: all above the threshold). Bounds the cost of a call
            whatever the vocabulary size and score mode; the service sets it.
    """

    score_threshold: float | None = None
    max_detections: int | None = None
    score_mode: str = DEFAULT_SCORE_MODE
    nms_threshold: float | None = None
    class_agnostic: bool = False
    max_candidates: int | None = None

    def __post_init__(self) -> None:
        if self.score_threshold is not None and not 0.0 <= self.score_threshold <= 1.0:
            raise ValueError(f"score_threshold must be in [0, 1], not {self.score_threshold}")
        if self.max_detections is not None and self.max_detections < 0:
            raise ValueError(f"max_detections must be >= 0, not {self.max_detections}")
        if self.score_mode not in SCORE_MODES:
            raise ValueError(f"score_mode {self.score_mode!r} is not one of {SCORE_MODES}")
        if self.nms_threshold is not None and not 0.0 < self.nms_threshold <= 1.0:
            raise ValueError(f"nms_threshold must be in (0, 1], not {self.nms_threshold}")
        if self.max_candidates is not None and self.max_candidates < 1:
            raise ValueError(f"max_candidates must be >= 1, not {self.max_candidates}")

    def model_kwargs(self) -> dict:
        """The keyword arguments of `EZSDOutputLayers.classify` (Detectron2's names)."""
        return {"score_thresh": self.score_threshold, "max_detections": self.max_detections,
                "nms_thresh": self.nms_threshold, "score_mode": self.score_mode,
                "class_agnostic": self.class_agnostic, "max_candidates": self.max_candidates}


def batches(preprocessing: Preprocessing, inputs: Sequence[dict], max_size: int | None = None
            ) -> list[list[int]]:
    """Indices of `inputs` grouped by batch key (first-seen order) and cut into chunks of at
    most `max_size`: the batches `Runtime.encode` may take together."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, x in enumerate(inputs):
        groups.setdefault(preprocessing.batch_key(x), []).append(i)
    step = max_size or max(len(inputs), 1)
    return [members[k:k + step] for members in groups.values() for k in range(0, len(members), step)]


def to_original(boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray, model_input: dict,
                names: Sequence[str]) -> Detections:
    """Detections in the resized input's pixels -> `Detections` in the original image's
    (`portable.to_original_boxes`: scaled, clipped, empty boxes dropped)."""
    boxes, keep = to_original_boxes(boxes, model_input)
    return Detections(boxes[keep], np.asarray(scores, np.float32)[keep],
                      np.asarray(classes, np.int64)[keep], tuple(names),
                      (int(model_input["height"]), int(model_input["width"])))


class Runtime(Protocol):
    """What runs a detector export (see the module docstring for the call order)."""

    manifest: dict
    preprocessing: Preprocessing
    text: object  # the export's CLIP text tower (ovd.models.clip.model.ClipModel)

    @property
    def max_detections(self) -> int:
        """The model's own per-image cap (ClassifyOptions.max_detections None), which also caps
        an image merged from tiles."""

    def text_embeddings(self, names: Sequence[str], template: str | None = None) -> torch.Tensor:
        """(C, D) normalised CLIP text embeddings of names in the export's prompt template."""

    def encode_text(self, prompts: Sequence[str]) -> np.ndarray:
        """(N, D) float32 normalised embeddings of full prompts (what the service caches)."""

    def encode(self, inputs: list[dict]) -> list:
        """Per-image region features of inputs that share one batch key."""

    def classify(self, regions: list, text: torch.Tensor, inputs: list[dict], names: Sequence[str],
                 options: ClassifyOptions | None = None) -> list[Detections]:
        """Detections of each encoded image against one vocabulary (text rows = names)."""


class TorchRuntime:
    """An export's PyTorch detector (models/exported.py)."""

    def __init__(self, exported):
        self.exported = exported
        self.model = exported.model
        self.text = exported.text
        self.manifest = exported.manifest
        self.preprocessing = Preprocessing.from_manifest(self.manifest)

    @property
    def max_detections(self) -> int:
        return int(self.model.roi_heads.box_predictor.test_topk_per_image)

    def text_embeddings(self, names: Sequence[str], template: str | None = None) -> torch.Tensor:
        import torch

        # No autograd graph: the embeddings are cached (ovd.Detector, the service) and a graph
        # would keep the text tower's activations alive with them.
        with torch.no_grad():
            return self.text.text_embeddings(list(names), template or self.manifest["prompt_template"])

    def encode_text(self, prompts: Sequence[str]) -> np.ndarray:
        """(N, D) float32 L2-normalised embeddings of full prompts (templates filled in)."""
        import torch

        with torch.inference_mode():
            return self.text.encode_text(list(prompts)).float().cpu().numpy()

    def encode(self, inputs: list[dict]) -> list:
        import torch

        with torch.inference_mode():
            return self.model.encode([{**x, "image": torch.as_tensor(x["image"])} for x in inputs])

    def classify(self, regions: list, text: torch.Tensor, inputs: list[dict], names: Sequence[str],
                 options: ClassifyOptions | None = None) -> list[Detections]:
        import torch

        with torch.inference_mode():
            results = self.model.classify(regions, torch.as_tensor(text),
                                          **(options or ClassifyOptions()).model_kwargs())
        return [to_original(r.pred_boxes.tensor.cpu().numpy(), r.scores.cpu().numpy(),
                            r.pred_classes.cpu().numpy(), x, names)
                for r, x in zip(results, inputs, strict=True)]


BACKENDS = ("torch", "onnx")


def load_runtime(folder: str | Path, *, backend: str = "torch", device: str = "cpu",
                 threads: int = 0) -> Runtime:
    """The runtime of an export folder (every file checked against its manifest first).

    Args:
        folder: an `ovd export` folder.
        backend: "torch" (PyTorch) or "onnx" (onnxruntime; the export needs `ovd export --onnx`).
        device: torch device of the PyTorch parts.
        threads: onnxruntime intra-op threads (0: its default).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r} is not one of {BACKENDS}")
    if backend == "onnx":  # onnxruntime alone: no torch import for an export with its text graph
        from .onnx_runtime import load_onnx_runtime

        return load_onnx_runtime(folder, threads=threads, device=device)
    from .exported import load_export

    return TorchRuntime(load_export(folder, device=device))
