"""The detector as ONNX with a live vocabulary: export, validate, load.

`ovd export --onnx` adds three graphs to an export folder (models/exported.py), each listed in
manifest.json with its sha256 and its input/output contract (`ONNX_CONTRACT`):

    detector.onnx           image (3, H, W) uint8 + text (C, D) -> boxes, scores, classes
    detector_encode.onnx    image -> proposals, region embeddings, regression features, size
    detector_classify.onnx  those + text -> boxes, scores, classes

The text-embedding matrix is an **input** with a dynamic number of rows C, so one file serves
any vocabulary (5, 16 or 1000 names) without re-export. The two halves mirror the PyTorch
split `model.encode(...)` (vocabulary-free, nearly all of the cost) and
`box_predictor.classify(regions, text)` (per vocabulary); the service's ONNX backend
(`OVD_BACKEND=onnx`) runs them so its batcher keeps one encode per image and one classify per
request. `detector.onnx` is the single self-contained graph for other consumers.

Image contract: `image` is one image as Detectron2 takes it: (3, H, W) uint8, channels in the
manifest's `input.format` order (RGB for the synthetic model), already resized the way
Detectron2's test transform does (shortest edge `input.min_size_test`, longest at most
`input.max_size_test`; a square image of the synthetic model is 256 x 256). H and W are dynamic
axes: normalisation and padding to the backbone's size divisibility happen inside the graph.
Boxes come out as XYXY pixels of that input image; `classes` index the rows of `text`.

Exporter: `torch.onnx.export(..., dynamo=False)` (TorchScript tracing), opset 17. Detectron2
v0.6 was written for tracing: under `torch.jit.is_tracing()` its ImageList, RPN top-k and
pooler keep image sizes and counts as traced tensors, and torchvision registers ONNX
symbolics for `nms` and `roi_align` (aligned RoIAlign needs opset >= 16) for this exporter
only. The dynamo exporter (torch.export) would have to trace Detectron2's data-dependent
shapes (nonzero, NMS, per-level index_put) as unbacked symbols, which its code was never
written for. What tracing would freeze is avoided in the model's own code instead of
patching Detectron2: the box predictor's `detect` (models/detector/output_layers.py), which
PyTorch runs too, replaces `fast_rcnn_inference` (a Python branch on non-finite scores,
per-class NMS through torchvision's `batched_nms`, whose `numel() == 0` branch and
`boxes.max()` would be traced for one case, and `keep[:topk]` with a Python int) with one NMS
over the (proposal, class) pairs offset per class by the image size and a rank mask for
`max_detections`. Every test-time option (`_OPTIONS`: score threshold, max detections, NMS
IoU, class-agnostic NMS, score mode) is a graph input with the config's value as its default,
so ONNX consumers get the same controls as the Python API and the service.
"""

from __future__ import annotations

import copy
import logging
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from detectron2.layers.wrappers import shapes_to_tensor
from torch import nn

from .detector.output_layers import NO_CANDIDATE_BOUND
from .exported import load_export
from .manifest import (
    FILES,
    ONNX_CLIENT_FILES,
    ONNX_FILES,
    ONNX_TEXT_FILES,
    ExportError,
    atomic_write,
    sha256_file,
    strict_json,
    verify_export,
)
from .onnx_runtime import OnnxGraphs
from .runtime import SCORE_MODES, ClassifyOptions

logger = logging.getLogger(__name__)

OPSET = 17

# Names, dtypes and shapes of every graph's inputs and outputs, written into manifest.json.
_IMAGE = {"name": "image", "dtype": "uint8", "shape": [3, "height", "width"],
          "meaning": "one image in the manifest's input.format channel order, 0-255, already "
                     "resized like Detectron2's test transform (input.min_size_test / max_size_test)"}
_TEXT = {"name": "text", "dtype": "float32", "shape": ["classes", "embed_dim"],
         "meaning": "L2-normalised CLIP text embeddings of the vocabulary, one row per class"}
_THRESHOLD = {"name": "score_threshold", "dtype": "float32", "shape": [], "optional": True,
              "meaning": "keep (region, class) pairs scoring above this"}
_MAX_DET = {"name": "max_detections", "dtype": "int64", "shape": [], "optional": True,
            "meaning": "at most this many detections (best first)"}
