"""Stage 4: train the open-vocabulary detector with Detectron2's trainer.

Detectron2 does the work: `DefaultTrainer` (loop, SGD, LR schedule, event logging to
metrics.json / TensorBoard), `DetectionCheckpointer` (a killed run resumes from the last
checkpoint in the output folder) and `launch` (several processes or machines). This module adds
the data the EZSD detector needs: the training vocabulary's text embeddings and, per image, the
distillation regions written by `ovd targets`.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import torch
import yaml
from detectron2.config import CfgNode, get_cfg
from detectron2.data import DatasetMapper, MetadataCatalog, build_detection_train_loader
from detectron2.engine import DefaultTrainer, hooks, launch
from detectron2.modeling import build_model
from detectron2.solver import get_default_optimizer_params
from detectron2.solver.build import maybe_add_gradient_clipping
from detectron2.structures import Boxes, Instances
from safetensors.torch import save_file

import ovd.models.detector  # noqa: F401  registers the detector components
from ovd.models.clip.model import ClipModel
from ovd.models.detector import add_ovd_config

from .layout import final_weights

logger = logging.getLogger(__name__)

TRAIN_TEXT_FILE = "text_train.safetensors"


def write_text_embeddings(clip: ClipModel, names: list[str], template: str, path: Path) -> torch.Tensor:
    """Embed class names with CLIP's text tower; save {"embeddings": (C, D)} with metadata."""
    text = clip.text_embeddings(names, template)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({"embeddings": text.contiguous()}, str(tmp), metadata={
        "names": json.dumps(names), "template": template, "clip": clip.name,
        "clip_sha256": (clip.manifest or {}).get("weights", {}).get("sha256", "")})
    tmp.replace(path)
    return text


def training_vocabulary(dataset_name: str, which: str) -> list[str]:
    """Class names the detector is trained to classify: the base classes, or all (oracle)."""
    meta = MetadataCatalog.get(dataset_name)
    if which == "all":
        return list(meta.thing_classes)
    if which == "base":
        return list(meta.base_classes)
    raise ValueError(f"training vocabulary must be 'base' or 'all', not {which!r}")


def build_config(config_file: str | Path, opts: list[str] | None = None) -> CfgNode:
    """Detectron2 config with the project's keys, from a file plus KEY VALUE overrides.

    MODEL.DEVICE "auto" (ours, not Detectron2's) becomes "cuda" on a machine with a GPU, else
    "cpu", so one config trains wherever it runs."""
    cfg = get_cfg()
    add_ovd_config(cfg)
    try:
        cfg.merge_from_file(str(config_file))
        cfg.merge_from_list(list(opts or []))
    except (AssertionError, KeyError, ValueError) as e:  # yacs: unknown key, odd-length opts, bad type
        raise ValueError(f"Detectron2 config {config_file} with overrides {list(opts or [])}: {e}") from e
    if cfg.MODEL.DEVICE == "auto":
        cfg.MODEL.DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
    return cfg


def detector_config_file(pipeline_cfg: dict, config_file: str | Path | None = None) -> Path:
    """The Detectron2 YAML of a pipeline config's `detector:` section (or `config_file`),
    found from the working directory, else from the repository (the configs/ it ships)."""
    from .config import REPO_ROOT

    path = Path(config_file or (pipeline_cfg.get("detector") or {}).get("config")
                or "configs/detector/synthetic_r18_fpn.yaml")
    return REPO_ROOT / path if not path.is_file() and (REPO_ROOT / path).is_file() else path


