"""Tests for ovd.training.clip_renorm (EZSD stage 1: LayerNorm-only CLIP fine-tuning)."""

from __future__ import annotations

import argparse
import functools
import json
import math
import shutil
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch
from progress_testing import Recorder
from safetensors.torch import load_file

from ovd.models.clip.model import (
    WEIGHTS_FILE,
    architecture_config,
    load_clip,
    save_clip,
    sha256_file,
    verify_checkpoint,
)
from ovd.training.cli import build_parser
from ovd.training.clip_renorm import (
    GTCropBatches,
    RenormConfig,
    background_boxes,
    base_gt_boxes,
    renorm_clip,
    renorm_loss,
    size_weights,
    step_indices,
    trainable_parameter_names,
)
from ovd.training.data.synthetic import world_datasets

ARCH = "ovd-vit-tiny-64"
# lr well above the paper's 1e-4 so that every LayerNorm moves visibly in a few steps.
CFG = RenormConfig(epochs=2, batch_size=8, lr=1e-3, checkpoint_every=1, threads=1,
                   precision="fp32")


@pytest.fixture(scope="module", autouse=True)
def _restore_torch_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def world(make_world) -> Path:
    return make_world()


@pytest.fixture(scope="module")
def train_data(world) -> tuple[Path, Path]:
    return world_datasets(world)["synth_train"]


