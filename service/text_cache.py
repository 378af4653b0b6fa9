"""Text embeddings of (template, class name) pairs, computed once per text tower.

Lookup order: process-memory LRU -> Redis (shared by replicas, survives restarts) -> the text
tower, called once for all misses of a request. Entries are float16 with a header and a CRC32
of the payload, verified on every Redis read: a corrupt entry is counted, recomputed and
overwritten, never used.

Every embedding is rounded to float16 before it is used, whichever layer it came from, so a
request gives the same detections whether its text was just computed or read from a cache.

Redis entries expire after `OVD_TEXT_CACHE_TTL_S` (30 days by default), so a stream of new class
names cannot grow Redis without bound; with `maxmemory-policy volatile-lru` (docker/compose.yaml)
Redis may also evict them early under memory pressure, while registered vocabularies, written
without an expiry, are never evicted. A hit does not refresh the expiry: that would turn every
read into a write (GETEX EX is propagated to the AOF), and a popular entry that expires costs one
text-tower call per TTL.
"""

from __future__ import annotations

import asyncio
import hashlib
import struct
import zlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .redis_store import RedisStore, StoreUnavailable

MAGIC = b"OVDE"
VERSION = 2  # 2: the checksum covers the entry's own key (version-1 entries count as corrupt)
DTYPE_FLOAT16 = 1
HEADER = struct.Struct("<4sBBHI")  # magic, version, dtype, dim, crc32 of key + payload


class CorruptEntry(ValueError):
    """A cache entry whose header, size, checksum or key is wrong."""


def _checksum(key: str, payload: bytes) -> int:
    return zlib.crc32(payload, zlib.crc32(key.encode("utf-8", "surrogatepass")))


def encode_entry(vector: np.ndarray, key: str) -> bytes:
    """(D,) float embedding -> header + D float16 values (little-endian), 12 + 2 D bytes. The
    checksum covers `key`, so an entry copied under another name's key does not verify."""
    payload = np.asarray(vector, dtype="<f2").tobytes()
    return HEADER.pack(MAGIC, VERSION, DTYPE_FLOAT16, vector.shape[0], _checksum(key, payload)) + payload


def decode_entry(data: bytes, dim: int, key: str) -> np.ndarray:
    """Inverse of encode_entry for the entry stored under `key`: (dim,) float16 array.

    Raises:
        CorruptEntry: short data, wrong magic/version/dtype/dim, size or checksum mismatch
            (including an entry written for another key), or non-finite values.
    """
    if len(data) < HEADER.size:
        raise CorruptEntry(f"entry of {len(data)} bytes is shorter than its header")
    magic, version, dtype, stored_dim, crc = HEADER.unpack_from(data)
    payload = data[HEADER.size:]
    if magic != MAGIC or version != VERSION or dtype != DTYPE_FLOAT16:
        raise CorruptEntry(f"unknown entry header {magic!r} v{version} dtype {dtype}")
    if stored_dim != dim or len(payload) != 2 * dim:
        raise CorruptEntry(f"entry has dim {stored_dim} and {len(payload)} payload bytes; expected dim {dim}")
    if _checksum(key, payload) != crc:
        raise CorruptEntry("entry checksum mismatch (damaged, or written for another key)")
    vector = np.frombuffer(payload, dtype="<f2").astype(np.float16)
    if not np.isfinite(vector).all():
        raise CorruptEntry("entry holds non-finite values")
    return vector


@dataclass
class TextLookup:
    """Pairs looked up in the caches: their keys, the vectors found, what is left to encode."""

    keys: list[str]
    found: dict[str, np.ndarray]
    todo: dict[str, tuple[str, str]]

    @property
    def new_prompts(self) -> int:
        return len(self.todo)


