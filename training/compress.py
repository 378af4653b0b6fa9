"""Compression: distil a trained open-vocabulary detector (the teacher) into a lighter student
(`ovd compress`; models/compression).

The student trains like `ovd train` (training/train_detector.py: Detectron2's DefaultTrainer,
DetectionCheckpointer, launch; base boxes, the training vocabulary's text embeddings and the
EZSD distillation targets) plus the TID and CID losses against a frozen teacher. The teacher
is loaded by the trainer, attached to the student outside its modules, and never saved: the
student's checkpoints hold the student alone, so a killed run resumes from its last
checkpoint and the output folder exports (`ovd export`) like a teacher's.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode
from detectron2.modeling import build_model
from safetensors import safe_open

from ovd.models.clip.model import ClipModel
from ovd.models.compression import StudentRCNN
from ovd.models.detector import OpenVocabRCNN
from ovd.models.manifest import sha256_file

from .layout import final_weights
from .train_detector import TRAIN_TEXT_FILE, Trainer, build_config, launch_training, prepare

logger = logging.getLogger(__name__)


def teacher_config(folder: str | Path) -> CfgNode:
    """The Detectron2 config of a teacher: a training output folder or an export folder.

    Raises:
        FileNotFoundError: the folder is neither.
    """
    folder = Path(folder)
    if (folder / "manifest.json").is_file():
        return build_config(folder / "detector.yaml")
    if (folder / "config.yaml").is_file():
        return build_config(folder / "config.yaml")
    raise FileNotFoundError(f"teacher {folder} is neither a training output folder (config.yaml + "
                            "model_final.pth) nor an export (manifest.json)")


def teacher_clip_sha256(folder: str | Path) -> str:
    """sha256 of the CLIP weights whose text embeddings the teacher was trained with ("" if
    unrecorded): from an export's manifest or a training folder's text embeddings."""
    folder = Path(folder)
    if (folder / "manifest.json").is_file():
        return json.loads((folder / "manifest.json").read_text()).get("clip", {}).get("weights_sha256") or ""
    path = folder / TRAIN_TEXT_FILE
    if not path.is_file():
        return ""
    with safe_open(str(path), "pt") as f:
        return (f.metadata() or {}).get("clip_sha256", "")


def teacher_weights_sha256(folder: str | Path) -> str | None:
    """sha256 of a teacher's weights: an export's detector file as its manifest lists it, else a
    training folder's final checkpoint (None when neither is there)."""
    folder = Path(folder)
    if (folder / "manifest.json").is_file():
        return json.loads((folder / "manifest.json").read_text()).get("files", {}).get("detector", {}).get("sha256")
    weights = final_weights(folder)
    return sha256_file(weights) if weights.is_file() else None


def load_teacher(folder: str | Path, *, device: str = "cpu") -> OpenVocabRCNN:
    """The trained teacher in eval mode: an export (verified), or a training output folder's
    config.yaml + model_final.pth."""
    folder = Path(folder)
    if (folder / "manifest.json").is_file():
        from ovd.models.exported import load_export

        return load_export(folder, device=device).model
    cfg = teacher_config(folder)
    cfg.MODEL.DEVICE = device
    cfg.MODEL.OVD.TRAIN_TEXT_EMBEDDINGS = ""  # the vocabulary comes with every call
    cfg.MODEL.WEIGHTS = ""
    model = build_model(cfg)
    weights = final_weights(folder)
    if not weights.is_file():
        raise FileNotFoundError(f"teacher {folder} has no model_final.pth (is its training finished?)")
    DetectionCheckpointer(model).load(str(weights))
    return model.eval()


class CompressTrainer(Trainer):
    """`ovd train`'s Trainer whose model is a StudentRCNN holding the frozen teacher of
    MODEL.KD.TEACHER (when TID or CID is on)."""

    @classmethod
    def build_model(cls, cfg: CfgNode):
        model = super().build_model(cfg)
        if not isinstance(model, StudentRCNN):
            raise ValueError(f"ovd compress trains a StudentRCNN, not {cfg.MODEL.META_ARCHITECTURE} "
                             "(MODEL.META_ARCHITECTURE)")
        if cfg.MODEL.KD.TID.ENABLED or cfg.MODEL.KD.CID.ENABLED:
            teacher = load_teacher(cfg.MODEL.KD.TEACHER, device=cfg.MODEL.DEVICE)
            model.attach_teacher(teacher)
            logger.info("teacher %s: %.1fM parameters; student: %.1fM", cfg.MODEL.KD.TEACHER,
                        sum(p.numel() for p in teacher.parameters()) / 1e6,
                        sum(p.numel() for p in model.parameters()) / 1e6)
        return model