@pytest.fixture(scope="module")
def parent(tmp_path_factory) -> Path:
    """A random tiny CLIP saved as a project checkpoint."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("clip") / "parent"
    save_clip(load_clip(ARCH), folder, model_cfg=architecture_config(ARCH),
              record={"name": "parent", "stage": "test"})
    return folder


@pytest.fixture(scope="module")
def full_run(parent, train_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("renorm") / "full"
    progress = Recorder()
    clip = renorm_clip(parent, *train_data, out, CFG, progress=progress)
    return clip, out, progress


@pytest.fixture(scope="module")
def interrupted(parent, train_data, tmp_path_factory) -> Path:
    """A run killed during its 3rd step: the resume checkpoint of step 2 is on disk."""
    out = tmp_path_factory.mktemp("renorm") / "interrupted"
    with pytest.raises(KeyboardInterrupt):
        renorm_clip(parent, *train_data, out, CFG, progress=Recorder(stop_after=3))
    return out


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / WEIGHTS_FILE)


def _num_base_boxes(json_file: Path) -> int:
    coco = json.loads(json_file.read_text())
    base = {c["id"] for c in coco["categories"] if c.get("split", "base") == "base"}
    return sum(a["category_id"] in base for a in coco["annotations"])


# ---------------------------------------------------------------- training

def test_renorm_writes_a_verified_checkpoint_naming_its_parent(parent, train_data, full_run):
    clip, out, progress = full_run
    manifest = verify_checkpoint(out)
    assert clip.manifest == manifest
    assert manifest["stage"] == "clip_renorm" and manifest["name"] == "full"
    parent_manifest = verify_checkpoint(parent)
    assert manifest["parent"] == {"path": str(parent), "sha256": parent_manifest["weights"]["sha256"]}
    assert manifest["architecture"] == parent_manifest["architecture"]
    training = manifest["training"]
    assert training["config"] == json.loads(json.dumps(asdict(CFG)))
    n = _num_base_boxes(train_data[0])
    assert training["data"]["crops"] == n > CFG.batch_size
    assert training["data"]["json_sha256"] == sha256_file(train_data[0])
    coco = json.loads(train_data[0].read_text())
    assert training["data"]["classes"] == [c["name"] for c in coco["categories"]
                                           if c["split"] == "base"]
    steps = CFG.epochs * math.ceil(n / CFG.batch_size)
    assert training["steps"] == steps and len(training["epoch_losses"]) == CFG.epochs
    # The loss used the parent's own frozen logit scale (a random open_clip CLIP: 1/0.07).
    assert training["logit_scale"] == pytest.approx(load_clip(str(parent)).logit_scale)
    assert training["logit_scale"] == pytest.approx(1 / 0.07, rel=1e-5)
    assert training["final_loss"] == training["epoch_losses"][-1] > 0
    assert not (out / "resume").exists()
    assert progress.opened == [("clip renorm", steps, 0)]
    assert [n for n, _ in progress.updates] == [1] * steps


def test_only_layernorms_change(parent, full_run):
    before, after = _weights(parent), _weights(full_run[1])
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("ln_" in k for k in changed)
    assert any(k.startswith("visual.") for k in changed)
    assert any(not k.startswith("visual.") for k in changed)  # vision+text tunes text LNs too
    assert "logit_scale" not in changed


def test_vision_only_leaves_the_text_tower_alone(parent, train_data, tmp_path):
    out = tmp_path / "vision"
    renorm_clip(parent, *train_data, out, replace(CFG, tune="vision", epochs=1))
    before, after = _weights(parent), _weights(out)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("visual.") and "ln_" in k for k in changed)


def test_min_steps_sets_the_update_budget(parent, train_data, tmp_path):
    """The budget is steps, not epochs: min_steps adds epochs until it is reached."""
    n = _num_base_boxes(train_data[0])
    per_epoch = math.ceil(n / CFG.batch_size)
    cfg = replace(CFG, epochs=1, min_steps=per_epoch + 3, checkpoint_every=100)
    clip = renorm_clip(parent, *train_data, tmp_path / "budget", cfg)
    training = clip.manifest["training"]
    assert training["steps"] == per_epoch + 3
    # One loss per epoch begun, the last over its 3 steps only.
    assert len(training["epoch_losses"]) == math.ceil((per_epoch + 3) / per_epoch) > 1


def test_flips_change_the_crops_the_model_sees(parent, train_data, full_run, tmp_path):
    """The same run without the flip augmentation ends elsewhere (EZSD flips its crops)."""
    renorm_clip(parent, *train_data, tmp_path / "noflip", replace(CFG, flip=False))
    flipped, plain = _weights(full_run[1]), _weights(tmp_path / "noflip")
    assert any(not torch.equal(flipped[k], plain[k]) for k in flipped)


def test_logit_scale_from_the_config_overrides_the_clips(parent, train_data, full_run, tmp_path):
    clip = renorm_clip(parent, *train_data, tmp_path / "s100", replace(CFG, logit_scale=100.0))
    assert clip.manifest["training"]["logit_scale"] == 100.0
    a, b = _weights(full_run[1]), _weights(tmp_path / "s100")
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_trainable_parameter_names(parent):
    model = load_clip(str(parent)).model
    vision = trainable_parameter_names(model, "vision")
    both = trainable_parameter_names(model, "vision+text")
    # ln_pre, ln_post and 4 blocks x (ln_1, ln_2), gamma and beta each.
    assert len(vision) == 2 * (2 + 4 * 2)
    # plus ln_final and 2 text blocks x (ln_1, ln_2).
    assert set(both) - set(vision) == {f"{p}.{w}" for w in ("weight", "bias") for p in (
        "ln_final", *(f"transformer.resblocks.{b}.ln_{i}" for b in (0, 1) for i in (1, 2)))}


def test_interrupted_run_leaves_a_resume_checkpoint(interrupted):
    state = json.loads((interrupted / "resume" / "state.json").read_text())
    assert state["step"] == 2
    saved = load_file(interrupted / "resume" / "model.safetensors")
    assert saved and all("ln_" in k for k in saved)  # only the trainable parameters
    assert (interrupted / "resume" / "optimizer.pt").is_file()
    assert not (interrupted / WEIGHTS_FILE).exists()


def test_resume_gives_the_uninterrupted_result(parent, train_data, full_run, interrupted,
                                                tmp_path):
    out = Path(shutil.copytree(interrupted, tmp_path / "run"))
    progress = Recorder()
    # How often it checkpoints does not change the result, so a resume may change it.
    clip = renorm_clip(parent, *train_data, out, replace(CFG, checkpoint_every=100),
                       progress=progress)
    steps = full_run[0].manifest["training"]["steps"]
    assert progress.opened == [("clip renorm", steps, 2)]
    assert len(progress.updates) == steps - 2
    assert not (out / "resume").exists()
    expected, got = _weights(full_run[1]), _weights(out)
    for k in expected:
        assert torch.equal(got[k], expected[k]), k
    training, full = clip.manifest["training"], full_run[0].manifest["training"]
    assert training["epoch_losses"] == pytest.approx(full["epoch_losses"], abs=1e-6)


def test_resume_from_another_run_is_refused(parent, train_data, interrupted, tmp_path):
    out = Path(shutil.copytree(interrupted, tmp_path / "run"))
    with pytest.raises(ValueError, match="another config, parent or data"):
        renorm_clip(parent, *train_data, out, replace(CFG, lr=2e-3))
    state_file = out / "resume" / "state.json"
    state = json.loads(state_file.read_text())
    state_file.write_text(json.dumps({**state, "data": {**state["data"], "parent_sha256": "0"}}))
    with pytest.raises(ValueError, match="another config, parent or data"):
        renorm_clip(parent, *train_data, out, CFG)
    assert (out / "resume" / "model.safetensors").is_file()  # left alone


# ---------------------------------------------------------------- loss, weights, data

def test_renorm_loss_by_hand():
    s = 0.5 ** 0.5
    image = torch.tensor([[1.0, 0.0], [s, s]])
    text = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-1.0, 0.0]])  # normalised inside
    labels = torch.tensor([0, 1])
    # cosines: sample 0 -> [1, 0, -1]; sample 1 -> [s, s, -s]
    cos = [[1.0, 0.0, -1.0], [s, s, -s]]
    onehot = [[1, 0, 0], [0, 1, 0]]

    def bce(z: float, y: int) -> float:
        # -[y log sigmoid(z) + (1 - y) log(1 - sigmoid(z))], in the form that does not
        # overflow at |z| = 100.
        return max(z, 0.0) - y * z + math.log1p(math.exp(-abs(z)))

    per_sample = [sum(bce(100 * c, y) for c, y in zip(cr, yr, strict=True)) / 3
                  for cr, yr in zip(cos, onehot, strict=True)]
    assert renorm_loss(image, text, labels, 100.0).item() == pytest.approx(sum(per_sample) / 2,
                                                                           rel=1e-5)
    w = torch.tensor([0.5, 1.5])
    expected = (0.5 * per_sample[0] + 1.5 * per_sample[1]) / 2
    assert renorm_loss(image, text, labels, 100.0, w).item() == pytest.approx(expected, rel=1e-5)
    # Sample 0: only its negative class 1 at cosine 0 costs anything, log 2.
    assert per_sample[0] == pytest.approx(math.log(2) / 3, rel=1e-6)
    # The largest term: sample 1's positive class at logit 100*s = 70.7 costs ~0; its
    # negative class 0 at the same logit costs ~70.7.
    assert per_sample[1] == pytest.approx(100 * s / 3, rel=1e-3)
    # At another scale the same cosines cost what that scale's logits cost.
    at_15 = [sum(bce(15 * c, y) for c, y in zip(cr, yr, strict=True)) / 3
             for cr, yr in zip(cos, onehot, strict=True)]
    assert renorm_loss(image, text, labels, 15.0).item() == pytest.approx(sum(at_15) / 2, rel=1e-5)


def test_size_weights_by_hand():
    box_wh = torch.tensor([[10.0, 40.0], [100.0, 100.0]])  # sqrt(area) 20 and 100
    image_wh = torch.tensor([[200.0, 200.0], [400.0, 100.0]])  # sqrt(area) 200 and 200
    raw = torch.tensor([math.exp(-0.1), math.exp(-0.5)])
    w = size_weights(box_wh, image_wh)
    torch.testing.assert_close(w, raw / raw.mean())
    assert w.mean().item() == pytest.approx(1.0)
    assert w[0] > w[1]  # the small box weighs more


def test_base_gt_boxes_and_their_crops(parent, train_data):
    clip = load_clip(str(parent))
    data = base_gt_boxes(*train_data, max_images=2)
    coco = json.loads(train_data[0].read_text())
    first = [img["id"] for img in coco["images"][:2]]
    assert len(data) == sum(a["image_id"] in first for a in coco["annotations"])
    assert data.class_names == [c["name"] for c in sorted(coco["categories"], key=lambda c: c["id"])
                                if c["split"] == "base"]
    assert 0 <= data.labels.min() and data.labels.max() < len(data.class_names)
    assert torch.equal(data.image_wh, torch.tensor([[96.0, 96.0]]).expand(len(data), 2))
    # No pixels are held: a batch's crops are cut when it is asked for, each image read once,
    # and equal what cutting every box of every image up front gave (the old stage 1).
    assert all(t.numel() <= 4 * len(data) for t in (data.image_ids, data.boxes, data.labels))
    batches = GTCropBatches(data, functools.partial(clip.crop_boxes, enlarge=1.2))
    upfront = torch.cat([clip.crop_boxes(data.data.read(i), data.boxes[data.image_ids == i], enlarge=1.2)
                         for i in first])
    idx = torch.tensor([len(data) - 1, 0, 2, 1])
    got_idx, crops = batches[idx]
    assert torch.equal(got_idx, idx) and crops.shape == (4, 3, 64, 64) and crops.dtype == torch.float32
    assert torch.equal(crops, upfront[idx])


def test_step_indices_resume_where_they_stopped():
    full = list(step_indices(10, 4, seed=3, start=0, total=7))
    assert [len(i) for i in full] == [4, 4, 2, 4, 4, 2, 4]
    assert sorted(torch.cat(full[:3]).tolist()) == list(range(10))  # an epoch sees every box once
    assert all(torch.equal(a, b) for a, b in zip(full[4:], step_indices(10, 4, seed=3, start=4, total=7), strict=True))


def _sideways_photo(folder: Path) -> tuple[Path, torch.Tensor]:
    """A JPEG stored 60 wide x 30 high with EXIF orientation 6 (shown rotated 90 degrees
    clockwise: upright it is 30 wide x 60 high), its json, and the upright pixels."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    stored = (rng.random((30, 60, 3)) * 255).astype(np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(folder / "phone.jpg", exif=exif, quality=100)
    upright = np.array(Image.open(folder / "phone.jpg").transpose(Image.Transpose.ROTATE_270))
    coco = {"images": [{"id": 1, "file_name": "phone.jpg", "width": 30, "height": 60}],
            "categories": [{"id": 1, "name": "thing", "split": "base"}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 30, 20, 25]}]}
    (folder / "phone.json").write_text(json.dumps(coco))
    return folder / "phone.json", torch.from_numpy(upright).permute(2, 0, 1)