class TextEmbedder:
    """Vocabulary text matrices with a two-level cache.

    Args:
        encode: prompts -> (N, D) L2-normalised float tensor (the text tower; called in a thread).
        model_key: identifies the text tower (its weights' sha256); part of every cache key.
        dim: D.
        cache_size: entries kept in process memory (LRU); 0 disables that layer.
        store: RedisStore or None.
        prefix: Redis key prefix.
        ttl_s: expiry of the entries written to Redis, seconds; 0 = none.
        on_lookup: callback(layer, result) counting hits and misses ("memory"/"redis", "hit"/"miss").
        chunk: prompts per text-tower call.
    """

    def __init__(self, encode: Callable[[list[str]], np.ndarray], *, model_key: str, dim: int,
                 cache_size: int, store: RedisStore | None = None, prefix: str = "ovd",
                 ttl_s: int = 0, on_lookup: Callable[[str, str], None] | None = None, chunk: int = 256):
        self._encode = encode
        self._model_key = model_key
        self.dim = dim
        self._cache_size = cache_size
        self._memory: OrderedDict[str, np.ndarray] = OrderedDict()
        self._store = store
        self._prefix = prefix
        self._ttl_s = ttl_s
        self._on_lookup = on_lookup or (lambda layer, result: None)
        self._writes: set[asyncio.Task] = set()
        self.chunk = chunk

    def key(self, template: str, name: str) -> str:
        """Redis key of one (template, name) embedding of this text tower."""
        digest = hashlib.sha256(f"{self._model_key}\0{template}\0{name}".encode()).hexdigest()
        return f"{self._prefix}:text:{digest[:40]}"

    def _remember(self, key: str, vector: np.ndarray) -> None:
        if self._cache_size <= 0:
            return
        self._memory[key] = vector
        self._memory.move_to_end(key)
        while len(self._memory) > self._cache_size:
            self._memory.popitem(last=False)

    def _compute(self, prompts: list[str]) -> np.ndarray:
        return np.asarray(self._encode(prompts), np.float32).astype(np.float16)

    async def lookup(self, pairs: list[tuple[str, str]]) -> TextLookup:
        """What the caches hold of (template, name) pairs (memory, then Redis); nothing is encoded.

        `TextLookup.new_prompts` is what `complete` would send to the text tower: the price of
        the request's text, known before that work starts.
        """
        keys = [self.key(t, n) for t, n in pairs]
        found: dict[str, np.ndarray] = {}
        for k in dict.fromkeys(keys):
            if k in self._memory:
                self._memory.move_to_end(k)
                found[k] = self._memory[k]
            self._on_lookup("memory", "hit" if k in found else "miss")
        missing = [k for k in dict.fromkeys(keys) if k not in found]
        if missing and self._store is not None:
            try:
                raw = await self._store.mget(missing)
            except StoreUnavailable:
                raw = [None] * len(missing)
            for k, data in zip(missing, raw, strict=True):
                if data is not None:
                    try:
                        found[k] = decode_entry(data, self.dim, k)
                        self._remember(k, found[k])
                    except CorruptEntry:
                        self._store.report("corrupt")  # recomputed and overwritten below
                self._on_lookup("redis", "hit" if k in found else "miss")
        todo = {k: p for k, p in zip(keys, pairs, strict=True) if k not in found}
        return TextLookup(keys, found, todo)

    async def complete(self, looked_up: TextLookup, *,
                       on_abandon: Callable[[int], None] | None = None) -> np.ndarray:
        """(len(pairs), D) float16 embeddings of a lookup, encoding what it lacks.

        The text tower runs `chunk` prompts per call; a request cancelled meanwhile stops after
        the call in progress (whose results are kept) and `on_abandon(prompts never encoded)`.
        """
        found, todo = looked_up.found, looked_up.todo
        items = list(todo.items())
        for start in range(0, len(items), self.chunk):
            part = items[start:start + self.chunk]
            try:
                computed = await asyncio.to_thread(self._compute, [t.replace("{}", n) for _, (t, n) in part])
            except asyncio.CancelledError:
                if on_abandon is not None:
                    on_abandon(len(items) - start - len(part))
                raise
            for (k, _), v in zip(part, computed, strict=True):
                found[k] = v
                self._remember(k, v)
            if self._store is not None:
                # Written in the background: a slow Redis must not delay the answer. With an
                # expiry, so that only these entries are evictable (see the module docstring).
                task = asyncio.create_task(self._store.set_many(
                    {k: encode_entry(found[k], k) for k, _ in part}, ttl_s=self._ttl_s))
                self._writes.add(task)
                task.add_done_callback(self._writes.discard)
        keys = looked_up.keys
        return np.stack([found[k] for k in keys]) if keys else np.zeros((0, self.dim), np.float16)

    async def vectors(self, pairs: list[tuple[str, str]]) -> np.ndarray:
        """(len(pairs), D) float16 embeddings of (template, name) pairs, through the caches."""
        return await self.complete(await self.lookup(pairs))

    async def text_matrix(self, names: list[str], templates: list[str]) -> np.ndarray:
        """(C, D) normalised float32 text embeddings of names, averaged over templates.

        With several templates this is prompt ensembling: mean of the per-template
        embeddings, renormalised. One template is renormalised too (after float16 rounding),
        so both cases go through the same arithmetic.
        """
        return self.ensemble(await self.vectors(self.pairs(names, templates)), len(names), len(templates))

    @staticmethod
    def pairs(names: list[str], templates: list[str]) -> list[tuple[str, str]]:
        """The (template, name) pairs of a vocabulary, template-major (what `ensemble` expects)."""
        return [(t, n) for t in templates for n in names]

    def ensemble(self, vectors: np.ndarray, n_names: int, n_templates: int) -> np.ndarray:
        """(C, D) text matrix of the `pairs(names, templates)` vectors: template mean, renormalised."""
        v = np.asarray(vectors, np.float32).reshape(n_templates, n_names, self.dim).mean(axis=0)
        return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)

    async def flush(self) -> None:
        """Wait for background Redis writes (shutdown, tests)."""
        if self._writes:
            await asyncio.gather(*self._writes, return_exceptions=True)
