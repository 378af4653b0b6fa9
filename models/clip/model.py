"""CLIP, loaded through open_clip: any published model by name + pretrained tag or file, or a
checkpoint folder written by this project (open_clip's `local-dir:` layout plus a manifest).

A project checkpoint folder holds::

    open_clip_config.json         {"model_cfg": ..., "preprocess_cfg": ...} (open_clip's format)
    open_clip_model.safetensors   the weights (never pickled)
    manifest.json                 ovd-clip/1: name, sha256 of the weights, training record

Loading a folder checks the weights' sha256 against the manifest before open_clip reads them.
"""

from __future__ import annotations

import difflib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
from safetensors.torch import save_file

from ..manifest import sha256_file
from .crops import crop_and_resize

MANIFEST_FORMAT = "ovd-clip/1"
WEIGHTS_FILE = "open_clip_model.safetensors"
CONFIG_FILE = "open_clip_config.json"
MANIFEST_FILE = "manifest.json"
DEFAULT_TEMPLATE = "a photo of a {}"
_PROJECT_CONFIGS = Path(__file__).with_name("model_configs")
open_clip.add_model_config(_PROJECT_CONFIGS)  # registers the project's small architectures


class ClipCheckpointError(ValueError):
    """A CLIP checkpoint that is missing, malformed, or does not match its manifest."""


@dataclass
class ClipModel:
    """An open_clip model with its tokenizer and preprocessing, plus the EZSD helpers.

    Attributes:
        model: the open_clip CLIP module.
        tokenizer: callable list[str] -> (N, context_length) int64 tokens.
        name: how it was loaded (open_clip name, or the checkpoint folder).
        image_size: input side S in pixels.
        mean, std: per-channel normalisation for pixel values in [0, 1].
        manifest: the project manifest when loaded from a project folder, else None.
    """

    model: torch.nn.Module
    tokenizer: object
    name: str
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    manifest: dict | None = None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def embed_dim(self) -> int:
        return int(self.model.text_projection.shape[1]) if hasattr(self.model, "text_projection") \
            else int(self.encode_text(["x"]).shape[1])

    @property
    def logit_scale(self) -> float:
        """The multiplier of cosine similarities this CLIP was trained with: its own
        ``logit_scale.exp()`` (100 for OpenAI's CLIPs; one the project trains learns its own).
        Softmaxes over classes must use it: a larger one makes them too sharp, a smaller one
        too flat."""
        return float(self.model.logit_scale.detach().exp())

    def encode_text(self, texts: list[str], *, batch_size: int = 512) -> torch.Tensor:
        """L2-normalised text embeddings, (len(texts), D) float32."""
        out = []
        for i in range(0, len(texts), batch_size):
            tokens = self.tokenizer(texts[i:i + batch_size]).to(self.device)
            out.append(torch.nn.functional.normalize(self.model.encode_text(tokens).float(), dim=-1))
        return torch.cat(out) if out else torch.zeros(0, self.embed_dim)

    def text_embeddings(self, names: list[str], template: str = DEFAULT_TEMPLATE) -> torch.Tensor:
        """(C, D) normalised embeddings of class names put into a prompt template."""
        return self.encode_text([template.format(n) for n in names])

    def encode_images(self, images: torch.Tensor, *, batch_size: int = 256) -> torch.Tensor:
        """(N, 3, S, S) normalised images -> (N, D) L2-normalised embeddings."""
        out = []
        for i in range(0, len(images), batch_size):
            feats = self.model.encode_image(images[i:i + batch_size].to(self.device))
            out.append(torch.nn.functional.normalize(feats.float(), dim=-1))
        return torch.cat(out) if out else torch.zeros(0, self.embed_dim)

    def normalise(self, images_uint8: torch.Tensor) -> torch.Tensor:
        """(N, S, S, 3) uint8 RGB -> (N, 3, S, S) float normalised for this CLIP."""
        x = images_uint8.permute(0, 3, 1, 2).float() / 255.0
        m = torch.tensor(self.mean).view(1, 3, 1, 1)
        s = torch.tensor(self.std).view(1, 3, 1, 1)
        return (x - m) / s

    def crop_boxes(self, image: torch.Tensor, boxes: torch.Tensor, *, enlarge: float = 1.2,
                   min_size: float = 10.0) -> torch.Tensor:
        """EZSD crops of boxes of one (3, H, W) uint8 image -> (N, 3, S, S) normalised."""
        return crop_and_resize(image, boxes, out_size=self.image_size, mean=self.mean, std=self.std,
                               enlarge=enlarge, min_size=min_size)


def _closest(name: str, options: Iterable[str]) -> str:
    near = difflib.get_close_matches(name, list(options), n=3, cutoff=0.5)
    return f" Did you mean: {', '.join(near)}?" if near else ""


