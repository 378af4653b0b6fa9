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
    teacher = distilled_from(cfg)
    return write_export(out_dir, model=model, cfg=cfg, clip=clip, clip_arch=arch, manifest_fields={
        "name": name, "version": version,
        **({"distilled_from": teacher} if teacher else {}),
        "trained_on": {"dataset": cfg.DATASETS.TRAIN[0], "classes": trained_on,
                       "vocabulary": cfg.MODEL.OVD.TRAIN_VOCABULARY,
                       "distillation": bool(cfg.MODEL.OVD.DISTILL_WEIGHT and cfg.DATASETS.DISTILL_TARGETS)},
        "categories": categories,
        "metrics": metrics,
    }, dtype=dtype)


def distilled_from(cfg) -> dict | None:
    """The teacher a student was compressed from (`ovd compress`), as the student's manifest
    records it: its name and version when the teacher is an export, its folder's name otherwise,
    the sha256 of its weights, and which KD losses the student trained with. None for a model
    trained without a teacher.
    """
    kd = cfg.MODEL.KD
    if not kd.TEACHER or cfg.MODEL.META_ARCHITECTURE != "StudentRCNN":
        return None
    from .compress import teacher_weights_sha256

    folder = Path(kd.TEACHER)
    record: dict = {"name": folder.name}
    if (folder / "manifest.json").is_file():
        m = json.loads((folder / "manifest.json").read_text())
        record = {"name": m.get("name"), "version": m.get("version")}
    return {**record, "weights_sha256": teacher_weights_sha256(folder),
            "kd": {"tid": bool(kd.TID.ENABLED), "cid": bool(kd.CID.ENABLED), "light_ml": bool(kd.LIGHT_ML.ENABLED)}}


def quantize_export(folder: str | Path, *, dataset: str, calibration: list, tolerance: float = 1.0) -> dict:
    """Turn an export's float32 ONNX graphs into int8 ones (models/onnx_quantize.py), judged by
    AP: the folder keeps the int8 graphs only if AP50 over all classes on `dataset` (through
    onnxruntime, `evaluate_runtime`) falls by at most `tolerance` points; otherwise the float32
    graphs and manifest are put back and OnnxValidationError is raised.

    Args:
        folder: an export with validated float32 ONNX graphs (`ovd export --onnx`).
        dataset: a registered dataset to measure AP on (the run's val split: a choice).
        calibration: images (paths or RGB arrays) for the activation ranges (training images).
        tolerance: largest allowed AP50 (all) drop, points.

    Returns:
        The manifest's `onnx.quantization` record, with both AP figures.
    """
    import shutil
    import tempfile

    import numpy as np

    from ovd.models.api import read_image
    from ovd.models.manifest import (
        ONNX_FILES,
        atomic_write,
        sha256_file,
        strict_json,
        verify_export,
    )
    from ovd.models.onnx_export import OnnxValidationError
    from ovd.models.onnx_quantize import QUANTIZED_GRAPHS, quantize_graphs
    from ovd.models.runtime import load_runtime

    from .evaluate import evaluate_runtime

    folder = Path(folder)
    manifest = verify_export(folder)
    if "onnx" not in manifest:
        raise ValueError(f"{folder} has no ONNX graphs to quantize: export with --onnx")
    runtime = load_runtime(folder, backend="onnx")
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        before = evaluate_runtime(runtime, dataset, scratch / "fp32")
        for key in QUANTIZED_GRAPHS:
            shutil.copyfile(folder / ONNX_FILES[key], scratch / ONNX_FILES[key])
        shutil.copyfile(folder / "manifest.json", scratch / "manifest.json")
        inputs = [runtime.preprocessing(read_image(x)) for x in calibration]
        text = np.asarray(runtime.text_embeddings([c["name"] for c in manifest.get("categories", [])]
                                                  or ["object"]), np.float32)
        record = quantize_graphs(folder, inputs, text)
        for key in QUANTIZED_GRAPHS:
            manifest["files"][key]["sha256"] = sha256_file(folder / ONNX_FILES[key])
        manifest["onnx"]["quantization"] = record
        atomic_write(folder / "manifest.json", strict_json(manifest, indent=2).encode())
        after = evaluate_runtime(load_runtime(folder, backend="onnx"), dataset, scratch / "int8")
        drop = before["all"]["AP50"] - after["all"]["AP50"]
        record["validation"] = {"dataset": dataset, "tolerance_ap50_all": tolerance,
                                **{f"{g}_{k}_{name}": round(r[g][k], 2) for name, r in (("fp32", before), ("int8", after))
                                   for g in ("all", "novel", "base") for k in ("AP50", "AP")}}
        if drop > tolerance:
            for key in QUANTIZED_GRAPHS:
                shutil.copyfile(scratch / ONNX_FILES[key], folder / ONNX_FILES[key])
            shutil.copyfile(scratch / "manifest.json", folder / "manifest.json")
            raise OnnxValidationError(
                f"int8 graphs lose {drop:.2f} AP50 (all classes) on {dataset} ({before['all']['AP50']:.2f} -> "
                f"{after['all']['AP50']:.2f}), more than the tolerance {tolerance}: {folder} keeps its float32 graphs")
    atomic_write(folder / "manifest.json", strict_json(manifest, indent=2).encode())
    verify_export(folder)
    logger.info("int8 graphs kept: AP50 all %.2f -> %.2f on %s (tolerance %.1f)", before["all"]["AP50"],
                after["all"]["AP50"], dataset, tolerance)
    return record
