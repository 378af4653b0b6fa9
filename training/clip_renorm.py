"""Stage 1 (EZSD): re-normalise CLIP on the detection domain by tuning only its LayerNorms.

A CLIP trained on web photos sees detection crops (small, blurred, hazy, cut from cluttered
scenes) as out of domain. EZSD bridges the gap by fine-tuning only the LayerNorm gains and
biases (parameter names containing ``ln_``) on crops of base-class ground-truth boxes (randomly
flipped left-right), with the CLIP's own frozen logit scale s: logits ``s * <v̂, t̂_c>`` over
the base classes and a sigmoid BCE against one-hot labels. Every other weight stays bitwise
identical to the parent checkpoint.

The budget is a number of optimizer steps, not the paper's 12 epochs: what transfers between a
dataset of 800k boxes and one of 3k is how far the LayerNorm parameters move, and the run is
judged by the detection-crop accuracy gate (training/gates.py), not by its epoch count.

The run checkpoints every `checkpoint_every` steps into ``<out>/resume/`` (the trainable
parameters, the optimizer state and ``state.json``) and, started again with the same output
folder, continues from there with the same result as an uninterrupted run. The result is a
project CLIP folder (see ovd.models.clip.model) whose manifest names its parent by sha256.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from safetensors.torch import save as safetensors_bytes

from ovd.models.clip.crops import crop_and_resize
from ovd.models.clip.model import (
    DEFAULT_TEMPLATE,
    ClipModel,
    architecture_config,
    load_clip,
    save_clip,
)
from ovd.models.manifest import sha256_file

from .clip_pretrain import bf16_supported
from .config import SectionConfig
from .data.detection_set import DetectionSet

logger = logging.getLogger(__name__)

TUNE_CHOICES = ("vision", "vision+text")
# Fields that change how the run is carried out but not its result; a resume may change them.
_NOT_IDENTITY = ("checkpoint_every", "threads", "workers")


@dataclass
class RenormConfig(SectionConfig):
    """The `clip_renorm:` section of a config file.

    Attributes:
        tune: which LayerNorms train: "vision" (LVIS recipe) or "vision+text" (COCO recipe).
        epochs: passes over all base GT crops (at least; see ``min_steps``).
        min_steps: the run takes at least this many optimizer steps, adding epochs as needed
            (the update budget that makes the LayerNorms move on a small dataset).
        batch_size: crops per step (the last step of an epoch may be smaller).
        lr: constant AdamW learning rate (EZSD: 1e-4).
        weight_decay: AdamW weight decay (applied to the LayerNorm parameters, the only ones).
        grad_clip: max L2 norm of the gradient of the trainable parameters.
        size_weighting: weight each crop by exp(-sqrt(w*h)/sqrt(W*H)) (box w, h and image
            W, H in pixels), renormalised to mean 1 per batch; favours small objects.
        enlarge: crop = GT box scaled by this about its centre (EZSD: 1.2).
        flip: flip each crop left-right with probability 0.5 at every step (EZSD's
            augmentation; seeded by (seed, step), so a resumed run sees the same flips).
        logit_scale: the frozen multiplier of the cosine logits; None (the default) = the
            CLIP's own ``logit_scale.exp()``, as EZSD's code does.
        template: prompt template for the class names.
        seed: seed of the per-epoch shuffling.
        checkpoint_every: steps between resumable checkpoints.
        max_images: use only the first this many images of the training json (None = all).
        threads: torch intra-op threads (0 = torch's default).
        workers: DataLoader processes that read images and cut crops while the CLIP trains
            (0 = in the training process; batches are the same either way).
        precision: "fp32", "bf16" (autocast) or "auto" (bf16 where the CPU has native bf16).
    """

    SECTION = "clip_renorm"

    tune: str = "vision+text"
    epochs: int = 3
    min_steps: int = 0
    batch_size: int = 128
    lr: float = 1e-4
    weight_decay: float = 1e-4
    grad_clip: float = 0.1
    size_weighting: bool = False
    enlarge: float = 1.2
    flip: bool = True
    logit_scale: float | None = None
    template: str = DEFAULT_TEMPLATE
    seed: int = 0
    checkpoint_every: int = 50
    max_images: int | None = None
    threads: int = 0
    workers: int = 2
    precision: str = "auto"

    def __post_init__(self) -> None:
        problems = []
        if self.tune not in TUNE_CHOICES:
            problems.append(f"tune {self.tune!r} not in {list(TUNE_CHOICES)}")
        if min(self.epochs, self.batch_size, self.checkpoint_every) < 1 or self.min_steps < 0:
            problems.append("epochs, batch_size and checkpoint_every must be >= 1, min_steps >= 0")
        if self.logit_scale is not None and not self.logit_scale > 0:
            problems.append(f"logit_scale {self.logit_scale} must be > 0 or null")
        if not self.lr > 0 or not self.grad_clip > 0 or self.weight_decay < 0:
            problems.append("lr and grad_clip must be > 0, weight_decay >= 0")
        if not self.enlarge > 0:
            problems.append(f"enlarge {self.enlarge} must be > 0")
        if "{}" not in self.template:
            problems.append(f"template {self.template!r} has no '{{}}' for the class name")
        if self.max_images is not None and self.max_images < 1:
            problems.append(f"max_images {self.max_images} must be >= 1 or null")
        if self.threads < 0 or self.workers < 0:
            problems.append(f"threads {self.threads} and workers {self.workers} must be >= 0")
        if self.precision not in ("auto", "fp32", "bf16"):
            problems.append(f"precision {self.precision!r} not in auto/fp32/bf16")
        if problems:
            raise ValueError("clip_renorm: " + "; ".join(problems))



@dataclass
class GTBoxes:
    """Every base-class GT box of a training json, without pixels: crops are cut per batch by
    :class:`GTCropBatches`, so memory grows with the batch, not with the dataset (COCO's ~665k
    base boxes would be ~400 GB of 224 px float32 crops).

    Attributes:
        data: the json and its images (read on demand).
        image_ids: (N,) int64 image of each box.
        boxes: (N, 4) float32 XYXY boxes, pixels of the upright image.
        labels: (N,) int64 index into `class_names` (-1: a background box, see `base_gt_boxes`).
        box_wh: (N, 2) float32 box width and height, pixels.
        image_wh: (N, 2) float32 width and height of the box's image, pixels.
        class_names: the base category names, ordered by category id.
        num_images: images that contributed at least one box.
    """

    data: DetectionSet
    image_ids: torch.Tensor
    boxes: torch.Tensor
    labels: torch.Tensor
    box_wh: torch.Tensor
    image_wh: torch.Tensor
    class_names: list[str]
    num_images: int

    def __len__(self) -> int:
        return len(self.labels)


class GTCropBatches(torch.utils.data.Dataset):
    """Map-style dataset whose keys are batches: ``dataset[idx]`` with idx a (B,) int64 tensor of
    box indices returns ``(idx, crops)``, crops (B, 3, S, S) float32 normalised for the CLIP, in
    idx's order. Each image of the batch is decoded once and all its boxes are cut together
    (RoIAlign), so a DataLoader with workers overlaps decoding with the CLIP's steps.

    Args:
        boxes: the GT boxes.
        crop: ``crop(pixels (3, H, W) uint8, boxes (K, 4)) -> (K, 3, S, S)`` (no model inside, so
            workers do not copy the CLIP).
    """

    def __init__(self, boxes: GTBoxes, crop: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
        self.boxes, self.crop = boxes, crop

    def __len__(self) -> int:
        return len(self.boxes)

    def __getitem__(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b = self.boxes
        out: torch.Tensor | None = None
        images = b.image_ids[idx]
        for image_id in images.unique().tolist():
            rows = (images == image_id).nonzero().flatten()
            crops = self.crop(b.data.read(image_id), b.boxes[idx[rows]])
            if out is None:
                out = crops.new_empty((len(idx), *crops.shape[1:]))
            out[rows] = crops
        return idx, out


def step_indices(n: int, batch_size: int, seed: int, start: int, total: int):
    """The box indices of steps start..total-1: (B,) int64 each, epochs of a permutation that
    depends on (seed, epoch) only, so a resumed run sees the batches of an uninterrupted one."""
    steps_per_epoch = math.ceil(n / batch_size)
    perm, perm_epoch = None, -1
    for step in range(start, total):
        epoch, i = divmod(step, steps_per_epoch)
        if epoch != perm_epoch:
            gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            perm, perm_epoch = torch.randperm(n, generator=gen), epoch
        yield perm[i * batch_size:(i + 1) * batch_size]


def renorm_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, labels: torch.Tensor,
                logit_scale: float, weights: torch.Tensor | None = None) -> torch.Tensor:
    """EZSD's re-normalisation loss: sigmoid BCE of fixed-scale cosine logits vs one-hot labels.

    Args:
        image_emb: (B, D) crop embeddings (L2-normalised here).
        text_emb: (C, D) class embeddings (L2-normalised here).
        labels: (B,) int64 class index in [0, C), or -1 for a background crop (all-zero
            target: our negatives for a dataset with one base class, see `base_gt_boxes`).
        logit_scale: the frozen multiplier of the cosines (the CLIP's own).
        weights: optional (B,) per-sample weights (e.g. `size_weights`), used as given.

    Returns:
        Scalar: the BCE averaged over the C classes of each sample, then over the batch
        (weighted by `weights` when given).
    """
    logits = logit_scale * F.normalize(image_emb, dim=-1) @ F.normalize(text_emb, dim=-1).T
    targets = F.one_hot(labels.clamp(min=0), logits.shape[1]).to(logits.dtype) * (labels >= 0)[:, None]
    per_sample = F.binary_cross_entropy_with_logits(logits, targets, reduction="none").mean(1)
    if weights is not None:
        per_sample = per_sample * weights
    return per_sample.mean()


def size_weights(box_wh: torch.Tensor, image_wh: torch.Tensor) -> torch.Tensor:
    """EZSD's optional size weight exp(-sqrt(w*h)/sqrt(W*H)), renormalised to mean 1.

    Args:
        box_wh: (B, 2) box width and height, pixels.
        image_wh: (B, 2) image width and height, pixels.

    Returns:
        (B,) float32 weights with mean 1; smaller boxes weigh more.
    """
    raw = torch.exp(-(box_wh.prod(1).sqrt() / image_wh.prod(1).sqrt()))
    return (raw / raw.mean()).float()


def trainable_parameter_names(model: torch.nn.Module, tune: str) -> list[str]:
    """Names of the LayerNorm parameters that `tune` trains.

    Args:
        model: an open_clip CLIP module.
        tune: "vision" (names under ``visual.``) or "vision+text" (every ``ln_`` name).

    Raises:
        ValueError: the model has no such parameters (e.g. a timm or HF tower that names its
            norms differently).
    """
    names = [n for n, _ in model.named_parameters()
             if "ln_" in n and (tune == "vision+text" or n.startswith("visual."))]
    if not names:
        raise ValueError(f"this CLIP has no LayerNorm parameters named 'ln_' for tune={tune!r}; "
                         "only open_clip's own towers are supported")
    return names


def background_boxes(image_hw: tuple[int, int], avoid: torch.Tensor, count: int,
                     generator: torch.Generator, *, max_iou: float = 0.1, tries: int = 20) -> torch.Tensor:
    """Up to `count` random boxes of an image overlapping none of `avoid` (IoU < max_iou).

    Args:
        image_hw: (H, W) pixels.
        avoid: (G, 4) xyxy boxes (every annotation of the image).
        generator: seeded torch generator (the crops are reproducible).

    Returns:
        (K, 4) xyxy float32 boxes, K <= count, sides 5-50% of the image's.
    """
    from torchvision.ops import box_iou

    h, w = (float(v) for v in image_hw)
    n = count * tries
    size = torch.rand(n, 2, generator=generator) * 0.45 + 0.05
    bw, bh = size[:, 0] * w, size[:, 1] * h
    x0, y0 = torch.rand(n, generator=generator) * (w - bw), torch.rand(n, generator=generator) * (h - bh)
    cand = torch.stack([x0, y0, x0 + bw, y0 + bh], dim=1)
    if len(avoid):
        cand = cand[box_iou(cand, avoid.float()).max(dim=1).values < max_iou]
    return cand[:count]


def base_gt_boxes(json_file: str | Path, image_root: str | Path, *,
                  max_images: int | None = None) -> GTBoxes:
    """Every base-class GT box of a COCO json (crowd boxes skipped), without reading pixels.

    Args:
        json_file: COCO instances json; categories without ``split`` count as base.
        image_root: folder the images' ``file_name`` are relative to.
        max_images: only the first this many images of the json.

    Raises:
        DatasetFormatError: invalid json. FileNotFoundError: missing image root.
        ValueError: no base-class annotation to train on. (An unreadable image, or one whose
        size differs from the json's, raises when a batch first reads it; `ovd data check`
        finds those up front.)
    """
    data = DetectionSet.load(json_file, image_root, max_images=max_images)
    is_base = ~data.is_novel
    base_index = torch.cumsum(is_base.long(), 0) - 1  # contiguous index -> index among the base
    # With one base class, EZSD's one-hot BCE has no negative: the loss is ~0 from the first
    # step and the LayerNorms do not move. Our formulation then adds background crops (boxes
    # overlapping no annotated box) with an all-zero target, one per GT box.
    negatives = int(is_base.sum()) == 1
    generator = torch.Generator().manual_seed(0)
    ids, all_boxes, labels, image_wh = [], [], [], []
    for image_id in data.image_ids:
        boxes, index = data.annotations(image_id, is_base)  # crowd boxes left out
        if not len(boxes):
            continue
        record = data.image(image_id)
        hw = (int(record["height"]), int(record["width"]))
        index = base_index[index]
        if negatives:
            background = background_boxes(hw, data.boxes[image_id], len(boxes), generator)
            boxes, index = torch.cat([boxes, background]), torch.cat([index, torch.full((len(background),), -1)])
        ids.append(torch.full((len(boxes),), image_id, dtype=torch.long))
        all_boxes.append(boxes.float())
        labels.append(index)
        image_wh.append(torch.tensor([[hw[1], hw[0]]], dtype=torch.float32).expand(len(boxes), 2))
    if not all_boxes:
        scope = f" in its first {max_images} images" if max_images is not None else ""
        raise ValueError(f"{json_file} has no annotations of base categories{scope} "
                         f"({int(is_base.sum())} base of {len(data.categories)} categories, "
                         f"{sum(len(v) for v in data.labels.values())} annotations): nothing to re-normalise on")
    boxes = torch.cat(all_boxes)
    return GTBoxes(data=data, image_ids=torch.cat(ids), boxes=boxes, labels=torch.cat(labels),
                   box_wh=boxes[:, 2:] - boxes[:, :2], image_wh=torch.cat(image_wh),
                   class_names=[n for n, b in zip(data.names, is_base, strict=True) if b],
                   num_images=len(all_boxes))


def weights_sha256(clip: ClipModel) -> str:
    """The sha256 of a CLIP's weights file: its manifest's for a checkpoint folder, else the
    digest save_clip would record for the in-memory weights (so both kinds of parent compare)."""
    if clip.manifest is not None:
        return clip.manifest["weights"]["sha256"]
    state = {k: v.detach().cpu().contiguous() for k, v in clip.model.state_dict().items()}
    return hashlib.sha256(safetensors_bytes(state)).hexdigest()


def _parent(clip_dir_or_name: str | Path, pretrained: str | None, device) -> tuple[ClipModel, dict,
                                                                                  dict]:
    """Load the parent; return it, its architecture config and its manifest record."""
    clip = load_clip(str(clip_dir_or_name), pretrained, device=device)
    model_cfg = clip.manifest["architecture"] if clip.manifest is not None \
        else architecture_config(str(clip_dir_or_name))
    record = {"path": str(clip_dir_or_name), "sha256": weights_sha256(clip)}
    if pretrained:
        record["pretrained"] = pretrained
    return clip, model_cfg, record


def renorm_clip(clip_dir_or_name: str | Path, json_file: str | Path, image_root: str | Path,
                out_dir: str | Path, cfg: RenormConfig, *,
                progress: Callable[[str, int, int], Callable[[int, dict], None]] | None = None,
                pretrained: str | None = None, device: str | torch.device = "cpu") -> ClipModel:
    """LayerNorm-only fine-tuning of a CLIP on base-class GT crops; saves a project checkpoint.

    Args:
        clip_dir_or_name: the parent: a project CLIP folder or an open_clip model name.
        json_file: detection training json (base-class boxes are used; others ignored).
        image_root: folder of its images.
        out_dir: checkpoint folder to write (and resume from); must not be the parent's.
        cfg: training config.
        progress: optional factory `progress(desc, total, initial) -> update(n, postfix)`.
        pretrained: open_clip pretrained tag or file, for a parent given by name.
        device: torch device to train on.

    Returns:
        The re-normalised model loaded from `out_dir` (eval mode).

    Raises:
        ValueError: no base annotations, a resume folder of another run, out_dir == parent.
    """
    out_dir = Path(out_dir)
    resume_dir = out_dir / "resume"
    if Path(clip_dir_or_name).is_dir() and out_dir.resolve() == Path(clip_dir_or_name).resolve():
        raise ValueError(f"--out {out_dir} is the parent checkpoint; choose another folder")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t_load = time.time()
    clip, model_cfg, parent = _parent(clip_dir_or_name, pretrained, device)
    data = base_gt_boxes(json_file, image_root, max_images=cfg.max_images)
    data_id = {"json_sha256": sha256_file(json_file), "parent_sha256": parent["sha256"],
               "crops": len(data)}
    background = int((data.labels < 0).sum())
    logger.info("clip renorm: %d base GT boxes of %d classes from %d images (%.1f s)%s",
                len(data) - background, len(data.class_names), data.num_images, time.time() - t_load,
                f"; one base class, so {background} background crops are its negatives (our "
                "formulation: EZSD's loss has none then)" if background else "")

    model = clip.model.train()
    names = trainable_parameter_names(model, cfg.tune)
    params = dict(model.named_parameters())
    model.requires_grad_(False)
    trainable = [params[n].requires_grad_(True) for n in names]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    dev = clip.device
    use_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and (
        torch.cuda.is_bf16_supported() if dev.type == "cuda" else bf16_supported()))

    def autocast() -> torch.autocast:
        return torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_bf16)

    tokens = clip.tokenizer([cfg.template.format(n) for n in data.class_names]).to(dev)
    train_text = cfg.tune == "vision+text"
    fixed_text = None
    if not train_text:
        with torch.no_grad(), autocast():
            fixed_text = model.encode_text(tokens).float()

    identity = {k: v for k, v in asdict(cfg).items() if k not in _NOT_IDENTITY}
    steps_per_epoch = math.ceil(len(data) / cfg.batch_size)
    total = max(cfg.epochs * steps_per_epoch, cfg.min_steps)
    scale = cfg.logit_scale or clip.logit_scale
    start, elapsed = 0, 0.0
    epoch_losses: list[float] = []
    epoch_sum, epoch_steps = 0.0, 0
    state_file = resume_dir / "state.json"
    if state_file.is_file():
        state = json.loads(state_file.read_text())
        if state["config"] != json.loads(json.dumps(identity)) or state["data"] != data_id:
            raise ValueError(f"{resume_dir} holds a run with another config, parent or data; "
                             "remove it or choose another --out")
        saved = load_file(resume_dir / "model.safetensors")
        if set(saved) != set(names):
            raise ValueError(f"{resume_dir}/model.safetensors does not hold the trainable "
                             "parameters of this run; remove it or choose another --out")
        with torch.no_grad():
            for n in names:
                params[n].copy_(saved[n])
        optimizer.load_state_dict(torch.load(resume_dir / "optimizer.pt", weights_only=True))
        start, elapsed = state["step"], state["seconds"]
        epoch_losses, epoch_sum, epoch_steps = (state["epoch_losses"], state["epoch_sum"],
                                                state["epoch_steps"])
        logger.info("resuming CLIP renorm at step %d/%d from %s", start, total, resume_dir)

    update = progress("clip renorm", total, start) if progress else (lambda k, info: None)
    crop = functools.partial(crop_and_resize, out_size=clip.image_size, mean=clip.mean, std=clip.std,
                             enlarge=cfg.enlarge)
    loader = torch.utils.data.DataLoader(
        GTCropBatches(data, crop), sampler=step_indices(len(data), cfg.batch_size, cfg.seed, start, total),
        batch_size=None, num_workers=cfg.workers, pin_memory=dev.type == "cuda",
        prefetch_factor=2 if cfg.workers else None)
    t0 = time.time()
    for step, (idx, crops) in enumerate(loader, start):
        epoch, i = divmod(step, steps_per_epoch)
        labels = data.labels[idx].to(dev)
        if cfg.flip:
            flip = torch.rand(len(idx), generator=torch.Generator().manual_seed(
                cfg.seed * 1_000_003 + 7_919 * step + 1)) < 0.5
            crops = torch.where(flip.view(-1, 1, 1, 1), crops.flip(-1), crops)
        weights = (size_weights(data.box_wh[idx], data.image_wh[idx]).to(dev)
                   if cfg.size_weighting else None)
        with autocast():
            image_emb = model.encode_image(crops.to(dev))
            text_emb = model.encode_text(tokens) if train_text else fixed_text
        loss = renorm_loss(image_emb.float(), text_emb.float(), labels, scale, weights)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
        optimizer.step()
        loss_value = loss.item()
        epoch_sum, epoch_steps = epoch_sum + loss_value, epoch_steps + 1
        if i == steps_per_epoch - 1:
            epoch_losses.append(epoch_sum / epoch_steps)
            epoch_sum, epoch_steps = 0.0, 0
        update(1, {"epoch": epoch + 1, "loss": f"{loss_value:.4f}"})
        done = step + 1
        if done % cfg.checkpoint_every == 0 and done < total:
            _save_resume(resume_dir, params, names, optimizer, {
                "step": done, "seconds": elapsed + time.time() - t0, "config": identity,
                "data": data_id, "epoch_losses": epoch_losses, "epoch_sum": epoch_sum,
                "epoch_steps": epoch_steps})
    seconds = elapsed + time.time() - t0
    if epoch_steps:  # a budget that ends inside an epoch: report its partial epoch too
        epoch_losses.append(epoch_sum / epoch_steps)

    model.requires_grad_(True)
    clip.model = model.eval()
    save_clip(clip, out_dir, model_cfg=model_cfg, record={
        "name": out_dir.name,
        "stage": "clip_renorm",
        "parent": parent,
        # The text tower is the parent's, unchanged: so is what it ever read.
        **({"text_words": clip.manifest["text_words"]} if (clip.manifest or {}).get("text_words") else {}),
        "training": {
            "config": asdict(cfg),
            "data": {"json": str(json_file), "json_sha256": data_id["json_sha256"],
                     "image_root": str(image_root), "images": data.num_images,
                     "crops": len(data), "classes": data.class_names},
            "trainable": {"tensors": len(names), "parameters": sum(p.numel() for p in trainable)},
            "steps": total,
            "logit_scale": scale,
            "epoch_losses": epoch_losses,
            "final_loss": epoch_losses[-1],
            "seconds": round(seconds, 1),
        },
    })
    for f in ("model.safetensors", "optimizer.pt", "state.json"):
        (resume_dir / f).unlink(missing_ok=True)
    if resume_dir.is_dir():
        resume_dir.rmdir()
    return load_clip(str(out_dir), device=device)


def _save_resume(resume_dir: Path, params: dict, names: list[str], optimizer, state: dict) -> None:
    resume_dir.mkdir(parents=True, exist_ok=True)
    save_file({n: params[n].detach().cpu().contiguous() for n in names},
              resume_dir / "model.safetensors.tmp")
    torch.save(optimizer.state_dict(), resume_dir / "optimizer.pt.tmp")
    os.replace(resume_dir / "model.safetensors.tmp", resume_dir / "model.safetensors")
    os.replace(resume_dir / "optimizer.pt.tmp", resume_dir / "optimizer.pt")
    # state.json last: it is what marks the checkpoint complete.
    (resume_dir / "state.json.tmp").write_text(json.dumps(state))
    os.replace(resume_dir / "state.json.tmp", resume_dir / "state.json")


