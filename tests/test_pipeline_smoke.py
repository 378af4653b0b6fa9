"""The whole chain, end to end, on a tiny world (configs/smoke.yaml): every stage runs for real
(open_clip training, Detectron2 training, COCO evaluation, export), then a second run reuses
every finished stage, and `ovd demo` serves the export and queries it over HTTP."""

from __future__ import annotations

import json
import logging

import pytest

from ovd.models.exported import load_export, verify_export
from ovd.training.cli import main


@pytest.fixture(autouse=True)
def _info_logs(caplog):
    caplog.set_level(logging.INFO)


def test_pipeline_runs_and_resumes(tmp_path, caplog, capsys):
    root = tmp_path / "smoke"
    assert main(["pipeline", "--config", "configs/smoke.yaml", "--root", str(root)]) == 0
    out = capsys.readouterr().out
    assert "CLIP zero-shot accuracy" in out and "generalized zero-shot detection" in out
    for rel in ("world/world.json", "world/preview.png", "clip/pretrained/manifest.json",
                "clip/renorm/manifest.json", "proposals/manifest.json", "targets/manifest.json",
                "detector/model_final.pth", "detector/eval_synth_test/metrics.json"):
        assert (root / rel).is_file(), rel
    manifest = verify_export(root / "export")
    assert len(manifest["trained_on"]["classes"]) == 11
    assert {c["split"] for c in manifest["categories"]} == {"base", "novel"}
    assert {c["tier"] for c in manifest["categories"]} == {"base", "novel_comp", "novel_shape", "novel_both"}
    # The shipped numbers are measured on test (choices are made on val).
    assert "synth_test" in manifest["metrics"] and "synth_val" not in manifest["metrics"]
    metrics = json.loads((root / "detector/eval_synth_test/metrics.json").read_text())
    assert set(metrics) >= {"novel", "base", "all"}
    assert load_export(root / "export").model is not None
    # The model card: the words its CLIP read are the caption corpus's, held-out ones included.
    words = set(manifest["clip"]["text_words"]["words"])
    assert {w for c in manifest["categories"] for w in c["name"].split()} <= words and "cat" not in words
    renorm = json.loads((root / "clip/renorm/manifest.json").read_text())
    assert renorm["text_words"] == manifest["clip"]["text_words"]
    # The gates of every stage, measured on the world's held-out annotations.
    gates = json.loads((root / "gates.json").read_text())
    assert set(gates) >= {"renorm", "proposals", "targets", "detector"} and not gates["skipped"]
    assert 0 <= gates["proposals"]["novel_recall50"] <= 1
    assert 0 < gates["proposals"]["grid_coverage50"]["all"] <= 1
    assert gates["detector"]["background_norm"] > 0
    for stage in ("clip/renorm", "proposals", "targets"):
        assert (root / stage / "gates.json").is_file(), stage

    caplog.clear()
    assert main(["pipeline", "--config", "configs/smoke.yaml", "--root", str(root)]) == 0
    messages = [r.getMessage() for r in caplog.records]
    for stage in ("dataset", "CLIP", "CLIP re-normalisation"):
        assert any(stage in m and ": reused" in m for m in messages), stage

    # The export serves: `ovd demo` starts a real `ovd serve`, posts a fresh scene with the
    # novel class names over HTTP and prints the answer.
    capsys.readouterr()
    assert main(["demo", "--model-dir", str(root / "export"), "--config", "configs/smoke.yaml",
                 "--out", str(tmp_path / "demo"), "--score-threshold", "0"]) == 0
    out = capsys.readouterr().out
    assert "POST http://127.0.0.1:" in out and "/v1/detect" in out
    novel = [c["name"] for c in manifest["categories"] if c["split"] == "novel"]
    assert all(name in out for name in novel)  # the classes sent are listed
    assert "*" in out.split("box [x1, y1, x2, y2] px", 1)[1]  # detections of novel names, marked
    assert (tmp_path / "demo" / "detections.png").is_file()


def test_a_stage_snapshot_is_restored_only_where_it_fits(tmp_path):
    """restore_snapshot copies a committed stage folder into a run that has none, when the
    folder's manifest says it was made from the same inputs; it never overwrites a run's own."""
    from ovd.training.pipeline import CLIP_SNAPSHOT, restore_snapshot

    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    (snapshot / "manifest.json").write_text(json.dumps({"training": {"data": {"fingerprint": "abc"}}}))
    (snapshot / "weights.bin").write_bytes(b"w")

    def same_world(m):
        return m["training"]["data"]["fingerprint"] == "abc"

    assert not restore_snapshot(snapshot, tmp_path / "other", lambda m: m["training"]["data"]["fingerprint"] == "xyz")
    assert not (tmp_path / "other").exists()
    assert restore_snapshot(snapshot, tmp_path / "run" / "clip", same_world)
    assert (tmp_path / "run" / "clip" / "weights.bin").read_bytes() == b"w"
    (tmp_path / "run" / "clip" / "weights.bin").write_bytes(b"mine")
    assert not restore_snapshot(snapshot, tmp_path / "run" / "clip", same_world)  # never overwrites
    assert (tmp_path / "run" / "clip" / "weights.bin").read_bytes() == b"mine"
    assert not restore_snapshot(snapshot, tmp_path / "bad", lambda m: m["missing"]["key"])  # unreadable: skip
    # The committed CLIP snapshot of the built-in world verifies against its own manifest.
    from ovd.models.clip.model import verify_checkpoint

    for stage in ("pretrained", "renorm"):
        verify_checkpoint(CLIP_SNAPSHOT / stage)
