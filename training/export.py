"""Stage 6: export the trained detector as the deployable artifact (models/exported.py)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import MetadataCatalog
from detectron2.modeling import build_model
from safetensors import safe_open

from ovd.models.clip.model import architecture_config, load_clip
from ovd.models.exported import write_export

from .layout import eval_metrics, final_weights
from .train_detector import TRAIN_TEXT_FILE, build_config

logger = logging.getLogger(__name__)


def export_detector(model_dir: str | Path, out_dir: str | Path, *, name: str, version: str,
                    weights: str | Path | None = None, dtype: str = "float32") -> Path:
    """Export a training output folder (config.yaml, weights, text_train.safetensors).

    The metrics of every `eval_<dataset>/metrics.json` in model_dir go into the manifest, each
    under its dataset's name (measured with the float32 checkpoint; `ovd eval --export`
    measures an export itself, e.g. one stored in float16). The training datasets are
    registered from the config.

    Returns:
        Path of the written manifest.json.
    """
    from .data.coco_format import register_from_spec

    model_dir = Path(model_dir)
    cfg = build_config(model_dir / "config.yaml")
    for spec in cfg.DATASETS.REGISTER:
        register_from_spec(spec, overwrite=True)
    model = build_model(cfg)
    DetectionCheckpointer(model).load(str(weights or final_weights(model_dir)))
    clip = load_clip(cfg.MODEL.OVD.CLIP)
    arch = (clip.manifest or {}).get("architecture") or architecture_config(cfg.MODEL.OVD.CLIP)
    with safe_open(str(model_dir / TRAIN_TEXT_FILE), "pt") as f:
        trained_on = json.loads(f.metadata()["names"])
    test = cfg.DATASETS.TEST[0] if cfg.DATASETS.TEST else None
    categories = []
    if test:
        meta = MetadataCatalog.get(test)
        if not hasattr(meta, "thing_classes"):
            raise ValueError(f"the config's test dataset {test!r} is not registered, so the export cannot "
                             "list its categories; give the run's config (its dataset: section registers "
                             "the splits) or register the dataset before exporting")
        novel = set(getattr(meta, "novel_classes", []))
        categories = [{"name": n, "split": "novel" if n in novel else "base"} for n in meta.thing_classes]
        # The synthetic world tags each novel category with its tier (N-comp / N-shape / N-both).
        tiers = {c["name"]: c["tier"] for c in json.loads(Path(meta.json_file).read_text())["categories"]
                 if "tier" in c} if getattr(meta, "json_file", None) else {}
        for c in categories:
            if c["name"] in tiers:
                c["tier"] = tiers[c["name"]]
    metrics = {}
    for f in eval_metrics(model_dir):
        m = json.loads(f.read_text())
        metrics[m.get("dataset", f.parent.name)] = {k: m[k] for k in ("novel", "base", "all", "images")
                                                      if k in m}
    return write_export(out_dir, model=model, cfg=cfg, clip=clip, clip_arch=arch, manifest_fields={
        "name": name, "version": version,
        "trained_on": {"dataset": cfg.DATASETS.TRAIN[0], "classes": trained_on,
                       "vocabulary": cfg.MODEL.OVD.TRAIN_VOCABULARY,
                       "distillation": bool(cfg.MODEL.OVD.DISTILL_WEIGHT and cfg.DATASETS.DISTILL_TARGETS)},
        "categories": categories,
        "metrics": metrics,
    }, dtype=dtype)