def test_gt_crops_are_cut_from_the_upright_photo(parent, tmp_path):
    """Stage 1 reads images as Detectron2 does (EXIF orientation applied), so the same box
    crops the same pixels in every stage; a plain PIL read would crop the sideways image."""
    from ovd.training.clip_eval import detection_gt_crops

    json_file, upright = _sideways_photo(tmp_path)
    clip = load_clip(str(parent))
    expected = clip.crop_boxes(upright, torch.tensor([[2.0, 30.0, 22.0, 55.0]]), enlarge=1.2)
    got = base_gt_boxes(json_file, tmp_path)  # one base class: a background box is added
    _, crops = GTCropBatches(got, functools.partial(clip.crop_boxes, enlarge=1.2))[torch.arange(len(got))]
    assert torch.allclose(crops[got.labels >= 0], expected)
    assert torch.allclose(detection_gt_crops(clip, json_file, tmp_path)[0], expected)


def test_background_crops_are_the_negatives_of_a_one_class_dataset():
    """EZSD's one-hot BCE has no negative with a single base class (the loss is ~0 from the
    start); a background crop (label -1) is scored against an all-zero target instead."""
    image_emb = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    text_emb = torch.tensor([[1.0, 0.0]])
    loss = renorm_loss(image_emb, text_emb, torch.tensor([0, -1]), logit_scale=10.0)
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    expected = (bce(torch.tensor([10.0]), torch.tensor([1.0])) + bce(torch.tensor([0.0]), torch.tensor([0.0]))) / 2
    assert torch.allclose(loss, expected)

    from torchvision.ops import box_iou

    avoid = torch.tensor([[0.0, 0.0, 50.0, 50.0], [60.0, 60.0, 100.0, 100.0]])
    boxes = background_boxes((100, 120), avoid, 5, torch.Generator().manual_seed(0))
    assert 0 < len(boxes) <= 5
    assert (box_iou(boxes, avoid) < 0.1).all()
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= 120).all() and (boxes[:, 3] <= 100).all()


