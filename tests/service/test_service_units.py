"""Units of the service: names, templates, built-in vocabularies, cache entries, image limits."""

from __future__ import annotations

import asyncio
import base64
import io
import socket
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import redis
import torch
from PIL import Image
from service_testing import image_bytes, png_claiming

from ovd.service.errors import ApiError
from ovd.service.images import decode_base64, decode_image
from ovd.service.redis_store import RedisStore
from ovd.service.settings import Settings
from ovd.service.text_cache import CorruptEntry, TextEmbedder, decode_entry, encode_entry
from ovd.service.vocabulary import (
    VocabularyRegistry,
    check_templates,
    coco_names,
    content_id,
    lvis_names,
    normalise_names,
    split_form_names,
)

# ---------------------------------------------------------------- names and vocabularies


def test_names_are_stripped_collapsed_and_deduplicated_keeping_the_first():
    names = ["  red   ring ", "", "   ", "Red Ring", "blue\tstar", "RED RING", "blue star "]
    assert normalise_names(names, max_classes=10, max_chars=20) == ["red ring", "blue\tstar".replace("\t", " ")]


@pytest.mark.parametrize("names,limit,code", [
    ([], {}, "no_classes"),
    (["", "  ", "\n"], {}, "no_classes"),
    ([f"class {i}" for i in range(6)], {"max_classes": 5}, "too_many_classes"),
    (["x" * 21], {}, "class_name_too_long"),
])
def test_name_limits_are_422(names, limit, code):
    with pytest.raises(ApiError) as info:
        normalise_names(names, **{"max_classes": 10, "max_chars": 20, **limit})
    assert info.value.status == 422 and info.value.code == code


def test_limits_apply_after_normalisation():
    # 6 entries but 5 distinct names, and padding does not count towards the length limit.
    names = ["a", "b", "c", "d", "e", " A "]
    assert len(normalise_names(names, max_classes=5, max_chars=1)) == 5


def test_form_fields_split_on_commas_and_newlines():
    assert split_form_names(["red ring, blue star\ngreen cross", "x"]) == [
        "red ring", " blue star", "green cross", "x"]


def test_templates_need_exactly_one_placeholder_and_no_other_braces():
    assert check_templates(["a photo of a {}", " a  photo of a {} "], max_templates=4,
                           max_chars=50) == ["a photo of a {}"]
    for bad in ["no placeholder", "{} and {}", "a {0.__class__}", "a {} {x}", "a {} }"]:
        with pytest.raises(ApiError) as info:
            check_templates([bad], max_templates=4, max_chars=50)
        assert info.value.code == "invalid_template"
    with pytest.raises(ApiError, match="limit is 1"):
        check_templates(["a {}", "the {}"], max_templates=1, max_chars=50)


def test_builtin_vocabularies():
    coco = coco_names()
    assert len(coco) == 80 and coco[0] == "person" and "traffic light" in coco
    lvis = lvis_names()
    assert len(lvis) == 1203 and len({n.casefold() for n in lvis}) == 1203
    assert not any("_" in n for n in lvis)
    assert lvis[0] == "aerosol can"
    # Qualifiers are dropped where the short name is unique, kept where it would collide.
    assert "bow (weapon)" in lvis and "bow (decorative ribbons)" in lvis
    assert "computer monitor" in lvis
    assert all(normalise_names([n], max_classes=1, max_chars=100) == [n] for n in lvis)


def test_content_id_depends_on_names_order_and_templates_only():
    a = content_id(["x", "y"], [])
    assert a == content_id(["x", "y"], []) and len(a) == 32
    assert a != content_id(["y", "x"], []) and a != content_id(["x", "y"], ["a {}"])


def test_settings_from_environment(monkeypatch):
    monkeypatch.delenv("OVD_MODEL_DIR", raising=False)
    monkeypatch.setenv("OVD_MAX_BATCH_SIZE", "3")
    monkeypatch.setenv("OVD_API_KEYS", " k1, ,k2 ")
    monkeypatch.setenv("OVD_REDIS_URL", "redis://127.0.0.1:1/0")
    s = Settings()
    assert s.max_batch_size == 3 and s.api_key_list == ["k1", "k2"] and s.redis_url.endswith(":1/0")
    # The shipped model, by absolute path: serving works from any working directory.
    assert s.model_dir.is_absolute() and s.model_dir.parts[-2:] == ("artifacts", "default")
    # A shipped model's name means its folder; anything else is a path.
    monkeypatch.setenv("OVD_MODEL_DIR", "default")
    assert Settings().model_dir == s.model_dir
    monkeypatch.setenv("OVD_MODEL_DIR", "exports/mine")
    assert Settings().model_dir == Path("exports/mine")
    monkeypatch.setenv("OVD_MAX_BATCH_SIZE", "0")
    with pytest.raises(ValueError):
        Settings()


