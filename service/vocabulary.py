"""Class names: normalisation, the built-in vocabularies, and the registry of named ones.

A vocabulary is a list of class names plus the prompt templates that embed them. Registered
vocabularies are addressed by a hash of their content, so registering the same names twice
gives the same id on every replica; they live in Redis (shared, survives restarts) and in
process memory (works while Redis is down).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from .errors import ApiError
from .redis_store import RedisStore, StoreUnavailable

BUILTIN_DESCRIPTIONS = {
    "training": "the categories the model was trained and evaluated on (its manifest)",
    "coco": "the 80 COCO thing categories",
    "lvis": "the 1203 LVIS v1 categories",
}


def check_text(value: str, what: str) -> str:
    """`value` if it is valid Unicode text (UTF-8 encodable: no lone surrogates, no NUL).

    JSON can carry "\ud800", which Python decodes to a str that cannot be encoded, hashed
    or sent to the text tower.

    Raises:
        ApiError: 422 `invalid_text`.
    """
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ApiError(422, "invalid_text",
                       f"{what} {value[:40]!r} is not valid Unicode text (lone surrogate at {e.start})") from e
    if "\0" in value:
        raise ApiError(422, "invalid_text", f"{what} {value[:40]!r} contains a NUL character")
    return value


def normalise_names(names: list[str], *, max_classes: int, max_chars: int) -> list[str]:
    """Strip, collapse whitespace, drop empties, dedupe case-insensitively (first one kept).

    Limits are checked after normalisation, so padding and duplicates never count.

    Raises:
        ApiError: 422 if nothing is left, more than `max_classes` remain, a name is longer
            than `max_chars` characters, or a name is not valid Unicode text (`invalid_text`).
    """
    for name in names:
        check_text(str(name), "class name")
    out: list[str] = []
    seen: set[str] = set()
    for name in names:
        clean = " ".join(str(name).split())
        if clean and clean.casefold() not in seen:
            seen.add(clean.casefold())
            out.append(clean)
    if not out:
        raise ApiError(422, "no_classes", "no class names given (send `classes` or a `vocabulary`)")
    if len(out) > max_classes:
        raise ApiError(422, "too_many_classes", f"{len(out)} class names; the limit is {max_classes}")
    long = [n for n in out if len(n) > max_chars]
    if long:
        raise ApiError(422, "class_name_too_long",
                       f"class name {long[0][:40]!r}... has {len(long[0])} characters; the limit is {max_chars}")
    return out


def split_form_names(values: list[str]) -> list[str]:
    """Form fields may carry one name each or several separated by newlines or commas."""
    return [part for v in values for part in re.split(r"[\n,]", v)]


def check_templates(templates: list[str], *, max_templates: int, max_chars: int) -> list[str]:
    """Validate prompt templates: each holds exactly one `{}` and no other braces.

    Only `{}` is substituted (with str.replace, never str.format), so a template cannot reach
    attributes of the name ("{0.__class__}").

    Raises:
        ApiError: 422 for a bad template or too many of them.
    """
    for t in templates:
        check_text(t, "template")
    clean = list(dict.fromkeys(" ".join(t.split()) for t in templates))
    if len(clean) > max_templates:
        raise ApiError(422, "too_many_templates", f"{len(clean)} templates; the limit is {max_templates}")
    for t in clean:
        if t.count("{}") != 1 or "{" in t.replace("{}", "") or "}" in t.replace("{}", ""):
            raise ApiError(422, "invalid_template",
                           f"template {t[:60]!r} must contain exactly one '{{}}' and no other braces")
        if len(t) > 4 * max_chars:
            raise ApiError(422, "invalid_template", f"template {t[:40]!r}... is too long")
    return clean


@dataclass(frozen=True)
class Vocabulary:
    """Names + prompt templates; `templates` empty means the model's own template."""

    id: str
    names: list[str]
    templates: list[str] = field(default_factory=list)
    builtin: bool = False

    def to_json(self) -> str:
        return json.dumps({"id": self.id, "names": self.names, "templates": self.templates})


