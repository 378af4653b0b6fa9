"""Tests for the measurement protocol (ovd.training.protocol): intervals, paired contrasts, the
verdict's wording, and the resumable cell store."""

from __future__ import annotations

import json
import math
import subprocess

import numpy as np
import pytest

from ovd.training import protocol
from ovd.training.evaluate import tier_groups
from ovd.training.protocol import (
    CellStore,
    flat_metrics,
    mean_ci,
    paired_contrast,
    recipe_digest,
    verdict,
)


def test_mean_ci_is_the_student_t_interval():
    # Three samples 1, 2, 3: mean 2, sd 1, t(0.975, 2) = 4.3027 -> half width 4.3027 / sqrt(3).
    mean, (lo, hi) = mean_ci([1.0, 2.0, 3.0])
    assert mean == 2.0
    assert hi - mean == pytest.approx(4.302653 / math.sqrt(3), rel=1e-5)
    assert mean - lo == pytest.approx(hi - mean)
    # More seeds of the same spread: narrower.
    _, (lo5, hi5) = mean_ci([1.0, 2.0, 3.0, 1.0, 3.0])
    assert hi5 - lo5 < hi - lo
    # One seed is an anecdote: no interval. NaNs (a group without ground truth) are skipped.
    one = mean_ci([4.0, float("nan")])
    assert one[0] == 4.0 and all(math.isnan(x) for x in one[1])
    assert math.isnan(mean_ci([])[0])


def test_mean_ci_covers_the_true_mean_95_percent_of_the_time():
    rng = np.random.default_rng(0)
    hits = sum(lo <= 10 <= hi for lo, hi in (mean_ci(rng.normal(10, 3, 4))[1] for _ in range(2000)))
    assert 0.93 <= hits / 2000 <= 0.97


def test_paired_contrast_removes_the_seed_effect():
    """Seeds move both rows together (a shared offset); the paired difference sees only the
    constant +2 of row B, so its interval is tight and excludes 0 although the rows' own
    intervals overlap."""
    offsets = {0: 0.0, 1: 8.0, 2: -5.0, 3: 3.0, 4: -1.0}
    noise = {0: 0.1, 1: -0.2, 2: 0.05, 3: 0.0, 4: 0.1}
    a = {s: {"ap50_novel": 30 + o} for s, o in offsets.items()}
    b = {s: {"ap50_novel": 32 + o + noise[s]} for s, o in offsets.items()}
    c = paired_contrast(a, b, metrics=["ap50_novel"])
    assert c["seeds"] == [0, 1, 2, 3, 4]
    assert c["diff_mean"]["ap50_novel"] == pytest.approx(2.01, abs=0.01)
    lo, hi = c["diff_ci95"]["ap50_novel"]
    assert 0 < lo < 2 < hi < 2.5
    assert c["verdict"]["ap50_novel"].startswith("higher")
    row_a, row_b = mean_ci([m["ap50_novel"] for m in a.values()]), mean_ci([m["ap50_novel"] for m in b.values()])
    assert row_b[1][0] < row_a[1][1]  # unpaired intervals overlap
    # Only seeds both rows finished are paired.
    del b[4]
    assert paired_contrast(a, b, metrics=["ap50_novel"])["seeds"] == [0, 1, 2, 3]


def test_verdict_claims_only_outside_zero():
    assert verdict(1.5, (0.2, 2.8), "AP50") == "higher AP50: +1.5 [+0.2, +2.8]"
    assert verdict(-1.5, (-2.8, -0.2)) == "lower: -1.5 [-2.8, -0.2]"
    assert verdict(1.5, (-0.2, 3.2)).startswith("no measurable effect")
    assert verdict(1.5, (float("nan"), float("nan"))).startswith("no measurable effect")


def test_flat_metrics_of_an_evaluation_result():
    result = {"novel": {"AP50": 31.25, "AP": 12.0, "APs": 1.0, "categories": 9},
              "novel_both": {"AP50": 5.0, "AP": 2.0, "APs": 0.0, "categories": 3},
              "base": {"AP50": 80.0, "AP": 50.0, "APs": 40.0, "categories": 11},
              "images": 400, "seconds": 3.0, "dataset": "synth_test"}
    assert flat_metrics(result) == {"ap50_novel": 31.25, "ap_novel": 12.0, "ap50_novel_both": 5.0,
                                    "ap_novel_both": 2.0, "ap50_base": 80.0, "ap_base": 50.0}


def test_cell_store_round_trip_and_staleness(tmp_path):
    store = CellStore(tmp_path / "cells")
    recipe = recipe_digest({"row": "dense", "lambda": 0.1, "iters": 300})
    assert recipe == recipe_digest({"iters": 300, "lambda": 0.1, "row": "dense"})  # key order
    assert store.get("test", "dense", 0, recipe) is None
    path = store.put("test", "dense", 0, recipe, {"ap50_novel": 12.5}, seconds=60)
    assert path == tmp_path / "cells" / "test" / "dense" / "seed0.json"
    cell = store.get("test", "dense", 0, recipe)
    assert cell["metrics"] == {"ap50_novel": 12.5} and cell["seconds"] == 60 and cell["seed"] == 0
    # A changed recipe makes the stored cell stale; other splits and seeds are separate cells.
    assert store.get("test", "dense", 0, recipe_digest({"row": "dense", "lambda": 0.3})) is None
    assert store.get("val", "dense", 0, recipe) is None and store.get("test", "dense", 1, recipe) is None
    assert not list(path.parent.glob("*.tmp"))  # written atomically


def test_summarise_row_lists_seeds_with_their_metrics():
    s = protocol.summarise_row({0: {"ap50_novel": 10.0}, 1: {"ap50_novel": 14.0}})
    assert s["seeds"] == [{"seed": 0, "ap50_novel": 10.0}, {"seed": 1, "ap50_novel": 14.0}]
    assert s["mean"]["ap50_novel"] == 12.0
    lo, hi = s["ci95"]["ap50_novel"]
    assert lo < 12 < hi


def test_commit_cell_commits_only_that_file(tmp_path):
    repo = tmp_path / "repo"
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    for k, v in (("user.email", "t@t"), ("user.name", "t")):
        subprocess.run(["git", "-C", str(repo), "config", k, v], check=True)
    (repo / "other.txt").write_text("staged but not part of the cell")
    subprocess.run(["git", "-C", str(repo), "add", "other.txt"], check=True)
    cell = CellStore(repo / "cells").put("val", "row", 0, "r", {"ap50_novel": 1.0})
    assert protocol.commit_cell(cell, "cell val/row seed 0")
    files = subprocess.run(["git", "-C", str(repo), "show", "--name-only", "--format=", "HEAD"],
                           capture_output=True, text=True, check=True).stdout.split()
    assert files == ["cells/val/row/seed0.json"]


def test_tier_groups_from_category_tags(tmp_path):
    path = tmp_path / "a.json"
    path.write_text(json.dumps({"categories": [
        {"id": 1, "name": "a", "split": "base", "tier": "base"},
        {"id": 2, "name": "b", "split": "novel", "tier": "novel_comp"},
        {"id": 3, "name": "c", "split": "novel", "tier": "novel_both"},
        {"id": 4, "name": "d", "split": "novel", "tier": "novel_both"}]}))
    assert tier_groups(path) == {"novel_comp": [2], "novel_both": [3, 4]}
    path.write_text(json.dumps({"categories": [{"id": 1, "name": "a"}]}))  # a user's plain COCO
    assert tier_groups(path) == {}
