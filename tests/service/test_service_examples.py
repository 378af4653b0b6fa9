"""Query by example over HTTP: JSON and multipart answer as the Python API does (the same
rows, the same detections), and every malformed example is a clear 422 before any work."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
from service_testing import image_bytes, running_app

from ovd.models.api import Detector, Example
from ovd.service.images import decode_image


@pytest.fixture(scope="module")
def client(detector, export_dir):
    with running_app(detector, export_dir, max_images_per_request=2, max_classes=4, max_examples=3) as c:
        yield c


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _close(got: list[dict], want) -> bool:
    """Equal up to float rounding (the service's text rows are cached in float16)."""
    return len(got) == len(want) and [d["label"] for d in got] == want.labels and np.allclose(
        [d["box"] for d in got], want.boxes.reshape(-1, 4), atol=1e-2) and np.allclose(
        [d["score"] for d in got], want.scores, atol=1e-3)


def test_examples_over_json_and_multipart_equal_the_python_api(client, detector):
    png, other = image_bytes(96, 80, seed=7), image_bytes(80, 64, seed=3)
    examples = [{"box": [10, 10, 40, 40], "label": "thing"}, {"box": [5, 5, 30, 30], "label": "other", "image": 0},
                {"box": [50, 20, 90, 60], "label": "thing"}]
    r = client.post("/v1/detect", json={"image": _b64(png), "examples": examples, "example_images": [_b64(other)],
                                        "score_threshold": 0.05, "max_detections": 50})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["classes"] == ["thing", "other"]
    rgb, other_rgb = decode_image(png, max_pixels=10**6), decode_image(other, max_pixels=10**6)
    want = Detector(detector)(rgb, examples=[Example([10, 10, 40, 40], "thing"), Example([5, 5, 30, 30], "other",
                                                                                          image=other_rgb),
                                             Example([50, 20, 90, 60], "thing")], threshold=0.05, max_detections=50)
    assert len(want) > 0 and _close(body["detections"], want)
    form = client.post("/v1/detect", files=[("image", ("x.png", png, "image/png")),
                                            ("example_images", ("e.png", other, "image/png"))],
                       data={"examples": json.dumps(examples), "score_threshold": "0.05", "max_detections": "50"})
    assert form.status_code == 200, form.text
    assert _close(form.json()["detections"], want)
    # Beside names: the names come first, and their detections are those of the names alone.
    both = client.post("/v1/detect", json={"image": _b64(png), "classes": ["red ring"], "examples": examples[:1],
                                           "score_threshold": 0.05, "max_detections": 300}).json()
    alone = client.post("/v1/detect", json={"image": _b64(png), "classes": ["red ring"], "score_threshold": 0.05,
                                            "max_detections": 300}).json()
    assert both["classes"] == ["red ring", "thing"]
    # (The example's detections share the 300 per image: the name keeps its best ones.)
    ring = [d for d in both["detections"] if d["label"] == "red ring"]
    assert len(ring) > 100 and [d["box"] for d in ring] == [d["box"] for d in alone["detections"][:len(ring)]]
    assert np.allclose([d["score"] for d in ring], [d["score"] for d in alone["detections"][:len(ring)]], atol=1e-6)
    # A batch request refers to example images by index.
    batch = client.post("/v1/detect/batch", json={"images": [_b64(png), _b64(other)], "score_threshold": 0.05,
                                                  "examples": [{**examples[0], "image": 0}],
                                                  "example_images": [_b64(png)], "max_detections": 50})
    assert batch.status_code == 200, batch.text
    assert _close(batch.json()["results"][0]["detections"],
                  Detector(detector)(rgb, examples=[Example([10, 10, 40, 40], "thing")], threshold=0.05,
                                     max_detections=50))
    # A 96 x 2 px strip, which no region fits: answered, with a warning naming the example.
    weak = client.post("/v1/detect", json={"image": _b64(png), "examples": [{"box": [0, 40, 96, 42], "label": "all"}]})
    assert weak.status_code == 200 and weak.json()["warnings"][0]["name"] == "all"


@pytest.mark.parametrize("change,code", [
    ({"examples": [{"box": [10, 10, 10, 40]}]}, "invalid_example"),  # empty box
    ({"examples": [{"box": [10, 10, 40]}]}, "invalid_request"),  # three numbers
    ({"examples": [{"box": [10, 10, 40, 40], "image": 1}]}, "invalid_request"),  # no such example image
    ({"examples": [{"box": [10, 10, 40, 40], "label": "red ring"}], "classes": ["red ring"]}, "invalid_request"),
    ({"examples": [{"box": [10, 10, 40, 40], "label": "  "}]}, "invalid_request"),
    ({"examples": [{"box": [10, 10, 40, 40], "label": f"l{i}"} for i in range(4)]}, "too_many_examples"),
    ({"examples": [{"box": [1, 1, 9, 9], "label": f"l{i}"} for i in range(3)], "classes": ["a", "b"]},
     "too_many_classes"),
    ({"example_images": [_b64(b"x")]}, "invalid_request"),  # images without boxes
    ({"examples": [{"box": [10, 10, 40, 40], "image": 0}], "example_images": [_b64(b"not an image")]},
     "unsupported_image"),
])
def test_bad_examples_are_clear_422s(client, change, code):
    body = {"image": _b64(image_bytes(96, 80, seed=1)), "classes": ["red ring"], **change}
    if "examples" in change and "classes" not in change:
        body.pop("classes")
    r = client.post("/v1/detect", json=body)
    assert r.status_code in (415, 422), r.text
    assert r.json()["error"]["code"] == code
    assert client.post("/v1/detect", json={"image": body["image"], "classes": ["a"]}).status_code == 200


def test_bad_example_forms_and_batches(client):
    png = image_bytes(96, 80, seed=2)
    r = client.post("/v1/detect", files={"image": ("x.png", png, "image/png")}, data={"examples": "[{oops"})
    assert r.status_code == 422 and "JSON list" in r.json()["error"]["message"]
    r = client.post("/v1/detect/batch", json={"images": [_b64(png)], "examples": [{"box": [1, 1, 20, 20]}]})
    assert r.status_code == 422 and "example_images" in r.json()["error"]["message"]