def detector_config(pipeline_cfg: dict, layout, *, config_file: str | Path | None = None,
                    opts: list | tuple = ()) -> CfgNode:
    """The Detectron2 config of a pipeline config's `detector:` section (its file and KEY VALUE
    opts, then `opts`), training on the run's dataset (training/data/dataset.py: the config's
    `dataset:` section, else the synthetic world, registered when it exists).

    Args:
        pipeline_cfg: the pipeline config (training/config.py's load_config).
        layout: the run's training.layout.RunLayout.
        config_file: replaces the section's Detectron2 file (its opts still apply).
    """
    from .data.dataset import dataset_of

    section = pipeline_cfg.get("detector") or {}
    cfg = build_config(detector_config_file(pipeline_cfg, config_file), list(section.get("opts", [])) + list(opts))
    if not cfg.DATASETS.REGISTER:
        data = dataset_of(pipeline_cfg, layout)
        cfg.DATASETS.REGISTER = data.specs()  # the splits that exist (none before `ovd data synth`)
        cfg.DATASETS.TRAIN = (data.train_name,)
        cfg.DATASETS.TEST = (data.val_name,) if data.val else ()
    return cfg


def register_datasets(cfg: CfgNode) -> None:
    """Register, in this process, the datasets a detector config names in DATASETS.REGISTER."""
    from .data.coco_format import register_from_spec

    for spec in cfg.DATASETS.REGISTER:
        register_from_spec(spec, overwrite=True)


def training_config(pipeline_cfg: dict, layout, *, config_file: str | Path | None, opts: list | tuple,
                    out: str | Path, distill: bool, targets: str | Path | None) -> CfgNode:
    """`detector_config` made ready to train into `out` (a teacher's or a student's): region
    distillation off, or from `targets` (default: the run's targets/, unless the Detectron2
    config names a folder), and its datasets registered in this process."""
    dcfg = detector_config(pipeline_cfg, layout, config_file=config_file, opts=opts)
    dcfg.OUTPUT_DIR = str(out)
    if not distill:
        dcfg.MODEL.OVD.DISTILL_WEIGHT = 0.0
    elif not dcfg.DATASETS.DISTILL_TARGETS:
        dcfg.DATASETS.DISTILL_TARGETS = str(targets or layout.targets())
    register_datasets(dcfg)
    return dcfg


def run_training(pipeline_cfg: dict, layout, *, clip: str | Path | None = None,
                 targets: str | Path | None = None, distill: bool = True, vocabulary: str = "base",
                 config_file: str | Path | None = None, opts: list | tuple = (),
                 out: str | Path | None = None, resume: bool = True, **launcher) -> Path:
    """Train the run's detector (stage 4): `ovd train` and the pipeline both call this.

    Args:
        pipeline_cfg, layout: the pipeline config and its run folder (training/layout.py).
        clip: CLIP of the text classifier (default: the run's re-normalised CLIP, else its
            pretrained one).
        targets: `ovd targets` folder (default: the run's targets/, unless the Detectron2
            config names one); ignored with ``distill=False``.
        vocabulary: "base" (open-vocabulary) or "all" (the oracle).
        config_file, opts: the Detectron2 file replacing the config's and KEY VALUE overrides.
        out: output folder (default: the run's detector/).
        resume: continue from the folder's last checkpoint.
        launcher: num_gpus, num_machines, machine_rank, dist_url (Detectron2's launcher).

    Returns:
        Path of the final weights.
    """
    from ovd.models.clip.model import load_clip

    dcfg = training_config(pipeline_cfg, layout, config_file=config_file, opts=opts,
                           out=out or layout.detector, distill=distill, targets=targets)
    dcfg.MODEL.OVD.TRAIN_VOCABULARY = vocabulary
    clip_path = clip or layout.text_clip
    clip_model = load_clip(str(clip_path))
    dcfg = prepare(dcfg, clip_model)
    resume = _check_identity(dcfg, clip_model, resume)
    logger.info("training %s on %s (vocabulary: %d %s classes, CLIP %s, distillation: %s) -> %s",
                dcfg.MODEL.META_ARCHITECTURE, dcfg.DATASETS.TRAIN[0], dcfg.MODEL.ROI_HEADS.NUM_CLASSES,
                vocabulary, clip_path, dcfg.DATASETS.DISTILL_TARGETS if dcfg.MODEL.OVD.DISTILL_WEIGHT
                else "off", dcfg.OUTPUT_DIR)
    return launch_training(dcfg, resume=resume, **launcher)


