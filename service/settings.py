"""Service settings, read from the environment (prefix `OVD_`) by pydantic-settings.

Every limit the service enforces is here, so an operator can see and change them in one place
(`OVD_MAX_BODY_BYTES=...`). Sizes are bytes, times seconds unless the name says `_ms`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from ovd.models.registry import DEFAULT_MODEL, registered_or_path


class Settings(BaseSettings):
    """Configuration of one service process (environment variables `OVD_<FIELD>`)."""

    model_config = SettingsConfigDict(env_prefix="OVD_", extra="ignore")

    model_dir: Path = Field(DEFAULT_MODEL, description="export folder (`ovd export`) or the name of a "
                                                       "model shipped with the repository checkout "
                                                       "(models/registry.py; default: default)")
    device: str = Field("cpu", description="torch device of the detector and the text tower")
    backend: Literal["torch", "onnx"] = Field(
        "torch", description="detector runtime: torch, or onnx (onnxruntime on the export's "
                             "ONNX graphs and text tower, `ovd export --onnx`; no torch import)")
    torch_threads: int = Field(0, ge=0, description="intra-op threads; 0 keeps torch's default")
    warmup: bool = Field(True, description="run one inference after loading, before /readyz is 200")

    redis_url: str = Field("", description="redis://host:port/db; empty runs without Redis")
    redis_timeout_s: float = Field(0.25, gt=0, description="socket + per-call timeout of Redis")
    redis_prefix: str = Field("ovd", description="key prefix, so several services share one Redis")
    redis_degraded_s: float = Field(30.0, ge=0, description="/readyz says degraded this long after a Redis error")

    api_keys: str = Field("", description="comma-separated bearer keys; empty turns auth off")

    max_batch_size: int = Field(8, ge=1, description="images per model.encode call")
    max_batch_wait_ms: float = Field(10.0, ge=0, description="how long a batch waits to fill up")
    max_queue: int = Field(64, ge=1, description="images waiting for the model; more -> 503")
    request_timeout_s: float = Field(30.0, gt=0, description="a request slower than this -> 504")
    header_timeout_s: float = Field(10.0, gt=0, description="a connection whose request line and headers are not "
                                    "complete this long after its first byte is closed (slowloris)")
    max_header_bytes: int = Field(16384, ge=1024, description="request line + headers larger than this -> 400")
    shutdown_timeout_s: float = Field(30.0, gt=0, description="graceful shutdown: time to finish in-flight requests")

    max_body_bytes: int = Field(20 * 2**20, ge=1, description="request body size; more -> 413")
    max_image_pixels: int = Field(40_000_000, ge=1, description="width * height of one image; more -> 413")
    max_images_per_request: int = Field(16, ge=1, description="images of one batch request")
    max_classes: int = Field(1500, ge=1, description="class names of one request or vocabulary")
    max_examples: int = Field(16, ge=0, description="example boxes of one request (query by example); each "
                              "costs up to one model pass. 0 turns query by example off")
    max_class_name_chars: int = Field(100, ge=1, description="characters of one class name")
    max_templates: int = Field(16, ge=1, description="prompt templates of one request")
    max_detections_limit: int = Field(1000, ge=1, description="the largest max_detections a client may ask")

    decode_workers: int = Field(2, ge=1, description="threads decoding images (a bounded pool; a cancelled "
                                                     "request's queued images never start)")
    max_request_pixels: int = Field(100_000_000, ge=1, description="decoded pixels (sum of width * height) "
                                    "of one request's images, read from their headers; more -> 413 request_too_large")
    max_pending_pixels: int = Field(200_000_000, ge=1, description="decoded pixels of all requests being "
                                    "decoded or waiting to be; more -> 503 server_busy (Retry-After)")
    max_request_new_prompts: int = Field(4096, ge=1, description="prompts (names x templates) one request may "
                                         "need encoded, i.e. not in any cache; more -> 422 too_many_new_prompts")
    max_pending_prompts: int = Field(8192, ge=1, description="prompts of all requests waiting for or in the "
                                     "text tower; more -> 503 server_busy (Retry-After)")
    text_encode_chunk: int = Field(256, ge=1, description="prompts per text-tower call; a cancelled request "
                                   "stops after the chunk in progress")
    max_classify_candidates: int = Field(5_000, ge=1, description="(box, class) pairs of one image (or tile) "
                                         "the model regresses and gives NMS: the best ones, whatever the "
                                         "vocabulary size, threshold and score mode (5,000 leave the best 300 "
                                         "after NMS all but unchanged, benchmarks/score_modes.py; 100,000 let one "
                                         "request hold the model thread for seconds)")
    max_tiles: int = Field(16, ge=1, description="windows of one image in sliced inference (`tiles`); a larger "
                           "image gets larger windows, so an image costs at most this + 1 model passes")

    max_vocabularies: int = Field(10_000, ge=1, description="registered vocabularies in all; more -> 422 "
                                  "vocabulary_limit (DELETE frees one)")
    max_vocabularies_per_key: int = Field(1000, ge=1, description="registered vocabularies per API key (all "
                                          "clients together when auth is off); more -> 422 vocabulary_limit")
    vocabulary_write_chunk_bytes: int = Field(64 * 1024, ge=1024, description="a vocabulary is written to Redis "
                                              "in pieces of this size, each call within OVD_REDIS_TIMEOUT_S")

    text_cache_size: int = Field(100_000, ge=0, description="text embeddings kept in process memory")
    text_cache_ttl_s: int = Field(30 * 24 * 3600, ge=0, description="Redis expiry of a text embedding; 0 = never")

    @field_validator("model_dir", mode="before")
    @classmethod
    def _registered_name(cls, value):
        return registered_or_path(value)

    @property
    def api_key_list(self) -> list[str]:
        """The configured API keys (empty: authentication off)."""
        return [k.strip() for k in self.api_keys.split(",") if k.strip()]