# ---------------------------------------------------------------- cache entries


def test_cache_entry_roundtrip_is_float16_with_header():
    v = np.random.default_rng(0).standard_normal(128).astype(np.float32)
    data = encode_entry(v, "key:a")
    assert len(data) == 12 + 2 * 128
    out = decode_entry(data, 128, "key:a")
    assert out.dtype == np.float16 and np.array_equal(out, v.astype(np.float16))


def test_a_cache_entry_copied_under_another_key_is_refused():
    """The checksum covers the key: a valid entry of "red ring" stored under "blue star"'s key
    (a copy, or a hostile write to Redis) is not served as "blue star"."""
    data = encode_entry(np.ones(8, np.float32), "t:a photo of a {}:red ring")
    with pytest.raises(CorruptEntry, match="another key"):
        decode_entry(data, 8, "t:a photo of a {}:blue star")


@pytest.mark.parametrize("corrupt", [
    lambda d: d[:-1],                                   # truncated payload
    lambda d: d[:8],                                    # shorter than the header
    lambda d: b"XXXX" + d[4:],                          # wrong magic
    lambda d: d[:-2] + bytes([d[-2] ^ 1]) + d[-1:],     # one payload bit flipped
    lambda d: d[:6] + struct.pack("<H", 64) + d[8:],    # wrong dim in the header
    lambda d: b"",
])
def test_corrupt_cache_entries_are_detected(corrupt):
    data = encode_entry(np.ones(128, np.float32), "k")
    with pytest.raises(CorruptEntry):
        decode_entry(corrupt(data), 128, "k")


def test_non_finite_payload_with_a_valid_checksum_is_refused():
    payload = np.full(4, np.inf, dtype="<f2").tobytes()
    crc = zlib.crc32(payload, zlib.crc32(b"k"))
    data = struct.pack("<4sBBHI", b"OVDE", 2, 1, 4, crc) + payload
    with pytest.raises(CorruptEntry, match="non-finite"):
        decode_entry(data, 4, "k")


class CountingEncoder:
    """A fake text tower: a deterministic vector per prompt; records every call."""

    def __init__(self, dim=8):
        self.dim = dim
        self.calls: list[list[str]] = []

    def __call__(self, prompts):
        self.calls.append(list(prompts))
        rows = [torch.tensor(np.random.default_rng(zlib.crc32(p.encode())).standard_normal(self.dim),
                             dtype=torch.float32) for p in prompts]
        return torch.nn.functional.normalize(torch.stack(rows), dim=-1)


def _embedder(enc, store=None, lookups=None, cache_size=100):
    return TextEmbedder(enc, model_key="m", dim=enc.dim, cache_size=cache_size, store=store,
                        prefix="unit", on_lookup=lambda layer, result: lookups.append((layer, result))
                        if lookups is not None else None)


def test_misses_are_computed_in_one_call_then_served_from_memory():
    enc, lookups = CountingEncoder(), []
    emb = _embedder(enc, lookups=lookups)
    t1 = torch.as_tensor(asyncio.run(emb.text_matrix(["a", "b", "c"], ["x {}", "y {}"])))
    assert enc.calls == [["x a", "x b", "x c", "y a", "y b", "y c"]]
    assert t1.shape == (3, 8) and torch.allclose(t1.norm(dim=1), torch.ones(3))
    # Prompt ensembling: mean of the float16-rounded per-template embeddings, renormalised.
    expected = torch.nn.functional.normalize(
        enc(["x a", "x b", "x c"]).half().float() + enc(["y a", "y b", "y c"]).half().float(), dim=-1)
    assert torch.allclose(t1, expected, atol=1e-6)
    enc.calls.clear()
    t2 = torch.as_tensor(asyncio.run(emb.text_matrix(["b", "d"], ["x {}"])))
    assert enc.calls == [["x d"]]
    assert lookups.count(("memory", "hit")) == 1 and lookups.count(("memory", "miss")) == 7
    assert torch.equal(t2[0], torch.nn.functional.normalize(enc(["x b"]).half().float(), dim=-1)[0])


def test_memory_layer_is_an_lru():
    enc = CountingEncoder()
    emb = _embedder(enc, cache_size=2)
    for name in ["a", "b", "a", "c"]:  # "b" is the least recently used when "c" arrives
        asyncio.run(emb.text_matrix([name], ["{}"]))
    enc.calls.clear()
    asyncio.run(emb.text_matrix(["a", "c"], ["{}"]))
    assert enc.calls == []
    asyncio.run(emb.text_matrix(["b"], ["{}"]))
    assert enc.calls == [["b"]]


def _store(url, errors, timeout=0.3):
    return RedisStore(url, timeout_s=timeout, degraded_s=30, on_error=errors.append)


