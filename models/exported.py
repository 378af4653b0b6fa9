"""The deployable detector artifact: write it (`ovd export`) and load it (service, eval).

An export folder holds::

    detector.safetensors         detector weights
    detector.yaml                its Detectron2 config
    text_encoder.safetensors     CLIP's text tower (the only CLIP part needed at request time)
    text_encoder.json            open_clip config of that CLIP (architecture + preprocessing)
    manifest.json                ovd-detector/1: categories, CLIP id + hash, prompt template,
                                 input format, metrics on a named split, sha256 of every file

and, after `ovd export --onnx` (models/onnx_export.py), the ONNX graphs of ONNX_FILES with their
input/output contract under the manifest's "onnx" key.

Loading checks every file against the manifest's sha256 first and reads only safetensors,
YAML (safe loader) and JSON: nothing is unpickled.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
from detectron2.config import CfgNode, get_cfg
from detectron2.modeling import build_model
from safetensors.torch import load_file, save_file

from .clip.model import ClipModel
from .detector import OpenVocabRCNN, add_ovd_config
from .manifest import (
    EXPORT_FORMAT,
    FILES,
    ExportError,
    atomic_write,
    sha256_file,
    strict_json,
    verify_export,
)


@dataclass
class ExportedDetector:
    """A loaded export: the detector, CLIP's text tower, and the manifest.

    Attributes:
        model: OpenVocabRCNN in eval mode.
        text: ClipModel whose vision tower is absent (only `encode_text` works).
        manifest: the parsed manifest.json.
    """

    model: OpenVocabRCNN
    text: ClipModel
    manifest: dict

    def text_embeddings(self, names: list[str], template: str | None = None) -> torch.Tensor:
        """(C, D) normalised text embeddings of names in the export's prompt template."""
        return self.text.text_embeddings(names, template or self.manifest["prompt_template"])


WEIGHT_DTYPES = {"float32": torch.float32, "float16": torch.float16}


def _save_tensors(path: Path, tensors: dict, dtype: str = "float32") -> None:
    """Write tensors as safetensors, floating-point ones stored in `dtype` (loading casts them
    back into the float32 model: float16 halves the artifact, see `write_export`)."""
    tensors = {k: v.to(WEIGHT_DTYPES[dtype]) if v.is_floating_point() else v for k, v in tensors.items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp))
    os.chmod(tmp, 0o644)  # readable by a non-root service user through a read-only mount
    os.replace(tmp, path)


