"""Tests for ovd.training.proposals (EZSD stage 2) and ovd.training.shards (sharded, resumable storage)."""

from __future__ import annotations

import math
import os
import pickle

import pytest
import torch
import torch.nn.functional as F
from detectron2.utils import comm

from ovd.training.cli import build_parser
from ovd.training.proposals import (
    AnchorGrid,
    ProposalConfig,
    load_proposals,
    make_anchors,
    objectness,
    propose_from_candidates,
    run_proposals,
    token_region_embeddings,
)
from ovd.training.shards import ReadAhead, ShardReader, ShardStore, shard_name

# Few anchors per image keep every full run to a few dozen tiny-ViT crops.
FAST = {"sizes": (32, 64), "ratios": (1.0, 2.0), "shard_size": 1}


def _tiny_clip(folder):
    """A seeded random ovd-vit-tiny-64 saved as a project checkpoint folder, loaded back."""
    from ovd.models.clip.model import architecture_config, load_clip, save_clip

    torch.manual_seed(0)
    clip = load_clip("ovd-vit-tiny-64")
    save_clip(clip, folder, model_cfg=architecture_config("ovd-vit-tiny-64"), record={"stage": "test"})
    return load_clip(str(folder))


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return _tiny_clip(tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="module")
def train(make_world):
    from ovd.training.data.synthetic import world_datasets

    json_file, image_root = world_datasets(make_world(num_train=3, image_size=64))["synth_train"]
    return json_file, image_root


@pytest.fixture(scope="module")
def dense_run(clip, train, tmp_path_factory):
    """An uninterrupted dense run: the reference for the resume / rank tests."""
    out = tmp_path_factory.mktemp("dense")
    return run_proposals(clip, *train, out, ProposalConfig(**FAST))


def _records(reader: ShardReader) -> dict:
    return {i: reader[i] for i in reader.image_ids()}


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for i in a:
        assert a[i].keys() == b[i].keys()
        for k in a[i]:
            assert torch.equal(a[i][k], b[i][k]), (i, k)


# ---------------------------------------------------------------- anchors + objectness

def test_anchors_hand_case_64x96():
    # H=64, W=96, stride 32: a 2 x 3 grid of centres (16|48, 16|48|80).
    a = make_anchors((64, 96), stride=32, sizes=(32,), ratios=(0.5, 1.0, 2.0), offset=0.5)
    assert a.shape == (18, 4)
    r2 = math.sqrt(2)
    # First centre (16, 16): ratio h/w = 0.5 -> w = 32 * sqrt 2, h = 32 / sqrt 2, left-clipped.
    assert torch.allclose(a[0], torch.tensor([0.0, 16 - 8 * r2, 16 + 16 * r2, 16 + 8 * r2]))
    assert torch.allclose(a[1], torch.tensor([0.0, 0.0, 32.0, 32.0]))  # ratio 1
    assert torch.allclose(a[2], torch.tensor([16 - 8 * r2, 0.0, 16 + 8 * r2, 16 + 16 * r2]))
    assert torch.allclose(a[-2], torch.tensor([64.0, 32.0, 96.0, 64.0]))  # centre (80, 48)
    assert (a[:, 0] >= 0).all() and (a[:, 2] <= 96).all() and (a[:, 3] <= 64).all()


def test_anchors_clipped_duplicates_are_merged():
    # Every 512-px anchor clips to the whole image: 6 distinct 32-px anchors + 1.
    a = make_anchors((64, 96), stride=32, sizes=(32, 512), ratios=(1.0,))
    assert a.shape == (7, 4)
    assert (a == torch.tensor([0.0, 0.0, 96.0, 64.0])).all(dim=1).sum() == 1


def test_anchors_degenerate_after_clipping_are_dropped():
    # offset 0: centres on grid corners; an 8-px anchor on the image border keeps 4 px.
    a = make_anchors((64, 96), stride=32, sizes=(8,), ratios=(1.0,), offset=0.0, min_size=5)
    assert torch.equal(a, torch.tensor([[28.0, 28.0, 36.0, 36.0], [60.0, 28.0, 68.0, 36.0]]))