def test_json_size_that_disagrees_with_the_image_is_refused(parent, tmp_path):
    json_file, _ = _sideways_photo(tmp_path)
    coco = json.loads(json_file.read_text())
    coco["images"][0].update(width=60, height=30)  # the stored, not the upright, size
    json_file.write_text(json.dumps(coco))
    boxes = base_gt_boxes(json_file, tmp_path)  # no pixels read yet; the first batch reads them
    with pytest.raises(ValueError, match="differs from the json's 60x30"):
        GTCropBatches(boxes, load_clip(str(parent)).crop_boxes)[torch.arange(len(boxes))]


def test_json_without_base_annotations_is_refused(parent, train_data, tmp_path):
    coco = json.loads(train_data[0].read_text())
    all_novel = {**coco, "categories": [{**c, "split": "novel"} for c in coco["categories"]]}
    for name, doc in (("novel.json", all_novel), ("empty.json", {**coco, "annotations": []})):
        (tmp_path / name).write_text(json.dumps(doc))
        with pytest.raises(ValueError, match="no annotations of base categories"):
            renorm_clip(parent, tmp_path / name, train_data[1], tmp_path / "out", CFG)
    assert not (tmp_path / "out").exists()


def test_output_folder_must_not_be_the_parent(parent, train_data):
    with pytest.raises(ValueError, match="is the parent checkpoint"):
        renorm_clip(parent, *train_data, parent, CFG)