def prepare_student(cfg: CfgNode, clip: ClipModel, teacher: str | Path) -> CfgNode:
    """`prepare` (training vocabulary's text embeddings) plus the teacher: its folder and FPN
    width go into the config, and its CLIP must be this one.

    Raises:
        ValueError: the teacher was trained with the text embeddings of another CLIP.
    """
    t_cfg = teacher_config(teacher)
    want, have = teacher_clip_sha256(teacher), (clip.manifest or {}).get("weights", {}).get("sha256", "")
    if want and have and want != have:
        raise ValueError(f"teacher {teacher} was trained with CLIP weights {want[:12]}, not these "
                         f"({have[:12]}, {clip.name}): give the student the teacher's CLIP (--clip)")
    cfg = prepare(cfg, clip)
    if cfg.MODEL.OVD.EMBED_DIM != t_cfg.MODEL.OVD.EMBED_DIM:
        raise ValueError(f"teacher embeds regions in {t_cfg.MODEL.OVD.EMBED_DIM} dimensions, "
                         f"CLIP {clip.name} in {cfg.MODEL.OVD.EMBED_DIM}")
    cfg.MODEL.KD.TEACHER = str(Path(teacher).resolve())
    cfg.MODEL.KD.TID.TEACHER_CHANNELS = int(t_cfg.MODEL.FPN.OUT_CHANNELS)
    return cfg


def launch_compression(cfg: CfgNode, *, resume: bool = True, num_gpus: int = 1, num_machines: int = 1,
                       machine_rank: int = 0, dist_url: str = "auto") -> Path:
    """Train (or resume) the student with Detectron2's launcher; returns its final weights."""
    return launch_training(cfg, resume=resume, num_gpus=num_gpus, num_machines=num_machines,
                           machine_rank=machine_rank, dist_url=dist_url, trainer_cls=CompressTrainer)


def run_compression(pipeline_cfg: dict, layout, *, teacher: str | Path | None = None,
                    student_config: str | Path | None = None, clip: str | None = None,
                    targets: str | Path | None = None, distill: bool = True, opts: list | tuple = (),
                    out: str | Path | None = None, resume: bool = True, **launcher) -> tuple[Path, Path]:
    """Train the run's compressed student (`ovd compress` calls this).

    Args:
        pipeline_cfg, layout: the pipeline config and its run folder (training/layout.py).
        teacher: a training output folder or an export (default: the run's detector/).
        student_config: the student's Detectron2 YAML (the config's detector.opts apply too).
        clip: CLIP of the text embeddings (default: the teacher's, which it must be).
        targets, distill: EZSD region distillation as in `run_training`.
        opts, out, resume, launcher: as in `run_training` (out defaults to the run's student/).

    Returns:
        (final weights, output folder).
    """
    from ovd.models.clip.model import load_clip

    from .train_detector import training_config

    teacher = Path(teacher or layout.detector)
    dcfg = training_config(pipeline_cfg, layout, config_file=student_config, opts=opts,
                           out=out or layout.student, distill=distill, targets=targets)
    # The student must share the teacher's text embeddings: default to the teacher's CLIP.
    clip_path = clip or teacher_config(teacher).MODEL.OVD.CLIP
    if not clip and not Path(clip_path).is_dir():
        clip_path = str(layout.text_clip)
    dcfg = prepare_student(dcfg, load_clip(clip_path), teacher)
    kd = dcfg.MODEL.KD
    logger.info("compressing %s into %s (%s backbone, FPN %d; TID %s, CID %s, Light-ML %s; region "
                "distillation: %s) -> %s", teacher, dcfg.MODEL.META_ARCHITECTURE, dcfg.MODEL.BACKBONE.NAME,
                dcfg.MODEL.FPN.OUT_CHANNELS, "on" if kd.TID.ENABLED else "off",
                "on" if kd.CID.ENABLED else "off", "on" if kd.LIGHT_ML.ENABLED else "off",
                dcfg.DATASETS.DISTILL_TARGETS if dcfg.MODEL.OVD.DISTILL_WEIGHT else "off", dcfg.OUTPUT_DIR)
    return launch_compression(dcfg, resume=resume, **launcher), Path(dcfg.OUTPUT_DIR)
