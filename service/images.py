"""Image bytes -> the detector's input, with every limit checked before pixels are decoded.

Order of checks (each a clear `ApiError`, never a crash):
  empty body (400) -> format sniffed by PIL (415 if not an image or not allowed) -> header
  size against `max_pixels` (413, before decoding: a decompression bomb costs nothing) -> full
  decode (400 if truncated or corrupt) -> EXIF orientation -> 8-bit RGB.

`read_header` runs the checks up to the decode without decoding any pixels, so the routes can
price a request (its decoded pixels) before they decode it.

Bytes after the end of the image are ignored, as every decoder ignores them: the service reads
the pixels and nothing else, and never stores the file or hands it to anything else, so a
"polyglot" (an image that is also a ZIP or a script) carries nothing that reaches anyone.
Refusing such files refused legitimate ones (a phone's "motion photo" is a JPEG with its video
appended), and the check itself could be passed by ending the payload with the format's end
marker.

Every PIL mode the allowed formats produce ends as 8-bit RGB: 16-bit gray ("I;16*", "I") is
scaled from 0..65535 to 0..255 (PIL's own conversion would clip it, and the image would be all
white); 16-bit colour PNGs are read by PIL at 8 bits; gray, palette and CMYK convert as PIL
converts them; an alpha channel is dropped (the stored colour is what the detector sees).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import heapq
import io
import itertools
import struct
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ApiError

HIGH_BIT_GRAY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")

T = TypeVar("T")

ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF")


def decode_base64(data: str) -> bytes:
    """Strict base64 (standard alphabet, optional `data:image/...;base64,` prefix) -> bytes."""
    if data.startswith("data:") and "," in data:
        data = data.split(",", 1)[1]
    try:
        return base64.b64decode("".join(data.split()), validate=True)
    except (binascii.Error, ValueError) as e:
        raise ApiError(400, "invalid_base64", f"image is not valid base64: {e}") from e


def _open(data: bytes, max_pixels: int) -> Image.Image:
    """PIL image of `data` with its header read, or the ApiError that refuses it."""
    if not data:
        raise ApiError(400, "empty_image", "the image is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            # PIL warns (and past 2x its own limit raises) for huge images; our limit comes first.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except UnidentifiedImageError as e:
        raise ApiError(415, "unsupported_image",
                       f"not an image in a supported format ({', '.join(ALLOWED_FORMATS)})") from e
    except Image.DecompressionBombError as e:  # PIL's own guard, past 2x its default limit
        raise ApiError(413, "image_too_large", f"image exceeds the limit of {max_pixels} pixels ({e})") from e
    except (OSError, ValueError, struct.error, SyntaxError, EOFError) as e:
        raise ApiError(400, "corrupt_image", f"the image header could not be read: {e}") from e


def _check_header(im: Image.Image, data: bytes, max_pixels: int) -> tuple[int, int]:
    width, height = im.size
    if width <= 0 or height <= 0:
        raise ApiError(400, "corrupt_image", f"image has size {width}x{height}")
    if width * height > max_pixels:
        raise ApiError(413, "image_too_large",
                       f"image is {width}x{height} = {width * height} pixels; the limit is {max_pixels} "
                       "(OVD_MAX_IMAGE_PIXELS)")
    return width, height


def read_header(data: bytes, *, max_pixels: int) -> tuple[int, int]:
    """(width, height) from the file's header, every check of `decode_image` before decoding done.

    Raises:
        ApiError: as `decode_image`, except for errors only a full decode finds.
    """
    with _open(data, max_pixels) as im:
        return _check_header(im, data, max_pixels)


def to_rgb(im: Image.Image) -> np.ndarray:
    """(H, W, 3) uint8 RGB of a decoded PIL image of any mode (see the module docstring)."""
    if im.mode in HIGH_BIT_GRAY_MODES:
        wide = np.clip(np.asarray(im).astype(np.int64), 0, 65535)
        gray = ((wide + 128) // 257).astype(np.uint8)  # 0..65535 -> 0..255, rounded
        return np.repeat(gray[:, :, None], 3, axis=2)
    if im.mode == "F":
        gray = np.clip(np.rint(np.asarray(im, dtype=np.float64)), 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    return np.asarray(im.convert("RGB"), dtype=np.uint8)


def decode_image(data: bytes, *, max_pixels: int) -> np.ndarray:
    """Decode an uploaded image.

    Args:
        data: the file's bytes.
        max_pixels: largest width * height accepted (checked from the header, before decoding).

    Returns:
        (H, W, 3) uint8 RGB array, EXIF orientation applied (H, W are the upright size).

    Raises:
        ApiError: 400 empty / truncated / corrupt, 413 too many pixels,
            415 not an image or a format outside ALLOWED_FORMATS.
    """
    with _open(data, max_pixels) as im:
        _check_header(im, data, max_pixels)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                im.load()
                upright = ImageOps.exif_transpose(im)
                return to_rgb(upright)
        except Image.DecompressionBombError as e:
            raise ApiError(413, "image_too_large", f"image exceeds the limit of {max_pixels} pixels ({e})") from e
        except (OSError, ValueError, SyntaxError, struct.error, EOFError, IndexError, ZeroDivisionError) as e:
            raise ApiError(400, "corrupt_image", f"the image could not be decoded: {e}") from e


class DecodePool:
    """A bounded pool of decoding threads shared by all requests, cheapest image first.

    `run` waits for a free thread; waiting calls are served in order of their `cost` (the
    image's pixels), so a small image never queues behind a batch of huge ones (first come,
    first served let one client's 64-megapixel batch delay everyone's 0.1-megapixel photo by
    seconds). A request cancelled while its call waits leaves the queue (the call never starts,
    and `on_dropped()` is called); one cancelled while its call runs lets it finish and drops the
    result: at most `workers` images are ever being decoded.
    """

    def __init__(self, workers: int):
        self.workers = workers
        self._free = workers
        self._waiting: list[tuple[float, int, asyncio.Future]] = []  # heap of (cost, arrival, gate)
        self._arrival = itertools.count()
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ovd-decode")

    async def run(self, fn: Callable[..., T], *args, cost: float = 0.0,
                  on_dropped: Callable[[], None] | None = None) -> T:
        """`fn(*args)` in a pool thread once one is free and no cheaper call waits."""
        loop = asyncio.get_running_loop()
        if self._free > 0 and not self._waiting:
            self._free -= 1
        else:
            gate = loop.create_future()
            heapq.heappush(self._waiting, (cost, next(self._arrival), gate))
            try:
                await gate  # resolved by _release: a thread is ours
            except asyncio.CancelledError:
                if gate.done() and not gate.cancelled():  # handed a thread just as we were cancelled
                    self._release()
                if on_dropped is not None:
                    on_dropped()
                raise
        job = self._executor.submit(fn, *args)
        # The thread is given back when the call ends, not when its awaiting request is cancelled.
        job.add_done_callback(lambda _: loop.call_soon_threadsafe(self._release))
        return await asyncio.wrap_future(job)

    def _release(self) -> None:
        """A thread is free: hand it to the cheapest waiting call still wanted."""
        while self._waiting:
            gate = heapq.heappop(self._waiting)[2]
            if not gate.done():  # a cancelled waiter's gate is cancelled
                gate.set_result(None)
                return
        self._free += 1

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