def test_parent_given_by_open_clip_name(train_data, tmp_path):
    out = tmp_path / "named"
    clip = renorm_clip(ARCH, *train_data, out, replace(CFG, epochs=1, max_images=1))
    assert clip.manifest["architecture"] == architecture_config(ARCH)
    assert clip.manifest["parent"]["path"] == ARCH
    assert len(clip.manifest["parent"]["sha256"]) == 64


def test_config_from_dict_and_validation():
    cfg = RenormConfig.from_dict({"tune": "vision", "epochs": 12, "size_weighting": True})
    assert (cfg.tune, cfg.epochs, cfg.size_weighting, cfg.lr) == ("vision", 12, True, 1e-4)
    with pytest.raises(ValueError, match="epochz"):
        RenormConfig.from_dict({"epochz": 1})
    for bad, match in (({"tune": "text"}, "tune"), ({"epochs": 0}, "epochs"),
                       ({"lr": 0}, "lr"), ({"template": "a photo"}, "template"),
                       ({"precision": "fp16"}, "precision"), ({"max_images": 0}, "max_images")):
        with pytest.raises(ValueError, match=match):
            RenormConfig(**bad)


# ---------------------------------------------------------------- command line

def _parse(argv: list[str]) -> argparse.Namespace:
    """`ovd clip ARGV`, parsed by the real command line."""
    return build_parser().parse_args(["clip", *argv])


