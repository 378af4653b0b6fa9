"""The served model's lifecycle: load it in the background, warm it up, publish it, close it.

One `ServingRuntime` per app holds what a service process serves with: its settings, its
metrics, the Redis connection (or none) and, once loaded, the `ServedModel` (the detector
runtime of `ovd.models.runtime`, the batcher in front of it, the text-embedding cache and the
vocabularies). The app's lifespan is `ServingRuntime.lifespan`: at start-up it connects Redis
and starts loading, so /livez answers at once while /readyz says 503 until the model is loaded
and warmed up; at shutdown it drains the batcher, writes pending cache entries and closes Redis.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import numpy as np

from ovd.models.examples import category_text_mean
from ovd.models.model_card import vocabulary_fits
from ovd.models.runtime import Runtime, load_runtime

from .admission import Admission
from .batcher import Batcher, Job
from .images import DecodePool
from .metrics import Metrics
from .redis_store import RedisStore
from .settings import Settings
from .text_cache import TextEmbedder
from .vocabulary import VocabularyRegistry

logger = logging.getLogger(__name__)


@dataclass
class ServedModel:
    """What the detection routes need once the model is loaded."""

    detector: Runtime
    batcher: Batcher
    text: TextEmbedder
    vocabularies: VocabularyRegistry
    decoder: DecodePool
    admission: Admission
    text_mean: np.ndarray  # (D,) where text rows sit: the target of example rows' shift


    @property
    def manifest(self) -> dict:
        return self.detector.manifest


class ServingRuntime:
    """Settings, metrics, Redis and the served model of one app.

    Attributes:
        settings: the process's configuration.
        metrics: the app's Prometheus metrics (its own registry).
        store: the Redis connection, or None without `OVD_REDIS_URL` (set at start-up).
        model: the loaded model, or None while it loads (or after loading failed).
        load_error: why loading failed ("ExceptionType: message"), else None.
    """

    def __init__(self, settings: Settings):
        self.settings = settings
        self.metrics = Metrics(settings.max_batch_size)
        self.store: RedisStore | None = None
        self.model: ServedModel | None = None
        self.load_error: str | None = None
        self._loader: asyncio.Task | None = None

    def load_detector(self) -> Runtime:
        """The detector runtime of `settings.model_dir` (run in a worker thread).

        Every file is checked against the manifest; the onnx backend never loads torch's detector.
        """
        s = self.settings
        return load_runtime(s.model_dir, backend=s.backend, device=s.device, threads=s.torch_threads)

    @asynccontextmanager
    async def lifespan(self, _app: object) -> AsyncIterator[None]:
        """The app's lifespan: `start()` before the first request, `close()` at shutdown."""
        await self.start()
        try:
            yield
        finally:
            await self.close()

    async def start(self) -> None:
        """Connect Redis (when configured) and start loading the model in the background."""
        s = self.settings
        if s.torch_threads and s.backend == "torch":  # the onnx backend never imports torch
            import torch

            torch.set_num_threads(s.torch_threads)
        if s.redis_url:
            self.store = RedisStore(s.redis_url, timeout_s=s.redis_timeout_s, degraded_s=s.redis_degraded_s,
                                    on_error=lambda reason: self.metrics.redis_errors.labels(reason).inc())
        self._loader = asyncio.create_task(self._load())

    async def _load(self) -> None:
        """Load the detector, build batcher, text cache and vocabularies, warm up, publish."""
        s, metrics = self.settings, self.metrics
        try:
            detector = await asyncio.to_thread(self.load_detector)
            manifest = detector.manifest
            batcher = Batcher(detector, max_batch_size=s.max_batch_size, max_wait_s=s.max_batch_wait_ms / 1000,
                              max_queue=s.max_queue, on_batch=metrics.observe_batch,
                              on_queue_depth=metrics.queue_depth.set, max_candidates=s.max_classify_candidates,
                              on_abandon=lambda stage, n: metrics.abandoned_jobs.labels(stage).inc(n))
            batcher.start()
            text = TextEmbedder(
                detector.encode_text, model_key=manifest["files"]["text_encoder"]["sha256"],
                dim=int(manifest.get("embed_dim") or detector.text.embed_dim),
                cache_size=s.text_cache_size, store=self.store, prefix=s.redis_prefix, ttl_s=s.text_cache_ttl_s,
                on_lookup=lambda layer, result: metrics.text_cache.labels(layer, result).inc(),
                chunk=s.text_encode_chunk)
            names = [c["name"] for c in manifest.get("categories", [])]
            vocabularies = VocabularyRegistry(names, store=self.store, prefix=s.redis_prefix,
                                              max_total=s.max_vocabularies, max_per_owner=s.max_vocabularies_per_key,
                                              chunk_bytes=s.vocabulary_write_chunk_bytes,
                                              fits=lambda vocab: vocabulary_fits(manifest, vocab))
            admission = Admission.from_settings(
                s, on_reject=lambda resource, reason: metrics.admission_rejections.labels(resource, reason).inc())
            text_mean = await asyncio.to_thread(category_text_mean, detector)
            model = ServedModel(detector, batcher, text, vocabularies, DecodePool(s.decode_workers), admission,
                                text_mean)
            if s.warmup:
                await self._warmup(model)
            self.model = model
            logger.info("model %s %s loaded from %s (%s backend)", manifest.get("name"),
                        manifest.get("version"), s.model_dir, s.backend)
        except Exception as e:  # noqa: BLE001  reported by /readyz and /livez, and logged
            logger.exception("loading the model from %s failed", s.model_dir)
            self.load_error = f"{type(e).__name__}: {e}"

    @staticmethod
    async def _warmup(model: ServedModel) -> None:
        """One inference on a blank image, so the first request does not pay for lazy init."""
        size = model.detector.preprocessing.min_size
        inputs = model.detector.preprocessing(np.zeros((size, size, 3), np.uint8))
        text = np.full((1, model.text.dim), model.text.dim ** -0.5, np.float32)  # one unit vector
        await asyncio.gather(*model.batcher.submit([Job(inputs, text, ("warm-up",))]))

    async def close(self) -> None:
        """Stop loading, let queued images finish (up to `shutdown_timeout_s`), flush, disconnect."""
        if self._loader is not None and not self._loader.done():
            self._loader.cancel()
        if self.model is not None:
            await self.model.batcher.close(self.settings.shutdown_timeout_s)
            await self.model.text.flush()
            self.model.decoder.close()
        if self.store is not None:
            await self.store.close()
        logger.info("shut down")