_NMS_THRESHOLD = {"name": "nms_threshold", "dtype": "float32", "shape": [], "optional": True,
                  "meaning": "IoU above which the lower-scoring of two boxes is dropped"}
_AGNOSTIC = {"name": "class_agnostic", "dtype": "bool", "shape": [], "optional": True,
             "meaning": "NMS across classes (one label per object) instead of within each class"}
_SCORE_MODE = {"name": "score_mode", "dtype": "int64", "shape": [], "optional": True,
               "meaning": "0: softmax over the vocabulary and background; 1: each class against "
                          "background alone (independent of the other rows of `text`)"}
_MAX_CANDIDATES = {"name": "max_candidates", "dtype": "int64", "shape": [], "optional": True,
                   "meaning": "at most this many (region, class) pairs, the best, go to NMS (bounds "
                              "the cost for long vocabularies)"}
#: The options every classify graph takes after `text`, in order (EZSDOutputLayers.detect's).
_OPTIONS = [_THRESHOLD, _MAX_DET, _NMS_THRESHOLD, _AGNOSTIC, _SCORE_MODE, _MAX_CANDIDATES]
_REGIONS = [
    {"name": "proposals", "dtype": "float32", "shape": ["regions", 4],
     "meaning": "RPN proposals, XYXY pixels of the input image"},
    {"name": "embeddings", "dtype": "float32", "shape": ["regions", "embed_dim"],
     "meaning": "L2-normalised region embeddings"},
    {"name": "reg_features", "dtype": "float32", "shape": ["regions", "branch_dim"],
     "meaning": "regression-branch features"},
    {"name": "image_size", "dtype": "int64", "shape": [2], "meaning": "(height, width) of the input image"},
]
_DETECTIONS = [
    {"name": "boxes", "dtype": "float32", "shape": ["detections", 4],
     "meaning": "XYXY pixels of the input image"},
    {"name": "scores", "dtype": "float32", "shape": ["detections"], "meaning": "score in [0, 1], best first"},
    {"name": "classes", "dtype": "int64", "shape": ["detections"], "meaning": "row of `text`"},
]
ONNX_CONTRACT = {
    "onnx_detector": {"inputs": [_IMAGE, _TEXT, *_OPTIONS], "outputs": _DETECTIONS},
    "onnx_encode": {"inputs": [_IMAGE], "outputs": _REGIONS},
    "onnx_classify": {"inputs": [*_REGIONS, _TEXT, *_OPTIONS], "outputs": _DETECTIONS},
}


class OnnxValidationError(ExportError):
    """onnxruntime's detections differ from PyTorch's beyond the tolerance."""


# --------------------------------------------------------------------------- traceable modules