def write_export(out_dir: str | Path, *, model: OpenVocabRCNN, cfg: CfgNode, clip: ClipModel,
                 clip_arch: dict, manifest_fields: dict, dtype: str = "float32") -> Path:
    """Write an export folder.

    Args:
        out_dir: destination folder (created).
        model: the trained detector.
        cfg: its Detectron2 config (written as YAML; file paths of training inputs dropped).
        clip: the CLIP whose text tower embeds class names for this detector.
        clip_arch: open_clip architecture config of that CLIP.
        manifest_fields: name, version, categories, metrics, ... merged into the manifest.
        dtype: storage of floating-point weights, "float32" or "float16" (half the size; the
            model still computes in float32 after loading, from weights rounded to float16).

    Returns:
        Path of manifest.json.
    """
    if dtype not in WEIGHT_DTYPES:
        raise ValueError(f"export dtype must be one of {sorted(WEIGHT_DTYPES)}, not {dtype!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "manifest.json").unlink(missing_ok=True)  # an interrupted export never verifies
    _save_tensors(out / FILES["detector"],
                  {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, dtype)
    # A CLIP loaded from a folder is named by its path; the export records the folder's name
    # (and the weights' sha256), never a path of the machine that built it.
    clip_name = Path(clip.name).name if "/" in clip.name or "\\" in clip.name else clip.name
    cfg = cfg.clone()
    cfg.defrost()
    cfg.OUTPUT_DIR = ""
    cfg.MODEL.OVD.CLIP = clip_name
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.OVD.TRAIN_TEXT_EMBEDDINGS = ""
    cfg.DATASETS.REGISTER = []
    cfg.DATASETS.DISTILL_TARGETS = ""
    cfg.MODEL.KD.TEACHER = ""  # a student's teacher: recorded in the manifest (distilled_from)
    cfg.MODEL.DEVICE = "cpu"
    atomic_write(out / FILES["config"], cfg.dump().encode())
    _save_tensors(out / FILES["text_encoder"], {
        k: v.detach().cpu().contiguous() for k, v in clip.model.state_dict().items()
        if not k.startswith("visual.")}, dtype)
    atomic_write(out / FILES["text_config"], json.dumps({
        "model_cfg": clip_arch, "preprocess_cfg": {"size": clip.image_size, "mean": list(clip.mean),
                                                   "std": list(clip.std)}}, indent=2).encode())
    manifest = {
        "format": EXPORT_FORMAT,
        **manifest_fields,
        "prompt_template": cfg.MODEL.OVD.PROMPT_TEMPLATE,
        "embed_dim": cfg.MODEL.OVD.EMBED_DIM,
        "weights_dtype": dtype,
        "clip": {"name": clip_name, "weights_sha256": (clip.manifest or {}).get("weights", {}).get("sha256"),
                 # The words its text tower ever read (a CLIP trained here from scratch), or
                 # None (e.g. an open_clip model pretrained on the web: not restricted).
                 "text_words": (clip.manifest or {}).get("text_words")},
        "input": {"format": cfg.INPUT.FORMAT, "min_size_test": cfg.INPUT.MIN_SIZE_TEST,
                  "max_size_test": cfg.INPUT.MAX_SIZE_TEST,
                  "size_divisibility": int(model.backbone.size_divisibility),
                  "boxes": "[x1, y1, x2, y2] pixels of the original image"},
        "files": {name: {"file": f, "sha256": sha256_file(out / f)} for name, f in FILES.items()},
    }
    atomic_write(out / "manifest.json", strict_json(manifest, indent=2).encode())
    return out / "manifest.json"


def load_export(folder: str | Path, *, device: str = "cpu") -> ExportedDetector:
    """Load a verified export folder (see module docstring)."""
    import ovd.models.detector  # noqa: F401  registers the detector components

    folder = Path(folder)
    manifest = verify_export(folder)
    cfg = get_cfg()
    add_ovd_config(cfg)
    cfg.merge_from_file(str(folder / FILES["config"]), allow_unsafe=False)
    cfg.MODEL.DEVICE = device
    model = build_model(cfg)
    missing, unexpected = model.load_state_dict(load_file(str(folder / FILES["detector"])), strict=False)
    if unexpected or [k for k in missing if k != "train_text"]:
        raise ExportError(f"{folder}: detector weights do not fit its config "
                          f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.eval()
    return ExportedDetector(model=model, text=load_text_encoder(folder, manifest, device=device),
                            manifest=manifest)


def load_text_encoder(folder: str | Path, manifest: dict, *, device: str = "cpu") -> ClipModel:
    """CLIP's text tower of a verified export (a ClipModel whose vision tower is absent)."""
    folder = Path(folder)
    text_cfg = json.loads((folder / FILES["text_config"]).read_text())
    clip_model = open_clip.model.CLIP(**text_cfg["model_cfg"])
    missing, unexpected = clip_model.load_state_dict(load_file(str(folder / FILES["text_encoder"])),
                                                     strict=False)
    if unexpected or [k for k in missing if not k.startswith("visual.")]:
        raise ExportError(f"{folder}: text encoder weights do not fit its config")
    del clip_model.visual  # never used at request time; frees its memory
    ctx = text_cfg["model_cfg"].get("text_cfg", {}).get("context_length", 77)
    pre = text_cfg["preprocess_cfg"]
    return ClipModel(model=clip_model.eval().to(device), tokenizer=open_clip.SimpleTokenizer(context_length=ctx),
                     name=manifest["clip"]["name"], image_size=int(pre["size"]),
                     mean=tuple(pre["mean"]), std=tuple(pre["std"]), manifest=None)