def test_redis_layer_shares_entries_and_repairs_corrupt_ones(redis_url):
    async def scenario():
        errors, lookups = [], []
        enc = CountingEncoder()
        first = _embedder(enc, store=_store(redis_url, errors))
        want = torch.as_tensor(await first.text_matrix(["red ring", "blue star"], ["a {}"]))
        await first.flush()
        # A second replica (empty memory) gets both from Redis, without the text tower.
        second = _embedder(enc, store=_store(redis_url, errors), lookups=lookups)
        assert torch.equal(torch.as_tensor(await second.text_matrix(["red ring", "blue star"], ["a {}"])), want)
        assert len(enc.calls) == 1 and lookups.count(("redis", "hit")) == 2
        # Corrupt one entry: it is counted, recomputed (same result) and overwritten.
        client = redis.Redis.from_url(redis_url)
        key = first.key("a {}", "red ring")
        client.set(key, b"OVDE\x01\x01garbage")
        third = _embedder(enc, store=_store(redis_url, errors))
        assert torch.equal(torch.as_tensor(await third.text_matrix(["red ring", "blue star"], ["a {}"])), want)
        await third.flush()
        assert errors == ["corrupt"] and enc.calls[-1] == ["a red ring"]
        decode_entry(client.get(key), enc.dim, key)
        client.close()

    asyncio.run(scenario())


def test_text_embeddings_expire_in_redis_and_registered_vocabularies_never_do(redis_url, monkeypatch):
    # Under maxmemory-policy volatile-lru only keys with an expiry can be evicted: the text cache.
    monkeypatch.setenv("OVD_TEXT_CACHE_TTL_S", "3600")
    ttl_s = Settings().text_cache_ttl_s
    assert ttl_s == 3600 and Settings.model_fields["text_cache_ttl_s"].default == 30 * 24 * 3600
    client = redis.Redis.from_url(redis_url)

    async def scenario():
        errors = []
        enc = CountingEncoder()
        expiring = TextEmbedder(enc, model_key="m", dim=enc.dim, cache_size=0,
                                store=_store(redis_url, errors), prefix="ttl", ttl_s=ttl_s)
        await expiring.text_matrix(["red ring"], ["a {}"])
        await expiring.flush()
        key = expiring.key("a {}", "red ring")
        assert 0 < client.ttl(key) <= ttl_s
        # A hit reads it without touching the expiry.
        await expiring.text_matrix(["red ring"], ["a {}"])
        assert len(enc.calls) == 1 and 0 < client.ttl(key) <= ttl_s
        vocabularies = VocabularyRegistry(["red ring"], store=_store(redis_url, errors), prefix="ttl")
        vocab = await vocabularies.register(["red ring", "blue disk"], [])
        assert client.ttl(f"ttl:vocab:{vocab.id}") == -1  # exists, no expiry
        forever = TextEmbedder(enc, model_key="m", dim=enc.dim, cache_size=0,
                               store=_store(redis_url, errors), prefix="ttl0", ttl_s=0)
        await forever.text_matrix(["red ring"], ["a {}"])
        await forever.flush()
        assert client.ttl(forever.key("a {}", "red ring")) == -1
        assert errors == []

    try:
        asyncio.run(scenario())
    finally:
        client.close()


def test_redis_down_or_slow_still_answers_and_counts(redis_url):
    # A listener that accepts connections and never answers: a hung Redis.
    hung = socket.socket()
    hung.bind(("127.0.0.1", 0))
    hung.listen(8)
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    closed_port = closed.getsockname()[1]
    closed.close()  # nothing listens there: connection refused

    async def scenario(url):
        errors = []
        store = _store(url, errors, timeout=0.2)
        emb = _embedder(CountingEncoder(), store=store)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        out = await emb.text_matrix(["a", "b"], ["{}"])
        await emb.flush()
        elapsed = loop.time() - t0
        assert out.shape == (2, 8) and store.recently_failed
        assert not await store.ping()
        await store.close()
        return errors, elapsed

    try:
        errors, elapsed = asyncio.run(scenario(f"redis://127.0.0.1:{hung.getsockname()[1]}/0"))
        assert errors and set(errors) == {"timeout"} and elapsed < 1.5
        errors, _ = asyncio.run(scenario(f"redis://127.0.0.1:{closed_port}/0"))
        assert errors and set(errors) == {"connection"}
    finally:
        hung.close()


# ---------------------------------------------------------------- images


def _err(data, max_pixels=10**7) -> ApiError:
    with pytest.raises(ApiError) as info:
        decode_image(data, max_pixels=max_pixels)
    return info.value


