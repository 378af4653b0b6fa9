"""What a request may cost: abandoned work is dropped (real server), requests are priced and
refused beyond the limits, classification stays bounded whatever the vocabulary."""

from __future__ import annotations

import base64
import io
import re
import threading
import time

import httpx
import pytest
from PIL import Image
from service_testing import image_bytes, reference, running_app

from ovd.service.admission import Budget
from ovd.service.errors import ApiError
from ovd.service.images import decode_image
from ovd.service.launch import ServerProcess


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _metric(text: str, name: str, **labels) -> float:
    """Sum of a metric's samples whose labels include `labels`."""
    total = 0.0
    for found, value in re.findall(rf"^{re.escape(name)}(?:{{([^}}]*)}})? (\S+)$", text, re.M):
        have = dict(re.findall(r'(\w+)="([^"]*)"', found or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            total += float(value)
    return total


def _big_blank_png(side: int) -> bytes:
    """A few KB of PNG that decodes to side x side pixels (slow to decode, cheap to send)."""
    buf = io.BytesIO()
    Image.new("RGB", (side, side)).save(buf, "PNG")
    return buf.getvalue()


def test_abandoned_requests_free_the_server(export_dir):
    """Clients that hang up, or time out, do not keep the decode pool busy for the next one."""
    env = {"OVD_DECODE_WORKERS": "1", "OVD_REQUEST_TIMEOUT_S": "3", "OVD_MAX_REQUEST_PIXELS": str(10**9),
           "OVD_MAX_PENDING_PIXELS": str(10**10), "OVD_MAX_IMAGE_PIXELS": str(10**8)}
    heavy = {"images": [_b64(_big_blank_png(5000))] * 8, "classes": ["red ring"]}  # ~8 x 0.7 s of decoding
    with ServerProcess(export_dir, env=env) as server:
        hung_up: list[str] = []

        def hang_up():
            try:
                httpx.post(f"{server.url}/v1/detect/batch", json=heavy, timeout=0.5)
            except httpx.TimeoutException:
                hung_up.append("gone")

        threads = [threading.Thread(target=hang_up) for _ in range(3)]
        for t in threads:
            t.start()
        timed_out = httpx.post(f"{server.url}/v1/detect/batch", json=heavy, timeout=60)
        for t in threads:
            t.join()
        assert hung_up == ["gone"] * 3
        assert timed_out.status_code == 504 and timed_out.json()["error"]["code"] == "timeout"
        # Without cancellation 4 x 8 images (~20 s of decoding) would be ahead of this one.
        t0 = time.monotonic()
        r = httpx.post(f"{server.url}/v1/detect", json={"image": _b64(image_bytes(seed=1)), "classes": ["red ring"]},
                       timeout=60)
        took = time.monotonic() - t0
        assert r.status_code == 200 and took < 4.0, took
        metrics = httpx.get(f"{server.url}/metrics").text
    assert _metric(metrics, "ovd_abandoned_requests_total", stage="decode") == 4
    # Most of the 4 x 8 images never ran: a request is cancelled about one decode (~0.7 s) after
    # its client leaves, later on a loaded machine (24 of 32 dropped was seen with a benchmark
    # beside the tests), so at least half is what the claim needs.
    assert _metric(metrics, "ovd_abandoned_jobs_total", stage="decode") >= 4 * 8 // 2
    assert _metric(metrics, "ovd_http_requests_total", route="/v1/detect/batch", status="499") == 3
    assert _metric(metrics, "ovd_http_requests_total", route="/v1/detect/batch", status="504") == 1


def test_a_request_gone_while_queued_is_not_encoded(export_dir):
    # A 3 s batching window keeps the job queued while its client hangs up.
    with ServerProcess(export_dir, env={"OVD_MAX_BATCH_WAIT_MS": "3000"}) as server:
        before = httpx.get(f"{server.url}/metrics").text
        with pytest.raises(httpx.TimeoutException):
            httpx.post(f"{server.url}/v1/detect", json={"image": _b64(image_bytes(seed=2)), "classes": ["a"]},
                       timeout=1.0)
        time.sleep(3.0)
        after = httpx.get(f"{server.url}/metrics").text
    assert _metric(after, "ovd_abandoned_requests_total", stage="model") == 1
    assert _metric(after, "ovd_abandoned_jobs_total", stage="queue") == 1
    assert _metric(after, "ovd_batch_size_count") == _metric(before, "ovd_batch_size_count")  # never encoded


# ---------------------------------------------------------------- admission by cost

def test_requests_are_priced_before_their_work(detector, export_dir):
    with running_app(detector, export_dir, max_request_pixels=100 * 80, max_request_new_prompts=100) as client:
        r = client.post("/v1/detect/batch", json={"images": [_b64(image_bytes(80, 64))] * 2, "classes": ["a"]})
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
        assert "OVD_MAX_REQUEST_PIXELS" in r.json()["error"]["message"]
        png = _b64(image_bytes(80, 64, seed=3))
        names = [f"thing {i}" for i in range(60)]
        r = client.post("/v1/detect", json={"image": png, "classes": names, "templates": ["a {}", "b {}"]})
        assert r.status_code == 422 and r.json()["error"]["code"] == "too_many_new_prompts"
        assert "OVD_MAX_REQUEST_NEW_PROMPTS" in r.json()["error"]["message"] and "120" in r.json()["error"]["message"]
        # Only uncached prompts count: 60 cached + 60 new is within 100.
        assert client.post("/v1/detect", json={"image": png, "classes": names}).status_code == 200
        more = names + [f"other {i}" for i in range(60)]
        assert client.post("/v1/detect", json={"image": png, "classes": more}).status_code == 200
        metrics = client.get("/metrics").text
        assert _metric(metrics, "ovd_admission_rejections_total", resource="pixels", reason="request") == 1
        assert _metric(metrics, "ovd_admission_rejections_total", resource="prompts", reason="request") == 1


def test_budget_shared_by_requests():
    rejected = []
    budget = Budget("pixels", per_request=10, per_request_setting="OVD_A", total=15, total_setting="OVD_B",
                    status=413, code="too_big", on_reject=rejected.append)
    with budget.hold(10):
        with pytest.raises(ApiError) as busy:
            with budget.hold(6):
                pass
        assert busy.value.status == 503 and busy.value.code == "server_busy"
        assert busy.value.headers["Retry-After"] == "1" and "OVD_B" in busy.value.message
        with budget.hold(5):
            assert budget.in_use == 15
    assert budget.in_use == 0
    with pytest.raises(ApiError) as big:
        with budget.hold(11):
            pass
    assert big.value.status == 413 and "OVD_A" in big.value.message
    assert rejected == ["busy", "request"]


@pytest.mark.parametrize("score_mode", ["softmax", "per_name"])
def test_classification_of_a_large_vocabulary_is_capped(detector, export_dir, score_mode):
    """The model regresses and gives NMS at most max_classify_candidates pairs, the best, in
    either score mode (per-name scores do not sum to one: a threshold bounds nothing there)."""
    png = image_bytes(80, 64, seed=4)
    names = ["red ring", "blue disk", "green cross"]
    request = {"image": _b64(png), "classes": names, "score_threshold": 0.0, "max_detections": 1000,
               "score_mode": score_mode, "nms_threshold": 1.0}  # NMS keeps all: the cap alone cuts
    inputs = detector.preprocessing(decode_image(png, max_pixels=10**6))
    proposals = len(detector.encode([inputs])[0].proposals)
    cap = proposals // 2
    with running_app(detector, export_dir, max_classify_candidates=cap) as client:
        got = client.post("/v1/detect", json=request).json()["detections"]
    everything = reference(detector, png, names, score_threshold=0.0, max_detections=1000, score_mode=score_mode,
                           nms_thresh=1.0)
    assert len(got) == cap < len(everything)
    assert [d["score"] for d in got] == sorted((d["score"] for d in everything), reverse=True)[:cap]
    with running_app(detector, export_dir, max_classify_candidates=len(names) * proposals) as client:  # within: exact
        got = client.post("/v1/detect", json=request).json()["detections"]
    assert got == everything


# ---------------------------------------------------------------- registered vocabularies

def test_vocabulary_limits_chunked_writes_and_delete(detector, export_dir, redis_url):
    import redis

    keys = {"api_keys": "k1,k2", "redis_url": redis_url, "redis_prefix": "vlim", "max_vocabularies": 3,
            "max_vocabularies_per_key": 2, "vocabulary_write_chunk_bytes": 1024}
    k1, k2 = ({"authorization": f"Bearer {k}"} for k in ("k1", "k2"))
    big = [f"a long class name number {i}" for i in range(1500)]  # ~45 KB: 40+ chunked writes
    with running_app(detector, export_dir, **keys) as client:
        r = client.post("/v1/vocabularies", json={"names": big}, headers=k1)
        assert r.status_code == 201
        big_id = r.json()["id"]
        store = redis.Redis.from_url(redis_url)
        assert store.ttl(f"vlim:vocab:{big_id}") == -1 and not list(store.scan_iter("vlim:vocab:*:partial:*"))
        assert client.get(f"/v1/vocabularies/{big_id}", headers=k2).json()["names"] == big
        ids = [client.post("/v1/vocabularies", json={"names": [f"x{i}"]}, headers=k).json().get("id")
               for i, k in ((1, k1), (2, k2))]
        r = client.post("/v1/vocabularies", json={"names": ["x3"]}, headers=k1)  # k1's third
        assert r.status_code == 422 and r.json()["error"]["code"] == "vocabulary_limit"
        assert "OVD_MAX_VOCABULARIES_PER_KEY" in r.json()["error"]["message"]
        r = client.post("/v1/vocabularies", json={"names": ["x4"]}, headers=k2)  # the service's fourth
        assert r.status_code == 422 and "OVD_MAX_VOCABULARIES)" in r.json()["error"]["message"]
        assert client.post("/v1/vocabularies", json={"names": big}, headers=k2).status_code == 201  # shared: free
        # Deleting: only by an owner; gone when its last owner deletes it.
        assert client.delete(f"/v1/vocabularies/{ids[0]}", headers=k2).status_code == 404
        assert client.delete("/v1/vocabularies/coco", headers=k1).json()["error"]["code"] == "builtin_vocabulary"
        assert client.delete(f"/v1/vocabularies/{ids[0]}", headers=k1).status_code == 204
        assert client.get(f"/v1/vocabularies/{ids[0]}", headers=k1).status_code == 404
        assert client.delete(f"/v1/vocabularies/{big_id}", headers=k1).status_code == 204
        assert client.get(f"/v1/vocabularies/{big_id}", headers=k1).status_code == 200  # k2 still holds it
        assert client.delete(f"/v1/vocabularies/{big_id}", headers=k2).status_code == 204
        assert client.get(f"/v1/vocabularies/{big_id}", headers=k1).status_code == 404
        assert client.post("/v1/vocabularies", json={"names": ["x3"]}, headers=k1).status_code == 201  # room again
        store.close()


def test_normal_requests_keep_their_latency_under_the_abuse_mix(export_dir):
    """benchmarks/load_service.py's abuse mix for 20 s against a real server: the normal
    requests all succeed with a p95 under 5 s (about 0.1 s alone on this tiny model), no client
    gets a 5xx other than 503/504, the abandoned work is dropped and counted, and the server's
    peak RSS stays under 2.5 GiB."""
    import asyncio
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    from load_service import abuse_mix, peak_rss_mb

    env = {"OVD_REQUEST_TIMEOUT_S": "10", "OVD_MAX_IMAGE_PIXELS": str(4000 * 4000)}
    with ServerProcess(export_dir, env=env) as server:
        result = asyncio.run(abuse_mix(server.url, _b64(image_bytes(96, 80, seed=3)), seconds=20))
        rss = peak_rss_mb(server.process.pid)
        assert "Traceback" not in server.log()
    normal = result["normal"]
    assert normal["n"] >= 5 and normal["errors"] == 0 and normal["p95_ms"] < 5000, result
    assert all(not s.startswith("5") or s in ("503", "504") for s in result["abuse_statuses"]), result
    assert result["abuse_statuses"].get("gone", 0) > 0 and sum(result["abandoned_jobs"].values()) > 0, result
    assert rss < 2.5 * 1024, rss