IDENTITY_FILE = "training_identity.json"


def training_identity(cfg: CfgNode, clip: ClipModel) -> dict:
    """What a trained folder was made from: the Detectron2 config, the training json's and
    the CLIP's sha256, and the distillation targets' manifest digest."""
    from detectron2.data import MetadataCatalog

    from ovd.models.manifest import sha256_file

    from .clip_renorm import weights_sha256

    json_file = getattr(MetadataCatalog.get(cfg.DATASETS.TRAIN[0]), "json_file", None)
    targets = Path(cfg.DATASETS.DISTILL_TARGETS or "") / "manifest.json"
    return {"config": yaml.safe_load(cfg.dump()),
            "train_json_sha256": sha256_file(json_file) if json_file else None,
            "clip_sha256": weights_sha256(clip),
            "targets_manifest_sha256": sha256_file(targets)
            if cfg.MODEL.OVD.DISTILL_WEIGHT and targets.is_file() else None}


def _check_identity(cfg: CfgNode, clip: ClipModel, resume: bool) -> bool:
    """Write the folder's training identity; a folder trained from other inputs is not resumed
    (Detectron2 would silently continue from, or reuse, a model of another recipe): training
    restarts, with a warning naming what changed. Returns the resume flag to use."""
    out = Path(cfg.OUTPUT_DIR)
    path = out / IDENTITY_FILE
    want = json.loads(json.dumps(training_identity(cfg, clip), default=str))
    if resume and path.is_file():
        have = json.loads(path.read_text())
        if have != want:
            changed = sorted(k for k in want if have.get(k) != want[k])
            logger.warning("%s was trained from other inputs (%s changed): training restarts from the "
                           "start", out, ", ".join(changed))
            resume = False
    elif resume and final_weights(out).is_file() and not path.is_file():
        logger.warning("%s holds a model with no record of its inputs: training restarts", out)
        resume = False
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(want, indent=1))
    return resume


class DistillDatasetMapper(DatasetMapper):
    """DatasetMapper that (1) maps dataset classes to rows of the training vocabulary,
    dropping boxes of classes outside it, and (2) attaches the image's distillation regions,
    transformed like its boxes, as `dataset_dict["distill"]` (Instances: boxes, embeddings,
    weights).

    Args:
        cfg: the training config.
        class_map: (num_dataset_classes,) int64, dataset contiguous id -> vocabulary row or -1.
        targets: reader of `ovd targets` output (image_id -> record), or None.
        max_proposals: at most this many proposal regions per image (GT regions always kept).
    """

    def __init__(self, cfg: CfgNode, *, class_map: torch.Tensor, targets=None, max_proposals: int = 200):
        super().__init__(cfg, is_train=True)
        self.class_map = class_map
        self.targets = targets
        self.max_proposals = max_proposals

    def _transform_annotations(self, dataset_dict, transforms, image_shape):
        super()._transform_annotations(dataset_dict, transforms, image_shape)
        inst = dataset_dict["instances"]
        rows = self.class_map[inst.gt_classes] if len(inst) else inst.gt_classes
        keep = rows >= 0
        inst = inst[keep]
        inst.gt_classes = rows[keep]
        dataset_dict["instances"] = inst
        if self.targets is None:
            return
        rec = self.targets[dataset_dict["image_id"]]
        is_gt = rec["is_gt"].bool()
        order = torch.nonzero(~is_gt).flatten()[:self.max_proposals]
        sel = torch.cat([torch.nonzero(is_gt).flatten(), order])
        boxes = transforms.apply_box(rec["boxes"][sel].numpy())
        boxes = Boxes(torch.as_tensor(np.asarray(boxes), dtype=torch.float32))
        boxes.clip(image_shape)
        nonempty = boxes.nonempty(threshold=1.0)
        distill = Instances(image_shape)
        distill.boxes = boxes[nonempty]
        distill.embeddings = rec["embeddings"][sel][nonempty].float()
        distill.weights = rec["weights"][sel][nonempty].float()
        dataset_dict["distill"] = distill