class EncodeGraph(nn.Module):
    """image (3, H, W) uint8 -> proposals, embeddings, reg_features, image_size (model.encode)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor):
        # OpenVocabRCNN.encode for one image, without encode_regions' split by Python-int
        # region counts (a trace would freeze the example image's count).
        model = self.model
        images = model.preprocess_image([{"image": image}])
        features = model.backbone(images.tensor)
        proposals, _ = model.proposal_generator(images, features, None)
        boxes = proposals[0].proposal_boxes
        f_cls, f_reg = model.roi_heads.box_predictor.branches(model.roi_heads.box_features(features, [boxes]))
        embeddings = model.roi_heads.box_predictor.region_embeddings(f_cls)
        return boxes.tensor, embeddings, f_reg, shapes_to_tensor(image.shape[-2:])


class ClassifyGraph(nn.Module):
    """Regions of one image + text (C, D) + options -> boxes, scores, classes
    (`EZSDOutputLayers.detect`, the same code PyTorch runs)."""

    def __init__(self, model):
        super().__init__()
        self.predictor = model.roi_heads.box_predictor

    def forward(self, proposals, embeddings, reg_features, image_size, text, *options):
        return self.predictor.detect(proposals, embeddings, reg_features, image_size, text, *options)


class DetectGraph(nn.Module):
    """image (3, H, W) uint8 + text (C, D) + options -> boxes, scores, classes: the two halves in one."""

    def __init__(self, model):
        super().__init__()
        self.encode = EncodeGraph(model)
        self.classify = ClassifyGraph(model)

    def forward(self, image, text, *options):
        return self.classify(*self.encode(image), text, *options)


def _defaults(model) -> dict[str, np.ndarray]:
    """The option inputs' defaults, in `_OPTIONS` order: the config's test score threshold,
    detections per image and NMS IoU, per-class NMS, softmax scores, no candidate bound."""
    predictor = model.roi_heads.box_predictor
    return {"score_threshold": np.array(predictor.test_score_thresh, np.float32),
            "max_detections": np.array(predictor.test_topk_per_image, np.int64),
            "nms_threshold": np.array(predictor.test_nms_thresh, np.float32),
            "class_agnostic": np.array(False),
            "score_mode": np.array(SCORE_MODES.index("softmax"), np.int64),
            "max_candidates": np.array(NO_CANDIDATE_BOUND, np.int64)}


def _export_graph(module: nn.Module, args: tuple, path: Path, contract: dict, defaults: dict) -> None:
    """Trace `module` into `path` with the contract's names, every named axis dynamic, and the
    optional inputs given default values (initializers of the same name, which onnxruntime
    lets a caller override)."""
    import onnx

    names_in = [i["name"] for i in contract["inputs"]]
    names_out = [o["name"] for o in contract["outputs"]]
    dynamic = {io["name"]: {k: axis for k, axis in enumerate(io["shape"]) if isinstance(axis, str)}
               for io in contract["inputs"] + contract["outputs"]}
    tmp = path.with_name(path.name + ".tmp")
    with torch.no_grad():
        torch.onnx.export(module, args, str(tmp), dynamo=False, opset_version=OPSET,
                          input_names=names_in, output_names=names_out,
                          dynamic_axes={k: v for k, v in dynamic.items() if v}, do_constant_folding=True)
    graph = onnx.load(str(tmp))
    for name, value in defaults.items():
        if name in names_in:
            graph.graph.initializer.append(onnx.numpy_helper.from_array(value, name))
    onnx.checker.check_model(graph)
    onnx.save(graph, str(tmp))
    tmp.chmod(0o644)
    tmp.replace(path)


def _example_image(model, manifest: dict) -> torch.Tensor:
    """A (3, S, S) uint8 image at the model's test size, to trace with."""
    size = int(manifest["input"]["min_size_test"])
    return torch.randint(0, 256, (3, size, size), generator=torch.Generator().manual_seed(0),
                         dtype=torch.uint8)


def write_onnx(model, out: str | Path, manifest: dict) -> dict[str, Path]:
    """Trace the model into the three graphs of ONNX_FILES under `out`.

    Args:
        model: OpenVocabRCNN in eval mode (float32, CPU).
        out: destination folder.
        manifest: the export's manifest (input size, embedding size).

    Returns:
        {file key: path} of the written graphs.
    """
    out = Path(out)
    image = _example_image(model, manifest)
    text = F.normalize(torch.randn(3, int(manifest["embed_dim"]), generator=torch.Generator().manual_seed(0)),
                       dim=1)
    defaults = _defaults(model)
    options = tuple(torch.from_numpy(v) for v in defaults.values())
    paths = {k: out / f for k, f in ONNX_FILES.items()}
    # eval(): the exporter restores each wrapper's training flag afterwards, recursively, so a
    # wrapper left in its default training mode would switch the model to training.
    with torch.no_grad():
        regions = EncodeGraph(model).eval()(image)
    _export_graph(DetectGraph(model).eval(), (image, text, *options), paths["onnx_detector"],
                  ONNX_CONTRACT["onnx_detector"], defaults)
    _export_graph(EncodeGraph(model).eval(), (image,), paths["onnx_encode"], ONNX_CONTRACT["onnx_encode"], {})
    _export_graph(ClassifyGraph(model).eval(), (*regions, text, *options), paths["onnx_classify"],
                  ONNX_CONTRACT["onnx_classify"], defaults)
    assert not model.training
    return paths


# --------------------------------------------------------------------------- validation

