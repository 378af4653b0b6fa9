"""Tests for ovd.training.clip_pretrain (checkpoint, manifest, resume) and ovd.training.clip_eval."""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
import torch
from progress_testing import Recorder
from safetensors.torch import load_file

from ovd.models.clip.model import WEIGHTS_FILE, load_clip, verify_checkpoint
from ovd.training.clip_eval import format_report, zero_shot_report
from ovd.training.clip_pretrain import (
    CaptionCorpus,
    PretrainConfig,
    _lr_at,
    augment,
    pretrain_clip,
)
from ovd.training.data.coco_format import load_coco_json

CFG = PretrainConfig(steps=4, batch_size=16, checkpoint_every=2, warmup_steps=1, threads=1)
NUM_CAPTIONS = 64


@pytest.fixture(scope="module", autouse=True)
def _restore_torch_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def world(make_world) -> Path:
    return make_world(num_captions=NUM_CAPTIONS)


@pytest.fixture(scope="module")
def full_run(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("pretrain") / "full"
    progress = Recorder()
    clip = pretrain_clip(world, out, CFG, progress=progress)
    return clip, out, progress


@pytest.fixture(scope="module")
def interrupted(world, tmp_path_factory) -> Path:
    """A run killed during its 3rd step: the resume checkpoint of step 2 is on disk."""
    out = tmp_path_factory.mktemp("pretrain") / "interrupted"
    with pytest.raises(KeyboardInterrupt):
        pretrain_clip(world, out, CFG, progress=Recorder(stop_after=3))
    return out


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / WEIGHTS_FILE)


# ---------------------------------------------------------------- pretraining

def test_pretrain_writes_a_verified_checkpoint(world, full_run):
    clip, out, progress = full_run
    manifest = verify_checkpoint(out)
    assert clip.manifest == manifest
    assert clip.name == str(out.resolve())
    world_json = json.loads((world / "world.json").read_text())
    training = manifest["training"]
    assert training["data"]["fingerprint"] == world_json["fingerprint"]
    assert training["data"]["samples"] == NUM_CAPTIONS
    assert training["config"] == json.loads(json.dumps(asdict(CFG)))
    assert math.isfinite(training["final_loss"]) and training["final_loss"] > 0
    assert manifest["stage"] == "clip_pretrain" and manifest["name"] == "full"
    assert not (out / "resume").exists()
    assert progress.opened == [("clip pretrain", CFG.steps, 0)]
    assert [n for n, _ in progress.updates] == [1] * CFG.steps
    assert all(float(p["loss"]) > 0 for _, p in progress.updates)


def test_pretraining_changes_the_weights(full_run):
    torch.manual_seed(CFG.seed)
    init = load_clip(CFG.architecture).model.state_dict()
    trained = _weights(full_run[1])
    changed = [k for k in init if not torch.equal(init[k], trained[k])]
    assert len(changed) > 0.5 * len(init)


def test_interrupted_run_leaves_a_resume_checkpoint(interrupted):
    state = json.loads((interrupted / "resume" / "state.json").read_text())
    assert state["step"] == 2
    assert state["config"] == json.loads(json.dumps(asdict(CFG)))
    assert (interrupted / "resume" / "model.safetensors").is_file()
    assert (interrupted / "resume" / "optimizer.pt").is_file()
    assert not (interrupted / WEIGHTS_FILE).exists()


def test_resume_gives_the_uninterrupted_result(world, full_run, interrupted, tmp_path):
    out = Path(shutil.copytree(interrupted, tmp_path / "run"))
    progress = Recorder()
    clip = pretrain_clip(world, out, CFG, progress=progress)
    assert progress.opened == [("clip pretrain", CFG.steps, 2)]
    assert len(progress.updates) == CFG.steps - 2
    assert not (out / "resume").exists()
    verify_checkpoint(out)
    expected, got = _weights(full_run[1]), _weights(out)
    assert expected.keys() == got.keys()
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], atol=1e-6, rtol=0, msg=k)
    assert clip.manifest["training"]["final_loss"] == pytest.approx(
        full_run[0].manifest["training"]["final_loss"], abs=1e-5)


def test_resume_from_another_config_is_refused(world, interrupted, tmp_path):
    out = Path(shutil.copytree(interrupted, tmp_path / "run"))
    with pytest.raises(ValueError, match="another config or data"):
        pretrain_clip(world, out, replace(CFG, lr=1e-3))
    # Nor from other data.
    state_file = out / "resume" / "state.json"
    state = json.loads(state_file.read_text())
    state_file.write_text(json.dumps({**state, "data": "0" * 64}))
    with pytest.raises(ValueError, match="another config or data"):
        pretrain_clip(world, out, CFG)
    assert (out / "resume" / "model.safetensors").is_file()  # left alone