class Trainer(DefaultTrainer):
    """DefaultTrainer with the distillation data loader. Evaluation is `ovd eval`'s job."""

    @classmethod
    def build_train_loader(cls, cfg):
        dataset = cfg.DATASETS.TRAIN[0]
        meta = MetadataCatalog.get(dataset)
        vocab = training_vocabulary(dataset, cfg.MODEL.OVD.TRAIN_VOCABULARY)
        row = {name: i for i, name in enumerate(vocab)}
        class_map = torch.tensor([row.get(name, -1) for name in meta.thing_classes], dtype=torch.long)
        targets = None
        if cfg.DATASETS.DISTILL_TARGETS and cfg.MODEL.OVD.DISTILL_WEIGHT > 0:
            from .targets import load_targets

            targets = load_targets(cfg.DATASETS.DISTILL_TARGETS)
        mapper = DistillDatasetMapper(cfg, class_map=class_map, targets=targets,
                                      max_proposals=cfg.DATASETS.DISTILL_MAX_PROPOSALS)
        return build_detection_train_loader(cfg, mapper=mapper)

    @classmethod
    def build_model(cls, cfg):
        """Detectron2's model, its architecture dump logged at DEBUG instead of INFO (hundreds
        of lines in every training log otherwise; `ovd -v` shows it)."""
        model = build_model(cfg)
        logging.getLogger(__name__).debug("Model:\n%s", model)
        return model

    @classmethod
    def build_optimizer(cls, cfg, model):
        """Detectron2's SGD (with its gradient clipping option), but without weight decay on
        the classifier's temperature: decay would pull log tau to 0 (tau = 1; CLIP exempts its
        logit scale for the same reason). The background vector is an ordinary linear layer
        and decays like one, as in EZSD's code."""
        params = get_default_optimizer_params(
            model, base_lr=cfg.SOLVER.BASE_LR, weight_decay_norm=cfg.SOLVER.WEIGHT_DECAY_NORM,
            bias_lr_factor=cfg.SOLVER.BIAS_LR_FACTOR, weight_decay_bias=cfg.SOLVER.WEIGHT_DECAY_BIAS,
            overrides={"log_temperature": {"weight_decay": 0.0}})
        return maybe_add_gradient_clipping(cfg, torch.optim.SGD)(
            params, lr=cfg.SOLVER.BASE_LR, momentum=cfg.SOLVER.MOMENTUM,
            nesterov=cfg.SOLVER.NESTEROV, weight_decay=cfg.SOLVER.WEIGHT_DECAY)

    def build_hooks(self):
        # Evaluation needs the full vocabulary's text embeddings: `ovd eval` does it.
        return [h for h in super().build_hooks() if not isinstance(h, hooks.EvalHook)]


def prepare(cfg: CfgNode, clip: ClipModel) -> CfgNode:
    """Write the training vocabulary's text embeddings into OUTPUT_DIR and point cfg at them."""
    cfg = cfg.clone()
    dataset = cfg.DATASETS.TRAIN[0]
    vocab = training_vocabulary(dataset, cfg.MODEL.OVD.TRAIN_VOCABULARY)
    path = Path(cfg.OUTPUT_DIR) / TRAIN_TEXT_FILE
    text = write_text_embeddings(clip, vocab, cfg.MODEL.OVD.PROMPT_TEMPLATE, path)
    cfg.MODEL.OVD.TRAIN_TEXT_EMBEDDINGS = str(path)
    cfg.MODEL.OVD.EMBED_DIM = int(text.shape[1])
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = len(vocab)
    cfg.MODEL.OVD.CLIP = clip.name
    return cfg


def train(cfg: CfgNode, *, resume: bool = True, trainer_cls: type[Trainer] = Trainer) -> Path:
    """Run (or resume) training in this process; returns the final checkpoint path."""
    trainer = trainer_cls(cfg)
    trainer.resume_or_load(resume=resume)
    trainer.train()
    return final_weights(cfg.OUTPUT_DIR)


