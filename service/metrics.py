"""Prometheus metrics of one app instance (own registry, so several apps can share a process).

Requests are labelled by route template ("/v1/vocabularies/{vocab_id}", not the raw path) to
keep label cardinality bounded; paths that match no route are "unmatched".
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from .disconnect import CLIENT_GONE

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    """The service's metrics, in `self.registry`."""

    def __init__(self, max_batch_size: int):
        self.registry = CollectorRegistry()
        self.requests = Counter("ovd_http_requests_total", "HTTP requests by route template and status",
                                ["method", "route", "status"], registry=self.registry)
        self.latency = Histogram("ovd_http_request_duration_seconds", "HTTP request latency (s)",
                                 ["method", "route", "status"], buckets=LATENCY_BUCKETS,
                                 registry=self.registry)
        self.batch_size = Histogram("ovd_batch_size", "images per model.encode call",
                                    buckets=sorted({1, 2, 4, 8, 16, 32, 64, max_batch_size}),
                                    registry=self.registry)
        self.batch_seconds = Histogram("ovd_batch_duration_seconds", "model.encode time per batch (s)",
                                       buckets=LATENCY_BUCKETS, registry=self.registry)
        self.queue_depth = Gauge("ovd_queue_depth", "images waiting for the model",
                                 registry=self.registry)
        self.text_cache = Counter("ovd_text_cache_lookups_total",
                                  "text-embedding cache lookups by layer (memory, redis) and result",
                                  ["layer", "result"], registry=self.registry)
        self.redis_errors = Counter("ovd_redis_errors_total",
                                    "Redis failures by reason (timeout, connection, corrupt, other)",
                                    ["reason"], registry=self.registry)
        self.abandoned_requests = Counter(
            "ovd_abandoned_requests_total",
            "detect requests cancelled (client gone or timed out), by the stage they were in "
            "(parse, decode, text, model)", ["stage"], registry=self.registry)
        self.abandoned_jobs = Counter(
            "ovd_abandoned_jobs_total",
            "work dropped because its request was cancelled, by stage: decode (images not decoded), "
            "text (prompts not encoded), queue / encode / classify (images the model thread skipped)",
            ["stage"], registry=self.registry)
        self.admission_rejections = Counter(
            "ovd_admission_rejections_total",
            "requests refused by cost, by resource (pixels, prompts) and reason (request: over the "
            "per-request limit, busy: over the shared limit)", ["resource", "reason"], registry=self.registry)
        self.detections = Histogram("ovd_detections_per_image", "detections returned per image",
                                    buckets=(0, 1, 5, 10, 25, 50, 100, 300, 1000),
                                    registry=self.registry)

    def observe_batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.batch_seconds.observe(seconds)


class MetricsMiddleware:
    """Pure ASGI middleware counting every HTTP request and its latency.

    Pure ASGI (not BaseHTTPMiddleware) so it sees the final status of every response,
    including ones produced by other middleware and exception handlers.
    """

    def __init__(self, app, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = {"code": 500}

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or ("/static" if scope["path"].startswith("/static/")
                                                        else "unmatched")
            code = 499 if scope.get(CLIENT_GONE) else status["code"]  # 499: client closed request
            labels = (scope["method"], template, str(code))
            self.metrics.requests.labels(*labels).inc()
            self.metrics.latency.labels(*labels).observe(time.perf_counter() - start)
