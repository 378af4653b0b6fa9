"""The deployable artifact: export, verified load, identical predictions, tamper detection."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from detectron2.modeling import build_model

from ovd.models.clip.model import architecture_config, load_clip, save_clip
from ovd.models.exported import ExportError, load_export, verify_export, write_export
from ovd.training.train_detector import build_config

ARCH = "ovd-vit-tiny-64"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    clip = load_clip(ARCH)
    dim = clip.embed_dim
    cfg = build_config("configs/detector/synthetic_r18_fpn.yaml", [
        "MODEL.OVD.EMBED_DIM", dim, "MODEL.ROI_HEADS.NUM_CLASSES", 2,
        "MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.0, "INPUT.MIN_SIZE_TEST", 64, "INPUT.MAX_SIZE_TEST", 64])
    model = build_model(cfg).eval()
    model.train_text = F.normalize(torch.randn(2, dim), dim=1)
    out = tmp_path_factory.mktemp("export")
    write_export(out, model=model, cfg=cfg, clip=clip, clip_arch=architecture_config(ARCH),
                 manifest_fields={"name": "t", "version": "0", "categories": [], "metrics": {}})
    return out, model, clip


def _image():
    g = torch.Generator().manual_seed(3)
    return [{"image": torch.randint(0, 255, (3, 64, 64), generator=g, dtype=torch.uint8),
             "height": 64, "width": 64}]


def test_roundtrip_gives_identical_predictions_and_text(exported):
    out, model, clip = exported
    loaded = load_export(out)
    names = ["red ring", "a thing never seen"]
    text = clip.text_embeddings(names)
    assert torch.allclose(loaded.text_embeddings(names), text, atol=1e-6)
    with torch.inference_mode():
        a = model(_image(), text=text)[0]["instances"]
        b = loaded.model(_image(), text=text)[0]["instances"]
    assert len(a) > 0
    assert torch.equal(a.pred_boxes.tensor, b.pred_boxes.tensor) and torch.equal(a.scores, b.scores)
    assert not hasattr(loaded.text.model, "visual")


def test_manifest_lists_every_file_with_its_hash(exported):
    out, _, _ = exported
    m = verify_export(out)
    assert m["format"] == "ovd-detector/1" and m["prompt_template"] == "a photo of a {}"
    assert set(m["files"]) == {"detector", "config", "text_encoder", "text_config"}
    assert m["input"]["boxes"].startswith("[x1, y1, x2, y2]")


def test_tampered_or_missing_files_are_refused(exported, tmp_path):
    import shutil

    out, _, _ = exported
    copy = tmp_path / "e"
    shutil.copytree(out, copy)
    w = copy / "detector.safetensors"
    data = bytearray(w.read_bytes())
    data[-1] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(ExportError, match="sha256"):
        load_export(copy)
    shutil.copy(out / "detector.safetensors", w)
    verify_export(copy)
    (copy / "text_encoder.json").unlink()
    with pytest.raises(ExportError, match="missing text_encoder.json"):
        verify_export(copy)
    (copy / "manifest.json").write_text("{not json")
    with pytest.raises(ExportError, match="not valid JSON"):
        verify_export(copy)
    (copy / "manifest.json").unlink()
    with pytest.raises(ExportError, match="missing manifest.json"):
        verify_export(copy)
    (copy / "manifest.json").write_text(json.dumps({"format": "other/9"}))
    with pytest.raises(ExportError, match="format"):
        verify_export(copy)


def test_float16_export_is_half_the_size_and_close_to_float32(exported, tmp_path):
    out, model, clip = exported
    cfg = build_config(out / "detector.yaml")
    half = tmp_path / "half"
    write_export(half, model=model, cfg=cfg, clip=clip, clip_arch=architecture_config(ARCH),
                 manifest_fields={"name": "t", "version": "0", "categories": [], "metrics": {}},
                 dtype="float16")
    assert verify_export(half)["weights_dtype"] == "float16"
    for f in ("detector.safetensors", "text_encoder.safetensors"):
        ratio = (half / f).stat().st_size / (out / f).stat().st_size
        assert 0.45 < ratio < 0.55, (f, ratio)
    loaded = load_export(half)
    assert next(loaded.model.parameters()).dtype == torch.float32  # computes in float32
    names = ["red ring", "blue star"]
    assert F.cosine_similarity(loaded.text_embeddings(names), clip.text_embeddings(names)).min() > 0.999
    with torch.inference_mode():
        a = model.encode(_image())[0]
        b = loaded.model.encode(_image())[0]
    # A random model's objectness scores nearly tie, so rounding may reorder proposals: match
    # each of the float32 model's best 20 to its nearest float16 proposal.
    dist, match = (a.proposals[:20, None] - b.proposals[None]).abs().amax(-1).min(1)
    assert dist.max() < 0.5
    assert F.cosine_similarity(a.embeddings[:20], b.embeddings[match]).min() > 0.99
    with pytest.raises(ValueError, match="dtype"):
        write_export(tmp_path / "bad", model=model, cfg=cfg, clip=clip, clip_arch=architecture_config(ARCH),
                     manifest_fields={}, dtype="int8")


def test_export_records_no_path_of_the_build_machine(exported, tmp_path):
    """A CLIP loaded from a folder is recorded by the folder's name; no absolute path or
    output folder of the machine that exported it reaches the manifest or detector.yaml."""
    out, model, clip = exported
    folder = tmp_path / "deep" / "renorm"
    save_clip(clip, folder, model_cfg=architecture_config(ARCH), record={"name": "renorm"})
    named = load_clip(str(folder))
    cfg = build_config("configs/detector/synthetic_r18_fpn.yaml", [
        "MODEL.OVD.EMBED_DIM", clip.embed_dim, "MODEL.ROI_HEADS.NUM_CLASSES", 2, "OUTPUT_DIR", str(tmp_path)])
    export = tmp_path / "export"
    write_export(export, model=model, cfg=cfg, clip=named, clip_arch=architecture_config(ARCH),
                 manifest_fields={"name": "t", "version": "0", "categories": [], "metrics": {}})
    manifest = json.loads((export / "manifest.json").read_text())
    assert manifest["clip"]["name"] == "renorm"
    for f in ("manifest.json", "detector.yaml"):
        assert str(tmp_path) not in (export / f).read_text(), f