def _main(cfg: CfgNode, resume: bool, trainer_cls: type[Trainer]) -> None:
    """One training process (`launch` runs one per device and machine)."""
    from detectron2.utils import comm
    from detectron2.utils.env import seed_all_rng
    from detectron2.utils.logger import setup_logger

    register_datasets(cfg)
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="detectron2")
    seed_all_rng(cfg.SEED + comm.get_rank())
    if comm.is_main_process():
        (Path(cfg.OUTPUT_DIR) / "config.yaml").write_text(cfg.dump())
    train(cfg, resume=resume, trainer_cls=trainer_cls)


def absolute_paths(cfg: CfgNode) -> CfgNode:
    """A copy of cfg whose local paths are absolute (resolved against the working directory),
    so the run's config.yaml still works from another directory (`ovd eval`, `ovd export`).

    Touches OUTPUT_DIR, MODEL.WEIGHTS (not URLs such as detectron2://), MODEL.OVD.CLIP (a
    folder; an open_clip name stays), MODEL.OVD.TRAIN_TEXT_EMBEDDINGS, DATASETS.DISTILL_TARGETS,
    MODEL.KD.TEACHER and both paths of every DATASETS.REGISTER spec. Empty values stay empty.
    """
    from .data.coco_format import parse_dataset_spec

    def resolve(value: str) -> str:
        return str(Path(value).resolve()) if value and "://" not in value else value

    cfg = cfg.clone()
    cfg.OUTPUT_DIR = resolve(cfg.OUTPUT_DIR)
    cfg.MODEL.WEIGHTS = resolve(cfg.MODEL.WEIGHTS)
    cfg.MODEL.OVD.TRAIN_TEXT_EMBEDDINGS = resolve(cfg.MODEL.OVD.TRAIN_TEXT_EMBEDDINGS)
    if cfg.MODEL.OVD.CLIP and Path(cfg.MODEL.OVD.CLIP).exists():
        cfg.MODEL.OVD.CLIP = resolve(cfg.MODEL.OVD.CLIP)
    cfg.DATASETS.DISTILL_TARGETS = resolve(cfg.DATASETS.DISTILL_TARGETS)
    if cfg.MODEL.get("KD") is not None:
        cfg.MODEL.KD.TEACHER = resolve(cfg.MODEL.KD.TEACHER)
    specs = []
    for spec in cfg.DATASETS.REGISTER:
        name, json_path, image_root = parse_dataset_spec(spec)
        specs.append(f"{name}={resolve(json_path)}:{resolve(image_root)}")
    cfg.DATASETS.REGISTER = specs
    return cfg


def launch_training(cfg: CfgNode, *, resume: bool = True, num_gpus: int = 1, num_machines: int = 1,
                    machine_rank: int = 0, dist_url: str = "auto",
                    trainer_cls: type[Trainer] = Trainer) -> Path:
    """Train with Detectron2's launcher (one process per GPU and machine; one on a CPU).

    `trainer_cls` is the Trainer (sub)class each process runs, e.g. the student's. A negative
    SEED (Detectron2's default, "draw one") is drawn here, once for every process, and so
    recorded in the run's config.yaml, whose paths are made absolute (:func:`absolute_paths`)."""
    cfg = absolute_paths(cfg)
    if cfg.MODEL.DEVICE == "cpu" and torch.cuda.is_available():
        logger.warning("MODEL.DEVICE is cpu although this machine has a GPU: training stays on the "
                       "CPU (add MODEL.DEVICE auto or cuda to the config's opts to use the GPU)")
    if cfg.SEED < 0:
        cfg.SEED = int.from_bytes(os.urandom(4), "little") % 2**30
        logger.info("SEED is negative (draw one): this run uses %d", cfg.SEED)
    launch(_main, num_gpus, num_machines=num_machines, machine_rank=machine_rank,
           dist_url=dist_url, args=(cfg, resume, trainer_cls))
    return final_weights(cfg.OUTPUT_DIR)
