"""The service as deployed: `ovd serve` (uvicorn) in its own process, real Redis, real sockets."""

from __future__ import annotations

import base64
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
from detector_testing import same_detections
from redis_testing import redis_process_or_skip
from service_testing import image_bytes, reference

from ovd.service.launch import ServerProcess
from ovd.training.cli import main


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _metric(text: str, name: str) -> float:
    """Sum of a metric's samples (all label sets) in Prometheus text format."""
    return sum(float(m) for m in re.findall(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M))


def test_concurrent_requests_with_different_vocabularies_are_batched_and_exact(server, detector):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        registered = c.post("/v1/vocabularies", json={"names": ["green cross", "a yellow thing"]}).json()["id"]
        before = c.get("/metrics").text
    vocabularies = [
        {"classes": ["red ring", "blue disk"]},
        {"classes": ["blue disk"], "templates": ["a photo of a {}", "a drone picture of a {}"]},
        {"vocabulary": registered},
        {"vocabulary": "training"},
        {"vocabulary": "coco"},
        {"classes": ["forklift", "red helmet", "person"]},
    ]
    names = {registered: ["green cross", "a yellow thing"], "training": ["red ring", "blue disk", "green cross"]}
    jobs = []
    for i, v in enumerate(vocabularies * 2):  # 12 requests, 2 image sizes: two padded shapes
        size = (80, 64) if i % 2 else (64, 64)
        jobs.append((image_bytes(*size, seed=20 + i), v))

    def send(job):
        data, v = job
        with httpx.Client(base_url=server.url, timeout=60) as c:
            return c.post("/v1/detect", json={"image": _b64(data), "score_threshold": 0.3, **v})

    with ThreadPoolExecutor(len(jobs)) as pool:
        responses = list(pool.map(send, jobs))
    total = 0
    for (data, v), r in zip(jobs, responses, strict=True):
        assert r.status_code == 200, r.text
        body = r.json()
        if "vocabulary" in v:
            want_names = names.get(v["vocabulary"]) or body["classes"]
            assert len(body["classes"]) == (80 if v["vocabulary"] == "coco" else len(want_names))
        else:
            want_names = v["classes"]
        assert body["classes"] == want_names
        want = reference(detector, data, want_names, v.get("templates"), score_threshold=0.3)
        assert same_detections(body["detections"], want), v
        total += len(want)
    assert total > 0
    after = httpx.get(f"{server.url}/metrics").text
    batches = _metric(after, "ovd_batch_size_count") - _metric(before, "ovd_batch_size_count")
    images = _metric(after, "ovd_batch_size_sum") - _metric(before, "ovd_batch_size_sum")
    assert images == len(jobs) and batches < len(jobs), (batches, images)  # some encode calls shared


def test_body_limit_and_a_good_request_on_the_real_server(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        r = c.post("/v1/detect", content=b"{" + b" " * (3 * 2**20), headers={"content-type": "application/json"})
        assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
        r = c.post("/v1/detect", files={"image": ("a.png", image_bytes(seed=1), "image/png")},
                   data={"classes": "red ring"})
        assert r.status_code == 200 and r.json()["detections"]


def test_redis_killed_mid_test_loses_no_request(export_dir):
    with redis_process_or_skip() as (redis_url, redis_proc), \
            ServerProcess(export_dir, env={"OVD_REDIS_URL": redis_url, "OVD_REDIS_TIMEOUT_S": "0.2"}) as server:
        assert httpx.get(f"{server.url}/readyz").json()["redis"] == "ok"
        png = _b64(image_bytes(64, 64, seed=3))
        statuses: list[int] = []
        sent = threading.Event()

        def client(worker: int) -> None:
            with httpx.Client(base_url=server.url, timeout=60) as c:
                for i in range(8):
                    # New names every time: each request reads and writes Redis.
                    r = c.post("/v1/detect", json={"image": png, "classes": [f"thing {worker}-{i}", "red ring"]})
                    statuses.append(r.status_code)
                    if len(statuses) >= 6:
                        sent.set()

        threads = [threading.Thread(target=client, args=(w,)) for w in range(3)]
        for t in threads:
            t.start()
        assert sent.wait(60)
        redis_proc.kill()
        for t in threads:
            t.join(120)
        assert len(statuses) == 24 and set(statuses) == {200}
        ready = httpx.get(f"{server.url}/readyz")
        assert ready.status_code == 200 and ready.json() == {
            "status": "degraded", "model": True, "redis": "down", "error": None}
        metrics = httpx.get(f"{server.url}/metrics").text
        assert _metric(metrics, "ovd_redis_errors_total") > 0


def test_graceful_shutdown_finishes_in_flight_requests(export_dir):
    # A 2 s batching window holds the requests in the queue while SIGTERM arrives.
    server = ServerProcess(export_dir, env={"OVD_MAX_BATCH_WAIT_MS": "2000", "OVD_MAX_BATCH_SIZE": "16"})
    with server:
        png = _b64(image_bytes(64, 64, seed=4))

        def send(_):
            with httpx.Client(base_url=server.url, timeout=60) as c:
                return c.post("/v1/detect", json={"image": png, "classes": ["red ring"]})

        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(send, i) for i in range(4)]
            deadline = time.monotonic() + 30
            while _metric(httpx.get(f"{server.url}/metrics").text, "ovd_queue_depth") < 4:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            t0 = time.monotonic()
            # uvicorn re-raises the signal it handled once it has shut down cleanly.
            assert server.stop() in (0, -15)
            responses = [f.result() for f in futures]
        assert [r.status_code for r in responses] == [200] * 4
        assert all(r.json()["detections"] for r in responses)
        assert time.monotonic() - t0 < 20
        assert "Waiting for application shutdown" in server.log()


def test_serve_refuses_a_missing_export(tmp_path, caplog):
    assert main(["serve", "--model-dir", str(tmp_path / "nothing"), "--port", "1"]) == 2
    assert "missing manifest.json" in caplog.text