def test_pretrain_config_from_dict():
    cfg = PretrainConfig.from_dict({"steps": 7, "crop_scale": [0.5, 1.0]})
    assert cfg.steps == 7 and cfg.crop_scale == (0.5, 1.0)
    with pytest.raises(ValueError, match="stepz"):
        PretrainConfig.from_dict({"stepz": 7})


def test_learning_rate_schedule():
    cfg = PretrainConfig(lr=1.0, warmup_steps=2, steps=6)
    lrs = [_lr_at(s, cfg) for s in range(7)]
    assert lrs[:3] == pytest.approx([0.5, 1.0, 1.0])
    assert lrs[4] == pytest.approx(0.5)  # half way through the cosine
    assert lrs[6] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:], strict=False))


def test_augment_is_a_function_of_the_generator():
    x = torch.randn(3, 3, 16, 16)
    a = augment(x, (0.6, 1.0), torch.Generator().manual_seed(5))
    b = augment(x, (0.6, 1.0), torch.Generator().manual_seed(5))
    c = augment(x, (0.6, 1.0), torch.Generator().manual_seed(6))
    assert a.shape == x.shape
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_caption_corpus(world, tmp_path):
    corpus = CaptionCorpus(world)
    assert len(corpus) == NUM_CAPTIONS == len(corpus.images)
    assert CaptionCorpus(world, "eval").images.shape[0] == 16
    with pytest.raises(FileNotFoundError, match="ovd data synth"):
        CaptionCorpus(tmp_path)
    (tmp_path / "captions").mkdir()
    np.save(tmp_path / "captions" / "pretrain.npy", np.zeros((3, 4, 4, 3), np.uint8))
    (tmp_path / "captions" / "pretrain.jsonl").write_text('{"caption": "a"}\n')
    with pytest.raises(ValueError, match="3 images but"):
        CaptionCorpus(tmp_path)


# ---------------------------------------------------------------- zero-shot evaluation

def _check_row(row: dict, n: int) -> None:
    assert row["n"] == n
    assert 0.0 <= row["all"] <= 1.0
    for key in ("base", "novel"):
        assert math.isnan(row[key]) or 0.0 <= row[key] <= 1.0
    # Accuracy counts are whole numbers of correct samples.
    assert row["all"] * n == pytest.approx(round(row["all"] * n), abs=1e-4)


def test_zero_shot_report(world, full_run):
    clip = full_run[0]
    val = load_coco_json(world / "detection" / "annotations" / "val.json")
    eval_rows = [json.loads(line) for line in
                 (world / "captions" / "eval.jsonl").read_text().splitlines()]
    report = zero_shot_report(clip, world)
    assert report["chance"] == pytest.approx(1 / len(val["categories"]))
    assert report["template"] == "a photo of a {}"
    _check_row(report["caption_crops"], len(eval_rows))
    _check_row(report["detection_gt_crops"], len(val["annotations"]))
    # base and novel are the two halves of all.
    novel_ids = {c["id"] for c in val["categories"] if c["split"] == "novel"}
    labels = [c for a in val["annotations"] for c in [a["category_id"]]]
    n_novel = sum(c in novel_ids for c in labels)
    row = report["detection_gt_crops"]
    assert 0 < n_novel < len(labels)
    assert row["all"] == pytest.approx(
        (row["base"] * (len(labels) - n_novel) + row["novel"] * n_novel) / len(labels), abs=1e-6)
    # The novel tiers partition novel.
    tier_of = {c["id"]: c["tier"] for c in val["categories"]}
    tiers = {t: sum(tier_of[c] == t for c in labels) for t in ("novel_comp", "novel_shape", "novel_both")}
    assert sum(tiers.values()) == n_novel
    assert row["novel"] * n_novel == pytest.approx(
        sum(row[t] * n for t, n in tiers.items() if n), abs=1e-4)

    text = format_report(report, "my title")
    lines = text.splitlines()
    assert lines[0] == "my title"
    assert lines[2].startswith("caption-style crops") and lines[2].endswith(f"{len(eval_rows)}")
    assert lines[3].startswith("detection GT crops") and lines[3].endswith(f"{len(labels)}")
    assert lines[4].startswith("chance") and f"{1 / len(val['categories']):.1%}" in lines[4]
    assert lines[1].split()[1:] == ["base", "novel", "all", "novel_comp", "novel_shape", "novel_both", "n"]
    assert f"{report['caption_crops']['all']:.1%}" in lines[2]


def test_zero_shot_report_limits(world, full_run):
    val = load_coco_json(world / "detection" / "annotations" / "val.json")
    first = val["images"][0]["id"]
    report = zero_shot_report(full_run[0], world, max_caption_images=5, max_detection_images=1)
    assert report["caption_crops"]["n"] == 5
    assert report["detection_gt_crops"]["n"] == sum(a["image_id"] == first
                                                    for a in val["annotations"])
