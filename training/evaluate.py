"""Stage 5: generalized zero-shot evaluation.

The detector classifies every validation region over **all** categories (base + novel) at
once, as in the paper's generalized setting; detections go through Detectron2's
`COCOEvaluator` (pycocotools, `use_fast_impl=False`: the compiled fast path is not built), or
its `LVISEvaluator` (the LVIS API, federated, with APr / APc / APf) for LVIS-style annotations
(OV-LVIS), and the per-category precision it computes is averaged over the base, novel and all groups, and
over each novel tier when the dataset's categories carry a ``tier`` tag (the synthetic world's
novel_comp / novel_shape / novel_both).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
from detectron2.data import MetadataCatalog, build_detection_test_loader
from detectron2.evaluation import COCOEvaluator, inference_on_dataset
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import nn

from ovd.models.manifest import strict_json

logger = logging.getLogger(__name__)


#: EZSD's generalized evaluation keeps the top 300 detections per image with no score floor
#: (AP integrates over the whole ranking; a floor only cuts its tail off).
EVAL_MAX_DETECTIONS = 300
EVAL_SCORE_THRESH = 0.0


class WithVocabulary(nn.Module):
    """Binds a vocabulary (and test-time options) to an OpenVocabRCNN so Detectron2's
    `inference_on_dataset` can call it.

    Args:
        model: an OpenVocabRCNN (or a student of it): ``encode``/``classify``/``to_original_size``.
        text: (C, D) normalised text embeddings.
        **options: ``classify`` options (score_thresh, max_detections, nms_thresh).
    """

    def __init__(self, model: nn.Module, text: torch.Tensor, **options):
        super().__init__()
        self.model = model
        self.text = text
        self.options = options
        # A new Module is in training mode, and `inference_on_dataset` restores the wrapper's
        # mode on exit, which would leave an eval-mode model in training mode after evaluation.
        self.train(model.training)

    def forward(self, batched_inputs):
        regions = self.model.encode(batched_inputs)
        results = self.model.classify(regions, self.text, **self.options)
        return self.model.to_original_size(results, batched_inputs)


def group_ap(gt_json: str | Path, detections: list[dict], groups: dict[str, list[int]],
             max_detections: int = EVAL_MAX_DETECTIONS) -> dict:
    """AP50, AP (0.5:0.95) and AP-small per group of category ids, from one COCOeval run.

    Args:
        gt_json: COCO annotation file.
        detections: COCO-format results ({image_id, category_id, bbox [x, y, w, h], score}).
        groups: name -> category ids; a group's AP is the mean over its categories that have
            ground truth (COCO's own convention for the overall AP).
        max_detections: detections per image scored (COCOeval's largest maxDets).

    Returns:
        {group: {"AP50": %, "AP": %, "APs": %, "categories": n}}; values in percent, NaN where
        a group has no category with ground truth.
    """
    gt = COCO(str(gt_json))
    dt = gt.loadRes(detections) if detections else None
    if dt is None:
        return {g: {"AP50": 0.0, "AP": 0.0, "APs": 0.0, "categories": len(ids)} for g, ids in groups.items()}
    ev = COCOeval(gt, dt, "bbox")
    # COCOeval's default keeps 100 per image; the generalized evaluation keeps up to 300.
    ev.params.maxDets = [1, 10, max_detections]
    ev.evaluate()
    ev.accumulate()
    precision = ev.eval["precision"]  # (T iou, R recall, K cat, A area, M maxdets)
    return _groups_from_precision(precision, {c: k for k, c in enumerate(ev.params.catIds)}, groups)


def lvis_group_ap(gt_json: str | Path, detections: list[dict], groups: dict[str, list[int]],
                  max_detections: int = EVAL_MAX_DETECTIONS) -> dict:
    """`group_ap` for LVIS-style annotations, scored by the LVIS API (federated: a category
    counts only on images that hold it or list it in ``neg_category_ids``; detections of a
    category listed in ``not_exhaustive_category_ids`` are not false positives), plus the LVIS
    summary under "lvis": AP, AP50, APr / APc / APf (rare / common / frequent categories), ...

    Args and returns as `group_ap` (one max-detections limit, LVIS's 300 by default).
    """
    from lvis import LVIS, LVISEval, LVISResults

    _lvis_numpy_compat()
    gt = LVIS(str(gt_json))
    if not detections:
        out = {g: {"AP50": 0.0, "AP": 0.0, "APs": 0.0, "categories": len(ids)} for g, ids in groups.items()}
        out["lvis"] = dict.fromkeys(("AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf"), 0.0)
        return out
    ev = LVISEval(gt, LVISResults(gt, detections, max_dets=max_detections), "bbox")
    ev.params.max_dets = max_detections
    ev.run()
    precision = ev.eval["precision"]  # (T iou, R recall, K cat, A area): no max-dets axis
    cat_index = {c: k for k, c in enumerate(ev.params.cat_ids)}
    out = _groups_from_precision(precision[..., None], cat_index, groups)
    out["lvis"] = {k: round(100.0 * float(v), 3) for k, v in ev.get_results().items()}
    return out


def _lvis_numpy_compat() -> None:
    """lvis 0.5.3 (the last release, and what Detectron2's LVISEvaluator calls) still uses
    np.float, which NumPy 1.24 removed; it meant the builtin float, so that alias is restored."""
    if not hasattr(np, "float"):
        np.float = float


def _groups_from_precision(precision: np.ndarray, cat_index: dict[int, int],
                           groups: dict[str, list[int]]) -> dict:
    """Mean AP50 / AP / APs per group from a (T, R, K, A, M) precision array (the last
    max-detections column), over the group's categories that have ground truth."""
    def mean_ap(ids: list[int], iou: slice, area: int) -> float:
        vals = []
        for c in ids:
            p = precision[iou, :, cat_index[c], area, -1]
            if (p > -1).any():
                vals.append(float(np.mean(p[p > -1])))
        return 100.0 * float(np.mean(vals)) if vals else float("nan")

    out = {}
    for name, ids in groups.items():
        ids = [c for c in ids if c in cat_index]
        out[name] = {"AP50": mean_ap(ids, slice(0, 1), 0), "AP": mean_ap(ids, slice(None), 0),
                     "APs": mean_ap(ids, slice(None), 1), "categories": len(ids)}
    return out


def evaluate(cfg, model: nn.Module, dataset_name: str, text: torch.Tensor, output_dir: str | Path,
             *, max_detections: int = EVAL_MAX_DETECTIONS,
             score_thresh: float = EVAL_SCORE_THRESH) -> dict:
    """Run the detector over a registered dataset with the given vocabulary and score it.

    Args:
        cfg: the detector config (test-time input sizes, data loader settings).
        model: an OpenVocabRCNN.
        dataset_name: registered dataset with base/novel metadata (coco_format.register_ov_dataset).
        text: (C, D) text embeddings of the dataset's thing_classes, in contiguous-id order.
        output_dir: where COCOEvaluator writes its detections json, and we write metrics.json.
        max_detections, score_thresh: detections kept per image and their score floor
            (EZSD's generalized evaluation: 300, none), whatever the config's test values.

    Returns:
        {"base": {...}, "novel": {...}, "all": {...}} as `group_ap` (plus one group per novel
        tier where the categories are tagged), "images", "seconds" and
        "max_detections"/"score_thresh".
    """
    import time

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    meta = MetadataCatalog.get(dataset_name)
    lvis = meta.get("evaluator_type") == "lvis"
    if lvis:
        from detectron2.evaluation import LVISEvaluator

        _lvis_numpy_compat()
        evaluator = LVISEvaluator(dataset_name, tasks=("bbox",), distributed=False,
                                  output_dir=str(output_dir), max_dets_per_image=max_detections)
    else:
        evaluator = COCOEvaluator(dataset_name, tasks=("bbox",), distributed=False,
                                  output_dir=str(output_dir), use_fast_impl=False)
    loader = build_detection_test_loader(cfg, dataset_name)
    model.eval()
    t0 = time.time()
    with torch.inference_mode():
        inference_on_dataset(WithVocabulary(model, text, max_detections=max_detections,
                                            score_thresh=score_thresh), loader, evaluator)
    seconds = time.time() - t0
    detections = json.loads((output_dir / ("lvis_instances_results.json" if lvis
                                           else "coco_instances_results.json")).read_text())
    return _score(meta, detections, output_dir, images=len(loader.dataset), seconds=round(seconds, 1),
                  dataset=dataset_name, max_detections=max_detections, score_thresh=score_thresh)


def _score(meta, detections: list[dict], output_dir: Path, **info) -> dict:
    """Group AP of a dataset's detections (COCO results format, dataset category ids), with
    `info` added; written to output_dir/metrics.json."""
    inverse = {v: k for k, v in meta.thing_dataset_id_to_contiguous_id.items()}
    groups = {"base": [inverse[i] for i in meta.base_contiguous_ids],
              "novel": [inverse[i] for i in meta.novel_contiguous_ids],
              "all": sorted(inverse.values())}
    groups.update(tier_groups(meta.json_file))
    lvis = meta.get("evaluator_type") == "lvis"
    result = (lvis_group_ap if lvis else group_ap)(meta.json_file, detections, groups, info["max_detections"])
    result.update(info)
    (output_dir / "metrics.json").write_text(strict_json(result, indent=2))
    return result


def evaluate_runtime(runtime, dataset_name: str, output_dir: str | Path, *,
                     max_detections: int = EVAL_MAX_DETECTIONS, score_thresh: float = EVAL_SCORE_THRESH) -> dict:
    """`evaluate` for a `models.runtime` Runtime, e.g. an export's ONNX graphs: every image of
    a registered dataset goes through the runtime's own preprocessing, `encode` and `classify`
    (softmax scores over all the dataset's names, the generalized setting), so the AP is that
    of the files a deployment runs. Returns and writes what `evaluate` does."""
    import time

    from detectron2.data import DatasetCatalog
    from detectron2.data import detection_utils as utils

    from ovd.models.runtime import ClassifyOptions

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    meta = MetadataCatalog.get(dataset_name)
    names = list(meta.thing_classes)
    text = runtime.text_embeddings(names)
    options = ClassifyOptions(score_threshold=score_thresh, max_detections=max_detections, score_mode="softmax")
    inverse = {v: k for k, v in meta.thing_dataset_id_to_contiguous_id.items()}
    records = DatasetCatalog.get(dataset_name)
    detections, t0 = [], time.time()
    for rec in records:
        x = runtime.preprocessing(utils.read_image(rec["file_name"], format="RGB"))
        (found,) = runtime.classify(runtime.encode([x]), text, [x], names, options)
        for (x0, y0, x1, y1), score, cls in zip(found.boxes.tolist(), found.scores.tolist(),
                                                found.class_indices.tolist(), strict=True):
            detections.append({"image_id": rec["image_id"], "category_id": inverse[int(cls)],
                               "bbox": [x0, y0, x1 - x0, y1 - y0], "score": score})
    (output_dir / "runtime_instances_results.json").write_text(json.dumps(detections))
    return _score(meta, detections, output_dir, images=len(records), seconds=round(time.time() - t0, 1),
                  dataset=dataset_name, max_detections=max_detections, score_thresh=score_thresh)


def evaluate_folder(folder: str | Path, *, dataset: str | None = None, json_file: str | Path | None = None,
                    image_root: str | Path | None = None, weights: str | Path | None = None,
                    clip: str | None = None, opts: list | tuple = (), out: str | Path | None = None,
                    data=None, backend: str = "torch") -> tuple[dict, Path]:
    """Evaluate a training output folder or an export folder (one with manifest.json: its own
    weights, e.g. float16, and text tower) on a registered dataset or a COCO json.

    Args:
        folder: the model folder (config.yaml + weights) or the export.
        dataset: registered dataset name (default: the config's DATASETS.TEST[0], else synth_val).
        json_file, image_root: the user's COCO json instead (categories may carry "split":
            "base" | "novel"); images default to the json's folder.
        weights, clip: a training folder's checkpoint and text CLIP (defaults: its
            model_final.pth and the CLIP it trained with).
        opts: Detectron2 KEY VALUE overrides.
        out: results folder (default: <folder>/eval_<dataset> for a training folder; for an
            export, eval_<export>_<dataset> in the working directory: an export stays as it
            was verified, and may be mounted read-only).
        data: a `training.data.dataset.Dataset` whose splits to register (an export names no
            dataset files; a training folder's config does).
        backend: for an export, "torch" (its PyTorch model) or "onnx" (its ONNX graphs under
            onnxruntime, through `evaluate_runtime`: the AP of the files a deployment runs).

    Returns:
        (metrics as `evaluate`, results folder).
    """
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.data import DatasetCatalog
    from detectron2.modeling import build_model

    from ovd.models.clip.model import load_clip
    from ovd.models.exported import load_export

    from .layout import final_weights
    from .train_detector import build_config, register_datasets

    folder = Path(folder)
    is_export = (folder / "manifest.json").is_file()
    if backend != "torch" and not is_export:
        raise ValueError(f"--backend {backend} evaluates an export folder (--export), not a training folder")
    if is_export:
        cfg = build_config(folder / "detector.yaml", opts)
        cfg.DATASETS.REGISTER = data.specs() if data is not None else []
    else:
        cfg = build_config(folder / "config.yaml", opts)
    register_datasets(cfg)
    if json_file:
        from .data.coco_format import register_ov_dataset

        json_file = Path(json_file)
        image_root = Path(image_root) if image_root else json_file.parent
        dataset = f"eval_{json_file.stem}"
        out = Path(out or _default_out(folder, dataset))
        json_file = _tag_like_the_export(json_file, folder, out)
        dataset = register_ov_dataset(dataset, json_file, image_root, overwrite=True)
    dataset = dataset or (cfg.DATASETS.TEST[0] if cfg.DATASETS.TEST else "synth_val")
    if dataset not in DatasetCatalog.list():
        known = sorted(n for n in DatasetCatalog.list() if not n.startswith(("coco_", "lvis_", "keypoints_",
                                                                               "voc_", "cityscapes_")))
        raise ValueError(f"dataset {dataset!r} is not registered; registered: {known or 'none'}. Give the "
                         "run's config (--config: its dataset: section registers <name>_train/_val/_test, "
                         "a _test only with dataset.test_json), generate the world (`ovd data synth`), or "
                         "evaluate a COCO json directly (--json FILE --image-root DIR)")
    out = Path(out or _default_out(folder, dataset))
    if backend != "torch":  # the ONNX graphs only: no PyTorch model is loaded
        from ovd.models.runtime import load_runtime

        return evaluate_runtime(load_runtime(folder, backend=backend), dataset, out), out
    names = list(MetadataCatalog.get(dataset).thing_classes)
    if is_export:
        exported = load_export(folder)
        model, text = exported.model, exported.text_embeddings(names)
    else:
        model = build_model(cfg)
        DetectionCheckpointer(model).load(str(weights or final_weights(folder)))
        text = load_clip(clip or cfg.MODEL.OVD.CLIP).text_embeddings(names, cfg.MODEL.OVD.PROMPT_TEMPLATE)
    return evaluate(cfg, model, dataset, text, out), out


def _default_out(folder: Path, dataset: str) -> Path:
    """Where `evaluate_folder` writes by default (see its `out`)."""
    from .layout import eval_dir

    if (folder / "manifest.json").is_file():
        return Path.cwd() / f"eval_{folder.name}_{dataset}"
    return eval_dir(folder, dataset)


def _tag_like_the_export(json_file: Path, folder: Path, out: Path) -> Path:
    """A json without novel tags, evaluated with an export: a copy under `out` whose categories
    carry the split the export's manifest gives their names (so novel AP means what the model
    was trained for); else the json itself."""
    manifest_path = folder / "manifest.json"
    coco = json.loads(json_file.read_text())
    if not manifest_path.is_file() or any(c.get("split") == "novel" for c in coco.get("categories", [])):
        return json_file
    splits = {c["name"]: c["split"] for c in json.loads(manifest_path.read_text()).get("categories", [])}
    novel = sorted(c["name"] for c in coco["categories"] if splits.get(c["name"]) == "novel")
    if not novel:
        return json_file
    logger.info("%s declares no novel class: using the export's split (novel: %s)", json_file, novel)
    coco["categories"] = [{**c, "split": splits.get(c["name"], "base")} for c in coco["categories"]]
    out.mkdir(parents=True, exist_ok=True)
    tagged = out / f"{json_file.stem}.tagged.json"
    tagged.write_text(json.dumps(coco))
    return tagged


def tier_groups(json_file: str | Path) -> dict[str, list[int]]:
    """Category ids per novel tier of a COCO file whose categories carry a ``tier`` tag
    (empty when none do). Base is not a tier group: it is the "base" group already."""
    groups: dict[str, list[int]] = {}
    for c in json.loads(Path(json_file).read_text())["categories"]:
        if c.get("tier", "base") != "base":
            groups.setdefault(c["tier"], []).append(c["id"])
    return groups


def format_metrics(result: dict, title: str = "generalized zero-shot detection") -> str:
    lines = [f"{title} ({result.get('dataset', '')}, {result.get('images', '?')} images)",
             f"{'group':<13}{'AP50':>8}{'AP':>8}{'APs':>8}{'classes':>9}"]
    tiers = [g for g in result if g.startswith("novel_")]
    for g in ("novel", *tiers, "base", "all"):
        r = result[g]
        name = g if g in ("novel", "base", "all") else f"  {g}"
        lines.append(f"{name:<13}{r['AP50']:>8.1f}{r['AP']:>8.1f}{r['APs']:>8.1f}{r['categories']:>9d}")
    if "lvis" in result:
        lines.append("LVIS API: " + "  ".join(f"{k} {result['lvis'][k]:.1f}" for k in
                                              ("AP", "AP50", "APr", "APc", "APf") if k in result["lvis"]))
    return "\n".join(lines)
