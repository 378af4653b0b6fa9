"""The HTTP API in process (TestClient, lifespan running, the real model and batcher).

Every detection is compared with the model's own `model([image], text=T)`: a request alone in
its batch must give exactly the same floats.
"""

from __future__ import annotations

import base64
import re

import numpy as np
import pytest
import redis
from service_testing import image_bytes, make_settings, png_claiming, reference, running_app

from ovd.service.app import create_app

NAMES = ["red ring", "blue disk", "a thing never seen"]


@pytest.fixture(scope="module")
def client(detector, export_dir, redis_url):
    with running_app(detector, export_dir, redis_url=redis_url, redis_prefix="api",
                     max_body_bytes=300_000, max_image_pixels=200 * 200, max_classes=20,
                     max_class_name_chars=30, max_images_per_request=3) as c:
        yield c


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _good(client) -> None:
    """A good request after every refused one: the server still answers."""
    r = client.post("/v1/detect", json={"image": _b64(image_bytes(seed=9)), "classes": ["red ring"]})
    assert r.status_code == 200, r.text
    assert r.json()["detections"]


def test_detect_multipart_equals_the_model(client, detector):
    png = image_bytes(80, 64, seed=1)
    r = client.post("/v1/detect", files={"image": ("x.png", png, "image/png")},
                    data={"classes": "red ring, blue disk\na thing never seen"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == {"name": "ovd-test", "version": "0.0.1"}
    assert body["image"] == {"width": 80, "height": 64, "tiles": 0}
    assert body["classes"] == NAMES
    assert set(body["timings_ms"]) == {"decode", "text", "queue", "model", "classify", "total"}
    assert body["detections"] == reference(detector, png, NAMES)  # exact floats
    for d in body["detections"]:
        assert d["label"] == NAMES[d["class_index"]]
        x1, y1, x2, y2 = d["box"]
        assert 0 <= x1 <= x2 <= 80 and 0 <= y1 <= y2 <= 64


def test_detect_json_with_options_templates_and_messy_names(client, detector):
    jpg = image_bytes(96, 60, seed=2, fmt="JPEG")
    templates = ["a photo of a {}", "a drone picture of a {}"]
    r = client.post("/v1/detect", json={
        "image": _b64(jpg), "classes": ["  red   ring", "RED RING", "", "blue disk"],
        "templates": templates, "score_threshold": 0.2, "max_detections": 5})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["classes"] == ["red ring", "blue disk"]
    want = reference(detector, jpg, ["red ring", "blue disk"], templates, score_threshold=0.2,
                     max_detections=5)
    assert body["detections"] == want and 0 < len(want) <= 5
    assert all(d["score"] >= 0.2 for d in want)
    # Repeatable form fields give the same answer as the JSON body.
    r2 = client.post("/v1/detect", files={"image": ("x.jpg", jpg, "image/jpeg")},
                     data={"classes": ["red ring", "blue disk"], "template": templates,
                           "score_threshold": "0.2", "max_detections": "5"})
    assert r2.json()["detections"] == want


def test_score_mode_and_nms_options_over_json_and_multipart(client, detector):
    png = image_bytes(96, 80, seed=7)
    names = ["red ring", "blue disk", "purple ring"]
    options = {"score_mode": "per_name", "nms_threshold": 0.3, "class_agnostic": True}
    r = client.post("/v1/detect", json={"image": _b64(png), "classes": names, "score_threshold": 0.05,
                                        **options})
    assert r.status_code == 200, r.text
    want = reference(detector, png, names, score_threshold=0.05, score_mode="per_name", nms_thresh=0.3,
                     class_agnostic=True)

    def close(got: list[dict], want: list[dict] = want) -> bool:
        # Equal up to rounding: a name's text embedding may come from the cache, encoded in
        # another batch of prompts by an earlier test (CLIP's float32 matmuls, then float16).
        return [d["label"] for d in got] == [d["label"] for d in want] and all(
            g["box"] == pytest.approx(w["box"], abs=1e-3) and g["score"] == pytest.approx(w["score"], abs=1e-5)
            for g, w in zip(got, want, strict=True))

    assert want and close(r.json()["detections"])
    form = client.post("/v1/detect", files={"image": ("x.png", png, "image/png")},
                       data={"classes": names, "score_threshold": "0.05", "score_mode": "per_name",
                             "nms_threshold": "0.3", "class_agnostic": "true"})
    assert form.status_code == 200, form.text
    assert close(form.json()["detections"])
    # The options change the answer: the default is per-name scores with the model's per-class NMS.
    default = client.post("/v1/detect", json={"image": _b64(png), "classes": names, "score_threshold": 0.05})
    softmax = reference(detector, png, names, score_threshold=0.05)
    assert close(default.json()["detections"], softmax) and not close(softmax)


def test_large_images_are_sliced_like_the_python_api(client, detector):
    from ovd.models.api import Detector
    from ovd.service.images import decode_image

    png = image_bytes(190, 150, seed=8)  # the test model's input is 64 px: 2.3x smaller, so auto slices
    names = ["red ring", "blue disk"]
    answers = {}
    for tiles in ("auto", "on", "off"):
        r = client.post("/v1/detect", files={"image": ("x.png", png, "image/png")},
                        data={"classes": names, "score_threshold": "0.05", "tiles": tiles})
        assert r.status_code == 200, r.text
        answers[tiles] = r.json()
    assert answers["auto"]["image"]["tiles"] == answers["on"]["image"]["tiles"] > 1
    assert answers["off"]["image"]["tiles"] == 0 and answers["off"]["detections"] != answers["on"]["detections"]
    want = Detector(detector)(decode_image(png, max_pixels=10**6), names, threshold=0.05, tiles="on", max_tiles=16,
                              max_detections=None)
    got = answers["on"]["detections"]
    assert len(got) == len(want) > 0

    def rows(boxes, labels) -> np.ndarray:  # order-free: the service's text is float16-rounded, so
        # near-tied scores of this random model may rank in another order
        table = np.column_stack([np.asarray(boxes, np.float64).round(1), [names.index(x) for x in labels]])
        return table[np.lexsort(table.T[::-1])]

    assert np.allclose(rows([d["box"] for d in got], [d["label"] for d in got]), rows(want.boxes, want.labels),
                       atol=0.11)


def test_model_passes_beyond_the_queue_get_fewer_tiles_or_a_clear_refusal(detector, export_dir):
    """16 windows + the whole image, twice, is 34 passes for a queue of 20: `auto` uses fewer,
    larger windows (20 // 2 - 1 = 9 per image), `on` is refused with the setting to change."""
    images = [_b64(image_bytes(199, 199, seed=1))] * 2
    with running_app(detector, export_dir, max_queue=20) as small:
        r = small.post("/v1/detect/batch", json={"images": images, "classes": ["a"], "tiles": "on"})
        assert r.status_code == 422 and r.json()["error"]["code"] == "too_many_model_passes", r.text
        assert "OVD_MAX_QUEUE" in r.json()["error"]["message"]
        auto = small.post("/v1/detect/batch", json={"images": images, "classes": ["a"], "tiles": "auto"})
        assert auto.status_code == 200 and [x["image"]["tiles"] for x in auto.json()["results"]] == [9, 9]


def test_batch_json_and_multipart(client, detector):
    images = [image_bytes(80, 64, seed=3), image_bytes(64, 64, seed=4, fmt="JPEG")]
    r = client.post("/v1/detect/batch", json={"images": [_b64(i) for i in images], "classes": NAMES})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [x["image"] for x in results] == [{"width": 80, "height": 64, "tiles": 0}, {"width": 64, "height": 64, "tiles": 0}]
    for res, data in zip(results, images, strict=True):
        # Different sizes pad differently: each is encoded alone, so the floats are exact.
        assert res["detections"] == reference(detector, data, NAMES)
    r = client.post("/v1/detect/batch", files=[("images", ("a.png", images[0], "image/png")),
                                               ("images", ("b.jpg", images[1], "image/jpeg"))],
                    data={"classes": NAMES})
    assert r.status_code == 200 and r.json()["results"] == [
        {**a, "timings_ms": b["timings_ms"]} for a, b in zip(results, r.json()["results"], strict=True)]


def test_vocabularies_builtin_registered_and_shared_through_redis(client, detector, export_dir, redis_url):
    listed = {v["id"]: v["size"] for v in client.get("/v1/vocabularies").json()["vocabularies"]}
    assert listed == {"training": 3, "coco": 80, "lvis": 1203}
    assert client.get("/v1/vocabularies/training").json()["names"] == ["red ring", "blue disk", "green cross"]
    r = client.post("/v1/vocabularies", json={"names": [" red ring", "blue disk", "Red Ring"]})
    assert r.status_code == 201
    created = r.json()
    assert created["size"] == 2 and re.fullmatch(r"[0-9a-f]{32}", created["id"])
    assert client.post("/v1/vocabularies", json={"names": ["red ring", "blue disk"]}).json() == created
    png = image_bytes(seed=5)
    by_id = client.post("/v1/detect", json={"image": _b64(png), "vocabulary": created["id"]}).json()
    assert by_id["classes"] == ["red ring", "blue disk"]
    assert by_id["detections"] == reference(detector, png, ["red ring", "blue disk"])
    # Another replica (or this one after a restart) finds it in Redis.
    with running_app(detector, export_dir, redis_url=redis_url, redis_prefix="api") as other:
        got = other.get(f"/v1/vocabularies/{created['id']}")
        assert got.status_code == 200 and got.json()["names"] == ["red ring", "blue disk"]
        metrics = other.get("/metrics").text
        other.post("/v1/detect", json={"image": _b64(png), "vocabulary": created["id"]})
        metrics = other.get("/metrics").text
        assert 'ovd_text_cache_lookups_total{layer="redis",result="hit"} 2.0' in metrics
    # Both were read from Redis above: text embeddings carry the configured expiry, the
    # registered vocabulary none (so volatile-lru never evicts it).
    store = redis.Redis.from_url(redis_url)
    text_ttls = {store.ttl(k) for k in store.scan_iter("api:text:*")}
    assert text_ttls and all(0 < t <= make_settings(export_dir).text_cache_ttl_s for t in text_ttls)
    assert store.ttl(f"api:vocab:{created['id']}") == -1
    store.close()
    # Corrupted in Redis: refused (404 with a clear message), counted.
    with running_app(detector, export_dir, redis_url=redis_url, redis_prefix="api") as other:
        redis.Redis.from_url(redis_url).set(f"api:vocab:{created['id']}", b"{broken")
        r = other.get(f"/v1/vocabularies/{created['id']}")
        assert r.status_code == 404 and "corrupted" in r.json()["error"]["message"]
        assert 'ovd_redis_errors_total{reason="corrupt"} 1.0' in other.get("/metrics").text
        assert other.get("/readyz").json()["status"] == "degraded"


@pytest.mark.parametrize("case,status,code", [
    ("body_too_large", 413, "body_too_large"),
    ("too_many_pixels", 413, "image_too_large"),
    ("not_an_image", 415, "unsupported_image"),
    ("zero_bytes", 400, "empty_image"),
    ("truncated", 400, "corrupt_image"),
    ("bad_base64", 400, "invalid_base64"),
    ("bad_json", 400, "invalid_json"),
    ("wrong_content_type", 415, "unsupported_media_type"),
    ("too_many_classes", 422, "too_many_classes"),
    ("class_name_too_long", 422, "class_name_too_long"),
    ("no_classes", 422, "no_classes"),
    ("classes_and_vocabulary", 422, "classes_and_vocabulary"),
    ("bad_template", 422, "invalid_template"),
    ("score_out_of_range", 422, "invalid_request"),
    ("unknown_field", 422, "invalid_request"),
    ("unknown_form_field", 422, "invalid_request"),
    ("nms_out_of_range", 422, "invalid_request"),
    ("unknown_score_mode", 422, "invalid_request"),
    ("too_many_images", 422, "too_many_images"),
    ("image_field_not_a_file", 422, "missing_image"),
    ("unknown_vocabulary", 404, "unknown_vocabulary"),
    ("unknown_hash_vocabulary", 404, "unknown_vocabulary"),
])
def test_refused_requests_are_clear_json_errors(client, case, status, code):
    png = image_bytes(seed=6)
    ok = {"image": _b64(png), "classes": ["red ring"]}
    requests = {
        "body_too_large": lambda: client.post("/v1/detect", content=b"x" * 300_001,
                                              headers={"content-type": "application/json"}),
        "too_many_pixels": lambda: client.post("/v1/detect", json={**ok, "image": _b64(image_bytes(201, 200))}),
        "not_an_image": lambda: client.post("/v1/detect", files={"image": ("x.txt", b"hello", "text/plain")},
                                            data={"classes": "a"}),
        "zero_bytes": lambda: client.post("/v1/detect", files={"image": ("x.png", b"", "image/png")},
                                          data={"classes": "a"}),
        "truncated": lambda: client.post("/v1/detect", json={**ok, "image": _b64(png[: len(png) // 2])}),
        "bad_base64": lambda: client.post("/v1/detect", json={**ok, "image": "!!not base64!!"}),
        "bad_json": lambda: client.post("/v1/detect", content=b'{"image": ',
                                        headers={"content-type": "application/json"}),
        "wrong_content_type": lambda: client.post("/v1/detect", content=png, headers={"content-type": "image/png"}),
        "too_many_classes": lambda: client.post("/v1/detect", json={**ok, "classes": [f"c{i}" for i in range(21)]}),
        "class_name_too_long": lambda: client.post("/v1/detect", json={**ok, "classes": ["x" * 31]}),
        "no_classes": lambda: client.post("/v1/detect", json={**ok, "classes": [" ", ""]}),
        "classes_and_vocabulary": lambda: client.post("/v1/detect", json={**ok, "vocabulary": "coco"}),
        "bad_template": lambda: client.post("/v1/detect", json={**ok, "templates": ["{0.__class__}"]}),
        "score_out_of_range": lambda: client.post("/v1/detect", json={**ok, "score_threshold": 1.5}),
        "unknown_field": lambda: client.post("/v1/detect", json={**ok, "clases": ["typo"]}),
        "unknown_form_field": lambda: client.post("/v1/detect", files={"image": ("x.png", png, "image/png")},
                                                  data={"classes": "a", "nms_treshold": "0.3"}),
        "nms_out_of_range": lambda: client.post("/v1/detect", json={**ok, "nms_threshold": 0}),
        "unknown_score_mode": lambda: client.post("/v1/detect", files={"image": ("x.png", png, "image/png")},
                                                  data={"classes": "a", "score_mode": "sigmoid"}),
        "too_many_images": lambda: client.post("/v1/detect/batch", json={"images": [ok["image"]] * 4,
                                                                         "classes": ["a"]}),
        "image_field_not_a_file": lambda: client.post("/v1/detect", data={"image": "abc", "classes": "a"},
                                                      files={"other": ("x", b"1")}),
        "unknown_vocabulary": lambda: client.post("/v1/detect", json={"image": ok["image"], "vocabulary": "nope"}),
        "unknown_hash_vocabulary": lambda: client.get("/v1/vocabularies/" + "0" * 32),
    }
    r = requests[case]()
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    error = r.json()["error"]
    assert error["status"] == status and error["code"] == code and error["message"]
    _good(client)


def test_pixel_bomb_header_is_refused_without_decoding(client):
    r = client.post("/v1/detect", files={"image": ("b.png", png_claiming(50_000, 50_000), "image/png")}, data={"classes": "a"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "image_too_large"
    _good(client)


def test_streamed_body_over_the_limit_is_413(client):
    def chunks():
        for _ in range(40):
            yield b"x" * 10_000

    r = client.post("/v1/detect", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
    _good(client)


def test_ops_routes(client):
    assert client.get("/livez").json() == {"status": "alive"}
    assert client.get("/readyz").json() == {"status": "ready", "model": True, "redis": "ok", "error": None}
    manifest = client.get("/v1/models").json()
    assert manifest["name"] == "ovd-test" and manifest["categories"][0]["split"] == "novel"
    spec = client.get("/openapi.json").json()
    assert {"/v1/detect", "/v1/detect/batch", "/v1/vocabularies", "/readyz"} <= set(spec["paths"])
    assert set(spec["paths"]["/v1/detect"]["post"]["requestBody"]["content"]) == {
        "application/json", "multipart/form-data"}
    assert client.get("/docs").status_code == 200
    page = client.get("/")
    assert page.status_code == 200 and "<canvas" in page.text
    assert client.get("/static/app.js").status_code == 200
    metrics = client.get("/metrics").text
    for line in ['ovd_http_requests_total{method="POST",route="/v1/detect",status="200"}',
                 'ovd_http_requests_total{method="POST",route="/v1/detect",status="422"}',
                 'ovd_http_request_duration_seconds_bucket{le="0.005",method="GET",route="/readyz",status="200"}',
                 "ovd_batch_size_bucket", "ovd_queue_depth 0.0",
                 'ovd_text_cache_lookups_total{layer="memory",result="hit"}',
                 'ovd_text_cache_lookups_total{layer="redis",result="miss"}']:
        assert line in metrics, line
    r = client.get("/no/such/route")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def test_api_keys(detector, export_dir):
    with running_app(detector, export_dir, api_keys="key-one,key-two") as c:
        body = {"image": _b64(image_bytes(seed=7)), "classes": ["red ring"]}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic key-one"},
                        {"Authorization": "Bearer "}, {"Authorization": "Bearer key-one-and-more"}):
            r = c.post("/v1/detect", json=body, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized", headers
            assert r.headers["www-authenticate"] == "Bearer"
        assert c.get("/v1/vocabularies").status_code == 401
        assert c.get("/v1/models").status_code == 401
        for key in ("key-one", "key-two"):
            assert c.post("/v1/detect", json=body, headers={"Authorization": f"Bearer {key}"}).status_code == 200
        for path in ("/livez", "/readyz", "/metrics", "/", "/docs", "/openapi.json", "/static/app.js"):
            assert c.get(path).status_code == 200, path


def test_overload_is_503_with_retry_after(detector, export_dir):
    import concurrent.futures

    png = image_bytes(96, 96, seed=8)
    with running_app(detector, export_dir, max_queue=1, max_batch_size=1, max_batch_wait_ms=0) as c:
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            rs = list(pool.map(lambda _: c.post("/v1/detect", json={"image": _b64(png), "classes": ["x"]}),
                               range(8)))
        codes = sorted(r.status_code for r in rs)
        assert 200 in codes and 503 in codes and set(codes) <= {200, 503}, codes
        busy = next(r for r in rs if r.status_code == 503)
        assert busy.headers["retry-after"] == "1" and busy.json()["error"]["code"] == "overloaded"
        _good(c)


def test_request_timeout_is_504(detector, export_dir):
    with running_app(detector, export_dir, request_timeout_s=0.005) as c:
        r = c.post("/v1/detect", json={"image": _b64(image_bytes(96, 96)), "classes": ["red ring"]})
        assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
        assert c.get("/livez").status_code == 200


def test_readiness_while_loading_and_after_a_failed_load(export_dir, tmp_path):
    from fastapi.testclient import TestClient

    # Loading from disk (hashes, weights) takes a while: /readyz says 503 "loading" meanwhile.
    app = create_app(make_settings(export_dir))
    with TestClient(app) as c:
        first = c.get("/readyz")
        assert first.status_code == 503 and first.json()["status"] == "loading"
        assert c.get("/livez").status_code == 200
        r = c.post("/v1/detect", json={"image": "", "classes": ["a"]})
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_not_ready"
    app = create_app(make_settings(tmp_path / "missing"))
    with TestClient(app) as c:
        for _ in range(100):
            r = c.get("/readyz")
            if r.json()["status"] == "failed":
                break
        assert r.status_code == 503 and "manifest.json" in r.json()["error"]
        assert c.get("/livez").status_code == 503
