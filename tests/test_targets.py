"""Tests for ovd.training.targets (EZSD stage 3: distillation targets per training image)."""

from __future__ import annotations

import pytest
import torch

from ovd.training.cli import build_parser
from ovd.training.proposals import TrainingImages, clip_identity
from ovd.training.shards import ShardStore
from ovd.training.targets import (
    TargetsConfig,
    image_targets,
    load_targets,
    run_targets,
)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    from ovd.models.clip.model import architecture_config, load_clip, save_clip

    torch.manual_seed(0)
    model = load_clip("ovd-vit-tiny-64")
    folder = tmp_path_factory.mktemp("clip")
    save_clip(model, folder, model_cfg=architecture_config("ovd-vit-tiny-64"), record={"stage": "test"})
    return load_clip(str(folder))


@pytest.fixture(scope="module")
def train(make_world):
    from ovd.training.data.synthetic import world_datasets

    json_file, image_root = world_datasets(make_world(num_train=3, image_size=64))["synth_train"]
    return json_file, image_root


def _fake_proposals(folder, clip, train, counts=(5, 0, 3)):
    """A stage-2 folder with hand-made records: image i gets counts[i] proposals whose
    objectness is a permutation (so the cap must sort) and confidence = 0.1 * (row + 1)."""
    data = TrainingImages.load(*train)
    identity = {"clip": clip_identity(clip), "source": {"json_sha256": data.json_sha256}}
    store = ShardStore(folder, stage="proposals", identity=identity, image_ids=data.image_ids,
                       shard_size=2)
    d = clip.embed_dim

    def compute(image_id):
        n = counts[data.image_ids.index(image_id)]
        g = torch.Generator().manual_seed(image_id)
        return {"boxes": torch.rand(n, 4, generator=g) * 30 + torch.tensor([0, 0, 30, 30]),
                "objectness": torch.randperm(n, generator=g).float(),
                "confidence": 0.1 * (torch.arange(n) + 1).float(),
                "classes": torch.zeros(n, dtype=torch.long),
                "embeddings": torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=-1).half(),
                }, {}

    store.run(compute, desc="fake proposals")
    return folder, data


def test_targets_gt_and_capped_proposals(clip, train, tmp_path):
    proposals, data = _fake_proposals(tmp_path / "p", clip, train)
    reader = run_targets(clip, *train, proposals, tmp_path / "t", TargetsConfig(max_proposals=4))
    assert reader.complete() and load_targets(tmp_path / "t") is not None
    from ovd.training.proposals import load_proposals

    props = load_proposals(proposals)
    for n_props, image_id in zip((5, 0, 3), data.image_ids, strict=True):
        rec = reader[image_id]
        gt = data.gt[image_id][~data.gt_crowd[image_id]]
        n_gt = len(gt)
        is_gt = rec["is_gt"]
        assert is_gt.dtype == torch.bool and is_gt[:n_gt].all() and not is_gt[n_gt:].any()
        assert len(rec["boxes"]) == n_gt + min(n_props, 4)  # capped at max_proposals
        assert torch.equal(rec["boxes"][:n_gt], gt)
        assert (rec["weights"][:n_gt] == 1).all()
        assert rec["embeddings"].dtype == torch.float16
        assert rec["embeddings"].shape == (len(rec["boxes"]), clip.embed_dim)
        assert torch.allclose(rec["embeddings"].float().norm(dim=-1), torch.ones(len(rec["boxes"])),
                              atol=2e-3)
        p = props[image_id]
        top = torch.argsort(p["objectness"], descending=True)[:4]
        assert torch.equal(rec["weights"][n_gt:], p["confidence"][top])  # weight = confidence
        assert torch.equal(rec["boxes"][n_gt:], p["boxes"][top])
        assert torch.equal(rec["embeddings"][n_gt:], p["embeddings"][top])
    assert any(len(data.gt[i]) for i in data.image_ids)  # the world has base boxes to embed
    assert reader.manifest["cost"]["totals"]["clip_crops"] == sum(
        int((~data.gt_crowd[i]).sum()) for i in data.image_ids)


def test_targets_gt_only(clip, train, tmp_path):
    reader = run_targets(clip, *train, None, tmp_path, TargetsConfig())
    data = TrainingImages.load(*train)
    for image_id in data.image_ids:
        rec = reader[image_id]
        assert rec["is_gt"].all() and (rec["weights"] == 1).all()
        assert len(rec["boxes"]) == int((~data.gt_crowd[image_id]).sum())
    assert reader.manifest["proposals"] is None


def test_targets_refuse_foreign_proposals(clip, train, tmp_path):
    from ovd.models.clip.model import load_clip

    proposals, _ = _fake_proposals(tmp_path / "p", clip, train)
    torch.manual_seed(1)
    stranger = load_clip("ovd-vit-tiny-64")  # other weights: another embedding space
    with pytest.raises(ValueError, match="CLIP weights"):
        run_targets(stranger, *train, proposals, tmp_path / "t", TargetsConfig())
    with pytest.raises(ValueError, match="not targets"):
        load_targets(proposals)
    # Proposals for a subset of the images are refused; a subset of the proposals is fine.
    partial, _ = _fake_proposals(tmp_path / "p2", clip, (train[0], train[1]), counts=(1, 1, 1))
    (partial / "shard-00001.safetensors").unlink()
    with pytest.raises(ValueError, match="no proposals for 1 of 3"):
        run_targets(clip, *train, partial, tmp_path / "t2", TargetsConfig())
    assert run_targets(clip, *train, partial, tmp_path / "t3", TargetsConfig(),
                       max_images=2).complete()


def test_image_targets_unit():
    gt = torch.tensor([[0.0, 0, 10, 10]])
    emb = torch.nn.functional.normalize(torch.ones(1, 4), dim=-1)
    props = {"boxes": torch.arange(12.0).reshape(3, 4), "objectness": torch.tensor([1.0, 3.0, 2.0]),
             "confidence": torch.tensor([0.5, 0.7, 0.9]), "embeddings": torch.eye(4)[:3].half()}
    rec = image_targets(gt, emb, props, max_proposals=2)
    assert rec["weights"].tolist() == pytest.approx([1.0, 0.7, 0.9])
    assert rec["is_gt"].tolist() == [True, False, False]
    none = image_targets(torch.zeros(0, 4), torch.zeros(0, 4), None, max_proposals=2)
    assert none["boxes"].shape == (0, 4) and none["embeddings"].shape == (0, 4)


def test_register_cli_parses():
    args = build_parser().parse_args(["targets", "--gt-only", "--max-proposals", "50"])
    assert args.gt_only and args.max_proposals == 50 and args.func.__name__ == "cmd_targets"
    with pytest.raises(ValueError, match="unknown targets config keys"):
        TargetsConfig.from_dict({"max_props": 1})
