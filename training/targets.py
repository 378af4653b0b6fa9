"""EZSD stage 3: distillation targets, computed once and stored per training image.

For every training image (docs/methods.md, "Stage 3"):

* each **base GT box** (non-crowd; base categories only, even if the json annotates more) is
  cropped 1.2x (EZSD crop), encoded by the CLIP and L2-normalised; weight 1;
* the **CLIP proposals** of stage 2 (ovd.training.proposals), at most ``max_proposals`` (200) per
  image, the highest by objectness, with the embedding stage 2 stored (the same 1.2x crop, the
  same CLIP: nothing is encoded twice); weight = the proposal's confidence (max class
  probability of that crop).

Stored per image (ovd.training.shards), GT rows first::

    boxes      (N, 4) float32  xyxy pixels of the stored image
    embeddings (N, D) float16  L2-normalised CLIP embeddings (targets t̂ of L_dist)
    weights    (N,)   float32  1 for GT, confidence for proposals (renormalised per image to
                               mean 1 by the loss, not here)
    is_gt      (N,)   bool

Without a proposals folder only GT rows are stored (the "ViLD-like" variant).
The detector's training mapper reads them with :func:`load_targets`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ovd.models.clip.model import ClipModel

from .config import SectionConfig
from .proposals import (
    TrainingImages,
    _setup_worker_logging,
    autocast,
    clip_identity,
    encode_boxes,
    load_proposals,
)
from .shards import (
    INFORMATIONAL_KEYS,
    ProgressFactory,
    ReadAhead,
    Record,
    ShardReader,
    ShardStore,
    sha256_json,
    stage_device,
)

logger = logging.getLogger(__name__)

RUNTIME_FIELDS = ("batch_size", "threads", "shard_size")


@dataclass
class TargetsConfig(SectionConfig):
    """The `targets:` section of a config file.

    Attributes:
        max_proposals: proposals kept per image, the highest by objectness (200).
        gt_enlarge: GT crop enlargement about the box centre (1.2).
        gt_min_size: GT crop width/height floor before clipping, pixels (10, as stage 1).
        precision: "fp32", or "bf16"/"fp16" autocast for the GT crops' CLIP forwards.
        batch_size: CLIP crops per forward (runtime only).
        shard_size: images per shard file.
        threads: torch intra-op threads, 0 = torch's default (runtime only).
    """

    SECTION = "targets"

    max_proposals: int = 200
    gt_enlarge: float = 1.2
    gt_min_size: float = 10.0
    precision: str = "fp32"
    batch_size: int = 256
    shard_size: int = 16
    threads: int = 0

    def __post_init__(self) -> None:
        if self.max_proposals < 0 or min(self.batch_size, self.shard_size) < 1:
            raise ValueError("targets: max_proposals must be >= 0, batch_size and shard_size >= 1")
        if self.gt_enlarge <= 0 or self.gt_min_size < 0:
            raise ValueError("targets: gt_enlarge must be > 0 and gt_min_size >= 0")
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"targets: precision {self.precision!r} not in fp32/bf16/fp16")


    def identity(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k not in RUNTIME_FIELDS}


def image_targets(gt_boxes: torch.Tensor, gt_embeddings: torch.Tensor,
                  proposals: Record | None, max_proposals: int) -> Record:
    """Assemble one image's targets from its GT embeddings and its stage-2 proposals.

    Args:
        gt_boxes: (G, 4) xyxy pixels.
        gt_embeddings: (G, D) normalised CLIP embeddings of their 1.2x crops ((0, D) when
            there is no GT box: D fixes the output's width).
        proposals: the image's stage-2 record (boxes, objectness, confidence, embeddings), or
            None for GT only.
        max_proposals: proposals kept, the highest by objectness.

    Returns:
        {"boxes" (N, 4) f32, "embeddings" (N, D) f16, "weights" (N,) f32, "is_gt" (N,) bool},
        GT rows first.
    """
    boxes, embs = [gt_boxes.float().reshape(-1, 4)], [gt_embeddings.half()]
    weights = [torch.ones(len(gt_boxes))]
    if proposals is not None and max_proposals > 0 and len(proposals["boxes"]):
        # Stable sort: ties (objectness saturates at log C under a too-sharp softmax) keep
        # stage 2's order.
        order = torch.argsort(proposals["objectness"].float(), descending=True, stable=True)
        order = order[:max_proposals]
        boxes.append(proposals["boxes"][order].float())
        embs.append(proposals["embeddings"][order].half())
        weights.append(proposals["confidence"][order].float())
    out_boxes = torch.cat(boxes)
    return {
        "boxes": out_boxes,
        "embeddings": torch.cat(embs),
        "weights": torch.cat(weights).float(),
        "is_gt": torch.arange(len(out_boxes)) < len(gt_boxes),
    }


def _proposals_fingerprint(reader: ShardReader) -> str:
    return sha256_json({k: v for k, v in reader.manifest.items() if k not in INFORMATIONAL_KEYS})


def run_targets(clip: ClipModel, json_file: str | Path, image_root: str | Path,
                proposals_dir: str | Path | None, out_dir: str | Path, cfg: TargetsConfig, *,
                max_images: int | None = None, overwrite: bool = False,
                progress: ProgressFactory | None = None, part: tuple[int, int] | None = None) -> ShardReader:
    """Compute (or resume) the distillation targets of a training set into a shard folder.

    Args:
        clip: the CLIP the proposals were made with (checked), on this process's device.
        json_file: COCO training json (base boxes).
        image_root: folder the json's file names are relative to.
        proposals_dir: a complete stage-2 folder for these images, or None (GT only).
        out_dir: shard folder to write or resume.
        cfg: the config.
        max_images: only the first N images by id.
        overwrite: replace a folder holding a different run.
        part: (index, count) of an independent job (``--shard-index/--num-shards``): this job
            computes the shards with ``k % count == index`` (ovd.training.shards).
        progress: optional ``progress(desc, total, initial) -> update(n, postfix)``.

    Returns:
        A reader of the folder.

    Raises:
        ValueError: proposals made with another CLIP or json, or missing some images; or the
            folder holds a different run (and not ``overwrite``).
    """
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    data = TrainingImages.load(json_file, image_root, max_images=max_images)
    clip_id = clip_identity(clip)
    proposals, fingerprint = None, None
    if proposals_dir is not None:
        proposals = load_proposals(proposals_dir)
        pm = proposals.manifest
        if pm.get("clip", {}).get("sha256") != clip_id["sha256"]:
            raise ValueError(f"{proposals_dir} was made with CLIP weights {pm.get('clip')}, not "
                             f"these ({clip_id['sha256'][:12]}): their embeddings live in "
                             "another space; recompute the proposals with this CLIP")
        if pm.get("source", {}).get("json_sha256") != data.json_sha256:
            raise ValueError(f"{proposals_dir} was made from another training json than "
                             f"{json_file} (sha256 differs)")
        absent = [i for i in data.image_ids if i not in proposals]
        if absent:
            raise ValueError(f"{proposals_dir} has no proposals for {len(absent)} of "
                             f"{len(data.image_ids)} images (first: {absent[:5]}); finish stage 2 "
                             "first (`ovd proposals`)")
        fingerprint = _proposals_fingerprint(proposals)
    identity = {
        "config": cfg.identity(),
        "clip": clip_id,
        "embed_dim": int(clip.embed_dim),
        "source": {"json_sha256": data.json_sha256},
        "proposals": fingerprint,
        "info": {"clip": clip.name, "json_file": str(data.json_file),
                 "image_root": str(data.image_root),
                 "proposals_dir": str(proposals_dir) if proposals_dir is not None else None},
    }
    store = ShardStore(out_dir, stage="targets", identity=identity, image_ids=data.image_ids,
                       shard_size=cfg.shard_size, overwrite=overwrite, part=part)

    def boxes_of(image_id: int) -> torch.Tensor:
        return data.gt[image_id][~data.gt_crowd[image_id]]  # a crowd box is no single object's embedding

    todo = store.todo_shards()
    read = ReadAhead(data.read, [i for i in store.image_ids_of(todo) if len(boxes_of(i))])

    def compute(image_id: int) -> tuple[Record, dict]:
        gt = boxes_of(image_id)
        with torch.inference_mode(), autocast(clip, cfg.precision):
            if len(gt):  # cropped where the CLIP runs
                emb = encode_boxes(clip, read(image_id).to(clip.device), gt, enlarge=cfg.gt_enlarge,
                                   batch_size=cfg.batch_size)
            else:  # nothing to crop: skip decoding the image
                emb = torch.zeros(0, clip.embed_dim)
        rec = image_targets(gt, emb, proposals[image_id] if proposals is not None else None,
                            cfg.max_proposals)
        n_gt = int(rec["is_gt"].sum())
        return rec, {"clip_crops": len(gt), "gt": n_gt, "proposals": len(rec["boxes"]) - n_gt}

    try:
        return store.run(compute, desc="targets", progress=progress, todo=todo)
    finally:
        read.close()


def load_targets(folder: str | Path) -> ShardReader:
    """A reader of a targets folder for the detector's training mapper.

    ``reader[image_id]`` -> {"boxes" (N, 4) f32, "embeddings" (N, D) f16, "weights" (N,) f32,
    "is_gt" (N,) bool}; ``image_id in reader``; ``reader.manifest["embed_dim"]``.

    Raises:
        FileNotFoundError: no manifest. ValueError: another stage's folder.
    """
    reader = ShardReader(folder)
    if reader.manifest.get("stage") != "targets":
        raise ValueError(f"{folder} holds {reader.manifest.get('stage')!r} output, not targets")
    return reader


# --------------------------------------------------------------------------- CLI

def targets_worker(clip_path: str, json_file: str, image_root: str, proposals: str | None,
                    out: str, cfg: dict, max_images: int | None, overwrite: bool,
                    part: tuple[int, int] | None = None) -> None:
    from detectron2.utils import comm

    from ovd.models.clip.model import load_clip

    from .progress import progress as _progress

    _setup_worker_logging()
    clip = load_clip(clip_path, device=stage_device())
    reader = run_targets(clip, json_file, image_root, proposals, out, TargetsConfig.from_dict(cfg),
                         max_images=max_images, overwrite=overwrite, part=part,
                         progress=_progress if comm.get_rank() == 0 else None)
    if comm.get_rank() == 0 and reader.complete():
        logger.info("targets written to %s: %s", out,
                    json.dumps(reader.manifest.get("cost", {}).get("per_image", {})))


__all__ = ["TargetsConfig", "image_targets", "load_targets", "run_targets", "targets_worker"]
