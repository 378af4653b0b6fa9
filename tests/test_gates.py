"""The stage gates (ovd.training.gates) and the data-derived anchor grid they judge."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ovd.training.gates import (
    HeldOut,
    bootstrap_ratio_ci,
    detector_gate,
    format_gates,
    grid_coverage,
    mcnemar_exact_p,
    paired_accuracy,
    proposal_quality,
    top_confusions,
    wilson_ci,
)
from ovd.training.proposals import AnchorGrid, ProposalConfig


def test_wilson_and_mcnemar_by_hand():
    # Wilson 7/10: (p + z^2/2n +- z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n).
    z = 1.959964
    centre, half = (0.7 + z * z / 20) / (1 + z * z / 10), \
        z * math.sqrt(0.021 + z * z / 400) / (1 + z * z / 10)
    assert wilson_ci(7, 10) == pytest.approx([centre - half, centre + half], abs=1e-6)
    assert all(math.isnan(x) for x in wilson_ci(0, 0))
    # 3 vs 12 discordant pairs: 2 * P(X <= 3), X ~ Bin(15, 1/2) = 2 * 576 / 32768.
    assert mcnemar_exact_p(3, 12) == pytest.approx(2 * 576 / 32768)
    assert mcnemar_exact_p(12, 3) == pytest.approx(2 * 576 / 32768)
    assert mcnemar_exact_p(0, 0) == 1.0 and mcnemar_exact_p(5, 5) == pytest.approx(1.0)


def test_paired_accuracy_by_hand():
    before = np.array([1, 1, 0, 0, 0, 1, 0, 0, 1, 0], bool)
    after = np.array([1, 1, 1, 1, 1, 0, 1, 0, 1, 0], bool)
    r = paired_accuracy(before, after)
    assert (r["n"], r["acc_before"], r["acc_after"]) == (10, 0.4, 0.7)
    assert (r["only_before"], r["only_after"]) == (1, 4)
    assert r["diff"] == pytest.approx(0.3)
    se = math.sqrt(5 - 10 * 0.09) / 10
    assert r["diff_ci95"] == pytest.approx([0.3 - 1.959964 * se, 0.3 + 1.959964 * se])
    assert r["mcnemar_p"] == pytest.approx(2 * 6 / 32)  # 2 * P(X <= 1), X ~ Bin(5, 1/2)


def test_bootstrap_ratio_ci_brackets_the_ratio_and_is_seeded():
    rng = np.random.default_rng(1)
    den = rng.integers(1, 6, size=200)
    num = rng.binomial(den, 0.6)
    ci = bootstrap_ratio_ci(num, den)
    assert ci[0] < num.sum() / den.sum() < ci[1]
    assert 0.5 < ci[0] and ci[1] < 0.7
    assert bootstrap_ratio_ci(num, den) == ci


@pytest.fixture
def held(tmp_path) -> HeldOut:
    """Two 100 x 200 images: a base box and a novel box in image 1, one novel box in image 2."""
    for i in (1, 2):
        Image.new("RGB", (200, 100), (i * 50, 0, 0)).save(tmp_path / f"{i}.png")
    coco = {
        "images": [{"id": i, "file_name": f"{i}.png", "height": 100, "width": 200} for i in (1, 2)],
        "categories": [{"id": 1, "name": "disk", "split": "base"},
                       {"id": 2, "name": "red ring", "split": "novel"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20]},
            {"id": 2, "image_id": 1, "category_id": 2, "bbox": [100, 40, 30, 30]},
            {"id": 3, "image_id": 2, "category_id": 2, "bbox": [50, 50, 16, 16]},
            {"id": 4, "image_id": 2, "category_id": 2, "bbox": [0, 0, 90, 90], "iscrowd": 1},
        ],
    }
    path = tmp_path / "all.json"
    path.write_text(json.dumps(coco))
    return HeldOut.load(path, tmp_path)


def test_heldout_reads_novel_boxes_without_crowds(held):
    assert held.names == ["disk", "red ring"]
    assert torch.equal(held.novel_boxes(1), torch.tensor([[100.0, 40.0, 130.0, 70.0]]))
    assert torch.equal(held.novel_boxes(2), torch.tensor([[50.0, 50.0, 66.0, 66.0]]))
    assert held.novel_boxes(99).shape == (0, 4)


def test_heldout_without_novel_categories_is_refused(tmp_path):
    path = tmp_path / "base.json"
    path.write_text(json.dumps({"images": [], "annotations": [],
                                "categories": [{"id": 1, "name": "a"}]}))
    with pytest.raises(ValueError, match="novel"):
        HeldOut.load(path)


def test_proposal_quality_by_hand(held):
    proposals = {
        1: torch.tensor([[100.0, 40.0, 130.0, 70.0],    # the novel object, exactly
                         [101.0, 41.0, 131.0, 71.0],    # again (IoU 0.88): counts once in recall
                         [10.0, 10.0, 30.0, 30.0]]),    # the base object: not novel
        2: torch.tensor([[0.0, 0.0, 10.0, 10.0]]),      # misses its novel object
    }
    r = proposal_quality(proposals, held)
    assert r["images"] == 2 and r["novel_objects"] == 2
    assert r["novel_recall50"] == 0.5
    assert r["precision50"] == 0.5  # 2 of 4 proposals lie on a novel object
    assert r["proposals_per_image"] == 2.0


def test_grid_coverage_paper_grid_misses_small_objects_the_auto_grid_covers(held):
    paper = AnchorGrid.from_config(ProposalConfig())
    auto = AnchorGrid.from_config(ProposalConfig(stride="auto", sizes="auto"),
                                  [held.boxes[i] for i in held.boxes])
    cov_paper, cov_auto = grid_coverage(paper, held), grid_coverage(auto, held)
    assert cov_paper["objects"] == cov_auto["objects"] == 3
    assert cov_paper["novel"] < 1.0  # the 16-px object has no 32-px anchor at IoU 0.5
    assert cov_auto["all"] == 1.0
    assert cov_auto["anchors_per_image"] > cov_paper["anchors_per_image"]


def test_auto_sizes_ladder_covers_the_box_size_range():
    sides = torch.tensor([10.0, 12.0, 20.0, 30.0, 40.0, 55.0, 60.0])
    boxes = torch.stack([torch.zeros(7), torch.zeros(7), sides, sides], dim=1)
    sizes = AnchorGrid.sizes_from_boxes([boxes], (0.0, 1.0), math.sqrt(2))
    # [10, 60] needs ceil(log(6) / log(sqrt 2)) = 6 bins of factor sqrt 2, centred.
    assert len(sizes) == 6
    assert sizes[0] == pytest.approx(10 * 2 ** 0.25, abs=0.05)
    ratios = np.array(sizes[1:]) / np.array(sizes[:-1])
    assert np.allclose(ratios, math.sqrt(2), atol=0.01)
    assert sizes[-1] * 2 ** 0.25 >= 60
    with pytest.raises(ValueError, match="sizes explicitly"):
        AnchorGrid.sizes_from_boxes([torch.zeros(0, 4)], (0.0, 1.0), 2.0)


def test_auto_stride_is_half_each_size():
    cfg = ProposalConfig(stride="auto", sizes=(16.0, 32.0, 64.0), ratios=(1.0,))
    grid = AnchorGrid.from_config(cfg)
    assert grid.strides == (8, 16, 32)
    a = grid.anchors((64, 64))
    # Per size: (64 / stride)^2 centres, minus clipped duplicates and thin boxes.
    assert len(a) == len(torch.unique(a, dim=0))
    small = a[(a[:, 2] - a[:, 0] == 16) & (a[:, 3] - a[:, 1] == 16)]
    assert len(small) == 6 * 6  # the inner 16-px anchors on the 8-px grid


@pytest.mark.parametrize("bad", [{"stride": "fine"}, {"sizes": "big"}, {"stride": 0},
                                 {"auto_step": 1.0}, {"auto_quantiles": (0.5, 0.1)}])
def test_grid_config_validation(bad):
    with pytest.raises(ValueError, match="proposals"):
        ProposalConfig(**bad)


def test_detector_gate_reads_both_checkpoint_versions(tmp_path):
    from safetensors.torch import save_file

    prefix = "roi_heads.box_predictor.classifier."
    v1 = {prefix + "background": torch.tensor([60.0, 80.0]),
          prefix + "log_temperature": torch.tensor(math.log(52.0))}
    assert detector_gate(v1) == pytest.approx({"background_norm": 1.0, "temperature": 52.0})
    v2 = {prefix + "background.weight": torch.tensor([[3.0, 4.0]]),
          prefix + "log_temperature": torch.tensor(math.log(20.0)), "other": torch.zeros(1)}
    save_file(v2, str(tmp_path / "detector.safetensors"))
    torch.save({"model": v2}, tmp_path / "model_final.pth")
    for f in ("detector.safetensors", "model_final.pth"):
        assert detector_gate(Path(tmp_path / f)) == pytest.approx(
            {"background_norm": 5.0, "temperature": 20.0})
    with pytest.raises(ValueError, match="no text classifier"):
        detector_gate({"x": torch.zeros(1)})


def test_renorm_gate_pairs_the_same_crops(held):
    from ovd.models.clip.model import load_clip
    from ovd.training.gates import renorm_gate

    torch.manual_seed(0)
    before = load_clip("ovd-vit-tiny-64")
    torch.manual_seed(1)
    after = load_clip("ovd-vit-tiny-64")
    g = renorm_gate(before, after, held)
    assert g["base"]["n"] == 1 and g["novel"]["n"] == 2  # the crowd box is no crop
    for grp in ("base", "novel"):
        r = g[grp]
        assert r["diff"] == pytest.approx(r["acc_after"] - r["acc_before"])
        assert len(r["diff_ci95_images"]) == 2
    same = renorm_gate(before, before, held)
    assert same["novel"]["diff"] == 0 and same["novel"]["mcnemar_p"] == 1.0
    assert set(g) >= {"base", "novel"} and "novel_both" not in g  # untagged: no tier rows


def test_renorm_gate_per_tier_where_categories_are_tagged(held):
    """World v2 tags novel categories with tiers; the gate then reports each tier too."""
    from ovd.models.clip.model import load_clip
    from ovd.training.gates import renorm_gate

    coco = json.loads(held.json_file.read_text())
    coco["categories"][0]["tier"] = "base"
    coco["categories"][1]["tier"] = "novel_both"
    held.json_file.write_text(json.dumps(coco))
    tagged = HeldOut.load(held.json_file, held.image_root)
    assert tagged.tiers == ["base", "novel_both"]
    torch.manual_seed(0)
    clip = load_clip("ovd-vit-tiny-64")
    g = renorm_gate(clip, clip, tagged)
    assert g["novel_both"]["n"] == g["novel"]["n"] == 2
    assert "novel_both" in format_gates({"renorm": g})


def test_ovd_gates_on_a_users_coco_json_measures_what_it_can(held, tmp_path, capsys):
    """`ovd gates` on any COCO dataset: the renorm gate from two CLIP folders and an eval json;
    the stages that were not run are reported as skipped, with what they need."""
    from ovd.models.clip.model import architecture_config, load_clip, save_clip
    from ovd.training.cli import main

    for seed, name in ((0, "before"), (1, "after")):
        torch.manual_seed(seed)
        save_clip(load_clip("ovd-vit-tiny-64"), tmp_path / name,
                  model_cfg=architecture_config("ovd-vit-tiny-64"), record={"stage": "test"})
    out = tmp_path / "g.json"
    assert main(["gates", "--root", str(tmp_path / "run"), "--parent-clip", str(tmp_path / "before"),
                 "--clip", str(tmp_path / "after"), "--eval-json", str(held.json_file),
                 "--eval-images", str(held.image_root), "--heldout-json", str(held.json_file),
                 "--heldout-images", str(held.image_root), "--out", str(out)]) == 0
    gates = json.loads(out.read_text())
    assert gates["renorm"]["novel"]["n"] == 2
    assert set(gates["skipped"]) == {"proposals", "targets", "detector"}
    assert (tmp_path / "after" / "gates.json").is_file()
    printed = capsys.readouterr().out
    assert "renorm    novel" in printed and "proposals skipped" in printed


def test_top_confusions_counts_errors_by_pair():
    names = ["red disk", "red ring", "black bolt"]
    label = np.array([0, 0, 0, 1, 1, 2, 0])
    predicted = np.array([2, 2, 0, 2, 0, 2, 1])
    assert top_confusions(predicted, label, names) == [
        ["red disk", "black bolt", 2], ["red disk", "red ring", 1], ["red ring", "red disk", 1],
        ["red ring", "black bolt", 1]]
    assert top_confusions(predicted, label, names, k=1) == [["red disk", "black bolt", 2]]
    assert top_confusions(label, label, names) == []
