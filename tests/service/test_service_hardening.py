"""Hostile and unusual client input on the real server: never a 500, never a dropped connection;
image modes decoded as their 8-bit RGB twins."""

from __future__ import annotations

import base64
import io
import struct
import zlib

import httpx
import numpy as np
import pytest
from PIL import Image
from service_testing import image_bytes

from ovd.service.images import decode_image


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _local_port(response: httpx.Response) -> int:
    """The client-side port of the TCP connection that carried `response`."""
    return response.extensions["network_stream"].get_extra_info("client_addr")[1]


def _png(width: int, height: int, color_type: int, bit_depth: int, rows: np.ndarray) -> bytes:
    """A PNG written by hand (PIL cannot write 16-bit RGB): rows is (H, W*channels) big-endian."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    raw = b"".join(b"\x00" + row.tobytes() for row in rows)
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def _save(im: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **options)
    return buf.getvalue()


def _nested(depth: int) -> bytes:
    return b'{"image": ' + b"[" * depth + b"]" * depth + b', "classes": ["a"]}'


HOSTILE = {
    # (request kwargs, expected status, expected code)
    "degenerate_aspect": (lambda: {"json": {"image": _b64(image_bytes(1, 2000, seed=1)), "classes": ["a"]}},
                          422, "degenerate_image"),
    "nested_json_detect": (lambda: {"content": _nested(200_000), "headers": {"content-type": "application/json"}},
                           400, "invalid_json"),
    "nested_json_vocabulary": (lambda: {"url": "/v1/vocabularies", "content": b'{"names": ' + b"[" * 200_000
                                        + b"]" * 200_000 + b"}", "headers": {"content-type": "application/json"}},
                               400, "invalid_json"),
    "surrogate_class": (lambda: {"content": b'{"image": "%s", "classes": ["a\\ud800b"]}' % _b64(image_bytes()).encode(),
                                 "headers": {"content-type": "application/json"}}, 422, "invalid_text"),
    "surrogate_template": (lambda: {"content": b'{"image": "%s", "classes": ["a"], "templates": ["\\udfff {}"]}'
                                    % _b64(image_bytes()).encode(), "headers": {"content-type": "application/json"}},
                           422, "invalid_text"),
    "surrogate_vocabulary_body": (lambda: {"url": "/v1/vocabularies", "content": b'{"names": ["x", "\\ud83d"]}',
                                           "headers": {"content-type": "application/json"}}, 422, "invalid_text"),
    "surrogate_vocabulary_id": (lambda: {"content": b'{"image": "%s", "vocabulary": "\\ud800"}'
                                         % _b64(image_bytes()).encode(), "headers": {"content-type": "application/json"}},
                                404, "unknown_vocabulary"),
    "nul_in_name": (lambda: {"json": {"image": _b64(image_bytes()), "classes": ["a\u0000b"]}}, 422, "invalid_text"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_input_is_a_4xx_and_the_connection_stays_open(server, case):
    make, status, code = HOSTILE[case]
    good = {"image": _b64(image_bytes(seed=2)), "classes": ["red ring"]}
    with httpx.Client(base_url=server.url, timeout=60) as c:
        first = c.post("/v1/detect", json=good)
        assert first.status_code == 200
        kwargs = make()
        r = c.post(kwargs.pop("url", "/v1/detect"), **kwargs)
        assert r.status_code == status, r.text
        assert r.json()["error"]["code"] == code
        assert r.headers.get("connection", "").lower() != "close"
        again = c.post("/v1/detect", json=good)
        assert again.status_code == 200 and again.json() == {**first.json(), "timings_ms": again.json()["timings_ms"]}
        assert _local_port(again) == _local_port(first), "the server closed the keep-alive connection"


# ---------------------------------------------------------------- image modes vs their 8-bit RGB twin

def _gray8(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (48, 40), dtype=np.uint8)


def test_16_bit_gray_png_decodes_as_its_8_bit_twin():
    gray = _gray8()
    twin = decode_image(_save(Image.fromarray(gray, "L")), max_pixels=10**6)
    assert twin.shape == (48, 40, 3) and (twin == gray[:, :, None]).all()
    wide = gray.astype(np.uint16) * 257  # 8-bit v -> 16-bit v * 257 (the same brightness)
    saved_by_pil = _save(Image.fromarray(wide))  # mode I;16
    by_hand = _png(40, 48, 0, 16, wide.astype(">u2"))
    for data in (saved_by_pil, by_hand):
        assert (decode_image(data, max_pixels=10**6) == twin).all()
    # Values between the 8-bit steps round to the nearest one, never clip to white.
    assert (decode_image(_png(40, 48, 0, 16, np.minimum(wide.astype(int) + 100, 65535).astype(">u2")),
                         max_pixels=10**6) == twin).all()


def test_16_bit_rgb_and_rgba_png_decode_as_their_8_bit_twin():
    rgb = np.random.default_rng(1).integers(0, 256, (48, 40, 3), dtype=np.uint8)
    twin = decode_image(_save(Image.fromarray(rgb)), max_pixels=10**6)
    assert (twin == rgb).all()
    wide = (rgb.astype(np.uint16) * 257).astype(">u2").reshape(48, 120)
    assert (decode_image(_png(40, 48, 2, 16, wide), max_pixels=10**6) == twin).all()
    opaque = np.concatenate([rgb.astype(np.uint16) * 257, np.full((48, 40, 1), 65535, np.uint16)], axis=2)
    assert (decode_image(_png(40, 48, 6, 16, opaque.astype(">u2").reshape(48, 160)), max_pixels=10**6) == twin).all()


def test_gray_palette_and_alpha_images_decode_as_their_rgb_twin():
    rgb = np.random.default_rng(2).integers(0, 256, (48, 40, 3), dtype=np.uint8)
    gray = _gray8(3)
    as_rgb = lambda a: decode_image(_save(Image.fromarray(a)), max_pixels=10**6)  # noqa: E731
    assert (decode_image(_save(Image.fromarray(gray, "L")), max_pixels=10**6) == as_rgb(np.stack([gray] * 3, 2))).all()
    palette = Image.fromarray(rgb).quantize(64)
    assert (decode_image(_save(palette), max_pixels=10**6) == as_rgb(np.asarray(palette.convert("RGB")))).all()
    assert (decode_image(_save(palette, "GIF"), max_pixels=10**6) == as_rgb(np.asarray(palette.convert("RGB")))).all()
    opaque = np.concatenate([rgb, np.full((48, 40, 1), 255, np.uint8)], axis=2)
    assert (decode_image(_save(Image.fromarray(opaque, "RGBA")), max_pixels=10**6) == rgb).all()
    la = np.stack([gray, np.full_like(gray, 255)], 2)
    assert (decode_image(_save(Image.fromarray(la, "LA")), max_pixels=10**6) == gray[:, :, None]).all()
    # Alpha is dropped: a translucent pixel is its stored colour.
    rgba = np.concatenate([rgb, np.random.default_rng(4).integers(0, 256, (48, 40, 1), dtype=np.uint8)], axis=2)
    assert (decode_image(_save(Image.fromarray(rgba, "RGBA")), max_pixels=10**6) == rgb).all()


def test_16_bit_gray_png_gets_the_detections_of_its_8_bit_twin(server):
    gray = _gray8(4)
    eight = _save(Image.fromarray(np.stack([gray] * 3, 2)))
    sixteen = _save(Image.fromarray(gray.astype(np.uint16) * 257))
    with httpx.Client(base_url=server.url, timeout=60) as c:
        a, b = (c.post("/v1/detect", json={"image": _b64(x), "classes": ["red ring", "blue disk"]}) for x in (eight, sixteen))
    assert a.status_code == b.status_code == 200
    assert a.json()["detections"] and a.json()["detections"] == b.json()["detections"]


def test_slow_and_oversized_headers_are_cut_off(export_dir):
    """A client trickling its headers (slowloris) is disconnected after OVD_HEADER_TIMEOUT_S;
    headers over OVD_MAX_HEADER_BYTES get a 431; an idle kept-alive connection is not cut."""
    import socket
    import time

    from ovd.service.launch import ServerProcess

    with ServerProcess(export_dir, env={"OVD_HEADER_TIMEOUT_S": "1", "OVD_MAX_HEADER_BYTES": "4096"}) as server:
        sock = socket.create_connection(("127.0.0.1", server.port))
        sock.settimeout(0.2)
        sock.sendall(b"GET /livez HTTP/1.1\r\nHost: x\r\n")
        start, closed = time.monotonic(), False
        while not closed and time.monotonic() - start < 6:
            try:
                sock.sendall(b"X-Slow: a\r\n")
                closed = sock.recv(1) == b""
            except TimeoutError:
                continue
            except OSError:
                closed = True
        sock.close()
        assert closed and time.monotonic() - start < 3
        big = httpx.get(server.url + "/livez", headers={"x-big": "a" * 5000})
        assert big.status_code == 431 and "OVD_MAX_HEADER_BYTES" in big.text
        assert httpx.get(server.url + "/livez", headers={"x-fine": "a" * 3000}).status_code == 200
        with httpx.Client() as client:
            first = client.get(server.url + "/livez")
            time.sleep(1.5)  # idle between requests: longer than the header timeout
            second = client.get(server.url + "/livez")
            assert first.status_code == second.status_code == 200 and _local_port(first) == _local_port(second)
        assert "Traceback" not in server.log()