def test_objectness_formula():
    assert objectness(torch.zeros(2, 7)).abs().max() < 1e-6  # uniform -> 0
    assert objectness(torch.tensor([[100.0, 0, 0, 0]])).item() == pytest.approx(math.log(4), abs=1e-6)
    # p = (1/4, 3/4): H = -(.25 ln .25 + .75 ln .75)
    h = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    s = objectness(torch.tensor([[0.0, math.log(3.0)]]))
    assert s.item() == pytest.approx(math.log(2) - h, abs=1e-6)


# ---------------------------------------------------------------- filters (fake CLIP)

class FakeClip:
    """Embeds a crop by a lookup of (box, enlarge): the filters can be checked by hand."""

    embed_dim = 3
    logit_scale = 10.0  # the CLIP's own scale, which the stage must use (not OpenAI's 100)

    def __init__(self, table: dict):
        self.table = table

    def crop_boxes(self, image, boxes, *, enlarge, min_size=10.0):
        return torch.cat([boxes, torch.full((len(boxes), 1), float(enlarge))], dim=1)

    def encode_images(self, crops, *, batch_size=256):
        rows = [self.table[(tuple(c[:4].tolist()), round(c[4].item(), 3))] for c in crops]
        return F.normalize(torch.tensor(rows, dtype=torch.float32).reshape(-1, 3), dim=-1)


SHARP0, SHARP1, SHARP2 = [1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]
SOFT1 = [0.995, 1.0, 0.995]  # class 1, but a soft posterior: low objectness
A, B, B2 = (0.0, 0.0, 38.0, 38.0), (50.0, 50.0, 90.0, 90.0), (51.0, 51.0, 90.0, 90.0)
C, D = (60.0, 0.0, 95.0, 30.0), (0.0, 60.0, 30.0, 95.0)
TABLE = {
    (A, 1.0): SHARP1, (B, 1.0): SHARP1, (B2, 1.0): SOFT1, (C, 1.0): SHARP2, (D, 1.0): SOFT1,
    (A, 1.2): SHARP1, (B, 1.2): SHARP2, (B2, 1.2): SHARP2, (C, 1.2): SHARP0, (D, 1.2): [0.2, 1.0, 0],
}
IS_BASE = torch.tensor([True, False, False])


def _fake_propose(cfg: ProposalConfig, image_id: int = 1):
    boxes = torch.tensor([A, B, B2, C, D])
    gt = torch.tensor([[0.0, 0.0, 40.0, 40.0]])  # IoU(A, gt) = 0.9; no other overlap
    return propose_from_candidates(FakeClip(TABLE), torch.zeros(3, 100, 100, dtype=torch.uint8),
                                   boxes, torch.eye(3), IS_BASE, gt, cfg, image_id)


def test_coco_filter_drops_base_gt_overlaps_and_base_classes():
    rec, crops = _fake_propose(ProposalConfig())
    # A: IoU 0.9 with the base box; B2: NMS-suppressed by B (IoU 0.95); C: base at 1.2x.
    assert rec["boxes"].tolist() == [list(B), list(D)]
    assert rec["classes"].tolist() == [2, 1]  # arg-max of the 1.2x re-encoding
    probs = F.softmax(10 * F.normalize(torch.tensor([SHARP2, [0.2, 1.0, 0]]), dim=-1), dim=-1)
    assert torch.allclose(rec["confidence"], probs.max(-1).values)
    assert rec["objectness"][0] > rec["objectness"][1]
    assert torch.allclose(rec["embeddings"].float(),
                          F.normalize(torch.tensor([SHARP2, [0.2, 1.0, 0]]), dim=-1), atol=1e-3)
    assert rec["embeddings"].dtype == torch.float16
    assert crops == 5 + 3  # every candidate at 1.0x; B, C, D re-encoded at 1.2x
    rec1, _ = _fake_propose(ProposalConfig(keep=1))
    assert rec1["boxes"].tolist() == [list(B)]


