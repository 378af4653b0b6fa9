"""The service's one Redis connection: short timeouts, failures counted, never raised blindly.

Redis is a shared cache and vocabulary store, not a dependency of answering a request: every
failure (down, slow, corrupt entry) is counted by reason, makes /readyz say "degraded" for a
while, and the caller falls back (recompute, or this process's memory).
"""

from __future__ import annotations

import asyncio
import logging
import time

import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

logger = logging.getLogger(__name__)


class StoreUnavailable(Exception):
    """Redis did not answer (down, timed out, or failed); the reason is already counted."""


def redis_reason(error: BaseException) -> str:
    """Metric label of a Redis failure: timeout, connection or other."""
    if isinstance(error, (asyncio.TimeoutError, TimeoutError, redis.exceptions.TimeoutError)):
        return "timeout"
    if isinstance(error, (redis.exceptions.ConnectionError, ConnectionError, OSError)):
        return "connection"
    return "other"


class RedisStore:
    """Async Redis access with a hard timeout per call.

    Args:
        url: redis:// URL.
        timeout_s: socket timeout and total time budget of one call.
        degraded_s: how long after a failure `recently_failed` stays true.
        on_error: callback(reason) counting failures (the Prometheus counter).
    """

    def __init__(self, url: str, *, timeout_s: float, degraded_s: float, on_error=None):
        # No retries: a request must not wait several timeouts for a cache.
        self.client = aioredis.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0), health_check_interval=0)
        self.timeout_s = timeout_s
        self.degraded_s = degraded_s
        self._on_error = on_error or (lambda reason: None)
        self._last_error = -float("inf")

    def report(self, reason: str) -> None:
        """Count a failure (timeout / connection / corrupt / other) and mark the store degraded."""
        self._last_error = time.monotonic()
        self._on_error(reason)
        logger.warning("redis: %s", reason)

    @property
    def recently_failed(self) -> bool:
        return time.monotonic() - self._last_error < self.degraded_s

    async def _call(self, coro):
        try:
            return await asyncio.wait_for(coro, self.timeout_s)
        except Exception as e:  # noqa: BLE001  every Redis failure degrades the same way
            self.report(redis_reason(e))
            raise StoreUnavailable(str(e)) from e

    async def call(self, coro):
        """Any client call under the timeout; StoreUnavailable (reported) when it fails."""
        return await self._call(coro)

    async def get(self, key: str) -> bytes | None:
        return await self._call(self.client.get(key))

    async def mget(self, keys: list[str]) -> list[bytes | None]:
        return await self._call(self.client.mget(keys)) if keys else []

    async def set_many(self, items: dict[str, bytes], *, ttl_s: int = 0) -> bool:
        """Write items in one round trip; False (already reported) when Redis failed.

        ttl_s > 0 gives every key that expiry (SET EX, pipelined); 0 writes them without one
        (MSET), which also clears an expiry the key had.
        """
        if not items:
            return True
        if ttl_s > 0:
            pipe = self.client.pipeline(transaction=False)
            for key, value in items.items():
                pipe.set(key, value, ex=ttl_s)
            write = pipe.execute()
        else:
            write = self.client.mset(items)
        try:
            await self._call(write)
        except StoreUnavailable:
            return False
        return True

    async def ping(self) -> bool:
        """True if Redis answers PING within the timeout (a failure is not counted)."""
        try:
            return bool(await asyncio.wait_for(self.client.ping(), self.timeout_s))
        except Exception:  # noqa: BLE001
            return False

    async def close(self) -> None:
        await self.client.aclose()
