"""EZSD stage 2: CLIP proposals — distillation regions that are not biased to the base classes.

For every training image (docs/methods.md, "Stage 2"):

1. Dense anchors on a grid of the image as stored: sizes x ratios (h/w = 0.5, 1, 2), clipped
   to the image; anchors that become thinner than ``min_size`` px are dropped, and exact
   duplicates created by clipping (every 512-px anchor of a 256-px image is the whole image)
   are encoded once. The paper's grid (stride 32, sizes 32..512) is for COCO images resized to
   1333x800; ``sizes: auto`` / ``stride: auto`` (the synthetic config) derive the grid from the
   data instead (`AnchorGrid`): a sqrt(2) ladder of sizes over the base GT boxes' size range,
   each size on a grid of step size / 2, like a detector's FPN anchors. ``anchor_resize``
   (``ovd proposals --paper-density``) lays the paper's grid on the image resized as the
   detector trains on it (short side 800, long <= 1333) and maps it back: ~12.7k anchors for a
   640x480 COCO image instead of ~4.4k on the stored image. On the synthetic world
   (objects 9-57 px) the paper's grid gives 21% of novel objects an anchor at IoU >= 0.5, the
   derived one 96% (training/gates.py measures it: ``grid_coverage50``).
2. Each anchor is cropped with no enlargement (EZSD crop: padded square, CLIP size), encoded by
   the (re-normalised) CLIP and classified over base + novel names with the prompt template;
   logits = ``s * <v, t>`` with s the CLIP's own ``logit_scale.exp()`` (100 only for OpenAI's
   CLIPs; a too-large s saturates step 3's objectness at log C and flattens its ranking).
3. Objectness ``s = log C - H(softmax(z))``: 0 for a uniform posterior, log C for a one-hot one.
4. Class-agnostic NMS (IoU 0.7), keep the top 1000 by ``s``.
5. ``filter: coco``: drop proposals with IoU >= 0.3 to any base GT box of the image, re-encode the
   rest with the 1.2x crop, drop those whose arg-max class is base, keep the top 300 by ``s``.
   ``filter: lvis``: no base filter; a random 500 of the NMS survivors, seeded by
   (seed, image_id) only (so independent of ranks, shards and resumes), re-encoded at 1.2x.

Stored per image (see ovd.training.shards): ``boxes`` (K, 4) float32 xyxy pixels of the stored
image, ``objectness`` (K,) float32 nats (step 3, 1.0x crop), ``confidence`` (K,) float32 = max
probability of the 1.2x re-encoding, ``classes`` (K,) int64 index into the manifest's
vocabulary (all categories ordered by id = Detectron2's contiguous ids), ``embeddings`` (K, D)
float16 = L2-normalised CLIP embedding of the 1.2x crop; ``image_size`` (2,) int64 (H, W).
Rows are sorted by objectness, highest first.

**Cost.** Dense mode encodes every anchor: ~15.7k CLIP crops per COCO image in the paper. The
``cheap`` mode *(our formulation)* spends CLIP crops only on the ``cheap_topk`` anchors (100)
ranked by a class-agnostic prior that costs a few CLIP forwards per image, then runs the exact
crop pipeline (steps 2-5) on those only:

* **tokens**: the image (as stored, times ``cheap_scale``) goes through CLIP's ViT to a grid of
  final patch tokens. ``cheap_prior: tiles`` (default) cuts it into windows of exactly CLIP's
  input size (S x S, the last ones padded black) and encodes them as one batch, so the ViT sees
  the resolution and positional embeddings it was trained on: ceil(H/S) * ceil(W/S) forwards,
  each costing one crop (16 for a 256-px image and a 64-px CLIP; 9 for a 640x480 COCO image and
  a 224-px ViT-B). ``cheap_prior: global`` is a single forward of the whole image with the
  positional embedding interpolated.
* **region embedding**: each anchor's tokens are averaged with RoIAlign on that grid (adaptive
  sampling), passed through the ViT's own ``ln_post`` and ``proj`` — the head the class token
  normally takes — and L2-normalised.
* **score**: the softmax over the same vocabulary at ``logit_scale`` gives, per anchor, either
  the objectness ``log C - H`` or the probability mass on novel classes. ``cheap_score: auto``
  uses the novel mass under the coco filter — that filter keeps only proposals whose 1.2x crop
  is classified novel, so that is what the budget should be spent on — and the objectness under
  the lvis filter (no class filter). Class-agnostic NMS on the score, then the top-K.

In ``coco`` filtering, anchors with IoU >= ``gt_iou`` to a base GT box are removed before the
prior's top-K: step 5 would drop them whatever their score, so they would only waste the budget.

**Early filter** *(our change of order, ``early_filter: true``)*. In the paper's order the
top-1000 by objectness is taken before either coco test. On the synthetic world (14k anchors
of 11-62 px per 256-px image, a CLIP trained only on object-centred captions) the most
confident anchors are *parts of base objects*: their IoU with the whole object's box is below
0.3, so the GT test keeps them, and their 1.2x crops are then classified as that base class and
dropped, so nothing is left: novel recall 0.0 on 8 training images. With ``early_filter``
both tests (IoU with base GT, arg-max class of the 1.0x crop) run on every anchor first, then
NMS, the top-K, the 1.2x re-encoding and its base-class test as in the paper.

Why this prior: it needs no training and reuses CLIP's own embedding space and vocabulary; its
cost does not grow with the number of anchors (RoIAlign on the token grid is negligible).
Measured on the synthetic world (20 training images, the project's tiny CLIP), the whole-image
variant suggested first (``global``) ranked anchors no better than chance — a ViT's final patch
tokens at a resolution it never saw, mixed by global attention, carry little of a crop's
meaning — while native-size windows with the novel-mass score recovered about twice as many of
dense mode's final proposals as a random top-K at the same cost. The prior only ranks; the
exact crops decide every stored value.

The manifest records the mode (``config``) and, once complete, ``cost``: per image the anchors,
the candidates that got a crop, the CLIP crops encoded, the prior's ViT inputs
(``prior_forwards``), the proposals kept and the seconds; and images per second.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from torchvision.ops import box_iou, nms, roi_align

from ovd.models.clip.model import DEFAULT_TEMPLATE, ClipModel
from ovd.models.manifest import sha256_file

from .config import SectionConfig
from .data.detection_set import DetectionSet
from .shards import (
    ProgressFactory,
    ReadAhead,
    Record,
    ShardReader,
    ShardStore,
    stage_device,
)

logger = logging.getLogger(__name__)

MODES = ("dense", "cheap")
FILTERS = ("coco", "lvis")
PRECISIONS = ("fp32", "bf16", "fp16")
#: Config fields that change how fast, not what, a stage computes: left out of the manifest
#: identity so a run can be resumed with another batch size or thread count.
RUNTIME_FIELDS = ("batch_size", "threads", "shard_size")
#: Fields of ProposalConfig (anchor_resize) and of AnchorGrid (resize) added after proposal
#: folders and benchmark cells were recorded: at these values they reproduce the earlier
#: behaviour, so they are left out of identities and those stay current.
NEUTRAL_DEFAULTS = {"anchor_resize": None, "resize": None}
#: The paper's anchor grid: stride 32, sides 32-512, on the image resized as Detectron2 resizes
#: COCO for training (short side 800, long side at most 1333). `ovd proposals --paper-density`.
PAPER_DENSITY = {"stride": 32, "sizes": (32, 64, 128, 256, 512), "anchor_resize": (800, 1333)}


def without_neutral(fields: dict) -> dict:
    """`fields` without the NEUTRAL_DEFAULTS entries that hold their neutral value."""
    return {k: v for k, v in fields.items() if k not in NEUTRAL_DEFAULTS or v != NEUTRAL_DEFAULTS[k]}


@dataclass
class ProposalConfig(SectionConfig):
    """The `proposals:` section of a config file.

    Attributes:
        mode: "dense" (every anchor is a CLIP crop, the paper) or "cheap" (a ViT token prior
            picks ``cheap_topk`` anchors for the crop pipeline; see the module docstring).
        filter: "coco" (base-GT IoU filter, base-class filter, keep ``keep``) or "lvis"
            (seeded random ``lvis_keep``).
        template: prompt template for the class names.
        logit_scale: multiplier of the cosine similarities before the softmax; None (the
            default) = the CLIP's own ``logit_scale.exp()``, as EZSD's code does.
        stride: anchor grid step in pixels of the stored image (of the resized one with
            ``anchor_resize``), or "auto": each size on a grid of step round(size / 2).
        sizes: anchor sides sqrt(w*h) in pixels, or "auto": a ladder of factor ``auto_step``
            whose sizes are the centres (in log scale) of bins covering the ``auto_quantiles``
            of the base GT box sizes sqrt(w*h) of the images the stage runs on (see
            `AnchorGrid.sizes_from_boxes`).
        ratios: anchor aspect ratios h/w.
        anchor_offset: anchor centres at (i + offset) * stride; 0.5 = cell centres *(our
            choice; mmdetection's default is 0, grid corners)*.
        min_size: anchors narrower or shorter than this after clipping are dropped, pixels.
        anchor_resize: None (the grid is laid on the image as stored) or (short, long): it is
            laid on the image resized so its short side is ``short`` and its long side at most
            ``long`` pixels (Detectron2's ResizeShortestEdge; the paper: (800, 1333), 12,750
            anchors for a 640x480 image), then mapped back to stored pixels (stride, sizes and
            min_size are then in resized pixels).
        auto_quantiles: ``sizes: auto``: the lower and upper quantile of base GT sizes covered.
        auto_step: ``sizes: auto``: ratio of consecutive sizes.
        nms_iou: class-agnostic NMS IoU threshold.
        pre_filter_topk: proposals kept after NMS (1000).
        gt_iou: coco filter: proposals with IoU >= this to any base GT box are dropped.
        keep: coco filter: proposals kept at the end (300).
        lvis_keep: lvis filter: random proposals kept (500).
        seed: lvis sampling seed (combined with the image id).
        early_filter: coco filter: drop anchors near a base GT box or whose 1.0x crop is
            classified base *before* NMS and the top-K (module docstring); False = the
            paper's order.
        cheap_topk: cheap mode: anchors that get a CLIP crop.
        cheap_prior: cheap mode: "tiles" (native-size windows) or "global" (one forward of the
            whole image, positional embedding interpolated).
        cheap_score: cheap mode: "auto" (novel-class mass under the coco filter, objectness
            under lvis), "novel" or "objectness".
        cheap_scale: cheap mode: the ViT sees the image resized by this factor (token stride =
            patch size / scale pixels of the stored image).
        cheap_nms: cheap mode: class-agnostic NMS on the prior before its top-K, so the budget
            is not spent on near-duplicates.
        precision: "fp32", or "bf16"/"fp16" autocast for the CLIP forwards (on the CPU, bf16
            gains little for a tiny ViT; on a GPU, fp16 is the usual choice). Stored values
            differ in the 3rd decimal, so it is part of the manifest identity.
        batch_size: CLIP crops per forward (runtime only).
        shard_size: images per shard file.
        threads: torch intra-op threads, 0 = torch's default (runtime only).
    """

    SECTION = "proposals"

    mode: str = "dense"
    filter: str = "coco"
    template: str = DEFAULT_TEMPLATE
    logit_scale: float | None = None
    stride: int | str = 32
    sizes: tuple[float, ...] | str = (32, 64, 128, 256, 512)
    ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    anchor_offset: float = 0.5
    min_size: float = 4.0
    anchor_resize: tuple[int, int] | None = None
    auto_quantiles: tuple[float, float] = (0.02, 0.98)
    auto_step: float = math.sqrt(2.0)
    nms_iou: float = 0.7
    pre_filter_topk: int = 1000
    gt_iou: float = 0.3
    keep: int = 300
    lvis_keep: int = 500
    seed: int = 0
    early_filter: bool = False
    cheap_topk: int = 100
    cheap_prior: str = "tiles"
    cheap_score: str = "auto"
    cheap_scale: float = 1.0
    cheap_nms: bool = True
    precision: str = "fp32"
    batch_size: int = 256
    shard_size: int = 16
    threads: int = 0

    def __post_init__(self) -> None:
        problems = []
        if self.mode not in MODES:
            problems.append(f"mode {self.mode!r} not in {MODES}")
        if self.filter not in FILTERS:
            problems.append(f"filter {self.filter!r} not in {FILTERS}")
        if self.cheap_prior not in ("tiles", "global"):
            problems.append(f"cheap_prior {self.cheap_prior!r} not in ('tiles', 'global')")
        if self.cheap_score not in ("auto", "novel", "objectness"):
            problems.append(f"cheap_score {self.cheap_score!r} not in ('auto', 'novel', 'objectness')")
        if self.precision not in PRECISIONS:
            problems.append(f"precision {self.precision!r} not in {PRECISIONS}")
        if "{}" not in self.template:
            problems.append(f"template {self.template!r} has no '{{}}' for the class name")
        if self.sizes != "auto" and (isinstance(self.sizes, str) or not self.sizes
                                     or min(self.sizes) <= 0):
            problems.append(f"sizes {self.sizes!r} must be 'auto' or non-empty and positive")
        if not self.ratios or min(self.ratios) <= 0:
            problems.append("ratios must be non-empty and positive")
        if self.stride != "auto" and (isinstance(self.stride, str) or self.stride < 1):
            problems.append(f"stride {self.stride!r} must be 'auto' or an integer >= 1")
        lo, hi = self.auto_quantiles
        if not 0 <= lo < hi <= 1 or not self.auto_step > 1:
            problems.append("auto_quantiles must be 0 <= lo < hi <= 1 and auto_step > 1")
        if min(self.pre_filter_topk, self.keep, self.lvis_keep, self.cheap_topk,
               self.batch_size, self.shard_size) < 1:
            problems.append("pre_filter_topk, keep, lvis_keep, cheap_topk, batch_size and "
                            "shard_size must be >= 1")
        if not 0 < self.nms_iou <= 1 or not 0 < self.gt_iou <= 1:
            problems.append("nms_iou and gt_iou must be in (0, 1]")
        if self.anchor_resize is not None and (len(self.anchor_resize) != 2 or min(self.anchor_resize) < 1
                                               or self.anchor_resize[0] > self.anchor_resize[1]):
            problems.append(f"anchor_resize {self.anchor_resize!r} must be null or [short, long] "
                            "with 1 <= short <= long")
        if (self.logit_scale is not None and self.logit_scale <= 0) or self.cheap_scale <= 0 \
                or self.min_size < 0:
            problems.append("logit_scale and cheap_scale must be > 0, min_size >= 0")
        if problems:
            raise ValueError("proposals: " + "; ".join(problems))


    def identity(self) -> dict:
        """The fields the stored proposals depend on."""
        return without_neutral({k: v for k, v in asdict(self).items() if k not in RUNTIME_FIELDS})


# --------------------------------------------------------------------------- dataset access

@dataclass
class TrainingImages:
    """The images of a COCO training json with their base GT boxes.

    Attributes:
        json_file, image_root: where they come from.
        json_sha256: sha256 of the json file.
        vocabulary: all category names ordered by category id (Detectron2's contiguous order).
        is_base: (C,) bool, True for base categories (no ``split`` key counts as base).
        images: image dicts (id, file_name, height, width) sorted by id.
        gt: image id -> (G, 4) float32 xyxy base GT boxes, pixels.
        gt_crowd: image id -> (G,) bool iscrowd flags of those boxes.
    """

    json_file: Path
    image_root: Path
    json_sha256: str
    vocabulary: list[str]
    is_base: torch.Tensor
    images: list[dict]
    gt: dict[int, torch.Tensor]
    gt_crowd: dict[int, torch.Tensor]
    data: DetectionSet = field(repr=False)

    @classmethod
    def load(cls, json_file: str | Path, image_root: str | Path, *,
             max_images: int | None = None) -> TrainingImages:
        """Read and validate a training json (its first ``max_images`` images by id)."""
        data = DetectionSet.load(json_file, image_root, max_images=max_images)
        # "Filter with base-only GT": a json that also annotates novel classes (an oracle
        # split) must not leak them into stage 2/3.
        is_base = ~data.is_novel
        base = {i: is_base[data.labels[i]] for i in data.image_ids}
        return cls(
            json_file=data.json_file, image_root=data.image_root, json_sha256=sha256_file(json_file),
            vocabulary=data.names, is_base=is_base, images=data.images,
            gt={i: data.boxes[i][keep] for i, keep in base.items()},
            gt_crowd={i: data.crowd[i][keep] for i, keep in base.items()}, data=data)

    @property
    def image_ids(self) -> list[int]:
        return [int(im["id"]) for im in self.images]

    def read(self, image_id: int) -> torch.Tensor:
        """The stored image as (3, H, W) uint8 RGB (see `read_dataset_image`)."""
        return self.data.read(image_id)

    def non_crowd_gt(self) -> list[torch.Tensor]:
        """Per image, the (G, 4) base GT boxes without crowd boxes (what ``sizes: auto`` reads)."""
        return [b[~self.gt_crowd[i]] for i, b in self.gt.items()]


def clip_identity(clip: ClipModel) -> dict:
    """{"sha256": ...} of a CLIP's weights: the manifest's for a checkpoint folder (verified at
    load), else a digest of the in-memory state dict (an open_clip name with random weights)."""
    if clip.manifest is not None:
        return {"sha256": clip.manifest["weights"]["sha256"]}
    from .shards import tensors_digest

    return {"sha256": tensors_digest({k: v.float() for k, v in clip.model.state_dict().items()})}


# --------------------------------------------------------------------------- geometry + scores

def make_anchors(image_hw: tuple[int, int], *, stride: int = 32,
                 sizes: tuple[float, ...] = (32, 64, 128, 256, 512),
                 ratios: tuple[float, ...] = (0.5, 1.0, 2.0), offset: float = 0.5,
                 min_size: float = 4.0) -> torch.Tensor:
    """Dense anchors of one image, clipped, filtered and de-duplicated.

    Args:
        image_hw: (H, W) of the stored image, pixels.
        stride: grid step; the grid covers the image padded up to a multiple of it
            (ceil(H / stride) x ceil(W / stride) centres).
        sizes: anchor sides sqrt(w * h), pixels.
        ratios: aspect ratios h / w; an anchor is w = size / sqrt(r), h = size * sqrt(r).
        offset: centres at ((j + offset) * stride, (i + offset) * stride).
        min_size: anchors with clipped width or height below this are dropped, pixels.

    Returns:
        (A, 4) float32 xyxy in pixels, inside [0, W] x [0, H], in grid order (row, column,
        size, ratio); duplicates after clipping keep their first occurrence only.
    """
    H, W = image_hw
    gh, gw = math.ceil(H / stride), math.ceil(W / stride)
    shapes = torch.tensor([[s / math.sqrt(r), s * math.sqrt(r)] for s in sizes for r in ratios],
                          dtype=torch.float64)  # (S, 2) w, h
    ys = (torch.arange(gh, dtype=torch.float64) + offset) * stride
    xs = (torch.arange(gw, dtype=torch.float64) + offset) * stride
    cy, cx = torch.meshgrid(ys, xs, indexing="ij")
    centres = torch.stack([cx.reshape(-1), cy.reshape(-1)], dim=1)  # (P, 2)
    c = centres[:, None, :]
    half = shapes[None, :, :] / 2
    boxes = torch.cat([c - half, c + half], dim=2).reshape(-1, 4)
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, W)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, H)
    keep = ((boxes[:, 2] - boxes[:, 0]) >= min_size) & ((boxes[:, 3] - boxes[:, 1]) >= min_size)
    boxes = boxes[keep].float()
    if len(boxes) == 0:
        return boxes.reshape(0, 4)
    return _first_unique(boxes)


def _first_unique(boxes: torch.Tensor) -> torch.Tensor:
    """The rows of (N, 4) boxes without repeats, first occurrences in their order.

    Identical clipped boxes give identical crops and scores; NMS would keep one of them anyway
    (IoU 1), so encoding each once changes nothing but the cost."""
    if len(boxes) == 0:
        return boxes
    _, inverse = torch.unique(boxes, dim=0, return_inverse=True)
    first = torch.full((int(inverse.max()) + 1,), len(boxes), dtype=torch.long)
    first = first.scatter_reduce(0, inverse, torch.arange(len(boxes)), reduce="amin")
    return boxes[first.sort().values]


@dataclass(frozen=True)
class AnchorGrid:
    """The dense anchors of stage 2: sizes, each on a grid of its own step.

    Attributes:
        sizes: anchor sides sqrt(w * h), pixels.
        strides: the grid step of each size, pixels.
        ratios: aspect ratios h / w.
        offset: anchor centres at (i + offset) * stride.
        min_size: anchors thinner than this after clipping are dropped, pixels.
    """

    sizes: tuple[float, ...]
    strides: tuple[int, ...]
    ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    offset: float = 0.5
    min_size: float = 4.0
    resize: tuple[int, int] | None = None

    @classmethod
    def from_config(cls, cfg: ProposalConfig, base_boxes: list[torch.Tensor] | None = None
                    ) -> AnchorGrid:
        """The grid of a config; ``sizes: auto`` reads the base GT boxes (xyxy pixels).

        Raises:
            ValueError: ``sizes: auto`` without any base GT box to derive it from.
        """
        if cfg.sizes == "auto":
            sizes = cls.sizes_from_boxes(base_boxes or [], cfg.auto_quantiles, cfg.auto_step)
        else:
            sizes = tuple(float(x) for x in cfg.sizes)
        strides = tuple(max(1, round(x / 2)) if cfg.stride == "auto" else int(cfg.stride)
                        for x in sizes)
        return cls(sizes=sizes, strides=strides, ratios=tuple(cfg.ratios),
                   offset=cfg.anchor_offset, min_size=cfg.min_size,
                   resize=tuple(cfg.anchor_resize) if cfg.anchor_resize else None)

    def resize_factor(self, image_hw: tuple[int, int]) -> float:
        """Resized / stored side length (1 without ``resize``), as ResizeShortestEdge computes it."""
        if self.resize is None:
            return 1.0
        short, long = self.resize
        return min(short / min(image_hw), long / max(image_hw))

    @staticmethod
    def sizes_from_boxes(boxes: list[torch.Tensor], quantiles: tuple[float, float],
                         step: float) -> tuple[float, ...]:
        """A ladder s_k = lo * step^(k + 1/2), k = 0..n-1, whose bins [lo step^k, lo step^(k+1)]
        cover [lo, hi], the quantiles of sqrt(w * h) of the boxes: every box size in that
        range is within a factor sqrt(step) of an anchor size. Rounded to 0.1 px."""
        wh = torch.cat([b.reshape(-1, 4) for b in boxes]) if boxes else torch.zeros(0, 4)
        side = ((wh[:, 2] - wh[:, 0]).clamp(min=0) * (wh[:, 3] - wh[:, 1]).clamp(min=0)).sqrt()
        side = side[side > 0]
        if len(side) == 0:
            raise ValueError("proposals: sizes 'auto' derives the anchor sizes from the training "
                             "json's base GT boxes, and it has none; give sizes explicitly")
        lo, hi = torch.quantile(side.double(), torch.tensor(quantiles, dtype=torch.float64)).tolist()
        n = max(1, math.ceil(math.log(max(hi / lo, 1.0 + 1e-9)) / math.log(step)))
        return tuple(round(lo * step ** (k + 0.5), 1) for k in range(n))

    def anchors(self, image_hw: tuple[int, int]) -> torch.Tensor:
        """(A, 4) float32 xyxy anchors of one image in stored pixels (`make_anchors` per stride
        on the stored or, with ``resize``, the resized image; duplicates across strides removed,
        first occurrence kept)."""
        factor = self.resize_factor(image_hw)
        grid_hw = (round(image_hw[0] * factor), round(image_hw[1] * factor))
        parts = []
        for stride in dict.fromkeys(self.strides):
            sizes = tuple(x for x, s in zip(self.sizes, self.strides, strict=True) if s == stride)
            parts.append(make_anchors(grid_hw, stride=stride, sizes=sizes, ratios=self.ratios,
                                      offset=self.offset, min_size=self.min_size))
        boxes = _first_unique(torch.cat(parts)) if len(parts) > 1 else parts[0]
        if factor == 1.0:
            return boxes
        H, W = image_hw
        boxes = boxes / factor
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, W)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, H)
        return boxes


def objectness(logits: torch.Tensor) -> torch.Tensor:
    """EZSD objectness ``log C - H(softmax(z))`` in nats.

    Args:
        logits: (N, C) class logits.

    Returns:
        (N,) in [0, log C]: 0 for a uniform posterior, log C for a one-hot one.
    """
    logp = F.log_softmax(logits.float(), dim=-1)
    entropy = -(logp.exp() * logp).sum(-1)
    return math.log(logits.shape[-1]) - entropy


def encode_boxes(clip: ClipModel, image: torch.Tensor, boxes: torch.Tensor, *, enlarge: float,
                 batch_size: int = 256) -> torch.Tensor:
    """CLIP embeddings of EZSD crops of boxes of one image, cropped and encoded in batches.

    Args:
        clip: the CLIP (``crop_boxes`` + ``encode_images``).
        image: (3, H, W) uint8 RGB.
        boxes: (N, 4) xyxy pixels.
        enlarge: crop enlargement about the box centre (1.0 anchors, 1.2 distillation crops).
        batch_size: crops per forward; the crops of one batch are the only ones in memory.

    Returns:
        (N, D) float32 L2-normalised embeddings on the CPU.
    """
    out = []
    for i in range(0, len(boxes), batch_size):
        crops = clip.crop_boxes(image, boxes[i:i + batch_size], enlarge=enlarge)
        out.append(clip.encode_images(crops, batch_size=batch_size).float().cpu())
    if not out:
        return torch.zeros(0, clip.embed_dim)
    return torch.cat(out)


def _resize_pos_embed(pos: torch.Tensor, grid: tuple[int, int], new: tuple[int, int]) -> torch.Tensor:
    """(1 + g0 * g1, C) ViT positional embedding -> (1 + n0 * n1, C), bicubic on the grid part."""
    if tuple(grid) == tuple(new):
        return pos
    cls, rest = pos[:1], pos[1:]
    rest = rest.reshape(1, grid[0], grid[1], -1).permute(0, 3, 1, 2)
    rest = F.interpolate(rest.float(), size=new, mode="bicubic", align_corners=False)
    return torch.cat([cls, rest.permute(0, 2, 3, 1).reshape(new[0] * new[1], -1).to(pos.dtype)])


def _vit_tokens(visual, x: torch.Tensor) -> torch.Tensor:
    """Final patch tokens of open_clip's VisionTransformer, before ``ln_post``.

    The ViT's own embedding path (``VisionTransformer._embeds``), except that the positional
    embedding is interpolated when the input is not the trained size.

    Args:
        visual: the ViT.
        x: (B, 3, h, w) normalised images, h and w multiples of the patch size.

    Returns:
        (B, width, h / p, w / p).
    """
    ph, pw = visual.patch_size
    gh, gw = x.shape[-2] // ph, x.shape[-1] // pw
    t = visual.conv1(x).flatten(2).transpose(1, 2)  # (B, gh * gw, width)
    cls = visual.class_embedding.to(t.dtype).view(1, 1, -1).expand(len(t), 1, -1)
    t = torch.cat([cls, t], dim=1)
    t = t + _resize_pos_embed(visual.positional_embedding, visual.grid_size, (gh, gw)).to(t.dtype)
    t = visual.transformer(visual.ln_pre(visual.patch_dropout(t)))
    return t[:, 1:].transpose(1, 2).reshape(len(t), -1, gh, gw)


def token_region_embeddings(clip: ClipModel, image: torch.Tensor, boxes: torch.Tensor, *,
                            scale: float = 1.0, windows: bool = True,
                            batch_size: int = 256) -> tuple[torch.Tensor, int]:
    """Rough region embeddings pooled from ViT patch tokens (the cheap prior).

    Args:
        clip: a CLIP whose image tower is an open_clip ``VisionTransformer`` (no attentional
            pooler).
        image: (3, H, W) uint8 RGB.
        boxes: (N, 4) xyxy pixels of ``image``.
        scale: the ViT sees the image resized by this factor (rounded to whole patches).
        windows: True: S x S windows at CLIP's input size S, padded black at the far borders,
            encoded as a batch; False: one forward of the whole image with the positional
            embedding interpolated.
        batch_size: windows per forward.

    Returns:
        (embeddings, forwards): (N, D) float32 L2-normalised (RoIAlign-averaged tokens through
        ``ln_post`` and ``proj``) on the CPU, and the number of ViT inputs encoded.

    Raises:
        ValueError: the image tower is not a supported ViT.
    """
    visual = clip.model.visual
    if not isinstance(visual, open_clip.transformer.VisionTransformer) or \
            getattr(visual, "attn_pool", None) is not None or visual.proj is None:
        raise ValueError(f"proposals mode 'cheap' needs an open_clip VisionTransformer image tower "
                         f"without attentional pooling; {clip.name} has {type(visual).__name__}")
    ph, pw = visual.patch_size
    H, W = image.shape[-2:]
    gh, gw = max(1, round(H * scale / ph)), max(1, round(W * scale / pw))
    device, dtype = clip.device, visual.conv1.weight.dtype
    x = image.to(device).float().unsqueeze(0) / 255.0
    if (gh * ph, gw * pw) != (H, W):
        x = F.interpolate(x, size=(gh * ph, gw * pw), mode="bilinear", antialias=True,
                          align_corners=False)
    mean = torch.tensor(clip.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(clip.std, device=device).view(1, 3, 1, 1)
    if windows:
        S = clip.image_size
        ny, nx = math.ceil(gh * ph / S), math.ceil(gw * pw / S)
        # Black padding before normalisation, as in the crops.
        x = F.pad(x, (0, nx * S - x.shape[-1], 0, ny * S - x.shape[-2]))
    x = ((x - mean) / std).to(dtype)
    if windows:
        tiles = x.unfold(2, S, S).unfold(3, S, S)  # (1, 3, ny, nx, S, S)
        tiles = tiles.permute(0, 2, 3, 1, 4, 5).reshape(ny * nx, 3, S, S)
        tok = torch.cat([_vit_tokens(visual, tiles[i:i + batch_size])
                         for i in range(0, len(tiles), batch_size)])  # (ny * nx, C, S/p, S/p)
        c, th, tw = tok.shape[1:]
        grid = tok.reshape(ny, nx, c, th, tw).permute(2, 0, 3, 1, 4).reshape(1, c, ny * th, nx * tw)
        forwards = ny * nx
    else:
        grid, forwards = _vit_tokens(visual, x), 1
    # Boxes in token units (token j spans [j, j + 1)); aligned RoIAlign with adaptive sampling
    # (ceil(roi side) samples per axis) averages the tokens under each box.
    rois = boxes.to(device).float() * torch.tensor([gw / W, gh / H, gw / W, gh / H], device=device)
    rois = torch.cat([rois.new_zeros(len(rois), 1), rois], dim=1)
    pooled = roi_align(grid.float(), rois, (1, 1), spatial_scale=1.0, sampling_ratio=0,
                       aligned=True)
    emb = visual.ln_post(pooled.flatten(1).to(dtype)) @ visual.proj
    return F.normalize(emb.float(), dim=-1).cpu(), forwards


def autocast(clip: ClipModel, precision: str):
    """Autocast context for the CLIP forwards at ``precision`` (a no-op for fp32)."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast(clip.device.type, dtype=dtype, enabled=dtype is not None)


def _lvis_sample(n: int, k: int, seed: int, image_id: int) -> torch.Tensor:
    """k of n indices, sorted, seeded by (seed, image_id) only."""
    rng = np.random.default_rng([int(seed), int(image_id)])
    return torch.from_numpy(np.sort(rng.permutation(n)[:k])).long()


def propose_from_candidates(clip: ClipModel, image: torch.Tensor, candidates: torch.Tensor,
                            text: torch.Tensor, is_base: torch.Tensor, gt_boxes: torch.Tensor,
                            cfg: ProposalConfig, image_id: int) -> tuple[Record, int]:
    """Steps 2-5 on given candidate boxes of one image.

    Args:
        clip: the CLIP.
        image: (3, H, W) uint8 RGB.
        candidates: (N, 4) xyxy pixels (anchors, or the cheap prior's top-K).
        text: (C, D) normalised text embeddings of the vocabulary.
        is_base: (C,) bool.
        gt_boxes: (G, 4) base GT boxes xyxy pixels (coco filter).
        cfg: the config.
        image_id: seeds the lvis sample.

    Returns:
        (record, crops): the stored tensors (module docstring) and the CLIP crops encoded.
    """
    scale = cfg.logit_scale or clip.logit_scale
    emb = encode_boxes(clip, image, candidates, enlarge=1.0, batch_size=cfg.batch_size)
    crops = len(candidates)
    logits = scale * emb @ text.T
    s = objectness(logits) if len(emb) else torch.zeros(0)
    if cfg.filter == "coco" and cfg.early_filter and len(candidates):
        # Both coco tests before the ranking, so the top-K is spent on regions that can
        # survive them (module docstring, "early filter").
        keep = ~is_base[logits.argmax(1)]
        if len(gt_boxes):
            keep &= box_iou(candidates, gt_boxes).max(dim=1).values < cfg.gt_iou
        candidates, s = candidates[keep], s[keep]
    order = nms(candidates.float(), s, cfg.nms_iou)[:cfg.pre_filter_topk]  # sorted by s, desc
    boxes, s = candidates[order], s[order]
    if cfg.filter == "coco":
        if len(gt_boxes) and len(boxes):
            far = box_iou(boxes, gt_boxes).max(dim=1).values < cfg.gt_iou
            boxes, s = boxes[far], s[far]
    else:
        idx = _lvis_sample(len(boxes), cfg.lvis_keep, cfg.seed, image_id)
        boxes, s = boxes[idx], s[idx]
    emb2 = encode_boxes(clip, image, boxes, enlarge=1.2, batch_size=cfg.batch_size)
    crops += len(boxes)
    if len(emb2):
        conf, cls = F.softmax(scale * emb2 @ text.T, dim=-1).max(dim=-1)
    else:
        conf, cls = torch.zeros(0), torch.zeros(0, dtype=torch.long)
    if cfg.filter == "coco":
        novel = ~is_base[cls]
        boxes, s, conf, cls, emb2 = boxes[novel], s[novel], conf[novel], cls[novel], emb2[novel]
        boxes, s, conf, cls, emb2 = (t[:cfg.keep] for t in (boxes, s, conf, cls, emb2))
    record = {
        "boxes": boxes.float().reshape(-1, 4),
        "objectness": s.float(),
        "confidence": conf.float(),
        "classes": cls.long(),
        "embeddings": emb2.half(),
        "image_size": torch.tensor(list(image.shape[-2:]), dtype=torch.long),
    }
    return record, crops


def propose_image(clip: ClipModel, image: torch.Tensor, text: torch.Tensor, is_base: torch.Tensor,
                  gt_boxes: torch.Tensor, cfg: ProposalConfig, image_id: int,
                  grid: AnchorGrid | None = None) -> tuple[Record, dict[str, int]]:
    """Stage 2 for one image (dense or cheap).

    ``grid`` is the dataset's anchor grid (`AnchorGrid.from_config`); None builds it from the
    config alone (not possible for ``sizes: auto``).

    Returns:
        (record, stats) with stats {"anchors", "candidates", "clip_crops", "prior_forwards",
        "proposals"}: the cost counters summed into the manifest. ``prior_forwards`` counts the
        cheap prior's ViT inputs (windows, each the cost of a crop; or 1 whole image).
    """
    H, W = image.shape[-2:]
    anchors = (grid or AnchorGrid.from_config(cfg)).anchors((H, W))
    candidates, forwards = anchors, 0
    if cfg.mode == "cheap":
        if cfg.filter == "coco" and len(gt_boxes) and len(candidates):
            # Anchors this close to a base box are dropped by the coco filter whatever their
            # score; only the NMS could differ (a dropped box can no longer suppress a
            # neighbour), which only ever adds proposals.
            candidates = candidates[box_iou(candidates, gt_boxes).max(dim=1).values < cfg.gt_iou]
        if len(candidates):
            emb, forwards = token_region_embeddings(
                clip, image, candidates, scale=cfg.cheap_scale,
                windows=cfg.cheap_prior == "tiles", batch_size=cfg.batch_size)
            logits = (cfg.logit_scale or clip.logit_scale) * emb @ text.T
            score = cfg.cheap_score
            if score == "auto":
                score = "novel" if cfg.filter == "coco" else "objectness"
            if score == "novel":
                prior = F.softmax(logits, dim=-1)[:, ~is_base].sum(-1)
            else:
                prior = objectness(logits)
            order = nms(candidates, prior, cfg.nms_iou) if cfg.cheap_nms \
                else prior.argsort(descending=True)
            candidates = candidates[order[:cfg.cheap_topk]]
    record, crops = propose_from_candidates(clip, image, candidates, text, is_base, gt_boxes,
                                            cfg, image_id)
    return record, {"anchors": len(anchors), "candidates": len(candidates), "clip_crops": crops,
                    "prior_forwards": forwards, "proposals": len(record["boxes"])}


# --------------------------------------------------------------------------- the stage

def run_proposals(clip: ClipModel, json_file: str | Path, image_root: str | Path,
                  out_dir: str | Path, cfg: ProposalConfig, *, max_images: int | None = None,
                  overwrite: bool = False, progress: ProgressFactory | None = None,
                  part: tuple[int, int] | None = None) -> ShardReader:
    """Compute (or resume) the CLIP proposals of a training set into a shard folder.

    Runs the shards of this process's rank (``detectron2.utils.comm``); see ovd.training.shards.

    Args:
        clip: the (re-normalised) CLIP, on this process's device.
        json_file: COCO training json (base boxes; categories tagged base/novel).
        image_root: folder the json's file names are relative to.
        out_dir: shard folder to write or resume.
        cfg: the config.
        max_images: only the first N images by id (part of the manifest: changing it is a
            different run).
        overwrite: replace a folder holding a different run.
        part: (index, count) of an independent job (``--shard-index/--num-shards``): this job
            computes the shards with ``k % count == index`` (ovd.training.shards).
        progress: optional ``progress(desc, total, initial) -> update(n, postfix)``.

    Returns:
        A reader of the folder (complete unless other ranks are still running).

    Raises:
        ValueError: the folder holds a different run (and not ``overwrite``), or the cheap
            mode on a CLIP without a ViT image tower.
    """
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    data = TrainingImages.load(json_file, image_root, max_images=max_images)
    if cfg.filter == "coco" and bool(data.is_base.all()):
        # The coco filter keeps only proposals CLIP classifies as a novel class: with none
        # declared it would keep nothing and the stage would silently produce empty shards.
        raise ValueError(f"{json_file} declares no novel category, and the coco proposal filter keeps "
                         "only proposals CLIP classifies as novel: declare the novel classes "
                         "(dataset.novel in the config, or \"split\": \"novel\" in the json), or set "
                         "proposals.filter: lvis (class-agnostic: no base-class filter)")
    grid = AnchorGrid.from_config(cfg, data.non_crowd_gt())
    logger.info("proposals: anchor sizes %s px on strides %s px", list(grid.sizes),
                list(grid.strides))
    identity = {
        "config": cfg.identity(),
        "grid": without_neutral(asdict(grid)),
        "clip": clip_identity(clip),
        "embed_dim": int(clip.embed_dim),
        "vocabulary": {"names": data.vocabulary, "is_base": data.is_base.tolist()},
        "source": {"json_sha256": data.json_sha256},
        "info": {"clip": clip.name, "json_file": str(data.json_file),
                 "image_root": str(data.image_root)},
    }
    store = ShardStore(out_dir, stage="proposals", identity=identity, image_ids=data.image_ids,
                       shard_size=cfg.shard_size, overwrite=overwrite, part=part)
    with torch.inference_mode():
        text = clip.text_embeddings(data.vocabulary, cfg.template).float().cpu()

    todo = store.todo_shards()
    read = ReadAhead(data.read, store.image_ids_of(todo))

    def compute(image_id: int) -> tuple[Record, dict]:
        # Crops are cut where the CLIP runs (RoIAlign on the GPU when there is one).
        with torch.inference_mode(), autocast(clip, cfg.precision):
            return propose_image(clip, read(image_id).to(clip.device), text, data.is_base,
                                 data.gt[image_id], cfg, image_id, grid)

    try:
        reader = store.run(compute, desc=f"proposals ({cfg.mode})", progress=progress, todo=todo)
    finally:
        read.close()
    found = (reader.manifest.get("cost") or {}).get("totals", {}).get("proposals") if reader.complete() else None
    if found == 0 and len(data.image_ids):
        raise ValueError(f"the proposal stage found no region in any of {len(data.image_ids)} images "
                         f"({out_dir}): with the {cfg.filter} filter every candidate was dropped; "
                         "check that the novel classes are declared and the CLIP reads these images "
                         "(`ovd clip eval`), or set proposals.filter: lvis")
    return reader


# --------------------------------------------------------------------------- CLI

def _setup_worker_logging() -> None:
    # Spawned workers start with an unconfigured root logger.
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, datefmt="%H:%M:%S",
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def proposals_worker(clip_path: str, json_file: str, image_root: str, out: str, cfg: dict,
                      max_images: int | None, overwrite: bool, part: tuple[int, int] | None = None) -> None:
    from detectron2.utils import comm

    from ovd.models.clip.model import load_clip

    from .progress import progress as _progress

    _setup_worker_logging()
    clip = load_clip(clip_path, device=stage_device())
    reader = run_proposals(clip, json_file, image_root, out, ProposalConfig.from_dict(cfg),
                           max_images=max_images, overwrite=overwrite, part=part,
                           progress=_progress if comm.get_rank() == 0 else None)
    if comm.get_rank() == 0 and reader.complete():
        cost = reader.manifest.get("cost", {})
        logger.info("proposals written to %s: %s", out, json.dumps(cost.get("per_image", {})))
        logger.info("  %.3f images/s (sum of shard times)", cost.get("images_per_second") or 0)


def load_proposals(folder: str | Path) -> ShardReader:
    """A reader of a proposals folder.

    Raises:
        ValueError: the folder holds another stage's output.
    """
    reader = ShardReader(folder)
    if reader.manifest.get("stage") != "proposals":
        raise ValueError(f"{folder} holds {reader.manifest.get('stage')!r} output, not proposals")
    return reader


__all__ = [
    "AnchorGrid",
    "ProposalConfig",
    "TrainingImages",
    "encode_boxes",
    "load_proposals",
    "make_anchors",
    "objectness",
    "propose_from_candidates",
    "propose_image",
    "run_proposals",
    "token_region_embeddings",
]