def test_logit_scale_is_the_clips_own_unless_configured():
    rec, _ = _fake_propose(ProposalConfig())
    rec100, _ = _fake_propose(ProposalConfig(logit_scale=100.0))
    emb = F.normalize(torch.tensor([SHARP2, [0.2, 1.0, 0]]), dim=-1)
    for r, scale in ((rec, 10.0), (rec100, 100.0)):
        assert torch.allclose(r["confidence"], F.softmax(scale * emb, dim=-1).max(-1).values)
    assert not torch.allclose(rec["confidence"], rec100["confidence"])


def test_early_filter_spends_the_top_k_on_regions_that_can_survive():
    """A part of a base object (IoU < 0.3 with its box, classified base) outranks a novel
    region: in the paper's order it takes the top-1 and is then dropped by the base-class
    test, leaving nothing; with early_filter the novel region is kept."""
    P, N = (0.0, 0.0, 12.0, 12.0), (60.0, 60.0, 90.0, 90.0)
    table = {(P, 1.0): SHARP0, (P, 1.2): SHARP0, (N, 1.0): SOFT1, (N, 1.2): SHARP1}
    gt = torch.tensor([[0.0, 0.0, 40.0, 40.0]])  # IoU(P, gt) = 0.09

    def run(cfg):
        return propose_from_candidates(FakeClip(table), torch.zeros(3, 100, 100, dtype=torch.uint8),
                                       torch.tensor([P, N]), torch.eye(3), IS_BASE, gt, cfg, 1)[0]

    paper = run(ProposalConfig(pre_filter_topk=1))
    early = run(ProposalConfig(pre_filter_topk=1, early_filter=True))
    assert paper["boxes"].shape == (0, 4)
    assert early["boxes"].tolist() == [list(N)]


def test_lvis_mode_seeded_random_without_base_filter():
    cfg = ProposalConfig(filter="lvis", lvis_keep=2)
    rec, crops = _fake_propose(cfg, image_id=5)
    again, _ = _fake_propose(cfg, image_id=5)
    assert torch.equal(rec["boxes"], again["boxes"]) and len(rec["boxes"]) == 2
    assert crops == 5 + 2
    picks = {tuple(map(tuple, _fake_propose(cfg, image_id=i)[0]["boxes"].tolist())) for i in range(12)}
    assert len(picks) > 1  # the seed depends on the image id
    everything, _ = _fake_propose(ProposalConfig(filter="lvis", lvis_keep=10))
    assert list(A) in everything["boxes"].tolist()  # no base-GT filter
    assert 0 in everything["classes"].tolist()  # no base-class filter (C)


# ---------------------------------------------------------------- cheap prior

def test_token_region_embeddings_shapes(clip):
    img = torch.randint(0, 255, (3, 64, 96), dtype=torch.uint8)
    boxes = torch.tensor([[0.0, 0.0, 96.0, 64.0], [10.0, 5.0, 30.0, 20.0], [40.0, 40.0, 41.0, 41.0]])
    for scale, windows, forwards in ((1.0, True, 2), (0.5, True, 1), (1.0, False, 1)):
        e, f = token_region_embeddings(clip, img, boxes, scale=scale, windows=windows)
        assert e.shape == (3, clip.embed_dim) and f == forwards
        assert torch.allclose(e.norm(dim=-1), torch.ones(3), atol=1e-5)


def test_window_tokens_equal_encoding_the_window_alone(clip):
    from ovd.training.proposals import _vit_tokens

    torch.manual_seed(0)
    img = torch.randint(0, 255, (3, 64, 128), dtype=torch.uint8)
    e, forwards = token_region_embeddings(clip, img, torch.tensor([[64.0, 0.0, 128.0, 64.0]]))
    assert forwards == 2
    visual = clip.model.visual
    with torch.inference_mode():
        tokens = _vit_tokens(visual, clip.normalise(img[:, :, 64:].permute(1, 2, 0)[None]))
        want = F.normalize(visual.ln_post(tokens.mean(dim=(2, 3))) @ visual.proj, dim=-1)
    assert torch.allclose(e, want, atol=1e-5)
    # A native-size image is one window: the global and the windowed prior coincide.
    square = img[:, :, :64]
    box = torch.tensor([[5.0, 9.0, 40.0, 30.0]])
    tiles, _ = token_region_embeddings(clip, square, box, windows=True)
    whole, _ = token_region_embeddings(clip, square, box, windows=False)
    assert torch.allclose(tiles, whole, atol=1e-6)


