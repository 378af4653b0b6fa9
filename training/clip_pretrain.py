"""Stage 0: pretrain a small CLIP on the world's image-caption corpus ("the web").

open_clip's own CLIP module and contrastive loss (`ClipLoss`), AdamW with warm-up and cosine
decay. The run checkpoints every `checkpoint_every` steps into `<out>/resume/` and, when started
again with the same output folder, continues from there (a killed run loses at most that many
steps). The result is a project CLIP folder (see ovd.models.clip.model) whose manifest records the
architecture, the sha256 of the weights and the fingerprint of the training data.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from ovd.models.clip.model import ClipModel, architecture_config, load_clip, save_clip
from ovd.models.model_card import words_of

from .config import SectionConfig

logger = logging.getLogger(__name__)


@dataclass
class PretrainConfig(SectionConfig):
    """The `clip_pretrain:` section of a config file.

    Attributes:
        architecture: open_clip model name to train from random weights.
        steps: optimisation steps.
        batch_size: image-caption pairs per step.
        lr: peak AdamW learning rate; warmup_steps linear warm-up, then cosine to 0.
        weight_decay: AdamW weight decay (not applied to norms, biases, logit scale).
        crop_scale: random-resized-crop area range (augmentation).
        checkpoint_every: steps between resumable checkpoints.
        seed: seed of sampling order and augmentation.
        threads: torch intra-op threads (0 = torch's default).
        precision: "fp32", "bf16" (autocast; ~1.6x faster on CPUs with AVX512-BF16) or "auto"
            (bf16 where oneDNN reports native bf16 support, else fp32).
    """

    SECTION = "clip_pretrain"

    architecture: str = "ovd-vit-tiny-64"
    steps: int = 300
    batch_size: int = 256
    lr: float = 2e-3
    warmup_steps: int = 30
    weight_decay: float = 0.1
    crop_scale: tuple[float, float] = (0.6, 1.0)
    checkpoint_every: int = 50
    seed: int = 0
    threads: int = 0
    precision: str = "auto"

    def __post_init__(self) -> None:
        if min(self.steps, self.batch_size, self.checkpoint_every) < 1 or self.warmup_steps < 0:
            raise ValueError("clip_pretrain: steps, batch_size and checkpoint_every must be >= 1, "
                             "warmup_steps >= 0")
        if not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise ValueError(f"clip_pretrain: crop_scale {self.crop_scale} must be 0 < lo <= hi <= 1")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"clip_pretrain: precision {self.precision!r} not in auto/fp32/bf16")



class CaptionCorpus:
    """The world's caption corpus: uint8 images (N, S, S, 3), memory-mapped, and their captions."""

    def __init__(self, world_dir: str | Path, split: str = "pretrain"):
        root = Path(world_dir) / "captions"
        npy, jsonl = root / f"{split}.npy", root / f"{split}.jsonl"
        if not npy.is_file() or not jsonl.is_file():
            raise FileNotFoundError(f"caption corpus missing under {root} (run `ovd data synth`)")
        self.images = np.load(npy, mmap_mode="r")
        self.captions = [json.loads(line)["caption"] for line in jsonl.read_text().splitlines()]
        if len(self.captions) != len(self.images):
            raise ValueError(f"{npy} has {len(self.images)} images but {jsonl} {len(self.captions)} captions")

    def __len__(self) -> int:
        return len(self.captions)


def corpus_words(captions: list[str]) -> list[str]:
    """The distinct lower-case words of a caption corpus: all the language a CLIP trained from
    scratch on it ever read (ovd.models.model_card warns about any other word)."""
    return sorted({w for c in captions for w in words_of(c)})


def augment(images: torch.Tensor, scale: tuple[float, float], gen: torch.Generator) -> torch.Tensor:
    """Batched random resized crop + horizontal flip via one affine grid. (N, 3, S, S) -> same."""
    n = images.shape[0]
    s = torch.empty(n).uniform_(*scale, generator=gen).sqrt()
    tx = (torch.rand(n, generator=gen) * 2 - 1) * (1 - s)
    ty = (torch.rand(n, generator=gen) * 2 - 1) * (1 - s)
    flip = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1] = s * flip, s
    theta[:, 0, 2], theta[:, 1, 2] = tx, ty
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def bf16_supported() -> bool:
    """Whether this CPU computes bf16 natively (oneDNN's own check)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "logit_scale" in name or "ln" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _lr_at(step: int, cfg: PretrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


def pretrain_clip(world_dir: str | Path, out_dir: str | Path, cfg: PretrainConfig, *,
                  progress: Callable[[str, int, int], Callable[[int, dict], None]] | None = None
                  ) -> ClipModel:
    """Train a CLIP from scratch on the caption corpus and save it as a project checkpoint.

    Args:
        world_dir: folder of a generated synthetic world.
        out_dir: checkpoint folder to write (and resume from).
        cfg: training config.
        progress: optional factory `progress(desc, total, initial) -> update(n, postfix)`.

    Returns:
        The trained model (eval mode).
    """
    out_dir = Path(out_dir)
    resume_dir = out_dir / "resume"
    torch.manual_seed(cfg.seed)
    corpus = CaptionCorpus(world_dir)
    world = json.loads((Path(world_dir) / "world.json").read_text())
    clip = load_clip(cfg.architecture)
    model = clip.model.train()
    tokens = clip.tokenizer(corpus.captions)  # (N, context_length), tokenised once
    optimizer = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98),
                                  eps=1e-6)
    loss_fn = open_clip.ClipLoss()
    start, elapsed = 0, 0.0
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    state_file = resume_dir / "state.json"
    if state_file.is_file():
        state = json.loads(state_file.read_text())
        if state["config"] != json.loads(json.dumps(asdict(cfg))) or state["data"] != world["fingerprint"]:
            raise ValueError(f"{resume_dir} holds a run with another config or data; "
                             "remove it or choose another --out")
        model.load_state_dict(load_file(resume_dir / "model.safetensors"))
        optimizer.load_state_dict(torch.load(resume_dir / "optimizer.pt", weights_only=True))
        start, elapsed = state["step"], state["seconds"]
        logger.info("resuming CLIP pretraining at step %d/%d from %s", start, cfg.steps, resume_dir)

    n = len(corpus)
    use_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and bf16_supported())
    update = progress("clip pretrain", cfg.steps, start) if progress else (lambda k, info: None)
    t0 = time.time()
    loss_value = float("nan")
    for step in range(start, cfg.steps):
        # Batch and augmentation are functions of (seed, step) only: a resumed run sees the
        # same data as an uninterrupted one.
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        idx = torch.sort(torch.randperm(n, generator=gen)[:cfg.batch_size]).values
        batch = torch.from_numpy(np.array(corpus.images[idx.numpy()]))
        images = augment(clip.normalise(batch), cfg.crop_scale, gen)
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, cfg)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16):
            image_f, text_f, logit_scale = model(images, tokens[idx])[:3]
            loss = loss_fn(image_f.float(), text_f.float(), logit_scale.float())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        loss_value = loss.item()
        update(1, {"loss": f"{loss_value:.3f}"})
        done = step + 1
        if done % cfg.checkpoint_every == 0 and done < cfg.steps:
            _save_resume(resume_dir, model, optimizer, done, elapsed + time.time() - t0, cfg, world)
    seconds = elapsed + time.time() - t0
    clip.model = model.eval()
    save_clip(clip, out_dir, model_cfg=architecture_config(cfg.architecture), record={
        "name": out_dir.name,
        "stage": "clip_pretrain",
        "text_words": {"words": corpus_words(corpus.captions),
                       "source": f"the {n} captions of {world_dir} it was trained on"},
        "training": {"config": asdict(cfg), "data": {"world": str(world_dir),
                                                     "fingerprint": world["fingerprint"],
                                                     "samples": n},
                     "final_loss": loss_value, "seconds": round(seconds, 1)},
    })
    for f in ("model.safetensors", "optimizer.pt", "state.json"):
        (resume_dir / f).unlink(missing_ok=True)
    if resume_dir.is_dir():
        resume_dir.rmdir()
    return load_clip(str(out_dir))


def _save_resume(resume_dir: Path, model, optimizer, step: int, seconds: float, cfg, world) -> None:
    resume_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, resume_dir / "model.safetensors.tmp")
    torch.save(optimizer.state_dict(), resume_dir / "optimizer.pt.tmp")
    os.replace(resume_dir / "model.safetensors.tmp", resume_dir / "model.safetensors")
    os.replace(resume_dir / "optimizer.pt.tmp", resume_dir / "optimizer.pt")
    # state.json last: it is what marks the checkpoint complete.
    (resume_dir / "state.json.tmp").write_text(json.dumps({
        "step": step, "seconds": seconds, "config": asdict(cfg), "data": world["fingerprint"]}))
    os.replace(resume_dir / "state.json.tmp", resume_dir / "state.json")
