"""Server-side batching: many requests, one `runtime.encode` per batch, one vocabulary each.

Requests wait in a bounded queue; a batch is taken when `max_batch_size` images are waiting
or the oldest has waited `max_batch_wait`, whichever comes first (while the model is busy,
the queue fills and the next batch leaves at once). A batch takes the jobs of the cheapest
requests first (fewest model passes, then arrival), so a one-image request is not queued behind
the tiles of another's large images. The batch runs in one worker thread, so the event loop
never blocks on torch:

    regions = runtime.encode(images)                    # ~all of the cost, shared
    for each request: runtime.classify(its regions, ...) # two small matmuls + NMS, per vocabulary

A job whose request went away (its future cancelled: client gone, timed out) is dropped at the
next stage boundary: when batches are taken (stage "queue"), before its group is encoded
("encode": skipped when no job of the group is still wanted) and before its classification
("classify"); `on_abandon(stage, images)` counts them.

Classification is bounded whatever the vocabulary and score mode: every job runs with
`max_candidates`, the most (box, class) pairs (the best) the model regresses and gives NMS.

Images are encoded together only when they share the runtime's batch key (their padded size):
the detector's GroupNorm sees the padding, so mixing sizes would make a request's detections
depend on which other requests it was batched with.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import numpy as np

from ovd.models.detections import Detections
from ovd.models.runtime import ClassifyOptions, Runtime, batches

logger = logging.getLogger(__name__)


class Overloaded(Exception):
    """The queue has no room for the request's images, or the batcher is shutting down."""


@dataclass
class Job:
    """One image to detect in, with its request's vocabulary.

    Attributes:
        inputs: the runtime's preprocessed input {"image": (3, h, w) uint8, "height": H, "width": W}.
        text: (C, D) normalised text embeddings; class indices index its rows. None: encode
            only, the result carries the image's regions (the example images of a query by
            example, models/examples.py).
        classes: the C names of those rows.
        options: score threshold, max detections, score mode and NMS of the request.
    """

    inputs: dict
    text: np.ndarray | None  # (C, D) float32 normalised embeddings
    classes: tuple[str, ...]
    options: ClassifyOptions = field(default_factory=ClassifyOptions)
    future: asyncio.Future | None = field(default=None, repr=False)
    enqueued: float = 0.0
    cost: int = 1  # model passes of its request (set by `Batcher.submit`): fewer go first


@dataclass
class JobResult:
    """Detections of one job and where its time went (seconds).

    Attributes:
        detections: boxes in pixels of the original image, class indices into the job's text
            (None for an encode-only job).
        queue_s: waiting for a batch. model_s: the batch's encode call (shared).
        classify_s: this job's classification. batch_size: images in its encode call.
        regions: the image's encoded regions, for an encode-only job.
    """

    detections: Detections | None
    queue_s: float
    model_s: float
    classify_s: float
    batch_size: int
    regions: object = None