# ---------------------------------------------------------------- full runs

def test_dense_run_writes_complete_shards(dense_run, clip):
    reader = dense_run
    assert reader.complete() and len(reader) == 3
    assert reader.manifest["stage"] == "proposals"
    assert reader.manifest["config"]["mode"] == "dense"
    assert reader.manifest["clip"]["sha256"] == clip.manifest["weights"]["sha256"]
    cost = reader.manifest["cost"]
    assert cost["per_image"]["clip_crops"] >= cost["per_image"]["anchors"] > 0
    assert cost["per_image"]["prior_forwards"] == 0
    for i in reader.image_ids():
        rec = reader[i]
        k = len(rec["boxes"])
        assert rec["embeddings"].shape == (k, clip.embed_dim)
        assert rec["embeddings"].dtype == torch.float16
        assert rec["objectness"].shape == rec["confidence"].shape == rec["classes"].shape == (k,)
        assert (rec["objectness"][:-1] >= rec["objectness"][1:]).all()
        names = reader.manifest["vocabulary"]["names"]
        is_base = torch.tensor(reader.manifest["vocabulary"]["is_base"])
        assert ((rec["classes"] >= 0) & (rec["classes"] < len(names))).all()
        assert not is_base[rec["classes"]].any()
        assert rec["image_size"].tolist() == [64, 64]
    assert load_proposals(reader.folder).complete()


def test_cheap_run_spends_at_most_topk_crops(clip, train, tmp_path):
    cfg = ProposalConfig(mode="cheap", cheap_topk=5, **FAST)
    reader = run_proposals(clip, *train, tmp_path, cfg)
    assert reader.complete()
    cost = reader.manifest["cost"]["per_image"]
    # A 64-px image is one window of the 64-px CLIP: one prior forward.
    assert cost["prior_forwards"] == 1 and cost["candidates"] <= 5 and cost["clip_crops"] <= 10
    assert reader.manifest["config"]["mode"] == "cheap"
    # The other prior (one global forward) and score (objectness, the lvis default).
    cfg = ProposalConfig(mode="cheap", cheap_topk=5, cheap_prior="global", filter="lvis", **FAST)
    reader = run_proposals(clip, *train, tmp_path / "global", cfg, max_images=1)
    assert reader.complete() and reader.manifest["cost"]["per_image"]["prior_forwards"] == 1


def test_auto_grid_follows_the_training_boxes_and_is_in_the_manifest(clip, train, tmp_path):
    import json

    import numpy as np

    cfg = ProposalConfig(mode="cheap", cheap_topk=5, stride="auto", sizes="auto", shard_size=1)
    reader = run_proposals(clip, *train, tmp_path, cfg, max_images=1)
    # Expected by hand: the first image's non-crowd base boxes, their 2% and 98% size quantiles,
    # then sizes lo * sqrt(2)^(k + 1/2) until the bins cover hi.
    coco = json.loads(train[0].read_text())
    first = min(im["id"] for im in coco["images"])
    base = {c["id"] for c in coco["categories"] if c.get("split", "base") == "base"}
    sides = [math.sqrt(a["bbox"][2] * a["bbox"][3]) for a in coco["annotations"]
             if a["image_id"] == first and a["category_id"] in base and not a.get("iscrowd")]
    lo, hi = np.quantile(sides, [0.02, 0.98])
    n = math.ceil(math.log(hi / lo) / math.log(math.sqrt(2)))
    grid = reader.manifest["grid"]
    assert grid["sizes"] == pytest.approx([lo * 2 ** ((k + 0.5) / 2) for k in range(n)], abs=0.051)
    assert grid["strides"] == [max(1, round(x / 2)) for x in grid["sizes"]]
    assert reader.manifest["config"]["sizes"] == "auto"


