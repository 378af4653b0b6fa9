"""Gates: the measurements that say whether each EZSD stage did its job.

A stage is not done because it ran; it is done when its output does what the paper's stage is
for. Each gate needs annotations the stage itself must never read (the novel objects of the
training images, or a validation split), and is computed *before* a detector is trained:

* ``renorm``: CLIP's zero-shot accuracy on detection GT crops (EZSD's 1.2x crop), base and
  novel, before and after re-normalisation, on the same crops: a paired test (McNemar's exact
  test on the crops whose correctness changed) and the paired difference with its 95% CI.
* ``proposals``: recall of the novel objects by the kept proposals at IoU >= 0.5, precision
  (share of kept proposals on a novel object at IoU >= 0.5), proposals and images per second;
  and the anchor grid's coverage ceiling (share of objects with any anchor at IoU >= 0.5).
* ``targets``: the mean distillation weight of proposals on a novel object vs the others (the
  weights should favour the regions the stage exists for).
* ``detector``: the background vector's norm and the temperature tau after training (a
  background vector that never learns leaves "background" to negative cosines alone).

Confidence intervals: Wilson for a proportion over independent items and McNemar's exact test
(both scipy's binomial test), the normal paired interval for the difference of two accuracies
on the same items, and a percentile bootstrap over *images* (seeded, 2,000 resamples) for
ratios whose items cluster by image.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy.stats import binomtest
from torchvision.ops import box_iou

from ovd.models.clip.model import DEFAULT_TEMPLATE, ClipModel
from ovd.models.manifest import strict_json

from .data.coco_format import read_dataset_image
from .data.detection_set import DetectionSet

logger = logging.getLogger(__name__)

Z95 = 1.959964
BOOTSTRAP_SAMPLES = 2000


# --------------------------------------------------------------------------- statistics

def wilson_ci(k: int, n: int) -> list[float]:
    """95% Wilson interval of a proportion k / n ([nan, nan] for n = 0)."""
    if n == 0:
        return [math.nan, math.nan]
    ci = binomtest(k, n).proportion_ci(0.95, method="wilson")
    return [float(ci.low), float(ci.high)]


def mcnemar_exact_p(only_before: int, only_after: int) -> float:
    """Two-sided exact McNemar p-value: the discordant pairs under H0 are Binomial(n, 1/2)."""
    n = only_before + only_after
    return float(binomtest(only_after, n, 0.5).pvalue) if n else 1.0


def paired_accuracy(before: np.ndarray, after: np.ndarray) -> dict:
    """Accuracy before and after on the same items, with the paired test.

    Args:
        before, after: (N,) bool, item i classified correctly.

    Returns:
        {"n", "acc_before", "acc_after" (each with a Wilson "_ci95"), "diff", "diff_ci95",
        "only_before", "only_after", "mcnemar_p"}; accuracies in [0, 1].
    """
    before, after = np.asarray(before, bool), np.asarray(after, bool)
    n = len(before)
    b, a = int(before.sum()), int(after.sum())
    only_b, only_a = int((before & ~after).sum()), int((after & ~before).sum())
    out = {"n": n, "acc_before": b / n if n else math.nan, "acc_before_ci95": wilson_ci(b, n),
           "acc_after": a / n if n else math.nan, "acc_after_ci95": wilson_ci(a, n),
           "only_before": only_b, "only_after": only_a,
           "mcnemar_p": mcnemar_exact_p(only_b, only_a)}
    if n:
        d = (only_a - only_b) / n
        se = math.sqrt(max(only_a + only_b - n * d * d, 0.0)) / n
        out.update(diff=d, diff_ci95=[d - Z95 * se, d + Z95 * se])
    else:
        out.update(diff=math.nan, diff_ci95=[math.nan, math.nan])
    return out


def bootstrap_ratio_ci(num: np.ndarray, den: np.ndarray, *, seed: int = 0) -> list[float]:
    """95% percentile-bootstrap interval of sum(num) / sum(den), resampling images.

    Args:
        num, den: (I,) per-image numerator and denominator (e.g. objects found, objects).
    """
    num, den = np.asarray(num, float), np.asarray(den, float)
    if len(num) == 0 or den.sum() == 0:
        return [math.nan, math.nan]
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(num), size=(BOOTSTRAP_SAMPLES, len(num)))
    d = den[idx].sum(1)
    r = num[idx].sum(1) / np.where(d > 0, d, np.nan)
    lo, hi = np.nanpercentile(r, [2.5, 97.5])
    return [float(lo), float(hi)]


# --------------------------------------------------------------------------- held-out data

@dataclass
class HeldOut:
    """All annotations of a set of images, for gates only (never for a stage's input).

    Attributes:
        json_file, image_root: where they come from.
        names: every category name, ordered by id (Detectron2's contiguous order).
        is_novel: (C,) bool.
        tiers: per category its ``tier`` tag where the json has one (the synthetic world's
            novel_comp / novel_shape / novel_both), else its split.
        images: image entries by id.
        boxes: image id -> (G, 4) float32 xyxy pixels (non-crowd).
        labels: image id -> (G,) int64 index into ``names``.
    """

    json_file: Path
    image_root: Path
    names: list[str]
    is_novel: torch.Tensor
    tiers: list[str]
    images: dict[int, dict]
    boxes: dict[int, torch.Tensor]
    labels: dict[int, torch.Tensor]

    @classmethod
    def load(cls, json_file: str | Path, image_root: str | Path | None = None) -> HeldOut:
        """Read a COCO json with all annotations (``train_all``-style or a val split).

        Raises:
            ValueError: no category is marked ``"split": "novel"`` (nothing to measure).
        """
        data = DetectionSet.load(json_file, image_root)
        is_novel = data.is_novel
        if not is_novel.any():
            raise ValueError(f"{json_file}: no category has \"split\": \"novel\"; the gates "
                             "measure novel objects, so they need a json that marks them")
        kept = {i: data.annotations(i) for i in data.image_ids}  # crowd boxes left out
        return cls(json_file=data.json_file, image_root=data.image_root, names=data.names,
                   is_novel=is_novel, tiers=data.tiers, images={i: data.image(i) for i in data.image_ids},
                   boxes={i: b for i, (b, _) in kept.items()}, labels={i: v for i, (_, v) in kept.items()})

    def novel_boxes(self, image_id: int) -> torch.Tensor:
        """(G_novel, 4) xyxy novel boxes of one image (empty for an unknown image)."""
        if image_id not in self.boxes:
            return torch.zeros(0, 4)
        return self.boxes[image_id][self.is_novel[self.labels[image_id]]]


# --------------------------------------------------------------------------- stage 1

@torch.inference_mode()
def crop_predictions(clip: ClipModel, held: HeldOut, *, template: str = DEFAULT_TEMPLATE,
                     max_images: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Zero-shot class of a CLIP for every GT crop (1.2x) over all category names.

    Returns:
        (predicted (N,) int64 and label (N,) int64, both indices into held.names, image_id
        (N,) int64), crops in image-id then annotation order.
    """
    text = clip.text_embeddings(held.names, template)
    predicted, label, owner = [], [], []
    for image_id in sorted(held.images)[:max_images]:
        boxes = held.boxes[image_id]
        if not len(boxes):
            continue
        pixels = read_dataset_image(held.image_root, held.images[image_id],
                                    json_file=held.json_file)
        emb = clip.encode_images(clip.crop_boxes(pixels, boxes, enlarge=1.2))
        labels = held.labels[image_id]
        predicted.append((emb @ text.T.to(emb.device)).argmax(1).cpu().numpy())
        label.append(labels.numpy())
        owner.append(np.full(len(labels), image_id, dtype=np.int64))
    if not predicted:
        raise ValueError(f"{held.json_file} has no annotation to crop")
    return np.concatenate(predicted), np.concatenate(label), np.concatenate(owner)


def top_confusions(predicted: np.ndarray, label: np.ndarray, names: list[str], k: int = 5) -> list:
    """The k most frequent errors as [true name, predicted name, count]: what a class is
    mistaken for (a name that attracts many classes points at a confound)."""
    wrong = predicted != label
    pairs, counts = np.unique(np.stack([label[wrong], predicted[wrong]], 1), axis=0, return_counts=True)
    order = np.argsort(-counts, kind="stable")[:k]
    return [[names[int(pairs[i, 0])], names[int(pairs[i, 1])], int(counts[i])] for i in order]


def renorm_gate(before: ClipModel, after: ClipModel, held: HeldOut, *,
                template: str = DEFAULT_TEMPLATE, max_images: int | None = None) -> dict:
    """Did re-normalisation move CLIP on detection crops? (module docstring)

    Returns:
        {"base": paired_accuracy, "novel": paired_accuracy, "dataset", "template",
        "novel_acc_before", "novel_acc_after", "base_acc_before", "base_acc_after"}, plus one
        paired_accuracy per novel tier where the categories carry tiers; each group also has
        "diff_ci95_images", a bootstrap over images of the difference (crops of one image are
        not independent, so this interval is the one to trust when it is wider).
        "confusions_before" / "confusions_after": the most frequent errors (`top_confusions`).
    """
    pred_b, label, owner = crop_predictions(before, held, template=template, max_images=max_images)
    pred_a, _, _ = crop_predictions(after, held, template=template, max_images=max_images)
    ok_b, ok_a = pred_b == label, pred_a == label
    out = {"dataset": str(held.json_file), "template": template,
           "confusions_before": top_confusions(pred_b, label, held.names),
           "confusions_after": top_confusions(pred_a, label, held.names)}
    novel = held.is_novel.numpy()[label]
    tier = np.array(held.tiers)[label]
    groups = [("base", ~novel), ("novel", novel)]
    groups += [(t, tier == t) for t in dict.fromkeys(held.tiers) if t not in ("base", "novel")
               and (tier == t).any()]
    for group, mask in groups:
        out[group] = paired_accuracy(ok_b[mask], ok_a[mask])
        ids, where = np.unique(owner[mask], return_inverse=True)
        change = np.bincount(where, ok_a[mask].astype(float) - ok_b[mask], minlength=len(ids))
        out[group]["diff_ci95_images"] = bootstrap_ratio_ci(change, np.bincount(where,
                                                                                minlength=len(ids)))
    for g in ("base", "novel"):
        out[f"{g}_acc_before"], out[f"{g}_acc_after"] = out[g]["acc_before"], out[g]["acc_after"]
    return out


# --------------------------------------------------------------------------- stage 2

def grid_coverage(grid, held: HeldOut, *, iou: float = 0.5,
                  image_ids: list[int] | None = None) -> dict:
    """Share of objects with any anchor of the grid at IoU >= ``iou``: the ceiling of what
    dense proposals can reach (an object no anchor fits cannot be proposed).

    Args:
        grid: a ovd.training.proposals.AnchorGrid.
        held: all annotations.
        image_ids: the images to count (default all).

    Returns:
        {"all", "base", "novel"} shares in [0, 1], "objects", "anchors_per_image".
    """
    hits = {"base": [], "novel": []}
    anchors = 0
    ids = sorted(held.images) if image_ids is None else image_ids
    cache: dict[tuple[int, int], torch.Tensor] = {}
    for image_id in ids:
        im = held.images[image_id]
        hw = (int(im["height"]), int(im["width"]))
        if hw not in cache:
            cache[hw] = grid.anchors(hw)
        a = cache[hw]
        anchors += len(a)
        boxes = held.boxes[image_id]
        if len(boxes) and len(a):
            best = box_iou(boxes, a).max(dim=1).values >= iou
        else:
            best = torch.zeros(len(boxes), dtype=torch.bool)
        novel = held.is_novel[held.labels[image_id]]
        hits["novel"].append(best[novel])
        hits["base"].append(best[~novel])
    out = {}
    for g in ("base", "novel"):
        h = torch.cat(hits[g]) if hits[g] else torch.zeros(0, dtype=torch.bool)
        out[g] = float(h.float().mean()) if len(h) else math.nan
    both = torch.cat([torch.cat(v) for v in hits.values() if v]) if ids else torch.zeros(0)
    out.update(all=float(both.float().mean()) if len(both) else math.nan, objects=len(both),
               anchors_per_image=anchors / max(len(ids), 1))
    return out


def proposal_quality(proposals: dict[int, torch.Tensor], held: HeldOut, *,
                     iou: float = 0.5) -> dict:
    """Novel recall and precision of kept proposals.

    Args:
        proposals: image id -> (K, 4) kept proposal boxes, xyxy pixels.
        held: all annotations of those images.

    Returns:
        {"images", "novel_objects", "novel_recall50" (share of novel objects with a proposal
        at IoU >= iou) and its bootstrap "_ci95", "precision50" (share of proposals at
        IoU >= iou with a novel object) and its "_ci95", "proposals_per_image"}.
    """
    found, objects, on_novel, kept = [], [], [], []
    for image_id, boxes in proposals.items():
        novel = held.novel_boxes(image_id)
        if len(novel) and len(boxes):
            m = box_iou(novel, boxes.float()) >= iou
            found.append(int(m.any(1).sum()))
            on_novel.append(int(m.any(0).sum()))
        else:
            found.append(0)
            on_novel.append(0)
        objects.append(len(novel))
        kept.append(len(boxes))
    found, objects, on_novel, kept = map(np.array, (found, objects, on_novel, kept))
    return {
        "images": len(kept), "novel_objects": int(objects.sum()),
        "novel_recall50": float(found.sum() / max(objects.sum(), 1)),
        "novel_recall50_ci95": bootstrap_ratio_ci(found, objects),
        "precision50": float(on_novel.sum() / max(kept.sum(), 1)),
        "precision50_ci95": bootstrap_ratio_ci(on_novel, kept),
        "proposals_per_image": float(kept.mean()) if len(kept) else 0.0,
    }


def proposals_gate(reader, held: HeldOut, *, iou: float = 0.5) -> dict:
    """`proposal_quality` of a stage-2 folder, with its images/s and its grid's coverage."""
    from .proposals import AnchorGrid

    boxes = {i: reader[i]["boxes"] for i in reader.image_ids()}
    out = proposal_quality(boxes, held, iou=iou)
    manifest = reader.manifest
    cost = manifest.get("cost") or {}
    grid = AnchorGrid(**{k: tuple(v) if isinstance(v, list) else v
                         for k, v in manifest["grid"].items()})
    out.update(mode=manifest["config"]["mode"], images_per_s=cost.get("images_per_second"),
               grid=manifest["grid"],
               grid_coverage50=grid_coverage(grid, held, iou=iou,
                                             image_ids=[i for i in reader.image_ids()
                                                        if i in held.images]))
    return out


# --------------------------------------------------------------------------- stage 3

def targets_gate(reader, held: HeldOut, *, iou: float = 0.5) -> dict:
    """Mean confidence weight of proposal targets on a novel object (IoU >= iou) vs not.

    Returns:
        {"on_novel": {"n", "mean_weight", "ci95"}, "elsewhere": {...}, "ratio"}; CIs by
        bootstrap over images of the per-image weight sums and counts.
    """
    sums = {"on_novel": [], "elsewhere": []}
    counts = {"on_novel": [], "elsewhere": []}
    for image_id in reader.image_ids():
        rec = reader[image_id]
        prop = ~rec["is_gt"]
        boxes, w = rec["boxes"][prop], rec["weights"][prop].double()
        novel = held.novel_boxes(image_id)
        hit = (box_iou(boxes, novel).max(1).values >= iou) if len(novel) and len(boxes) \
            else torch.zeros(len(boxes), dtype=torch.bool)
        for key, mask in (("on_novel", hit), ("elsewhere", ~hit)):
            sums[key].append(float(w[mask].sum()))
            counts[key].append(int(mask.sum()))
    out = {}
    for key in sums:
        s, c = np.array(sums[key]), np.array(counts[key])
        out[key] = {"n": int(c.sum()), "mean_weight": float(s.sum() / c.sum()) if c.sum() else math.nan,
                    "ci95": bootstrap_ratio_ci(s, c)}
    out["ratio"] = out["on_novel"]["mean_weight"] / out["elsewhere"]["mean_weight"] \
        if out["elsewhere"]["mean_weight"] else math.nan
    return out


# --------------------------------------------------------------------------- stage 4

CLASSIFIER_PREFIX = "roi_heads.box_predictor.classifier."


def detector_gate(weights: str | Path | dict) -> dict:
    """{"background_norm", "temperature"} of a trained detector's text classifier.

    Args:
        weights: a Detectron2 checkpoint (.pth, ``{"model": state}``), an export's
            ``detector.safetensors``, or a state dict.
    """
    from ovd.models.detector.output_layers import TextEmbeddingClassifier

    if not isinstance(weights, dict):
        path = Path(weights)
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            weights = load_file(str(path))
        else:
            weights = torch.load(path, map_location="cpu", weights_only=False)
            weights = weights.get("model", weights)
    state = {k[len(CLASSIFIER_PREFIX):]: v.float() for k, v in weights.items()
             if k.startswith(CLASSIFIER_PREFIX)}
    if "log_temperature" not in state:
        raise ValueError("no text classifier (roi_heads.box_predictor.classifier) in these weights")
    dim = (state.get("background.weight") if "background.weight" in state
           else state["background"]).numel()
    clf = TextEmbeddingClassifier(dim)
    clf.load_state_dict(state)
    return {"background_norm": float(clf.background_vector.detach().norm()),
            "temperature": float(clf.log_temperature.detach().exp())}


# --------------------------------------------------------------------------- all stages

def stage_gates(*, heldout: HeldOut | None = None, eval_set: HeldOut | None = None,
                parent_clip: str | Path | None = None, clip: str | Path | None = None,
                proposals: str | Path | None = None, targets: str | Path | None = None,
                detector: str | Path | None = None, template: str = DEFAULT_TEMPLATE) -> dict:
    """Every gate whose inputs are given and present; the renorm, proposals and targets gates
    are also written to ``gates.json`` in their stage's folder.

    Args:
        heldout: all annotations of the training images (proposals, targets).
        eval_set: all annotations of an evaluation split (renorm: its GT crops).
        parent_clip, clip: CLIP folders before and after re-normalisation.
        proposals, targets: stage-2 / stage-3 folders.
        detector: a trained detector's weights file (see `detector_gate`).

    Returns:
        {"renorm": ..., "proposals": ..., "targets": ..., "detector": ...} for those measured,
        and "skipped": {gate: why}.
    """

    from ovd.models.clip.model import load_clip

    from .proposals import load_proposals
    from .targets import load_targets

    out: dict = {"skipped": {}}

    def save(key: str, folder: Path, value: dict) -> None:
        out[key] = value
        (folder / "gates.json").write_text(strict_json(value, indent=2))
        logger.info("gate %s written to %s", key, folder / "gates.json")

    def missing(key: str, why: str) -> None:
        out["skipped"][key] = why
        logger.info("gate %s skipped: %s", key, why)

    if clip and parent_clip and eval_set and Path(clip).is_dir():
        save("renorm", Path(clip), renorm_gate(load_clip(str(parent_clip)), load_clip(str(clip)),
                                               eval_set, template=template))
    else:
        missing("renorm", "needs the parent and re-normalised CLIP folders and an evaluation json")
    for key, folder, load, gate in (("proposals", proposals, load_proposals, proposals_gate),
                                    ("targets", targets, load_targets, targets_gate)):
        if folder and heldout and (Path(folder) / "manifest.json").is_file():
            save(key, Path(folder), gate(load(folder), heldout))
        else:
            missing(key, f"needs a {key} folder and a held-out json of the training images")
    if detector and Path(detector).is_file():
        # Not written beside the weights: they may be an export (or a previous run's).
        out["detector"] = detector_gate(detector)
    else:
        missing("detector", "needs a trained detector's weights")
    return out


def format_gates(g: dict) -> str:
    """A short human-readable summary of `ovd.training.gates.stage_gates`' result."""
    lines = []
    if "renorm" in g:
        for grp in [k for k, v in g["renorm"].items() if isinstance(v, dict) and "acc_before" in v]:
            r = g["renorm"][grp]
            lines.append(f"renorm    {grp:<11} crop accuracy {r['acc_before']:.1%} -> {r['acc_after']:.1%}"
                         f"  (diff {r['diff']:+.1%}, 95% CI [{r['diff_ci95'][0]:+.1%}, "
                         f"{r['diff_ci95'][1]:+.1%}], McNemar p={r['mcnemar_p']:.2g}, n={r['n']})")
        if g["renorm"].get("confusions_after"):
            lines.append("renorm    most frequent errors after: " + ", ".join(
                f"{t} -> {p} ({n})" for t, p, n in g["renorm"]["confusions_after"][:3]))
    if "proposals" in g:
        p = g["proposals"]
        lo, hi = p["novel_recall50_ci95"]
        lines.append(f"proposals {p['mode']}: novel recall@0.5 {p['novel_recall50']:.1%} "
                     f"[{lo:.1%}, {hi:.1%}], precision {p['precision50']:.1%}, "
                     f"{p['proposals_per_image']:.0f}/image, {p['images_per_s'] or 0:.2f} images/s; "
                     f"grid coverage@0.5 {p['grid_coverage50']['all']:.1%}")
    if "targets" in g:
        t = g["targets"]
        lines.append(f"targets   mean weight on novel objects {t['on_novel']['mean_weight']:.3f} "
                     f"vs elsewhere {t['elsewhere']['mean_weight']:.3f}")
    if "detector" in g:
        d = g["detector"]
        lines.append(f"detector  |w_bg| {d['background_norm']:.3f}, tau {d['temperature']:.1f}")
    for key, why in g.get("skipped", {}).items():
        lines.append(f"{key:<9} skipped: {why}")
    return "\n".join(lines)


__all__ = [
    "HeldOut",
    "bootstrap_ratio_ci",
    "crop_predictions",
    "detector_gate",
    "format_gates",
    "grid_coverage",
    "mcnemar_exact_p",
    "paired_accuracy",
    "proposal_quality",
    "proposals_gate",
    "renorm_gate",
    "stage_gates",
    "targets_gate",
    "top_confusions",
    "wilson_ci",
]
