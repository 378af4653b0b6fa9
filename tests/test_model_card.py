"""The model card: what an export knows, and the warnings for names it cannot read."""

from __future__ import annotations

import json
import shutil
import warnings

import pytest

from ovd.models.model_card import model_card, unknown_words, vocabulary_fits, warnings_for, words_of
from ovd.training.clip_pretrain import corpus_words

MANIFEST = {"name": "m", "clip": {"text_words": {"words": ["a", "red", "ring", "blue", "star", "photo", "of"],
                                                 "source": "test"}}}


def test_words_and_unknown_words():
    assert words_of("Red-Ring 2, a  PHOTO") == ["red", "ring", "a", "photo"]
    assert corpus_words(["a red ring.", "A photo of a blue star"]) == ["a", "blue", "of", "photo", "red", "ring", "star"]
    assert unknown_words(MANIFEST, ["red ring", "red cat", "forklift", "blue star"]) == {
        "red cat": ["cat"], "forklift": ["forklift"]}
    assert unknown_words({"clip": {"text_words": None}}, ["forklift"]) == {}  # not recorded: not restricted
    (w,) = warnings_for(MANIFEST, ["cat", "ring"])
    assert w["name"] == "cat" and w["unknown_words"] == ["cat"] and "'cat'" in w["message"]


def test_vocabulary_fits_and_card():
    assert vocabulary_fits(MANIFEST, ["red ring", "blue star", "cat"])
    assert not vocabulary_fits(MANIFEST, ["person", "bicycle", "car", "red ring"])
    assert vocabulary_fits({}, ["person"])
    card = model_card(MANIFEST)
    assert card["vocabulary"]["restricted"] and "red" in card["vocabulary"]["words"]
    assert model_card({})["vocabulary"]["restricted"] is False


@pytest.fixture(scope="module")
def carded_export(tmp_path_factory, plain_export):
    """The tiny export with a recorded reading (the manifest is not hash-listed; its files are)."""
    out = tmp_path_factory.mktemp("carded") / "export"
    shutil.copytree(plain_export, out)
    manifest = json.loads((out / "manifest.json").read_text())
    names = [c["name"] for c in manifest["categories"]]
    manifest["clip"]["text_words"] = {"words": corpus_words([f"a photo of a {n}" for n in names]),
                                      "source": "test captions"}
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def test_api_warns_about_unknown_words(carded_export):
    from ovd.models.api import Detector, UnknownWordWarning

    detector = Detector.load(carded_export)
    name = detector.manifest["categories"][0]["name"]
    assert detector.warnings([name]) == []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        detector(__import__("numpy").zeros((64, 64, 3), "uint8"), [name, "cat"])
    ours = [w for w in caught if w.category is UnknownWordWarning]
    assert len(ours) == 1 and "'cat'" in str(ours[0].message)
    assert detector.card["vocabulary"]["restricted"]


def test_service_warns_and_offers_only_vocabularies_the_model_can_read(carded_export):
    import sys

    sys.path.insert(0, "tests/service")
    from service_testing import image_bytes, running_app

    from ovd.models.runtime import load_runtime

    runtime = load_runtime(carded_export)
    name = runtime.manifest["categories"][0]["name"]
    with running_app(runtime, carded_export) as client:
        r = client.post("/v1/detect", files={"image": ("x.png", image_bytes(seed=2), "image/png")},
                        data={"classes": [name, "cat"]})
        assert r.status_code == 200, r.text
        assert [(w["name"], w["unknown_words"]) for w in r.json()["warnings"]] == [("cat", ["cat"])]
        ids = [v["id"] for v in client.get("/v1/vocabularies").json()["vocabularies"]]
        assert ids == ["training"]  # coco and lvis are words this model never read
        card = client.get("/v1/models/card").json()
        assert card["vocabulary"]["restricted"] and name.split()[0] in card["vocabulary"]["words"]


def test_the_shipped_model_names_the_words_it_never_read():
    """The shipped export carries its CLIP's words (`ovd export` copies them from the CLIP's
    manifest): "cat" gets a warning naming the word, its own class names none, and COCO's names
    do not fit it."""
    from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES

    from ovd.models.registry import REGISTERED

    manifest = json.loads((REGISTERED["default"] / "manifest.json").read_text())
    (cat,) = warnings_for(manifest, ["cat", "red ring", "white hexagon"])
    assert cat["name"] == "cat" and cat["unknown_words"] == ["cat"]
    assert not vocabulary_fits(manifest, [c["name"] for c in COCO_CATEGORIES if c["isthing"]])