def test_resume_after_interrupt_skips_finished_shards(clip, train, dense_run, tmp_path):
    calls = []

    def interrupting(desc, total, initial):
        calls.append(initial)

        def update(n, postfix=None):
            raise KeyboardInterrupt  # after the first image, whose shard is on disk

        return update

    with pytest.raises(KeyboardInterrupt):
        run_proposals(clip, *train, tmp_path, ProposalConfig(**FAST), progress=interrupting)
    assert calls == [0]
    first = tmp_path / shard_name(0)
    assert first.is_file() and not (tmp_path / shard_name(1)).exists()
    assert not ShardReader(tmp_path).complete()
    mtime = first.stat().st_mtime_ns
    seen = []
    reader = run_proposals(clip, *train, tmp_path, ProposalConfig(**FAST),
                           progress=lambda d, t, i: (seen.append((t, i)), lambda n, p=None: None)[1])
    assert seen == [(3, 1)]  # resumed with one image done
    assert first.stat().st_mtime_ns == mtime
    assert reader.complete()
    _assert_same(_records(reader), _records(dense_run))


def test_corrupt_shards_are_recomputed(clip, train, dense_run, tmp_path):
    import shutil

    shutil.copytree(dense_run.folder, tmp_path, dirs_exist_ok=True)
    truncated, flipped, intact = (tmp_path / shard_name(k) for k in range(3))
    truncated.write_bytes(truncated.read_bytes()[:-7])
    data = bytearray(flipped.read_bytes())
    data[-3] ^= 0xFF  # a bit flip inside the tensor data: the header still parses
    flipped.write_bytes(bytes(data))
    mtime = intact.stat().st_mtime_ns
    reader = run_proposals(clip, *train, tmp_path, ProposalConfig(**FAST))
    assert intact.stat().st_mtime_ns == mtime
    _assert_same(_records(reader), _records(dense_run))


def test_manifest_mismatch_raises(clip, train, dense_run):
    with pytest.raises(ValueError, match="differs from the requested.*keep"):
        run_proposals(clip, *train, dense_run.folder, ProposalConfig(keep=7, **FAST))
    with pytest.raises(ValueError, match="image_ids"):
        run_proposals(clip, *train, dense_run.folder, ProposalConfig(**FAST), max_images=2)
    # Runtime-only fields (batch size) are not part of the identity: this resumes (no work).
    reader = run_proposals(clip, *train, dense_run.folder, ProposalConfig(batch_size=3, **FAST))
    assert reader.complete()


def test_two_ranks_split_the_shards(clip, train, dense_run, tmp_path, monkeypatch):
    monkeypatch.setattr(comm, "get_world_size", lambda: 2)
    written = {}
    for rank in (1, 0):
        monkeypatch.setattr(comm, "get_rank", lambda r=rank: r)
        before = set(os.listdir(tmp_path))
        run_proposals(clip, *train, tmp_path, ProposalConfig(**FAST))
        written[rank] = sorted(f for f in set(os.listdir(tmp_path)) - before if f.startswith("shard"))
    assert written == {1: [shard_name(1)], 0: [shard_name(0), shard_name(2)]}
    reader = ShardReader(tmp_path)
    assert reader.complete() and "cost" in reader.manifest  # rank 0 finalised
    _assert_same(_records(reader), _records(dense_run))


