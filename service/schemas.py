"""Request and response models of the HTTP API (they are also the OpenAPI schema), and the
documented error answers of the /v1 routes."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ovd.models.runtime import DEFAULT_SCORE_MODE, ClassifyOptions
from ovd.models.tiling import DEFAULT_TILES


class ExampleBox(BaseModel):
    """An example box: look for objects like the one inside it (query by example)."""

    model_config = ConfigDict(extra="forbid")

    box: list[float] = Field(..., min_length=4, max_length=4,
                             description="[x1, y1, x2, y2] pixels of its image (upright, after EXIF orientation)")
    label: str = Field("example", min_length=1, description="the name its detections get; examples sharing "
                       "a label are averaged into one query", examples=["part 7"])
    image: int | None = Field(None, ge=0, description="index into `example_images`; null: the image searched "
                              "(POST /v1/detect only)")


class DetectOptions(BaseModel):
    """What to look for: `classes` or `vocabulary` (not both), and/or `examples`."""

    model_config = ConfigDict(extra="forbid")

    classes: list[str] | None = Field(None, description="class names in plain words",
                                      examples=[["red ring", "blue star"]])
    vocabulary: str | None = Field(None, description="id of a named vocabulary (built-in or registered)",
                                   examples=["training"])
    templates: list[str] | None = Field(None, description="prompt templates with one '{}'; several are "
                                        "averaged (prompt ensembling). Default: the model's own")
    score_threshold: float | None = Field(None, ge=0.0, le=1.0, description="minimum score "
                                          "(default: the model's test threshold)")
    max_detections: int | None = Field(None, ge=1, description="at most this many detections per image")
    score_mode: Literal["softmax", "per_name"] = Field(
        DEFAULT_SCORE_MODE, description="per_name: each name against background alone, so a box scores the "
        "same whatever other names are sent (a threshold means the same in every request). softmax: a "
        "probability over the names sent and background (the paper's; a name's score falls when similar "
        "names are added). Same AP on val; see the README")
    nms_threshold: float | None = Field(None, gt=0.0, le=1.0, description="IoU above which the "
                                        "lower-scoring of two boxes is dropped (default: the model's)")
    class_agnostic: bool = Field(False, description="NMS across names (one label per object) instead "
                                 "of within each name")
    examples: list[ExampleBox] | None = Field(
        None, description="example boxes, searched for beside or instead of names: each distinct label is one "
        "more class after the names. Each example image costs one model pass (a window per box in a large "
        "image); a label clashing with a class name is refused")
    tiles: Literal["auto", "on", "off"] = Field(
        DEFAULT_TILES, description="sliced inference for large images: the model also runs on overlapping "
        "windows at its own input size (256 px for the shipped model), merged by NMS. auto: when the "
        "model's resize would shrink the image more than 2x. Costs up to OVD_MAX_TILES + 1 model passes")

    def classify_options(self) -> ClassifyOptions:
        return ClassifyOptions(score_threshold=self.score_threshold, max_detections=self.max_detections,
                               score_mode=self.score_mode, nms_threshold=self.nms_threshold,
                               class_agnostic=self.class_agnostic)


class DetectRequest(DetectOptions):
    """One image as base64 (JSON body of POST /v1/detect)."""

    image: str = Field(..., description="the image file (JPEG, PNG, WebP, BMP, GIF) as base64")
    example_images: list[str] | None = Field(None, description="images of the example boxes, as base64")


class BatchDetectRequest(DetectOptions):
    """Several images as base64 (JSON body of POST /v1/detect/batch)."""

    images: list[str] = Field(..., min_length=1, description="image files as base64")
    example_images: list[str] | None = Field(None, description="images of the example boxes, as base64")


class Detection(BaseModel):
    box: list[float] = Field(..., min_length=4, max_length=4,
                             description="[x1, y1, x2, y2] pixels of the original (upright) image")
    score: float = Field(..., description="class probability, 0..1")
    label: str = Field(..., description="the class name as sent (whitespace-normalised)")
    class_index: int = Field(..., description="index into `classes`")


class ModelInfo(BaseModel):
    name: str
    version: str


class ImageInfo(BaseModel):
    width: int = Field(..., description="pixels, after EXIF orientation")
    height: int
    tiles: int = Field(0, description="windows of sliced inference besides the whole image (0: not sliced)")


class Timings(BaseModel):
    """Milliseconds spent per step; `model` is the shared batch's encode time."""

    decode: float
    text: float
    queue: float
    model: float
    classify: float
    total: float


class NameWarning(BaseModel):
    name: str = Field(..., description="a class name of the request")
    unknown_words: list[str] = Field(..., description="its words the model's text encoder never read")
    message: str


class DetectResponse(BaseModel):
    model: ModelInfo
    image: ImageInfo
    classes: list[str] = Field(..., description="the normalised class names used; class_index indexes them")
    detections: list[Detection]
    warnings: list[NameWarning] = Field([], description="names the model cannot read (see GET /v1/models/card): "
                                        "their detections are not meaningful")
    timings_ms: Timings


class BatchDetectResponse(BaseModel):
    results: list[DetectResponse] = Field(..., description="one per image, in request order")


class VocabularyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    names: list[str] = Field(..., description="class names", examples=[["forklift", "red helmet"]])
    templates: list[str] | None = Field(None, description="prompt templates (default: the model's)")


class VocabularyCreated(BaseModel):
    id: str = Field(..., description="content hash: the same names and templates give the same id")
    size: int = Field(..., description="number of class names after normalisation")


class VocabularyInfo(BaseModel):
    id: str
    size: int
    builtin: bool
    names: list[str]
    templates: list[str] = Field(..., description="empty: the model's own template")


class VocabularySummary(BaseModel):
    id: str
    size: int
    description: str


class VocabularyList(BaseModel):
    vocabularies: list[VocabularySummary]


class Readiness(BaseModel):
    status: Literal["ready", "degraded", "loading", "failed"]
    model: bool
    redis: Literal["ok", "down", "disabled"]
    error: str | None = None


class ErrorDetail(BaseModel):
    status: int
    code: str = Field(..., description="stable machine-readable code, e.g. image_too_large")
    message: str


class ErrorResponse(BaseModel):
    error: ErrorDetail


# The documented error answers of the /v1 routes (OpenAPI `responses`).
ERROR_RESPONSES = {status: {"model": ErrorResponse, "description": text} for status, text in {
    400: "bad input (base64, JSON, truncated or corrupt image)", 401: "missing or invalid API key",
    404: "unknown vocabulary", 413: "body or image too large", 415: "not a supported image or body type",
    422: "invalid options (classes, templates, limits)", 503: "overloaded or model not ready (Retry-After)",
    504: "timed out"}.items()}