def verify_checkpoint(folder: str | Path) -> dict:
    """Check a project CLIP folder against its manifest and return the manifest.

    Raises:
        ClipCheckpointError: missing files, unreadable manifest, or weights whose sha256
            differs from the manifest's.
    """
    folder = Path(folder)
    for f in (CONFIG_FILE, WEIGHTS_FILE, MANIFEST_FILE):
        if not (folder / f).is_file():
            raise ClipCheckpointError(f"CLIP checkpoint {folder} is missing {f}")
    try:
        manifest = json.loads((folder / MANIFEST_FILE).read_text())
    except json.JSONDecodeError as e:
        raise ClipCheckpointError(f"{folder / MANIFEST_FILE} is not valid JSON: {e}") from e
    if manifest.get("format") != MANIFEST_FORMAT:
        raise ClipCheckpointError(f"{folder / MANIFEST_FILE}: format {manifest.get('format')!r}, "
                                  f"expected {MANIFEST_FORMAT!r}")
    expected = manifest.get("weights", {}).get("sha256")
    actual = sha256_file(folder / WEIGHTS_FILE)
    if expected != actual:
        raise ClipCheckpointError(
            f"{folder / WEIGHTS_FILE} has sha256 {actual}, but its manifest says {expected}: "
            "the weights were changed or corrupted after they were written")
    return manifest


def load_clip(model: str, pretrained: str | None = None, *, device: str | torch.device = "cpu") -> ClipModel:
    """Load a CLIP.

    Args:
        model: an open_clip model name (`open_clip.list_models()`, e.g. "ViT-B-32", or a project
            architecture such as "ovd-vit-tiny-64"), or the path of a project checkpoint folder
            (optionally written open_clip's way, "local-dir:PATH").
        pretrained: for an open_clip name: a pretrained tag ("openai", "laion2b_s34b_b79k") or
            a local checkpoint file; None gives random weights. Ignored for a folder.
        device: torch device.

    Raises:
        ClipCheckpointError: bad project folder (see `verify_checkpoint`).
        ValueError: unknown model name.
    """
    manifest = None
    path = Path(model.removeprefix("local-dir:"))
    if path.is_dir():
        manifest = verify_checkpoint(path)
        name = str(path.resolve())
        clip, _, _ = open_clip.create_model_and_transforms(f"local-dir:{name}", device=device)
        tokenizer = open_clip.get_tokenizer(f"local-dir:{name}")
    else:
        if model not in open_clip.list_models():
            if os.sep in model or model.startswith("."):
                raise ClipCheckpointError(f"CLIP checkpoint folder {model} does not exist")
            raise ValueError(f"unknown CLIP model {model!r}.{_closest(model, open_clip.list_models())} "
                             "See open_clip.list_models(), or pass a checkpoint folder.")
        if pretrained and not Path(pretrained).is_file() and \
                pretrained not in open_clip.list_pretrained_tags_by_model(model):
            raise ValueError(f"unknown pretrained tag {pretrained!r} for {model}; known: "
                             f"{open_clip.list_pretrained_tags_by_model(model) or 'none'} "
                             "(or pass a local checkpoint file)")
        clip, _, _ = open_clip.create_model_and_transforms(model, pretrained=pretrained, device=device)
        tokenizer = open_clip.get_tokenizer(model)
        name = model if not pretrained else f"{model}:{pretrained}"
    cfg = clip.visual.preprocess_cfg
    size = cfg["size"]
    return ClipModel(model=clip.eval(), tokenizer=tokenizer, name=name,
                     image_size=int(size[0] if isinstance(size, (tuple, list)) else size),
                     mean=tuple(cfg["mean"]), std=tuple(cfg["std"]), manifest=manifest)


def save_clip(clip: ClipModel, folder: str | Path, *, model_cfg: dict, record: dict) -> Path:
    """Write a project CLIP checkpoint folder (weights, open_clip config, manifest).

    Args:
        clip: the model to save.
        folder: destination; files are written under temporary names and renamed, so a killed
            save never leaves a folder that passes `verify_checkpoint`.
        model_cfg: the open_clip architecture config (embed_dim, vision_cfg, text_cfg).
        record: training facts for the manifest (data fingerprint, steps, metrics, parent, ...).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in clip.model.state_dict().items()}
    tmp_weights = folder / (WEIGHTS_FILE + ".tmp")
    save_file(state, str(tmp_weights))
    digest = sha256_file(tmp_weights)
    config = {"model_cfg": model_cfg, "preprocess_cfg": {
        "size": clip.image_size, "mean": list(clip.mean), "std": list(clip.std),
        "interpolation": "bicubic", "resize_mode": "shortest"}}
    manifest = {"format": MANIFEST_FORMAT, "architecture": model_cfg,
                "tokenizer": "open_clip SimpleTokenizer (BPE, 49408)",
                "context_length": model_cfg.get("text_cfg", {}).get("context_length"),
                "weights": {"file": WEIGHTS_FILE, "sha256": digest}, **record}
    (folder / MANIFEST_FILE).unlink(missing_ok=True)
    for name, payload in ((CONFIG_FILE, config),):
        (folder / (name + ".tmp")).write_text(json.dumps(payload, indent=2))
        os.replace(folder / (name + ".tmp"), folder / name)
    os.replace(tmp_weights, folder / WEIGHTS_FILE)
    (folder / (MANIFEST_FILE + ".tmp")).write_text(json.dumps(manifest, indent=2))
    os.replace(folder / (MANIFEST_FILE + ".tmp"), folder / MANIFEST_FILE)
    return folder


def architecture_config(name: str) -> dict:
    """The open_clip architecture config of a registered model name."""
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise ValueError(f"unknown CLIP model {name!r}.{_closest(name, open_clip.list_models())}")
    return cfg