def test_decodes_formats_to_rgb():
    for fmt in ("PNG", "JPEG", "WEBP", "BMP", "GIF"):
        rgb = decode_image(image_bytes(30, 20, fmt=fmt), max_pixels=600)
        assert rgb.shape == (20, 30, 3) and rgb.dtype == np.uint8, fmt
    gray = io.BytesIO()
    Image.new("LA", (5, 4), (100, 50)).save(gray, "PNG")
    assert decode_image(gray.getvalue(), max_pixels=100)[0, 0].tolist() == [100, 100, 100]


def test_exif_orientation_is_applied():
    im = Image.fromarray(np.zeros((20, 40, 3), np.uint8))  # 40 wide, 20 high as stored
    im.putpixel((0, 0), (255, 255, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    buf = io.BytesIO()
    im.save(buf, "JPEG", exif=exif, quality=100)
    rgb = decode_image(buf.getvalue(), max_pixels=10**4)
    assert rgb.shape == (40, 20, 3)  # upright: 20 wide, 40 high
    assert rgb[0, -1].mean() > 150  # the stored top-left corner is now top-right


def test_empty_text_and_unsupported_formats():
    assert (_err(b"").status, _err(b"").code) == (400, "empty_image")
    for data in (b"hello, not an image", b"%PDF-1.4 ...", b"<svg xmlns='http://www.w3.org/2000/svg'/>",
                 image_bytes(8, 8, fmt="TIFF")):
        e = _err(data)
        assert (e.status, e.code) == (415, "unsupported_image")


def test_truncated_image_is_400():
    for fmt in ("PNG", "JPEG"):
        data = image_bytes(64, 64, fmt=fmt)
        e = _err(data[: len(data) // 2])
        assert (e.status, e.code) == (400, "corrupt_image"), fmt


def test_bytes_after_the_image_are_ignored_as_a_decoder_ignores_them():
    """A polyglot (image + ZIP) and a phone's motion photo (JPEG + MP4) decode to the pixels of
    the image alone: nothing after the image's end is read, stored or served."""
    zip_tail = b"PK\x03\x04" + b"\x00" * 26 + b"evil.js" + b"alert(1)"
    mp4_tail = b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 4
    for fmt in ("PNG", "JPEG", "GIF", "WEBP", "BMP"):
        clean = image_bytes(16, 16, fmt=fmt)
        for tail in (zip_tail, mp4_tail, b"IEND\xaeB`\x82", b"\x00" * 16):
            assert np.array_equal(decode_image(clean + tail, max_pixels=256), decode_image(clean, max_pixels=256)), fmt


def test_pixel_limit_is_checked_from_the_header_before_decoding():
    e = _err(png_claiming(5_000, 5_000), max_pixels=10**7)
    assert (e.status, e.code) == (413, "image_too_large") and "5000x5000" in e.message
    e = _err(png_claiming(100_000, 100_000), max_pixels=10**7)  # past PIL's own guard too
    assert (e.status, e.code) == (413, "image_too_large")
    e = _err(image_bytes(101, 100), max_pixels=10_000)
    assert e.status == 413


def test_base64_strict_with_optional_data_url():
    raw = image_bytes(4, 4)
    b64 = base64.b64encode(raw).decode()
    assert decode_base64(b64) == raw
    assert decode_base64("data:image/png;base64," + b64) == raw
    assert decode_base64(b64[:10] + "\n" + b64[10:]) == raw
    for bad in ("not base64!", b64[:-1], "ab$d"):
        with pytest.raises(ApiError) as info:
            decode_base64(bad)
        assert (info.value.status, info.value.code) == (400, "invalid_base64")




def test_decode_pool_serves_the_cheapest_image_first_and_drops_cancelled_waiters():
    import threading

    from ovd.service.images import DecodePool

    async def scenario() -> tuple[list[str], list[str], int]:
        pool = DecodePool(1)
        order, dropped, running, peak = [], [], [0], [0]
        release = threading.Event()

        def job(name: str, wait: bool = False) -> str:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
            if wait:
                release.wait(5)
            order.append(name)
            running[0] -= 1
            return name

        first = asyncio.ensure_future(pool.run(job, "first", True, cost=1e6))
        await asyncio.sleep(0.05)  # "first" holds the only thread
        big = asyncio.ensure_future(pool.run(job, "big", cost=64e6))
        gone = asyncio.ensure_future(pool.run(job, "gone", cost=1, on_dropped=lambda: dropped.append("gone")))
        small = asyncio.ensure_future(pool.run(job, "small", cost=1e4))
        await asyncio.sleep(0.05)
        gone.cancel()
        release.set()
        await asyncio.gather(first, big, small)
        pool.close()
        return order, dropped, peak[0]

    order, dropped, peak = asyncio.run(scenario())
    assert order == ["first", "small", "big"] and dropped == ["gone"] and peak == 1
