"""Tests for ovd.models.clip.model: loading by name, file and folder; save/verify round trip."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ovd.models.clip.model import (
    CONFIG_FILE,
    MANIFEST_FILE,
    MANIFEST_FORMAT,
    WEIGHTS_FILE,
    ClipCheckpointError,
    architecture_config,
    load_clip,
    save_clip,
    sha256_file,
    verify_checkpoint,
)

ARCH = "ovd-vit-tiny-64"
TEXTS = ["a photo of a red disk", "blue star", "a green cross next to a white hexagon"]
RECORD = {"name": "unit-test", "stage": "test", "training": {"data": {"fingerprint": "abc"}}}


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    return load_clip(ARCH)


@pytest.fixture(scope="module")
def images(clip) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randn(4, 3, clip.image_size, clip.image_size, generator=g)


@pytest.fixture(scope="module")
def saved(clip, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("clip") / "ckpt"
    assert save_clip(clip, folder, model_cfg=architecture_config(ARCH), record=RECORD) == folder
    return folder


@pytest.fixture
def saved_copy(saved, tmp_path) -> Path:
    return Path(shutil.copytree(saved, tmp_path / "ckpt"))


# ---------------------------------------------------------------- the model

def test_random_model_properties(clip):
    cfg = json.loads((Path(__file__).parents[1] / "models" / "clip" / "model_configs"
                      / f"{ARCH}.json").read_text())
    assert clip.name == ARCH
    assert clip.manifest is None
    assert clip.image_size == cfg["vision_cfg"]["image_size"] == 64
    assert clip.embed_dim == cfg["embed_dim"]
    assert clip.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))
    assert clip.std == pytest.approx((0.26862954, 0.26130258, 0.27577711))
    assert not clip.model.training
    assert clip.device == torch.device("cpu")
    assert clip.tokenizer(TEXTS).shape == (len(TEXTS), cfg["text_cfg"]["context_length"])


def test_encode_text_normalised(clip):
    emb = clip.encode_text(TEXTS)
    assert emb.shape == (len(TEXTS), clip.embed_dim)
    assert emb.dtype == torch.float32
    assert torch.allclose(emb.norm(dim=1), torch.ones(len(TEXTS)), atol=1e-5)
    assert not torch.allclose(emb[0], emb[1])
    # Batching does not change the result.
    assert torch.allclose(clip.encode_text(TEXTS, batch_size=1), emb, atol=1e-5)
    assert clip.encode_text([]).shape == (0, clip.embed_dim)


def test_text_embeddings_use_the_template(clip):
    emb = clip.text_embeddings(["red disk", "blue star"], "a photo of a {}")
    assert torch.allclose(emb, clip.encode_text(["a photo of a red disk", "a photo of a blue star"]))


def test_encode_images_and_normalise(clip, images):
    emb = clip.encode_images(images)
    assert emb.shape == (len(images), clip.embed_dim)
    assert torch.allclose(emb.norm(dim=1), torch.ones(len(images)), atol=1e-5)
    pixels = torch.full((2, 64, 64, 3), 255, dtype=torch.uint8)
    x = clip.normalise(pixels)
    assert x.shape == (2, 3, 64, 64)
    expected = (1 - torch.tensor(clip.mean)) / torch.tensor(clip.std)
    assert torch.allclose(x[0, :, 5, 7], expected)


def test_crop_boxes_uses_the_model_input_size(clip):
    image = torch.zeros((3, 96, 96), dtype=torch.uint8)
    crops = clip.crop_boxes(image, torch.tensor([[10.0, 10.0, 30.0, 40.0], [0, 0, 96, 96]]))
    assert crops.shape == (2, 3, clip.image_size, clip.image_size)


# ---------------------------------------------------------------- save / load folder

def test_save_writes_manifest_and_no_temporaries(clip, saved):
    assert sorted(p.name for p in saved.iterdir()) == sorted([CONFIG_FILE, WEIGHTS_FILE,
                                                             MANIFEST_FILE])
    manifest = json.loads((saved / MANIFEST_FILE).read_text())
    assert manifest["format"] == MANIFEST_FORMAT
    assert manifest["weights"] == {"file": WEIGHTS_FILE, "sha256": sha256_file(saved / WEIGHTS_FILE)}
    assert manifest["architecture"] == architecture_config(ARCH)
    assert manifest["context_length"] == 24
    assert manifest["training"] == RECORD["training"] and manifest["name"] == "unit-test"
    config = json.loads((saved / CONFIG_FILE).read_text())
    assert config["model_cfg"] == architecture_config(ARCH)
    assert config["preprocess_cfg"]["size"] == clip.image_size
    assert verify_checkpoint(saved) == manifest


def test_folder_round_trip_gives_identical_embeddings(clip, saved, images):
    loaded = load_clip(str(saved))
    assert loaded.name == str(saved.resolve())
    assert loaded.manifest == verify_checkpoint(saved)
    assert (loaded.image_size, loaded.mean, loaded.std) == (clip.image_size, clip.mean, clip.std)
    assert torch.equal(loaded.tokenizer(TEXTS), clip.tokenizer(TEXTS))
    with torch.no_grad():
        assert torch.equal(loaded.encode_text(TEXTS), clip.encode_text(TEXTS))
        assert torch.equal(loaded.encode_images(images), clip.encode_images(images))
    a, b = clip.model.state_dict(), loaded.model.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_tampered_weights_are_rejected(saved_copy):
    weights = saved_copy / WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(ClipCheckpointError, match="sha256"):
        verify_checkpoint(saved_copy)
    with pytest.raises(ClipCheckpointError, match="sha256"):
        load_clip(str(saved_copy))


@pytest.mark.parametrize("missing", [MANIFEST_FILE, WEIGHTS_FILE, CONFIG_FILE])
def test_missing_file_is_rejected(saved_copy, missing):
    (saved_copy / missing).unlink()
    with pytest.raises(ClipCheckpointError, match=f"missing {missing}"):
        verify_checkpoint(saved_copy)
    with pytest.raises(ClipCheckpointError, match=f"missing {missing}"):
        load_clip(str(saved_copy))


def test_bad_manifest_is_rejected(saved_copy):
    manifest = saved_copy / MANIFEST_FILE
    good = json.loads(manifest.read_text())
    manifest.write_text("{not json")
    with pytest.raises(ClipCheckpointError, match="not valid JSON"):
        verify_checkpoint(saved_copy)
    manifest.write_text(json.dumps({**good, "format": "ovd-clip/0"}))
    with pytest.raises(ClipCheckpointError, match="ovd-clip/0"):
        verify_checkpoint(saved_copy)


# ---------------------------------------------------------------- names, tags, files

def test_unknown_model_name_suggests_close_names():
    with pytest.raises(ValueError, match="ViT-B-32") as info:
        load_clip("ViT-B-3")
    assert not isinstance(info.value, ClipCheckpointError)
    assert "unknown CLIP model 'ViT-B-3'" in str(info.value)
    with pytest.raises(ValueError, match="ovd-vit-tiny-64"):
        architecture_config("ovd-vit-tiny-6")
    assert architecture_config(ARCH)["embed_dim"] == 128


def test_missing_folder_path_is_a_checkpoint_error(tmp_path):
    with pytest.raises(ClipCheckpointError, match="does not exist"):
        load_clip(str(tmp_path / "no-such-checkpoint"))
    with pytest.raises(ClipCheckpointError, match="does not exist"):
        load_clip("./no-such-checkpoint")


def test_unknown_pretrained_tag():
    with pytest.raises(ValueError, match="unknown pretrained tag 'openai'"):
        load_clip(ARCH, pretrained="openai")


def test_pretrained_local_file(clip, images, tmp_path):
    state = {k: v.detach().contiguous() for k, v in clip.model.state_dict().items()}
    path = tmp_path / "weights.safetensors"
    save_file(state, str(path))
    torch.manual_seed(123)  # a different random init, overwritten by the file
    loaded = load_clip(ARCH, pretrained=str(path))
    assert loaded.name == f"{ARCH}:{path}"
    assert loaded.manifest is None
    with torch.no_grad():
        assert torch.equal(loaded.encode_text(TEXTS), clip.encode_text(TEXTS))
        assert torch.equal(loaded.encode_images(images), clip.encode_images(images))
    # Control: without the file the same seed gives other weights.
    torch.manual_seed(123)
    other = load_clip(ARCH)
    assert not torch.allclose(other.encode_text(TEXTS), clip.encode_text(TEXTS))