def test_independent_jobs_split_the_shards_without_a_process_group(clip, train, dense_run, tmp_path):
    """--num-shards 2 --shard-index i (a job array): each job computes its shards; the one that
    ends last finds every shard present and records the cost; the output is the one-process one."""
    run_proposals(clip, *train, tmp_path, ProposalConfig(**FAST), part=(1, 2))
    assert sorted(f for f in os.listdir(tmp_path) if f.startswith("shard")) == [shard_name(1)]
    assert "cost" not in ShardReader(tmp_path).manifest
    reader = run_proposals(clip, *train, tmp_path, ProposalConfig(**FAST), part=(0, 2))
    assert reader.complete() and "cost" in reader.manifest
    _assert_same(_records(reader), _records(dense_run))
    with pytest.raises(ValueError, match="one job wipe another"):
        run_proposals(clip, *train, tmp_path, ProposalConfig(**FAST), part=(0, 2), overwrite=True)
    with pytest.raises(ValueError, match=r"shard index 2 is not in \[0, 2\)"):
        run_proposals(clip, *train, tmp_path, ProposalConfig(**FAST), part=(2, 2))


def test_torchrun_two_processes_give_the_one_process_output(clip, train, dense_run, tmp_path):
    """`torchrun --nproc_per_node 2 -m ovd proposals` (env://, gloo on CPU) splits the shards
    between its two ranks and writes what one process writes."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists() and shutil.which("torchrun") is None:
        pytest.skip("torchrun is not installed")
    (tmp_path / "cfg.yaml").write_text("proposals: {sizes: [32, 64], ratios: [1.0, 2.0], shard_size: 1}\n")
    out = tmp_path / "out"
    cmd = [str(torchrun if torchrun.exists() else "torchrun"), "--standalone", "--nproc_per_node", "2",
           "-m", "ovd", "proposals", "--config", str(tmp_path / "cfg.yaml"), "--clip", _clip_dir(clip),
           "--train-json", str(train[0]), "--image-root", str(train[1]), "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    reader = ShardReader(out)
    assert reader.complete() and "cost" in reader.manifest
    _assert_same(_records(reader), _records(dense_run))


# ---------------------------------------------------------------- shards + CLI

def test_shard_store_and_reader_units(tmp_path):
    ids = [10, 11, 12, 13, 14]
    store = ShardStore(tmp_path, stage="unit", identity={"config": {"a": 1}}, image_ids=ids,
                       shard_size=2)
    assert store.num_shards == 3 and store.shard_ids(2) == [14]
    reader = store.run(lambda i: ({"x": torch.full((i % 3, 2), float(i))}, {"n": 1}), desc="unit")
    assert reader.complete() and reader.image_ids() == ids and 12 in reader and 99 not in reader
    assert reader[13]["x"].shape == (1, 2) and reader[12]["x"].shape == (0, 2)
    assert reader.manifest["cost"]["totals"]["n"] == 5
    clone = pickle.loads(pickle.dumps(reader))  # DataLoader workers
    assert torch.equal(clone[14]["x"], reader[14]["x"])
    with pytest.raises(KeyError):
        reader[99]
    (tmp_path / shard_name(1)).unlink()
    assert not reader.complete() and 12 not in reader and reader.missing_shards() == [1]
    with pytest.raises(ValueError, match="config"):
        ShardStore(tmp_path, stage="unit", identity={"config": {"a": 2}}, image_ids=ids, shard_size=2)
    fresh = ShardStore(tmp_path, stage="unit", identity={"config": {"a": 2}}, image_ids=ids,
                       shard_size=2, overwrite=True)
    assert not any(tmp_path.glob("shard-*")) and fresh.manifest["config"] == {"a": 2}


def test_register_cli_parses():
    args = build_parser().parse_args(["proposals", "--mode", "cheap", "--max-images", "20", "--num-gpus",
                              "2", "--dist-url", "tcp://127.0.0.1:1234", "--overwrite"])
    assert (args.mode, args.max_images, args.num_gpus, args.overwrite) == ("cheap", 20, 2, True)
    assert args.func.__name__ == "cmd_proposals"


def test_cli_command_runs_in_process(clip, train, tmp_path):
    args = build_parser().parse_args(["proposals", "--clip", _clip_dir(clip),
                              "--train-json", str(train[0]), "--image-root", str(train[1]),
                              "--out", str(tmp_path), "--mode", "cheap", "--max-images", "1"])
    assert args.func(args) == 0
    reader = load_proposals(tmp_path)
    assert reader.complete() and len(reader) == 1 and reader.manifest["config"]["mode"] == "cheap"


def _clip_dir(clip) -> str:
    return clip.name.removeprefix("local-dir:")


def test_config_validation():
    with pytest.raises(ValueError, match="mode"):
        ProposalConfig(mode="fast")
    with pytest.raises(ValueError, match="unknown proposals config keys"):
        ProposalConfig.from_dict({"sizez": [1]})
    assert ProposalConfig.from_dict({"sizes": [16, 32]}).sizes == (16, 32)


def test_read_ahead_decodes_the_next_images_in_order():
    import threading

    reads, lock = [], threading.Lock()

    def read(image_id):
        with lock:
            reads.append(image_id)
        return torch.full((1,), image_id)

    ahead = ReadAhead(read, [5, 3, 9, 7], depth=2)
    try:
        assert ahead(5).item() == 5
        for future in list(ahead.pending.values()):
            future.result()
        assert sorted(reads) == [3, 5, 9]  # the next two were decoded ahead, 7 not yet
        assert ahead(3).item() == 3 and ahead(9).item() == 9
        assert ahead(42).item() == 42  # not in the plan: read on the spot
    finally:
        ahead.close()


def test_paper_density_lays_the_grid_on_the_resized_image():
    from ovd.training.proposals import PAPER_DENSITY

    stored = (480, 640)  # a COCO image; Detectron2 trains it at 800 x 1067 (factor 5/3)
    grid = AnchorGrid.from_config(ProposalConfig(**PAPER_DENSITY))
    assert grid.resize_factor(stored) == pytest.approx(800 / 480)
    anchors = grid.anchors(stored)
    on_resized = make_anchors((800, 1067), stride=32, sizes=(32, 64, 128, 256, 512))
    assert len(anchors) == len(on_resized) > 2.5 * len(AnchorGrid.from_config(ProposalConfig()).anchors(stored))
    # The same boxes, in stored pixels (the smallest anchor is 32 / (5/3) = 19.2 px there).
    torch.testing.assert_close(anchors, (on_resized * 480 / 800).clamp(max=640))
    assert anchors[:, 2].max() <= 640 and anchors[:, 3].max() <= 480
    # Off by default, and then absent from the recorded identity (older folders stay current).
    assert "anchor_resize" not in ProposalConfig().identity()
    assert ProposalConfig(**PAPER_DENSITY).identity()["anchor_resize"] == (800, 1333)
    with pytest.raises(ValueError, match="anchor_resize"):
        ProposalConfig(anchor_resize=(1333, 800))
    args = build_parser().parse_args(["proposals", "--paper-density"])
    assert args.paper_density


def test_the_slurm_array_script_gives_the_one_process_output(clip, train, dense_run, tmp_path):
    """scripts/slurm/proposals_array.sbatch run as two array tasks (SLURM's variables set by
    hand; #SBATCH lines are comments to bash) writes what one process writes."""
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    (tmp_path / "cfg.yaml").write_text("proposals: {sizes: [32, 64], ratios: [1.0, 2.0], shard_size: 1}\n")
    out = tmp_path / "out"
    for task in (1, 0):
        env = {**os.environ, "SLURM_ARRAY_TASK_COUNT": "2", "SLURM_ARRAY_TASK_ID": str(task),
               "SLURM_SUBMIT_DIR": str(repo), "OVD": str(Path(sys.executable).with_name("ovd"))}
        done = subprocess.run(["bash", str(repo / "scripts" / "slurm" / "proposals_array.sbatch"),
                               str(tmp_path / "cfg.yaml"), "--clip", _clip_dir(clip), "--train-json",
                               str(train[0]), "--image-root", str(train[1]), "--out", str(out)],
                              env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    reader = ShardReader(out)
    assert reader.complete() and "cost" in reader.manifest
    _assert_same(_records(reader), _records(dense_run))
    for script in (repo / "scripts" / "slurm").glob("*.sbatch"):
        assert subprocess.run(["bash", "-n", str(script)]).returncode == 0, script