class Batcher:
    """Asyncio front, one worker thread behind.

    Args:
        runtime: the detector runtime (ovd.models.runtime: PyTorch or onnxruntime).
        max_batch_size: images per encode call.
        max_wait_s: longest a batch waits to fill up, seconds.
        max_queue: images waiting at most; more -> Overloaded.
        on_batch: callback(batch_size, seconds) per encode call (metrics).
        on_queue_depth: callback(depth) whenever the queue changes (metrics).
        max_candidates: (box, class) pairs one image may give NMS (None: unbounded).
        on_abandon: callback(stage, images) for jobs dropped because their request went away.
    """

    def __init__(self, runtime: Runtime, *, max_batch_size: int, max_wait_s: float, max_queue: int,
                 on_batch: Callable[[int, float], None] | None = None,
                 on_queue_depth: Callable[[int], None] | None = None,
                 max_candidates: int | None = None,
                 on_abandon: Callable[[str, int], None] | None = None):
        self.runtime = runtime
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self._on_batch = on_batch or (lambda size, seconds: None)
        self._on_queue_depth = on_queue_depth or (lambda depth: None)
        self._on_abandon = on_abandon or (lambda stage, images: None)
        self.max_candidates = max_candidates
        self._queue: list[Job] = []
        self._arrived = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._closing = False
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ovd-model")
        self._task: asyncio.Task | None = None

    @property
    def depth(self) -> int:
        return len(self._queue)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="ovd-batcher")

    def submit(self, jobs: list[Job]) -> list[asyncio.Future]:
        """Queue all jobs of one request, or none of them.

        Returns:
            One future per job, resolving to a JobResult (cancel it to drop the job).

        Raises:
            Overloaded: not enough room in the queue, or shutting down.
        """
        if self._closing:
            raise Overloaded("the server is shutting down")
        if len(self._queue) + len(jobs) > self.max_queue:
            raise Overloaded(f"{len(self._queue)} images are waiting; the queue holds {self.max_queue}")
        loop = asyncio.get_running_loop()
        for job in jobs:
            job.future = loop.create_future()
            job.enqueued = time.monotonic()
            job.cost = len(jobs)
            self._queue.append(job)
        self._idle.clear()
        self._arrived.set()
        self._on_queue_depth(len(self._queue))
        return [job.future for job in jobs]

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._arrived.wait()
            while self._queue and len(self._queue) < self.max_batch_size:
                remaining = min(j.enqueued for j in self._queue) + self.max_wait_s - time.monotonic()
                if remaining <= 0:
                    break
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), remaining)
                except asyncio.TimeoutError:
                    break
            batch: list[Job] = []
            dropped = 0
            # Cheapest request first (then arrival): a one-image request does not wait behind
            # the 60 tiles of another's large images; those wait, and may time out, instead.
            self._queue.sort(key=lambda j: (j.cost, j.enqueued))
            while self._queue and len(batch) < self.max_batch_size:
                job = self._queue.pop(0)
                if not job.future.done():  # a request that timed out or went away is skipped
                    batch.append(job)
                else:
                    dropped += 1
            if dropped:
                self._on_abandon("queue", dropped)
            self._on_queue_depth(len(self._queue))
            if self._queue:
                self._arrived.set()  # the rest is the next batch, without waiting again
            else:
                self._arrived.clear()
            if batch:
                started = time.monotonic()
                outcomes = await loop.run_in_executor(self._executor, self._process, batch, started)
                for job, outcome in zip(batch, outcomes, strict=True):
                    if job.future.done():
                        continue
                    if isinstance(outcome, BaseException):
                        job.future.set_exception(outcome)
                    else:
                        job.future.set_result(outcome)
            if not self._queue:
                self._idle.set()

    def _process(self, batch: list[Job], started: float) -> list[JobResult | BaseException]:
        """Runs in the worker thread: encode each same-size group once, classify per job."""
        outcomes: list[JobResult | BaseException] = [RuntimeError("not processed")] * len(batch)
        for group in batches(self.runtime.preprocessing, [j.inputs for j in batch]):
            # The futures belong to the event loop; reading whether one was cancelled is safe.
            members = [i for i in group if not batch[i].future.done()]
            if len(members) < len(group):
                self._on_abandon("encode", len(group) - len(members))
            for i in group:
                if i not in members:
                    outcomes[i] = RuntimeError("abandoned")
            if not members:
                continue
            jobs = [batch[i] for i in members]
            try:
                t0 = time.monotonic()
                regions = self.runtime.encode([j.inputs for j in jobs])
                model_s = time.monotonic() - t0
                self._on_batch(len(jobs), model_s)
                for i, job, region in zip(members, jobs, regions, strict=True):
                    if job.future.done():
                        self._on_abandon("classify", 1)
                        outcomes[i] = RuntimeError("abandoned")
                        continue
                    if job.text is None:
                        outcomes[i] = JobResult(None, queue_s=started - job.enqueued, model_s=model_s,
                                                classify_s=0.0, batch_size=len(jobs), regions=region)
                        continue
                    t1 = time.monotonic()
                    options = replace(job.options, max_candidates=self.max_candidates)
                    (found,) = self.runtime.classify([region], job.text, [job.inputs], job.classes, options)
                    outcomes[i] = JobResult(found, queue_s=started - job.enqueued, model_s=model_s,
                                            classify_s=time.monotonic() - t1, batch_size=len(jobs))
            except Exception as e:  # noqa: BLE001  delivered to the waiting requests
                logger.exception("inference failed for a batch of %d images", len(jobs))
                for i in members:
                    outcomes[i] = e
        return outcomes

    async def close(self, timeout_s: float = 30.0) -> None:
        """Refuse new jobs, finish the queued and running ones (up to timeout_s), stop."""
        self._closing = True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except asyncio.TimeoutError:
            logger.warning("shutdown: %d queued images dropped after %.0f s", len(self._queue), timeout_s)
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        for job in self._queue:
            if not job.future.done():
                job.future.set_exception(Overloaded("the server shut down"))
        self._executor.shutdown(wait=True)