def test_cli_help(capsys):
    with pytest.raises(SystemExit) as info:
        _parse(["renorm", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "LayerNorm" in out and "--train-json" in out and "--tune" in out


def test_cli_runs_and_writes_before_after_tables(world, parent, tmp_path, capsys):
    root = tmp_path / "root"
    (root / "clip").mkdir(parents=True)
    (root / "world").symlink_to(world)
    (root / "clip" / "pretrained").symlink_to(parent)
    args = _parse(["renorm", "--root", str(root), "--epochs", "1",
                                 "--tune", "vision", "--threads", "1"])
    assert args.func(args) == 0
    out = root / "clip" / "renorm"
    manifest = verify_checkpoint(out)
    assert manifest["training"]["config"]["tune"] == "vision"
    assert manifest["parent"]["path"] == str(root / "clip" / "pretrained")
    report = json.loads((out / "zero_shot.json").read_text())
    assert set(report) == {"parent", "renorm"}
    for row in ("caption_crops", "detection_gt_crops"):
        assert report["parent"][row]["n"] == report["renorm"][row]["n"] > 0
    printed = capsys.readouterr().out
    assert "before: parent" in printed and "after: re-normalised" in printed
    gate = json.loads((out / "gates.json").read_text())  # the paired test on val's GT crops
    assert gate["novel"]["n"] + gate["base"]["n"] == report["renorm"]["detection_gt_crops"]["n"]
    assert 0 <= gate["novel"]["mcnemar_p"] <= 1 and "McNemar" in printed


_PEAK_SCRIPT = """
import json, sys
from ovd.training.clip_renorm import RenormConfig, renorm_clip
folder, images = sys.argv[2], int(sys.argv[3])
cfg = RenormConfig(tune="vision", epochs=1, min_steps=45, batch_size=64, workers=0, max_images=images,
                   checkpoint_every=1000, precision="fp32")
renorm_clip(sys.argv[1], folder + "/data.json", folder, f"{folder}/out{images}", cfg)
print(json.dumps({"peak_kb": [int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")][0]}))
"""


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="peak RSS from /proc")
def test_renorm_peak_memory_does_not_grow_with_the_dataset(parent, tmp_path):
    """The same 45 steps on 8 and on 96 images of 90 boxes each: holding every 64 px float32 crop
    would add ~370 MB (7,920 more crops x 48 KB); stage 1 holds boxes, so the peak barely moves
    (the peak itself wanders by up to ~50 MB between runs of one process, hence the margin)."""
    import subprocess
    import sys

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    coco = {"images": [], "annotations": [],
            "categories": [{"id": 1, "name": "disk", "split": "base"}, {"id": 2, "name": "ring", "split": "base"}]}
    for k in range(96):
        Image.fromarray(rng.integers(0, 255, (96, 96, 3), dtype=np.uint8)).save(tmp_path / f"{k}.png")
        coco["images"].append({"id": k + 1, "file_name": f"{k}.png", "width": 96, "height": 96})
        for j in range(90):
            x, y = rng.integers(0, 70, 2).tolist()
            coco["annotations"].append({"id": 90 * k + j + 1, "image_id": k + 1, "category_id": 1 + j % 2,
                                        "bbox": [x, y, 20, 20], "area": 400, "iscrowd": 0})
    (tmp_path / "data.json").write_text(json.dumps(coco))
    peaks = {}
    for images in (8, 96):
        done = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(parent), str(tmp_path), str(images)],
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        peaks[images] = json.loads(done.stdout.strip().splitlines()[-1])["peak_kb"] / 1024
    assert peaks[96] - peaks[8] < 120, peaks  # MB (-1 and +52 measured); up-front crops: ~370 MB