def content_id(names: list[str], templates: list[str]) -> str:
    """Content hash of a vocabulary: the same names and templates give the same id anywhere."""
    payload = json.dumps({"names": names, "templates": templates}, ensure_ascii=False,
                         separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def _detectron2_data(module: str, name: str):
    """A list from one of Detectron2's category-metadata files, read without importing the
    detectron2 package (which imports torch: the onnx backend serves without it). Those files
    are plain data modules; None when Detectron2 is not installed."""
    import importlib.util

    spec = importlib.util.find_spec("detectron2")  # finds the package; does not import it
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "data" / "datasets" / f"{module}.py"
    loader = importlib.util.spec_from_file_location(f"_ovd_detectron2_{module}", path)
    data = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(data)
    return getattr(data, name)


@cache
def coco_names() -> tuple[str, ...]:
    """The 80 COCO thing classes, in COCO order (empty without Detectron2)."""
    categories = _detectron2_data("builtin_meta", "COCO_CATEGORIES") or []
    return tuple(c["name"] for c in categories if c["isthing"] == 1)


@cache
def lvis_names() -> tuple[str, ...]:
    """The 1203 LVIS v1 classes in plain words, in LVIS order.

    "bow_(weapon)" -> "bow", unless another category would then read the same ("bow_(weapon)"
    and "bow_(decorative_ribbons)"): those keep their qualifier as "bow (weapon)".
    """
    categories = _detectron2_data("lvis_v1_categories", "LVIS_CATEGORIES") or []
    raw = [c["name"] for c in sorted(categories, key=lambda c: c["id"])]
    # One name has words after its qualifier: "monitor_(computer_equipment) computer_monitor"
    # reads best as those words.
    full = [re.sub(r"^.*_\([^)]*\)\s+(\S.*)$", r"\1", n).replace("_", " ") for n in raw]
    short = [re.sub(r"\s*\([^)]*\)$", "", n) for n in full]
    counts = Counter(s.casefold() for s in short)
    return tuple(s if counts[s.casefold()] == 1 else f for f, s in zip(full, short, strict=True))


class VocabularyRegistry:
    """Built-in and registered vocabularies.

    Registered ones are counted (at most `max_total`, and `max_per_owner` per API key) and live
    in Redis under keys of their own, without expiry (`<prefix>:vocab:<id>`, with the index sets
    `<prefix>:vocabs` and `<prefix>:vocabs:owner:<owner>`): text-cache entries are the only keys
    with an expiry, so `volatile-lru` eviction never reaches a vocabulary. A large one is written
    in pieces of `chunk_bytes` (each call within the Redis timeout) to a temporary key renamed
    into place, so a reader never sees half of it.

    Args:
        training_names: the model's category names (built-in "training").
        fits: whether the model can read a vocabulary (ovd.models.model_card.vocabulary_fits):
            the other built-ins (coco, lvis) are offered only when it can.
        store: the shared RedisStore, or None without Redis (then this process holds them).
        prefix: Redis key prefix.
        max_total, max_per_owner, chunk_bytes: the limits above.
    """

    def __init__(self, training_names: list[str], *, store: RedisStore | None = None,
                 prefix: str = "ovd", max_total: int = 10_000, max_per_owner: int = 1000,
                 chunk_bytes: int = 64 * 1024, fits: Callable[[list[str]], bool] = lambda names: True):
        self._builtin = {name: Vocabulary(name, list(names), builtin=True) for name, names in (
            ("training", training_names), ("coco", coco_names()), ("lvis", lvis_names()))
            if names and (name == "training" or fits(list(names)))}
        self._registered: dict[str, Vocabulary] = {}
        self._owners: dict[str, set[str]] = {}  # without Redis: owner -> ids
        self._store = store
        self._prefix = prefix
        self.max_total = max_total
        self.max_per_owner = max_per_owner
        self.chunk_bytes = chunk_bytes

    def builtins(self) -> list[Vocabulary]:
        return list(self._builtin.values())

    def _key(self, vocab_id: str) -> str:
        return f"{self._prefix}:vocab:{vocab_id}"

    def _index(self, owner: str | None = None) -> str:
        return f"{self._prefix}:vocabs" + (f":owner:{owner}" if owner else "")

    def _limit(self, count: int, limit: int, setting: str, whose: str) -> None:
        if count >= limit:
            raise ApiError(422, "vocabulary_limit",
                           f"{whose} {count} registered vocabularies; the limit is {limit} ({setting}); "
                           "DELETE /v1/vocabularies/{id} frees one")

    async def register(self, names: list[str], templates: list[str], owner: str = "anonymous") -> Vocabulary:
        """Store a vocabulary (already normalised) under its content id; idempotent.

        Returns only once it is stored (in Redis when configured).

        Raises:
            ApiError: 422 `vocabulary_limit` past a count limit; 503 `vocabulary_store_unavailable`
                when Redis is configured and the write failed.
        """
        vocab = Vocabulary(content_id(names, templates), names, templates)
        if self._store is None:
            mine = self._owners.setdefault(owner, set())
            if vocab.id not in mine:
                self._limit(len(mine), self.max_per_owner, "OVD_MAX_VOCABULARIES_PER_KEY", "this API key has")
                if vocab.id not in self._registered:
                    self._limit(len(self._registered), self.max_total, "OVD_MAX_VOCABULARIES", "the service has")
            self._registered[vocab.id] = vocab
            mine.add(vocab.id)
            return vocab
        store = self._store
        try:
            pipe = store.client.pipeline(transaction=False)
            pipe.sismember(self._index(owner), vocab.id).sismember(self._index(), vocab.id)
            pipe.scard(self._index(owner)).scard(self._index())
            owned, known, n_owned, n_all = await store.call(pipe.execute())
            if not owned:
                self._limit(n_owned, self.max_per_owner, "OVD_MAX_VOCABULARIES_PER_KEY", "this API key has")
            if not known:
                self._limit(n_all, self.max_total, "OVD_MAX_VOCABULARIES", "the service has")
                await self._write(vocab)
            await store.call(store.client.pipeline(transaction=False)
                             .sadd(self._index(), vocab.id).sadd(self._index(owner), vocab.id).execute())
        except StoreUnavailable as e:
            raise ApiError(503, "vocabulary_store_unavailable", "Redis did not store the vocabulary; retry",
                           headers={"Retry-After": "5"}) from e
        self._registered[vocab.id] = vocab
        return vocab

    async def _write(self, vocab: Vocabulary) -> None:
        """The vocabulary's JSON in chunks to a temporary key, then renamed into place."""
        store, data = self._store, vocab.to_json().encode()
        tmp = f"{self._key(vocab.id)}:partial:{os.urandom(6).hex()}"
        try:
            for start in range(0, len(data), self.chunk_bytes):
                pipe = store.client.pipeline(transaction=False)
                pipe.append(tmp, data[start:start + self.chunk_bytes]).expire(tmp, 600)
                await store.call(pipe.execute())
            await store.call(store.client.pipeline(transaction=True).rename(tmp, self._key(vocab.id))
                             .persist(self._key(vocab.id)).execute())
        except StoreUnavailable:
            with contextlib.suppress(Exception):
                await store.client.delete(tmp)
            raise

    async def delete(self, vocab_id: str, owner: str = "anonymous") -> None:
        """Remove this owner's registration; the vocabulary goes when no owner is left.

        Raises:
            ApiError: 422 `builtin_vocabulary`; 404 `unknown_vocabulary` when this owner did not
                register it; 503 `vocabulary_store_unavailable`.
        """
        if vocab_id in self._builtin:
            raise ApiError(422, "builtin_vocabulary", f"{vocab_id!r} is built in and cannot be deleted")
        unknown = ApiError(404, "unknown_vocabulary", f"no vocabulary with id {vocab_id!r} registered by this key")
        if self._store is None:
            mine = self._owners.get(owner, set())
            if vocab_id not in mine:
                raise unknown
            mine.discard(vocab_id)
            if not any(vocab_id in ids for ids in self._owners.values()):
                self._registered.pop(vocab_id, None)
            return
        store = self._store
        try:
            if not await store.call(store.client.srem(self._index(owner), vocab_id)):
                raise unknown
            owner_sets = [k async for k in store.client.scan_iter(f"{self._index()}:owner:*")]
            still = False
            for key in owner_sets:
                still = still or bool(await store.call(store.client.sismember(key, vocab_id)))
            if not still:
                await store.call(store.client.pipeline(transaction=False).delete(self._key(vocab_id))
                                 .srem(self._index(), vocab_id).execute())
                self._registered.pop(vocab_id, None)
        except StoreUnavailable as e:
            raise ApiError(503, "vocabulary_store_unavailable", "Redis is unavailable; retry",
                           headers={"Retry-After": "5"}) from e

    async def get(self, vocab_id: str) -> Vocabulary:
        """A vocabulary by id: built-in, this process, or Redis.

        Raises:
            ApiError: 404 unknown id; 503 if the id is not known here and Redis cannot be asked.
        """
        if vocab_id in self._builtin:
            return self._builtin[vocab_id]
        if vocab_id in self._registered and self._store is None:
            return self._registered[vocab_id]
        if self._store is not None and vocab_id in self._registered:
            # Still registered (another replica may have deleted it)? Redis down: this copy serves.
            try:
                if await self._store.call(self._store.client.exists(self._key(vocab_id))):
                    return self._registered[vocab_id]
                self._registered.pop(vocab_id, None)
            except StoreUnavailable:
                return self._registered[vocab_id]
        if self._store is None or not re.fullmatch(r"[0-9a-f]{32}", vocab_id):
            raise ApiError(404, "unknown_vocabulary", f"no vocabulary with id {vocab_id!r}")
        try:
            raw = await self._store.get(self._key(vocab_id))
        except StoreUnavailable as e:
            raise ApiError(503, "vocabulary_store_unavailable",
                           f"vocabulary {vocab_id!r} is not in this replica and Redis is unavailable",
                           headers={"Retry-After": "5"}) from e
        if raw is None:
            raise ApiError(404, "unknown_vocabulary", f"no vocabulary with id {vocab_id!r}")
        try:
            data = json.loads(raw)
            vocab = Vocabulary(vocab_id, list(data["names"]), list(data["templates"]))
            if content_id(vocab.names, vocab.templates) != vocab_id:
                raise ValueError("content does not match its id")
        except (ValueError, KeyError, TypeError) as e:
            self._store.report("corrupt")
            raise ApiError(404, "unknown_vocabulary",
                           f"vocabulary {vocab_id!r} is stored corrupted; register it again") from e
        self._registered[vocab_id] = vocab
        return vocab
