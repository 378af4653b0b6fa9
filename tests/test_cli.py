"""Tests for the `ovd` command line (ovd.training.cli.main): help, exit codes, errors, data synth."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ovd.training.cli import main

# Leaf commands and the purpose each one's help should state.
LEAVES = {
    ("data", "synth"): "caption corpus for CLIP pretraining",
    ("data", "preview"): "scenes of a world with their boxes",
    ("data", "check"): "COCO-format annotation file",
    ("data", "ov-coco"): "OV-COCO base/novel split",
    ("data", "ov-lvis"): "OV-LVIS base/novel split",
    ("clip", "pretrain"): "contrastive loss",
    ("clip", "eval"): "accuracy of a CLIP",
    ("clip", "renorm"): "LayerNorm",
    ("proposals",): "proposals",
    ("targets",): "targets",
    ("train",): "resumes from its last checkpoint",
    ("compress",): "frozen teacher",
    ("eval",): "averaged over novel, base, all",
    ("export",): "weights as safetensors",
    ("pipeline",): "every pipeline stage",
    ("demo",): "novel class names",
    ("serve",): "Serve an exported detector over HTTP",
}


@pytest.fixture(autouse=True)
def _logging(caplog):
    """main() reconfigures logging levels; record INFO and restore the levels afterwards."""
    saved = {n: logging.getLogger(n).level for n in ("PIL", "matplotlib", "ovd")}
    caplog.set_level(logging.INFO)
    yield
    for name, level in saved.items():
        logging.getLogger(name).setLevel(level)


def _help(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as info:
        main([*argv, "--help"])
    assert info.value.code == 0
    return capsys.readouterr().out


def _errors(caplog) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR)


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# ---------------------------------------------------------------- help

@pytest.mark.parametrize("argv", list(LEAVES), ids=" ".join)
def test_help_of_every_subcommand_exits_zero(capsys, argv):
    out = _help(capsys, *argv)
    assert out.startswith(f"usage: ovd {' '.join(argv)} ")
    assert "--help" in out


def test_group_help_lists_every_purpose(capsys):
    top = _help(capsys)
    for argv in LEAVES:
        assert f"ovd {' '.join(argv)}" in top
    data = _help(capsys, "data")
    for purpose in ("generate the synthetic world", "draw scenes with boxes",
                    "validate a COCO dataset: json, image files, boxes", "OV-COCO base/novel split",
                    "OV-LVIS base/novel split"):
        assert purpose in " ".join(data.split())
    clip = _help(capsys, "clip")
    assert "train a small CLIP" in clip and "zero-shot accuracy" in clip


@pytest.mark.parametrize("argv", list(LEAVES), ids=" ".join)
def test_own_help_states_the_purpose(capsys, argv):
    assert LEAVES[argv] in " ".join(_help(capsys, *argv).split())


def test_missing_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2
    assert "required" in capsys.readouterr().err


# ---------------------------------------------------------------- data check

def test_data_check_malformed_json(tmp_path, caplog, capsys):
    bad = _write(tmp_path / "bad.json", '{"images": [')
    assert main(["data", "check", str(bad)]) == 2
    errors = _errors(caplog)
    assert str(bad) in errors and "invalid JSON" in errors
    assert "OK" not in capsys.readouterr().out


def test_data_check_invalid_coco(tmp_path, caplog):
    bad = _write(tmp_path / "bad.json", json.dumps({"images": [], "annotations": []}))
    assert main(["data", "check", str(bad)]) == 2
    assert "missing top-level key(s) ['categories']" in _errors(caplog)


def test_data_check_missing_file(tmp_path, caplog):
    assert main(["data", "check", str(tmp_path / "nope.json")]) == 2
    assert "does not exist" in _errors(caplog)


def _coco_with_image(tmp_path, bbox):
    Image.new("RGB", (10, 10)).save(tmp_path / "a.png")
    return {
        "images": [{"id": 1, "file_name": "a.png", "width": 10, "height": 10}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 2, "bbox": bbox}],
        "categories": [{"id": 1, "name": "cat", "split": "base"},
                       {"id": 2, "name": "dog", "split": "novel"}],
    }


def test_data_check_valid_file(tmp_path, capsys, caplog):
    good = _write(tmp_path / "good.json", json.dumps(_coco_with_image(tmp_path, [1, 1, 3, 3])))
    assert main(["data", "check", str(good)]) == 0
    out = capsys.readouterr().out
    assert "OK" in out and "1 images, 1 boxes, 1 base categories ['cat'], 1 novel ['dog']" in out
    assert "warning: category 'cat' (id 1) has no box" in out
    assert _errors(caplog) == ""


def test_data_check_finds_missing_images_and_overrunning_boxes(tmp_path, capsys, caplog):
    coco = _coco_with_image(tmp_path, [5, 5, 9, 3])  # overruns the 10 px image
    coco["images"].append({"id": 2, "file_name": "gone.png", "width": 10, "height": 10})
    (tmp_path / "imgs").mkdir()
    (tmp_path / "a.png").rename(tmp_path / "imgs" / "a.png")
    path = _write(tmp_path / "d.json", json.dumps(coco))
    assert main(["data", "check", str(path), "--image-root", str(tmp_path / "imgs")]) == 2
    out = capsys.readouterr().out
    assert "gone.png (image id 2) does not exist" in out
    assert "annotation 1: box [5, 5, 9, 3] overruns image 1 (10x10)" in out
    assert "1 missing image" in _errors(caplog) and "OK" not in out


# ---------------------------------------------------------------- clip eval

def test_clip_eval_unknown_model(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    assert main(["clip", "eval", "--clip", "no-such-model"]) == 2
    assert "unknown CLIP model 'no-such-model'" in _errors(caplog)


def test_clip_eval_missing_checkpoint_folder(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    assert main(["clip", "eval", "--clip", str(tmp_path / "ckpt")]) == 2
    assert "does not exist" in _errors(caplog)


# ---------------------------------------------------------------- data synth and config

def test_data_synth_writes_world_and_preview(tmp_path, caplog):
    config = _write(tmp_path / "tiny.yaml", "world:\n  num_caption_eval: 4\n  num_train: 50\n")
    out, png = tmp_path / "world", tmp_path / "p.png"
    rc = main(["data", "synth", "--config", str(config), "--out", str(out), "--num-train", "2",
               "--num-val", "1", "--num-test", "1", "--num-captions", "20", "--image-size", "64",
               "--workers", "1", "--preview", str(png)])
    assert rc == 0, _errors(caplog)
    world = json.loads((out / "world.json").read_text())
    assert world["format"] == "ovd-synthetic-world/2"
    # Flags override the file; the file overrides the defaults.
    assert world["config"]["num_train"] == 2
    assert world["config"]["num_val"] == world["config"]["num_test"] == 1
    assert world["config"]["num_captions"] == 20
    assert world["config"]["image_size"] == 64
    assert world["config"]["num_caption_eval"] == 4
    assert len(list((out / "detection" / "train").glob("*.png"))) == 2
    assert len((out / "captions" / "eval.jsonl").read_text().splitlines()) == 4
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size[0] > 300 and im.size[1] > 300


def test_info_messages_are_logged(make_world, tmp_path, caplog):
    world = make_world()
    assert main(["data", "preview", "--world", str(world), "--out", str(tmp_path / "p.png")]) == 0
    assert (tmp_path / "p.png").is_file()
    assert any("preview written to" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("text,message", [
    ("wrold:\n  seed: 1\n", "unknown sections ['wrold']"),
    ("world:\n  num_trian: 1\n", "unknown world config keys: ['num_trian']"),
    ("world: [1, 2\n", "not valid YAML"),
    ("- 1\n- 2\n", "must hold a mapping of sections"),
])
def test_config_errors(tmp_path, caplog, text, message):
    config = _write(tmp_path / "bad.yaml", text)
    out = tmp_path / "world"
    assert main(["data", "synth", "--config", str(config), "--out", str(out)]) == 2
    assert message in _errors(caplog)
    assert not (out / "world.json").exists()


def test_missing_config_file(tmp_path, caplog):
    missing = tmp_path / "missing.yaml"
    assert main(["data", "synth", "--config", str(missing), "--out", str(tmp_path / "w")]) == 2
    assert f"config file {missing} does not exist" in _errors(caplog)


def test_preview_of_missing_world(tmp_path, caplog):
    assert main(["data", "preview", "--world", str(tmp_path / "none"),
                 "--out", str(tmp_path / "p.png")]) == 2
    assert "world.json" in _errors(caplog)
    assert not (tmp_path / "p.png").exists()


def test_eval_an_export_on_a_users_coco_json(plain_export, tmp_path, monkeypatch, capsys):
    """`ovd eval --export DIR --json FILE`: a user's own COCO json (no world, no registration),
    from a folder outside the repository; an unregistered dataset is a clear error."""
    rng = np.random.default_rng(0)
    images, anns = [], []
    for i in (1, 2):
        Image.fromarray(rng.integers(0, 255, (64, 80, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
        images.append({"id": i, "file_name": f"{i}.png", "width": 80, "height": 64})
        anns.append({"id": i, "image_id": i, "category_id": i, "bbox": [10, 10, 30, 20], "area": 600,
                     "iscrowd": 0})
    coco = {"images": images, "annotations": anns,
            "categories": [{"id": 1, "name": "red ring", "split": "novel"}, {"id": 2, "name": "blue disk"}]}
    (tmp_path / "mine.json").write_text(json.dumps(coco))
    monkeypatch.chdir(tmp_path)
    assert main(["eval", "--export", str(plain_export), "--json", "mine.json", "--out", "ev"]) == 0
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert metrics["images"] == 2 and set(metrics) >= {"novel", "base", "all"}
    assert "generalized zero-shot detection" in capsys.readouterr().out
    # Without --out the results go to the working directory, never into the (verified) export.
    before = sorted(p.name for p in plain_export.iterdir())
    assert main(["eval", "--export", str(plain_export), "--json", "mine.json"]) == 0
    assert (tmp_path / f"eval_{plain_export.name}_eval_mine" / "metrics.json").is_file()
    assert sorted(p.name for p in plain_export.iterdir()) == before
    assert main(["eval", "--export", str(plain_export), "--dataset", "nothing_here"]) == 2