def drawn_scenes(size: int, count: int = 3, seed: int = 2026) -> list[np.ndarray]:
    """Seeded (size, size, 3) uint8 RGB scenes of filled shapes on a shaded background: the
    validation images of an export whose caller gives none (any model proposes regions on
    them; the comparison needs detections, not correct ones)."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    scenes = []
    for _ in range(count):
        ramp = np.linspace(0, 1, size, dtype=np.float32)[None, :, None]
        base = rng.uniform(40, 200, 3).astype(np.float32)
        background = base + 40 * ramp + rng.normal(0, 6, (size, size, 3)).astype(np.float32)
        image = Image.fromarray(background.clip(0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(image)
        for _ in range(int(rng.integers(4, 9))):
            w, h = rng.uniform(0.08, 0.3, 2) * size
            x, y = rng.uniform(0, size - w), rng.uniform(0, size - h)
            shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
            shape([x, y, x + w, y + h], fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
        scenes.append(np.asarray(image))
    return scenes


def validation_images(manifest: dict, sources: Sequence | None = None, count: int = 3,
                      seed: int = 2026) -> list[torch.Tensor]:
    """The model inputs of the validation images: (3, h, w) uint8, resized and in channel
    order by the export's own `Preprocessing` (models/runtime.py).

    Args:
        manifest: the export's manifest.
        sources: images of the user's domain (paths, PIL images or (H, W, 3) RGB arrays, read
            like `ovd.read_image`); without them, `count` `drawn_scenes`.
    """
    from .api import read_image
    from .runtime import Preprocessing

    prep = Preprocessing.from_manifest(manifest)
    rgbs = [read_image(x) for x in sources] if sources else drawn_scenes(prep.min_size, count, seed)
    return [torch.from_numpy(prep(rgb)["image"]) for rgb in rgbs]


def match_detections(want: tuple, got: tuple, box_tol: float = 1e-2) -> dict:
    """Greedy one-to-one match of two detection sets, best-scoring reference first.

    A reference detection matches the same-class detection with the closest box. A matched pair
    whose boxes differ by more than `box_tol` but overlap at IoU >= 0.5 with scores within 1e-5 is
    a *swap*: two overlapping candidates of one class scored within float noise (saturated scores
    near 1 are a few ulps apart), and the two runtimes' NMS kept a different one of them.

    Args:
        want, got: (boxes (N, 4) xyxy px, scores (N,), classes (N,)) as numpy arrays or tensors.

    Returns:
        {"want", "got", "matched", "swaps", "max_box_diff" (px, over matched pairs that are not
        swaps), "max_score_diff" (over all matched pairs)}.
    """
    wb, ws, wc = (np.asarray(x, np.float64) for x in want)
    gb, gs, gc = (np.asarray(x, np.float64) for x in got)
    free = np.ones(len(gb), bool)
    box_diff = score_diff = 0.0
    matched = swaps = 0
    for i in np.argsort(-ws, kind="stable"):
        candidates = np.flatnonzero(free & (gc == wc[i]))
        if not len(candidates):
            continue
        diffs = np.abs(gb[candidates] - wb[i]).max(1)
        j = candidates[diffs.argmin()]
        free[j] = False
        matched += 1
        pair_score_diff = abs(float(gs[j] - ws[i]))
        score_diff = max(score_diff, pair_score_diff)
        if diffs.min() > box_tol and pair_score_diff <= 1e-5 and _iou(wb[i], gb[j]) >= 0.5:
            swaps += 1
        else:
            box_diff = max(box_diff, float(diffs.min()))
    return {"want": len(wb), "got": len(gb), "matched": matched, "swaps": swaps,
            "max_box_diff": box_diff, "max_score_diff": score_diff}


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two xyxy boxes."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h
    return float(w * h / union) if union > 0 else 0.0


#: The option sets an export is validated under: the graphs' defaults, a low threshold (many
#: more detections), and every other option moved off its default at once.
VALIDATION_OPTIONS = (ClassifyOptions(score_mode="softmax"), ClassifyOptions(score_mode="softmax", score_threshold=0.01),
                      ClassifyOptions(score_threshold=0.01, score_mode="per_name", nms_threshold=0.3,
                                      class_agnostic=True, max_detections=20, max_candidates=50))


def compare_with_torch(model, onnx: OnnxGraphs, images: list[torch.Tensor],
                       vocabularies: list[torch.Tensor], options: ClassifyOptions | None = None,
                       box_tol: float = 1e-2) -> list[dict]:
    """onnxruntime (detector.onnx and the two halves) vs the PyTorch model, per image and
    vocabulary. PyTorch runs `model.encode` + `box_predictor.classify` eagerly.

    Returns:
        One `match_detections` report per (image, vocabulary, graph), with "classes" = C and
        "graph" = "detector" or "encode+classify".
    """
    predictor = model.roi_heads.box_predictor
    options = options or ClassifyOptions()
    keep = predictor.test_topk_per_image if options.max_detections is None else options.max_detections
    reports = []
    with torch.inference_mode():
        for image in images:
            regions = model.encode([{"image": image}])
            (onnx_regions,) = onnx.encode([{"image": image.numpy()}])
            for text in vocabularies:
                ref = predictor.classify(regions, text, **options.model_kwargs())[0]
                want = (ref.pred_boxes.tensor, ref.scores, ref.pred_classes)
                for graph, out in (("detector", onnx.detect(image.numpy(), text.numpy(), options)),
                                   ("encode+classify", onnx.classify_one(onnx_regions, text.numpy(), options))):
                    reports.append({"graph": graph, "classes": len(text), "options": repr(options),
                                    **match_detections(*_clear_of_the_cut(want, out, keep), box_tol)})
    return reports


def _clear_of_the_cut(want: tuple, got: tuple, keep: int, margin: float = 1e-5) -> tuple[tuple, tuple]:
    """When the reference kept exactly `keep` detections, which ones made the cut is decided by
    scores that may tie within float noise; both sides are compared on the detections scoring
    clearly above the lowest kept score (by `margin`), the rest of the ranking is exact."""
    scores = np.asarray(want[1], np.float64)
    if len(scores) < keep or keep <= 0:
        return want, got
    floor = scores.min() + margin

    def above(dets: tuple) -> tuple:
        mask = np.asarray(dets[1], np.float64) > floor
        return tuple(np.asarray(x)[mask] for x in dets)

    return above(want), above(got)


def check_reports(reports: list[dict], *, box_tol: float = 1e-2, score_tol: float = 1e-3) -> dict:
    """Raise OnnxValidationError unless every report matched all detections within tolerance.

    NMS swaps between tied candidates (see `match_detections`) are allowed for at most one in ten
    of a comparison's detections (at least one): a graph that regresses boxes differently moves
    every box and fails.

    Returns:
        Summary: {"comparisons", "detections", "swaps", "max_box_diff_px", "max_score_diff", tolerances}.
    """
    bad = [r for r in reports if not (r["want"] == r["got"] == r["matched"]
                                      and r["swaps"] <= max(1, r["matched"] // 10)
                                      and r["max_box_diff"] <= box_tol and r["max_score_diff"] <= score_tol)]
    if bad:
        raise OnnxValidationError(f"onnxruntime differs from PyTorch (tolerance {box_tol} px, "
                                  f"{score_tol} score) in {len(bad)} of {len(reports)} comparisons, "
                                  f"first: {bad[0]}")
    return {"comparisons": len(reports), "detections": sum(r["want"] for r in reports),
            "swaps": sum(r["swaps"] for r in reports), "vocabulary_sizes": sorted({r["classes"] for r in reports}),
            "max_box_diff_px": max(r["max_box_diff"] for r in reports),
            "max_score_diff": max(r["max_score_diff"] for r in reports),
            "box_tolerance_px": box_tol, "score_tolerance": score_tol}


def random_vocabularies(dim: int, sizes: tuple[int, ...] = (5, 16), seed: int = 0) -> list[torch.Tensor]:
    """Random normalised (C, D) text matrices, one per size (a vocabulary is just its rows)."""
    g = torch.Generator().manual_seed(seed)
    return [F.normalize(torch.randn(c, dim, generator=g), dim=1) for c in sizes]


# --------------------------------------------------------------------------- the text tower

class TextGraph(nn.Module):
    """token ids (N, L) int64 -> L2-normalised text embeddings (N, D): CLIP's text tower."""

    def __init__(self, clip_model):
        super().__init__()
        self.clip = clip_model

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.clip.encode_text(tokens).float(), dim=-1)


