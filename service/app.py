"""The FastAPI app: `create_app(settings) -> FastAPI` (uvicorn: `ovd.service.app:create_app`, factory).

The model is loaded in the lifespan hook, in the background: /livez answers at once, /readyz
says 503 until the model is loaded (and warmed up), then "ready", or "degraded" while Redis
fails. Shutdown (SIGTERM) stops accepting connections (uvicorn), lets in-flight requests
finish, then drains the batcher.

Routes: /v1/detect, /v1/detect/batch, /v1/vocabularies[/{id}], /v1/models (API key when
configured); /, /static, /docs, /openapi.json, /livez, /readyz, /metrics (open).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
from fastapi import Depends, FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException

from ovd.models.runtime import Runtime, load_runtime

from . import schemas
from .auth import check_api_key
from .batcher import Batcher, Job, Overloaded
from .errors import ApiError
from .images import decode_base64, decode_image
from .metrics import Metrics, MetricsMiddleware
from .redis_store import RedisStore
from .settings import Settings
from .text_cache import TextEmbedder
from .vocabulary import (
    BUILTIN_DESCRIPTIONS,
    VocabularyRegistry,
    check_templates,
    normalise_names,
    split_form_names,
)

logger = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"


@dataclass
class Serving:
    """What the detection routes need once the model is loaded."""

    detector: Runtime
    batcher: Batcher
    text: TextEmbedder
    vocabularies: VocabularyRegistry

    @property
    def manifest(self) -> dict:
        return self.detector.manifest


# --------------------------------------------------------------------------- middleware

class BodyLimitMiddleware:
    """413 for a body over `max_bytes`: by Content-Length before reading, else while streaming.

    A streamed overflow raises ApiError from `receive`; the error handlers render it (also
    when the framework wraps it while parsing a form).
    """

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        error = ApiError(413, "body_too_large", f"request body exceeds {self.max_bytes} bytes")
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await _error_response(error)(scope, receive, send)
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise error
            return message

        await self.app(scope, limited_receive, send)


def _error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError):
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError):
        errors = jsonable_encoder(exc.errors(), exclude={"input", "ctx", "url"})
        first = errors[0] if errors else {}
        where = ".".join(str(p) for p in first.get("loc", []))
        body = ApiError(422, "invalid_request", f"{where}: {first.get('msg', 'invalid request')}").body()
        body["error"]["details"] = errors
        return JSONResponse(body, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException):
        if isinstance(exc.__cause__, ApiError):  # e.g. the body limit hit while FastAPI parsed a body
            return _error_response(exc.__cause__)
        codes = {404: "not_found", 405: "method_not_allowed", 400: "bad_request"}
        return _error_response(ApiError(exc.status_code, codes.get(exc.status_code, "http_error"),
                                        str(exc.detail), headers=dict(exc.headers or {})))

    @app.exception_handler(Exception)
    async def internal_error(_: Request, exc: Exception):
        logger.exception("unhandled error", exc_info=exc)
        return _error_response(ApiError(500, "internal_error", "internal server error"))


# --------------------------------------------------------------------------- lifespan

async def _load(app: FastAPI, detector: Runtime | None) -> None:
    """Load (or take) the detector runtime, build batcher and text cache, warm up, publish."""
    settings: Settings = app.state.settings
    metrics: Metrics = app.state.metrics
    store: RedisStore | None = app.state.store
    try:
        if detector is None:  # every file checked against the manifest; onnx never loads torch's detector
            detector = await asyncio.to_thread(load_runtime, settings.model_dir, backend=settings.backend,
                                               device=settings.device, threads=settings.torch_threads)
        manifest = detector.manifest
        batcher = Batcher(detector, max_batch_size=settings.max_batch_size,
                          max_wait_s=settings.max_batch_wait_ms / 1000, max_queue=settings.max_queue,
                          on_batch=metrics.observe_batch, on_queue_depth=metrics.queue_depth.set)
        batcher.start()
        text = TextEmbedder(
            detector.text.encode_text, model_key=manifest["files"]["text_encoder"]["sha256"],
            dim=int(manifest.get("embed_dim") or detector.text.embed_dim),
            cache_size=settings.text_cache_size, store=store, prefix=settings.redis_prefix,
            ttl_s=settings.text_cache_ttl_s,
            on_lookup=lambda layer, result: metrics.text_cache.labels(layer, result).inc())
        names = [c["name"] for c in manifest.get("categories", [])]
        vocabularies = VocabularyRegistry(names, store=store, prefix=settings.redis_prefix)
        serving = Serving(detector, batcher, text, vocabularies)
        if settings.warmup:
            await _warmup(serving)
        app.state.runtime = serving
        logger.info("model %s %s loaded from %s (%s backend)", manifest.get("name"),
                    manifest.get("version"), settings.model_dir, settings.backend)
    except Exception as e:  # noqa: BLE001  reported by /readyz and /livez, and logged
        logger.exception("loading the model from %s failed", settings.model_dir)
        app.state.load_error = f"{type(e).__name__}: {e}"


async def _warmup(serving: Serving) -> None:
    """One inference on a blank image, so the first request does not pay for lazy init."""
    size = serving.detector.preprocessing.min_size
    inputs = serving.detector.preprocessing(np.zeros((size, size, 3), np.uint8))
    text = torch.nn.functional.normalize(torch.ones(1, serving.text.dim), dim=-1)
    await asyncio.gather(*serving.batcher.submit([Job(inputs, text, ("warm-up",))]))


def _lifespan(detector: Runtime | None):
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        settings: Settings = app.state.settings
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        metrics: Metrics = app.state.metrics
        app.state.store = (RedisStore(settings.redis_url, timeout_s=settings.redis_timeout_s,
                                      degraded_s=settings.redis_degraded_s,
                                      on_error=lambda reason: metrics.redis_errors.labels(reason).inc())
                           if settings.redis_url else None)
        loader = asyncio.create_task(_load(app, detector))
        try:
            yield
        finally:
            if not loader.done():
                loader.cancel()
            serving: Serving | None = app.state.runtime
            if serving is not None:
                await serving.batcher.close(settings.shutdown_timeout_s)
                await serving.text.flush()
            if app.state.store is not None:
                await app.state.store.close()
            logger.info("shut down")

    return lifespan


# --------------------------------------------------------------------------- request parsing

def _runtime(request: Request) -> Serving:
    runtime = request.app.state.runtime
    if runtime is None:
        raise ApiError(503, "model_not_ready", request.app.state.load_error or "the model is loading",
                       headers={"Retry-After": "5"})
    return runtime


RuntimeDep = Annotated[Serving, Depends(_runtime)]


def _validation_error(e: ValidationError) -> ApiError:
    first = e.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "body"
    return ApiError(422, "invalid_request", f"{where}: {first['msg']}")


async def _parse_detect(request: Request, *, batch: bool) -> tuple[list[bytes], schemas.DetectOptions]:
    """Image bytes and options from a JSON body (base64) or a multipart form (files)."""
    settings: Settings = request.app.state.settings
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "application/json":
        try:
            raw = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, "invalid_json", f"the body is not valid JSON: {e}") from e
        try:
            req = (schemas.BatchDetectRequest if batch else schemas.DetectRequest).model_validate(raw)
        except ValidationError as e:
            raise _validation_error(e) from e
        encoded = req.images if batch else [req.image]
        if len(encoded) > settings.max_images_per_request:
            raise ApiError(422, "too_many_images",
                           f"{len(encoded)} images; the limit is {settings.max_images_per_request}")
        return [decode_base64(s) for s in encoded], schemas.DetectOptions.model_validate(
            req.model_dump(exclude={"image", "images"}))
    if ctype == "multipart/form-data":
        try:
            form = await request.form(max_files=settings.max_images_per_request + 1,
                                      max_fields=4 * settings.max_classes + 100)
        except MultiPartException as e:
            raise ApiError(400, "invalid_form", f"the multipart body could not be parsed: {e.message}") from e
        field = "images" if batch else "image"
        files = form.getlist(field)
        if not files:
            raise ApiError(422, "missing_image", f"no `{field}` file in the form")
        if any(not isinstance(f, UploadFile) for f in files):
            raise ApiError(422, "missing_image", f"`{field}` must be a file upload, not a text field")
        if len(files) > settings.max_images_per_request:
            raise ApiError(422, "too_many_images",
                           f"{len(files)} images; the limit is {settings.max_images_per_request}")
        data = [await f.read() for f in files]
        texts = {k: [v for v in form.getlist(k) if isinstance(v, str)]
                 for k in ("classes", "template", "templates", "vocabulary", "score_threshold",
                           "max_detections")}
        fields: dict = {}
        if texts["classes"]:
            fields["classes"] = split_form_names(texts["classes"])
        if texts["template"] or texts["templates"]:
            fields["templates"] = texts["template"] + texts["templates"]
        for k in ("vocabulary", "score_threshold", "max_detections"):
            if texts[k] and texts[k][0].strip():
                fields[k] = texts[k][0].strip()
        try:
            return data, schemas.DetectOptions.model_validate(fields)
        except ValidationError as e:
            raise _validation_error(e) from e
    raise ApiError(415, "unsupported_media_type",
                   "send application/json (base64 images) or multipart/form-data (files)")


async def _resolve_vocabulary(runtime: Serving, opts: schemas.DetectOptions,
                              settings: Settings) -> tuple[list[str], list[str]]:
    """(names, templates) of a request: its own classes or a named vocabulary."""
    if opts.classes and opts.vocabulary:
        raise ApiError(422, "classes_and_vocabulary", "send `classes` or `vocabulary`, not both")
    templates = opts.templates
    if opts.vocabulary:
        vocab = await runtime.vocabularies.get(opts.vocabulary)
        names = vocab.names
        templates = templates or vocab.templates
    else:
        names = normalise_names(opts.classes or [], max_classes=settings.max_classes,
                                max_chars=settings.max_class_name_chars)
    templates = check_templates(templates or [runtime.manifest["prompt_template"]],
                                max_templates=settings.max_templates,
                                max_chars=settings.max_class_name_chars)
    if opts.max_detections is not None and opts.max_detections > settings.max_detections_limit:
        raise ApiError(422, "invalid_request",
                       f"max_detections {opts.max_detections} exceeds {settings.max_detections_limit}")
    return names, templates


def _decode_all(data: list[bytes], runtime: Serving, max_pixels: int) -> list[tuple[dict, float]]:
    """Decode + preprocess each image (worker thread); per image (model input, seconds)."""
    out = []
    for i, blob in enumerate(data):
        t0 = time.perf_counter()
        try:
            rgb = decode_image(blob, max_pixels=max_pixels)
        except ApiError as e:
            if len(data) > 1:
                e.message = f"image {i}: {e.message}"
            raise
        inputs = runtime.detector.preprocessing(rgb)
        out.append((inputs, time.perf_counter() - t0))
    return out


async def _detect(request: Request, runtime: Serving, *, batch: bool) -> list[dict]:
    """Everything of a detect request after auth: parse, decode, text, batch, respond."""
    start = time.perf_counter()
    settings: Settings = request.app.state.settings
    data, opts = await _parse_detect(request, batch=batch)
    names, templates = await _resolve_vocabulary(runtime, opts, settings)
    decoded = await asyncio.to_thread(_decode_all, data, runtime, settings.max_image_pixels)
    t_text = time.perf_counter()
    text = await runtime.text.text_matrix(names, templates)
    text_s = time.perf_counter() - t_text
    try:
        futures = runtime.batcher.submit([Job(inputs, text, tuple(names), opts.score_threshold,
                                              opts.max_detections) for inputs, _ in decoded])
    except Overloaded as e:
        raise ApiError(503, "overloaded", f"the server is busy: {e}", headers={"Retry-After": "1"}) from e
    results = await asyncio.gather(*futures)
    total_ms = 1000 * (time.perf_counter() - start)
    manifest = runtime.manifest
    metrics: Metrics = request.app.state.metrics
    out = []
    for (inputs, decode_s), res in zip(decoded, results, strict=True):
        metrics.detections.observe(len(res.detections))
        out.append({
            "model": {"name": str(manifest.get("name")), "version": str(manifest.get("version"))},
            "image": {"width": inputs["width"], "height": inputs["height"]},
            "classes": names,
            "detections": res.detections.to_json(),
            "timings_ms": {"decode": 1000 * decode_s, "text": 1000 * text_s, "queue": 1000 * res.queue_s,
                           "model": 1000 * res.model_s, "classify": 1000 * res.classify_s,
                           "total": total_ms},
        })
    return out


async def _with_timeout(request: Request, coro):
    timeout = request.app.state.settings.request_timeout_s
    try:
        return await asyncio.wait_for(coro, timeout)
    except asyncio.TimeoutError as e:
        raise ApiError(504, "timeout", f"the request took longer than {timeout:g} s") from e


def _detect_body(model: type, multipart_file: str, *, batch: bool) -> dict:
    """OpenAPI requestBody of a detect route: JSON with base64, or a multipart form with files."""
    file_schema = {"type": "string", "format": "binary"}
    form = {
        "type": "object", "required": [multipart_file],
        "properties": {
            multipart_file: {"type": "array", "items": file_schema} if batch else file_schema,
            "classes": {"type": "array", "items": {"type": "string"},
                        "description": "repeat the field, or separate names by commas/newlines"},
            "vocabulary": {"type": "string"},
            "template": {"type": "array", "items": {"type": "string"}},
            "score_threshold": {"type": "number", "minimum": 0, "maximum": 1},
            "max_detections": {"type": "integer", "minimum": 1},
        },
    }
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": model.model_json_schema()},
        "multipart/form-data": {"schema": form}}}}


ERRORS = {status: {"model": schemas.ErrorResponse, "description": text} for status, text in {
    400: "bad input (base64, JSON, truncated or polyglot image)", 401: "missing or invalid API key",
    404: "unknown vocabulary", 413: "body or image too large", 415: "not a supported image or body type",
    422: "invalid options (classes, templates, limits)", 503: "overloaded or model not ready (Retry-After)",
    504: "timed out"}.items()}


# --------------------------------------------------------------------------- the app

def create_app(settings: Settings | None = None, *, detector: Runtime | None = None) -> FastAPI:
    """Build the service.

    Args:
        settings: configuration; default: read from the environment (OVD_*).
        detector: an already loaded detector runtime (tests share one); default: load
            `settings.model_dir` with `settings.backend`.
    """
    settings = settings or Settings()
    metrics = Metrics(settings.max_batch_size)
    app = FastAPI(title="ovd detection service", version="1",
                  description="Open-vocabulary object detection: send an image and class names in "
                              "plain words, get boxes back.",
                  lifespan=_lifespan(detector))
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.runtime = None
    app.state.load_error = None
    app.state.store = None
    _install_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    auth = [Depends(check_api_key)]

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC / "index.html")

    @app.get("/livez", tags=["ops"], summary="the process is alive")
    async def livez():
        if app.state.load_error:
            return JSONResponse({"status": "failed", "error": app.state.load_error}, status_code=503)
        return {"status": "alive"}

    @app.get("/readyz", tags=["ops"], response_model=schemas.Readiness,
             responses={503: {"model": schemas.Readiness}}, summary="ready to detect?")
    async def readyz():
        store: RedisStore | None = app.state.store
        redis = "disabled" if store is None else ("ok" if await store.ping() else "down")
        loaded = app.state.runtime is not None
        if not loaded:
            status = "failed" if app.state.load_error else "loading"
            body = schemas.Readiness(status=status, model=False, redis=redis, error=app.state.load_error)
            return JSONResponse(body.model_dump(), status_code=503)
        degraded = store is not None and (redis == "down" or store.recently_failed)
        return schemas.Readiness(status="degraded" if degraded else "ready", model=True, redis=redis)

    @app.get("/metrics", tags=["ops"], summary="Prometheus metrics")
    async def prometheus_metrics():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", tags=["models"], dependencies=auth, responses=ERRORS,
             summary="the loaded model's manifest")
    async def model_manifest(runtime: RuntimeDep) -> dict:
        return runtime.manifest

    @app.post("/v1/detect", tags=["detect"], dependencies=auth, response_model=schemas.DetectResponse,
              responses=ERRORS, openapi_extra=_detect_body(schemas.DetectRequest, "image", batch=False),
              summary="detect the given classes in one image")
    async def detect(request: Request, runtime: RuntimeDep):
        return (await _with_timeout(request, _detect(request, runtime, batch=False)))[0]

    @app.post("/v1/detect/batch", tags=["detect"], dependencies=auth,
              response_model=schemas.BatchDetectResponse, responses=ERRORS,
              openapi_extra=_detect_body(schemas.BatchDetectRequest, "images", batch=True),
              summary="detect the given classes in several images")
    async def detect_batch(request: Request, runtime: RuntimeDep):
        return {"results": await _with_timeout(request, _detect(request, runtime, batch=True))}

    @app.get("/v1/vocabularies", tags=["vocabularies"], dependencies=auth,
             response_model=schemas.VocabularyList, responses=ERRORS, summary="the built-in vocabularies")
    async def list_vocabularies(runtime: RuntimeDep):
        return {"vocabularies": [{"id": v.id, "size": len(v.names), "description": BUILTIN_DESCRIPTIONS[v.id]}
                                 for v in runtime.vocabularies.builtins()]}

    @app.post("/v1/vocabularies", tags=["vocabularies"], dependencies=auth, status_code=201,
              response_model=schemas.VocabularyCreated, responses=ERRORS,
              summary="register a named vocabulary (id = content hash)")
    async def create_vocabulary(body: schemas.VocabularyCreate, runtime: RuntimeDep):
        names = normalise_names(body.names, max_classes=settings.max_classes,
                                max_chars=settings.max_class_name_chars)
        templates = check_templates(body.templates or [], max_templates=settings.max_templates,
                                    max_chars=settings.max_class_name_chars)
        vocab = await runtime.vocabularies.register(names, templates)
        return {"id": vocab.id, "size": len(vocab.names)}

    @app.get("/v1/vocabularies/{vocab_id}", tags=["vocabularies"], dependencies=auth,
             response_model=schemas.VocabularyInfo, responses=ERRORS, summary="one vocabulary")
    async def get_vocabulary(vocab_id: str, runtime: RuntimeDep):
        v = await runtime.vocabularies.get(vocab_id)
        return {"id": v.id, "size": len(v.names), "builtin": v.builtin, "names": v.names,
                "templates": v.templates}

    return app
