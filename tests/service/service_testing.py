"""Helpers of the service tests: in-process apps sharing one loaded detector, test images, the
model's own answers."""

from __future__ import annotations

import contextlib
import io
import struct
import time
import zlib

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ovd.service.serving import ServingRuntime
from ovd.service.settings import Settings


class PreloadedRuntime(ServingRuntime):
    """A serving runtime that serves an already loaded detector (the tests share one) instead of
    loading `settings.model_dir`; everything else (batcher, cache, Redis, warm-up) is real."""

    def __init__(self, settings: Settings, detector):
        super().__init__(settings)
        self.detector = detector

    def load_detector(self):
        return self.detector


def make_settings(export_dir, **overrides) -> Settings:
    """Settings for an in-process app, independent of the environment."""
    base = dict(model_dir=export_dir, redis_url="", api_keys="", warmup=False, max_batch_wait_ms=5.0)
    return Settings(**{**base, **overrides})


@contextlib.contextmanager
def running_app(detector, export_dir, **overrides):
    """A TestClient of create_app(...) with its lifespan running and the model ready."""
    from fastapi.testclient import TestClient

    from ovd.service.app import create_app

    app = create_app(runtime=PreloadedRuntime(make_settings(export_dir, **overrides), detector))
    with TestClient(app, raise_server_exceptions=False) as client:
        for _ in range(200):
            if client.get("/readyz").status_code == 200:
                break
            time.sleep(0.05)
        yield client


def image_bytes(width: int = 80, height: int = 64, *, seed: int = 0, fmt: str = "PNG", **save) -> bytes:
    """A random-noise image file of the given size and format."""
    rgb = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, fmt, **save)
    return buf.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A small PNG whose header claims width x height (a decompression bomb's header)."""
    data = bytearray(image_bytes(8, 8))
    ihdr = bytearray(data[12:29])  # chunk type + 13 data bytes
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    return bytes(data)


def reference(detector, data: bytes, names: list[str], templates: list[str] | None = None, *,
              score_threshold: float | None = None, max_detections: int | None = None, **options) -> list[dict]:
    """What `model([image], text=T)` detects, in the API's JSON shape (the ground truth).

    T is built as the service documents it: per-template CLIP embeddings rounded to float16,
    averaged, renormalised. options: the box predictor's other test-time options
    (score_mode, nms_thresh, class_agnostic).
    """
    from detectron2.data import transforms as T

    from ovd.models.runtime import ClassifyOptions
    from ovd.service.images import decode_image

    rgb = decode_image(data, max_pixels=10**8)
    cfg = detector.manifest["input"]
    resized = T.ResizeShortestEdge(cfg["min_size_test"], cfg["max_size_test"]).get_transform(rgb).apply_image(rgb)
    inputs = {"image": torch.from_numpy(resized.transpose(2, 0, 1).copy()), "height": rgb.shape[0],
              "width": rgb.shape[1]}
    templates = templates or [detector.manifest["prompt_template"]]
    options.setdefault("score_mode", ClassifyOptions().score_mode)  # the service's default
    with torch.inference_mode():
        per = torch.stack([detector.text.encode_text([t.replace("{}", n) for n in names])
                           for t in templates]).half().float()
        text = F.normalize(per.mean(0), dim=-1)
        model = detector.model
        found = model.classify(model.encode([inputs]), text, score_thresh=score_threshold,
                               max_detections=max_detections, **options)
        inst = model.to_original_size(found, [inputs])[0]["instances"]
    return [{"box": b, "score": s, "label": names[c], "class_index": c}
            for b, s, c in zip(inst.pred_boxes.tensor.tolist(), inst.scores.tolist(),
                               inst.pred_classes.tolist(), strict=True)]