def text_contract(context_length: int, embed_dim: int) -> dict:
    """text_encoder.onnx's inputs and outputs (context length and width fixed by the model)."""
    return {"inputs": [{"name": "tokens", "dtype": "int64", "shape": ["texts", context_length],
                        "meaning": "CLIP token ids: start, BPE ids, end, zero padding (tokenizer.json)"}],
            "outputs": [{"name": "embeddings", "dtype": "float32", "shape": ["texts", embed_dim],
                         "meaning": "L2-normalised text embeddings (the detector's `text` rows)"}]}


def write_clip_tokenizer(path: Path) -> None:
    """open_clip's SimpleTokenizer as an HF `tokenizers` file: its vocabulary and merge ranks,
    CLIP's split pattern, byte-level symbols and "</w>" word ends (models/portable.py's
    Tokenizer adds the start/end tokens, truncation and padding, and ftfy's clean-up)."""
    from open_clip.tokenizer import SimpleTokenizer
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers

    clip_tok = SimpleTokenizer()
    merges = [pair for pair, _ in sorted(clip_tok.bpe_ranks.items(), key=lambda kv: kv[1])]
    tok = Tokenizer(models.BPE(vocab=dict(clip_tok.encoder), merges=merges, end_of_word_suffix="</w>",
                               fuse_unk=False))
    tok.normalizer = normalizers.Sequence([normalizers.Replace(Regex(r"\s+"), " "), normalizers.Strip(),
                                           normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""),
                             behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tmp = path.with_name(path.name + ".tmp")
    tok.save(str(tmp))
    tmp.chmod(0o644)
    tmp.replace(path)


#: Texts beyond the vocabulary on which the exported tokenizer must match open_clip's exactly.
TOKENIZER_PROBES = ("a photo of a Red  Ring.", "Café déjà-vu", "  forklift's   cargo ", "3 trees & 2 palms",
                    "&amp; HTML &lt;b&gt;", "ünïcödé ЖУК 車", "a" * 300, "don't, won't; it'll!", "")


def export_text_onnx(text_clip, out: Path, names: Sequence[str], template: str, *,
                     tol: float = 1e-4) -> tuple[dict[str, Path], dict]:
    """Write text_encoder.onnx and tokenizer.json, and check both against open_clip.

    Args:
        text_clip: the export's ClipModel (text tower).
        out: destination folder.
        names, template: the export's categories and prompt template (probes besides
            TOKENIZER_PROBES).
        tol: largest allowed difference of an embedding coordinate.

    Returns:
        ({file key: path}, the manifest's onnx.text record with its validation).

    Raises:
        OnnxValidationError: a token differs, or an embedding beyond tol.
    """
    from .onnx_runtime import session
    from .portable import Tokenizer

    paths = {k: out / f for k, f in ONNX_TEXT_FILES.items()}
    write_clip_tokenizer(paths["tokenizer"])
    probes = [template.format(n) for n in names] + list(TOKENIZER_PROBES)
    want_tokens = text_clip.tokenizer(probes)
    context_length = int(want_tokens.shape[1])
    got_tokens = Tokenizer(paths["tokenizer"], context_length)(probes)
    bad = [t for t, a, b in zip(probes, want_tokens.numpy(), got_tokens, strict=True) if not np.array_equal(a, b)]
    if bad:
        raise OnnxValidationError(f"the exported tokenizer differs from open_clip's on {len(bad)} of "
                                  f"{len(probes)} probe texts, first: {bad[0]!r}")
    contract = text_contract(context_length, int(text_clip.embed_dim))
    _export_graph(TextGraph(text_clip.model).eval(), (want_tokens[:2],), paths["onnx_text"], contract, {})
    with torch.inference_mode():
        want = F.normalize(text_clip.model.encode_text(want_tokens).float(), dim=-1).numpy()
    got = session(paths["onnx_text"]).run(None, {"tokens": got_tokens})[0]
    diff = float(np.abs(want - got).max())
    if diff > tol:
        raise OnnxValidationError(f"text_encoder.onnx differs from PyTorch by {diff:.2g} (tolerance {tol})")
    record = {"context_length": context_length, "graph": {"file": ONNX_TEXT_FILES["onnx_text"], **contract},
              "tokenizer": ONNX_TEXT_FILES["tokenizer"],
              "validation": {"texts": len(probes), "tokens_equal": True, "max_abs_diff": diff, "tolerance": tol}}
    return paths, record


# --------------------------------------------------------------------------- the export folder

def export_onnx(source: str | Path, out: str | Path | None = None, *, images: Sequence | None = None,
                box_tol: float = 1e-2, score_tol: float = 1e-3) -> Path:
    """Add the ONNX graphs to an export folder, validate them, record them in its manifest.

    The graphs are traced from the export's own weights (as `load_export` computes them, e.g.
    float16-stored weights in float32). Validation: on `images` (default: three drawn scenes), with the
    export's categories' real text embeddings (a vocabulary of its size) and a random
    16-class one, onnxruntime must give PyTorch's detections (same count, one-to-one by class,
    boxes within box_tol pixels, scores within score_tol) at the config's score threshold and
    at threshold 0.01 (many more detections). The files are listed in the manifest only after
    validation passed, so a failed export leaves the folder verifying as before, without ONNX.

    Args:
        source: a verified export folder.
        out: destination (default: source itself); other files are copied there first.
        images: validation images of the model's domain (see `validation_images`).

    Returns:
        Path of the updated manifest.json.

    Raises:
        ExportError: the source does not verify.
        OnnxValidationError: onnxruntime and PyTorch disagree.
    """
    source = Path(source)
    out = Path(out) if out is not None else source
    exported = load_export(source)
    manifest = copy.deepcopy(exported.manifest)
    for key in (*ONNX_FILES, *ONNX_TEXT_FILES, *ONNX_CLIENT_FILES):
        manifest["files"].pop(key, None)
    manifest.pop("onnx", None)
    out.mkdir(parents=True, exist_ok=True)
    if out.resolve() != source.resolve():
        (out / "manifest.json").unlink(missing_ok=True)
        for f in FILES.values():
            shutil.copyfile(source / f, out / f)
    # Without ONNX entries first: stale graphs of an earlier export are never trusted.
    atomic_write(out / "manifest.json", strict_json(manifest, indent=2).encode())
    model = exported.model
    t0 = time.perf_counter()
    paths = write_onnx(model, out, manifest)
    export_s = time.perf_counter() - t0
    manifest["onnx"] = {"opset": OPSET, "exporter": "torch.onnx.export(dynamo=False), TorchScript tracing",
                        "runtime": "onnxruntime CPUExecutionProvider",
                        "defaults": {k: v.item() for k, v in _defaults(model).items()},
                        "graphs": {k: {"file": ONNX_FILES[k], **ONNX_CONTRACT[k]} for k in ONNX_FILES}}
    onnx = OnnxGraphs(out, manifest)
    names = [c["name"] for c in manifest.get("categories", [])] or ["object"]
    vocabularies = [exported.text_embeddings(names), *random_vocabularies(int(manifest["embed_dim"]), (16,))]
    scenes = validation_images(manifest, images)
    reports = [r for options in VALIDATION_OPTIONS
               for r in compare_with_torch(model, onnx, scenes, vocabularies, options, box_tol)]
    summary = {**check_reports(reports, box_tol=box_tol, score_tol=score_tol),
               "images": f"{len(scenes)} given" if images else f"{len(scenes)} drawn scenes"}
    manifest["onnx"]["validation"] = summary
    text_paths, manifest["onnx"]["text"] = export_text_onnx(exported.text, out, names, manifest["prompt_template"])
    paths.update(text_paths)
    # The client-side code (input transform, tokenizer, boxes back to the photo) next to the
    # graphs: a consumer with onnxruntime alone needs nothing from this project.
    paths["portable"] = out / ONNX_CLIENT_FILES["portable"]
    shutil.copyfile(Path(__file__).with_name("portable.py"), paths["portable"])
    manifest["files"].update({k: {"file": p.name, "sha256": sha256_file(p)} for k, p in paths.items()})
    atomic_write(out / "manifest.json", strict_json(manifest, indent=2).encode())
    verify_export(out)
    logger.info("ONNX graphs written to %s in %.0f s and validated against PyTorch: %d comparisons, "
                "%d detections, max box diff %.2g px, max score diff %.2g", out, export_s,
                summary["comparisons"], summary["detections"], summary["max_box_diff_px"],
                summary["max_score_diff"])
    return out / "manifest.json"
