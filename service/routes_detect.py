"""/v1/detect and /v1/detect/batch (API key when configured): parse, decode, embed, batch, answer.

A request is read as JSON (base64 images) or a multipart form (files), its vocabulary resolved
(its own class names, or a named vocabulary), its images decoded and preprocessed in a worker
thread, its text embedded through the cache, and its images queued to the shared batcher; the
whole request is bounded by `request_timeout_s`.
"""

from __future__ import annotations

import asyncio
import json
import time

import numpy as np
from fastapi import APIRouter, Request
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException

from ovd.models.examples import example_inputs, example_rows, prototypes, weak_example_warnings
from ovd.models.model_card import warnings_for
from ovd.models.tiling import AUTO_SHRINK, TilePlan, merge_tiles, plan_tiles

from . import schemas
from .batcher import Job, Overloaded
from .deps import API_KEY_REQUIRED, MetricsDep, ModelDep, SettingsDep
from .errors import ApiError
from .images import decode_base64, decode_image, read_header
from .metrics import Metrics
from .schemas import ERROR_RESPONSES
from .serving import ServedModel
from .settings import Settings
from .vocabulary import check_templates, check_text, normalise_names, split_form_names

router = APIRouter()


#: The scalar options a multipart form may carry (one value each), with their JSON schema:
#: the same fields as the JSON body's, so a form field is never silently ignored.
FORM_SCALARS = ("vocabulary", "score_threshold", "max_detections", "score_mode", "nms_threshold",
                "class_agnostic", "tiles")
_FORM_OPTIONS = {k: {key: v for key, v in schemas.DetectOptions.model_json_schema()["properties"][k].items()
                     if key != "title"} for k in FORM_SCALARS}


def _inline_defs(schema: dict) -> dict:
    """A pydantic JSON schema with its `$defs` written in place of their `$ref`s: the schema of an
    `openapi_extra` body is not in `components`, so a `#/$defs/...` reference would point nowhere
    in the OpenAPI document (ReDoc refuses to render it). The request models are not recursive."""
    defs = schema.pop("$defs", {})

    def resolve(node):
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/$defs/"):
                return resolve({**defs[ref.removeprefix("#/$defs/")], **{k: v for k, v in node.items() if k != "$ref"}})
            return {k: resolve(v) for k, v in node.items()}
        if isinstance(node, list):
            return [resolve(v) for v in node]
        return node

    return resolve(schema)


def _detect_body(model: type, multipart_file: str, *, batch: bool) -> dict:
    """OpenAPI requestBody of a detect route: JSON with base64, or a multipart form with files."""
    file_schema = {"type": "string", "format": "binary"}
    form = {
        "type": "object", "required": [multipart_file],
        "properties": {
            multipart_file: {"type": "array", "items": file_schema} if batch else file_schema,
            "classes": {"type": "array", "items": {"type": "string"},
                        "description": "repeat the field, or separate names by commas/newlines"},
            "template": {"type": "array", "items": {"type": "string"}},
            "examples": {"type": "string", "description": "example boxes as a JSON list of "
                         "{\"box\": [x1, y1, x2, y2], \"label\": ..., \"image\": index or null}"},
            "example_images": {"type": "array", "items": file_schema},
            **{k: _FORM_OPTIONS[k] for k in FORM_SCALARS},
        },
    }
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": _inline_defs(model.model_json_schema())},
        "multipart/form-data": {"schema": form}}}}


@router.post("/v1/detect", tags=["detect"], dependencies=API_KEY_REQUIRED,
             response_model=schemas.DetectResponse, responses=ERROR_RESPONSES,
             openapi_extra=_detect_body(schemas.DetectRequest, "image", batch=False),
             summary="detect the given classes in one image")
async def detect(request: Request, model: ModelDep, settings: SettingsDep, metrics: MetricsDep):
    return (await _with_timeout(_detect(request, model, settings, metrics, batch=False),
                                settings.request_timeout_s))[0]


@router.post("/v1/detect/batch", tags=["detect"], dependencies=API_KEY_REQUIRED,
             response_model=schemas.BatchDetectResponse, responses=ERROR_RESPONSES,
             openapi_extra=_detect_body(schemas.BatchDetectRequest, "images", batch=True),
             summary="detect the given classes in several images")
async def detect_batch(request: Request, model: ModelDep, settings: SettingsDep, metrics: MetricsDep):
    return {"results": await _with_timeout(_detect(request, model, settings, metrics, batch=True),
                                           settings.request_timeout_s)}


async def _with_timeout(coro, timeout: float):
    try:
        return await asyncio.wait_for(coro, timeout)
    except asyncio.TimeoutError as e:
        raise ApiError(504, "timeout", f"the request took longer than {timeout:g} s") from e


async def _detect(request: Request, model: ServedModel, settings: Settings, metrics: Metrics, *,
                  batch: bool) -> list[dict]:
    """Everything of a detect request after auth: parse, price, decode, text, batch, respond.

    The request is priced before its work starts (service/admission.py): its decoded pixels
    from the image headers, its uncached prompts after the cache lookups. Cancelled (client
    gone, or `request_timeout_s` passed), it stops where it waits and its work is dropped.
    """
    start = time.perf_counter()
    stage = "parse"
    try:
        data, example_data, opts = await _parse_detect(request, settings, batch=batch)
        names, templates = await _resolve_vocabulary(model, opts, settings)
        groups = _examples_by_image(opts)
        labels, example_blobs = _check_examples(opts, groups, names, data, example_data, settings, batch=batch)
        sizes = [_image_size(blob, i, len(data), model, settings.max_image_pixels) for i, blob in enumerate(data)]
        example_sizes = [_image_size(blob, i, len(example_blobs), model, settings.max_image_pixels)
                         for i, blob in enumerate(example_blobs)]
        example_passes = sum(_example_passes(size, len(boxes), model) for size, (_, boxes) in
                             zip(example_sizes, groups, strict=True))
        max_tiles = _tile_budget(sizes, opts.tiles, model, settings, extra_passes=example_passes)
        stage = "decode"
        with model.admission.pixels.hold(sum(w * h for w, h in sizes + example_sizes)):
            decoded = await _decode_all(data, sizes, opts.tiles, max_tiles, model, settings, metrics)
            example_parts = await asyncio.gather(*(
                model.decoder.run(_decode_example, blob, boxes, model, settings, cost=w * h)
                for blob, (_, boxes), (w, h) in zip(example_blobs, groups, example_sizes, strict=True)))
        stage = "text"
        t_text = time.perf_counter()
        text = np.zeros((0, model.text.dim), np.float32)
        if names:
            looked_up = await model.text.lookup(model.text.pairs(names, templates))
            with model.admission.prompts.hold(looked_up.new_prompts):
                vectors = await model.text.complete(
                    looked_up, on_abandon=lambda n: metrics.abandoned_jobs.labels("text").inc(n))
            text = model.text.ensemble(vectors, len(names), len(templates))
        text_s = time.perf_counter() - t_text
        example_warnings: list[dict] = []
        if example_parts:
            stage = "examples"
            rows, example_warnings = await _example_rows(model, opts, groups, labels, example_parts)
            text = np.concatenate([text, rows])
            names = names + list(dict.fromkeys(labels))
        stage = "model"
        try:
            options = opts.classify_options()
            futures = model.batcher.submit([Job(inputs, text, tuple(names), options)
                                            for _, windows, _ in decoded for inputs in windows])
        except Overloaded as e:
            raise ApiError(503, "overloaded", f"the server is busy: {e}", headers={"Retry-After": "1"}) from e
        results = await asyncio.gather(*futures)
    except asyncio.CancelledError:
        metrics.abandoned_requests.labels(stage).inc()
        raise
    total_ms = 1000 * (time.perf_counter() - start)
    manifest = model.manifest
    warnings = warnings_for(manifest, names[:len(names) - len(set(labels))]) + example_warnings
    out = []
    first = 0
    for plan, windows, decode_s in decoded:
        parts = results[first:first + len(windows)]
        first += len(windows)
        found = merge_tiles([r.detections for r in parts], plan, options,
                            max_detections=model.detector.max_detections if options.max_detections is None
                            else options.max_detections)
        metrics.detections.observe(len(found))
        height, width = plan.image_size
        out.append({
            "model": {"name": str(manifest.get("name")), "version": str(manifest.get("version"))},
            "image": {"width": width, "height": height, "tiles": len(windows) - 1 if plan.tiled else 0},
            "classes": names,
            "detections": found.to_json(),
            "warnings": warnings,
            "timings_ms": {"decode": 1000 * decode_s, "text": 1000 * text_s,
                           "queue": 1000 * max(r.queue_s for r in parts),
                           "model": 1000 * sum(r.model_s for r in parts),
                           "classify": 1000 * sum(r.classify_s for r in parts), "total": total_ms},
        })
    return out


def _validation_error(e: ValidationError) -> ApiError:
    first = e.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "body"
    return ApiError(422, "invalid_request", f"{where}: {first['msg']}")


async def _parse_detect(request: Request, settings: Settings, *,
                        batch: bool) -> tuple[list[bytes], list[bytes], schemas.DetectOptions]:
    """Image bytes, example image bytes and options from a JSON body (base64) or a multipart
    form (files)."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "application/json":
        try:
            raw = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, "invalid_json", f"the body is not valid JSON: {e}") from e
        except RecursionError as e:  # e.g. 100,000 nested arrays
            raise ApiError(400, "invalid_json", "the body is not valid JSON: nested too deeply") from e
        try:
            req = (schemas.BatchDetectRequest if batch else schemas.DetectRequest).model_validate(raw)
        except ValidationError as e:
            raise _validation_error(e) from e
        encoded = req.images if batch else [req.image]
        examples = req.example_images or []
        for what, items in (("images", encoded), ("example images", examples)):
            if len(items) > settings.max_images_per_request:
                raise ApiError(422, "too_many_images",
                               f"{len(items)} {what}; the limit is {settings.max_images_per_request}")
        return [decode_base64(s) for s in encoded], [decode_base64(s) for s in examples], \
            schemas.DetectOptions.model_validate(req.model_dump(exclude={"image", "images", "example_images"}))
    if ctype == "multipart/form-data":
        try:
            form = await request.form(max_files=2 * settings.max_images_per_request + 1,
                                      max_fields=4 * settings.max_classes + 100)
        except MultiPartException as e:
            raise ApiError(400, "invalid_form", f"the multipart body could not be parsed: {e.message}") from e
        field = "images" if batch else "image"
        files = form.getlist(field)
        if not files:
            raise ApiError(422, "missing_image", f"no `{field}` file in the form")
        example_files = form.getlist("example_images")
        for name, items in ((field, files), ("example_images", example_files)):
            if any(not isinstance(f, UploadFile) for f in items):
                raise ApiError(422, "missing_image", f"`{name}` must be a file upload, not a text field")
            if len(items) > settings.max_images_per_request:
                raise ApiError(422, "too_many_images",
                               f"{len(items)} {name}; the limit is {settings.max_images_per_request}")
        data = [await f.read() for f in files]
        example_data = [await f.read() for f in example_files]
        texts = {k: [v for v in form.getlist(k) if isinstance(v, str)]
                 for k in ("classes", "template", "templates", "examples", *FORM_SCALARS)}
        fields: dict = {}
        if texts["classes"]:
            fields["classes"] = split_form_names(texts["classes"])
        if texts["template"] or texts["templates"]:
            fields["templates"] = texts["template"] + texts["templates"]
        for k in FORM_SCALARS:
            if texts[k] and texts[k][0].strip():
                fields[k] = texts[k][0].strip()
        if texts["examples"] and texts["examples"][0].strip():
            try:
                fields["examples"] = json.loads(texts["examples"][0])
            except (json.JSONDecodeError, RecursionError) as e:
                raise ApiError(422, "invalid_request", "`examples` must be a JSON list of "
                               '{"box": [x1, y1, x2, y2], "label": ..., "image": ...}') from e
        known = {field, "example_images", "classes", "template", "templates", "examples", *FORM_SCALARS}
        unknown = sorted(set(form.keys()) - known)
        if unknown:
            raise ApiError(422, "invalid_request", f"unknown form fields {unknown}; the form takes `{field}`, "
                           "`classes`, `template`, `examples`, `example_images` and "
                           f"{', '.join(f'`{k}`' for k in FORM_SCALARS)}")
        try:
            return data, example_data, schemas.DetectOptions.model_validate(fields)
        except ValidationError as e:
            raise _validation_error(e) from e
    raise ApiError(415, "unsupported_media_type",
                   "send application/json (base64 images) or multipart/form-data (files)")


async def _resolve_vocabulary(model: ServedModel, opts: schemas.DetectOptions,
                              settings: Settings) -> tuple[list[str], list[str]]:
    """(names, templates) of a request: its own classes or a named vocabulary."""
    if opts.classes and opts.vocabulary:
        raise ApiError(422, "classes_and_vocabulary", "send `classes` or `vocabulary`, not both")
    templates = opts.templates
    if opts.vocabulary:
        vocab = await model.vocabularies.get(opts.vocabulary)
        names = vocab.names
        templates = templates or vocab.templates
    elif opts.examples and not opts.classes:
        names = []  # examples alone
    else:
        names = normalise_names(opts.classes or [], max_classes=settings.max_classes,
                                max_chars=settings.max_class_name_chars)
    templates = check_templates(templates or [model.manifest["prompt_template"]],
                                max_templates=settings.max_templates,
                                max_chars=settings.max_class_name_chars)
    if opts.max_detections is not None and opts.max_detections > settings.max_detections_limit:
        raise ApiError(422, "invalid_request",
                       f"max_detections {opts.max_detections} exceeds {settings.max_detections_limit}")
    return names, templates


def _image_size(blob: bytes, index: int, count: int, model: ServedModel, max_pixels: int) -> tuple[int, int]:
    """(width, height) of one image from its header, every check before decoding done."""
    try:
        size = read_header(blob, max_pixels=max_pixels)
        check_aspect(size, model)
        return size
    except ApiError as e:
        if count > 1:
            e.message = f"image {index}: {e.message}"
        raise


def check_aspect(size: tuple[int, int], model: ServedModel) -> None:
    """422 `degenerate_image` when the detector's resize would make a side shorter than one pixel
    (a 1 x 100,000 strip: its short side is scaled up to min_size, then the long side down to
    max_size)."""
    width, height = size
    h, w = model.detector.preprocessing.resized_shape(height, width)
    if min(h, w) < 1:
        raise ApiError(422, "degenerate_image",
                       f"a {width}x{height} image is resized to {w}x{h} for the detector: its aspect "
                       "ratio is too extreme")


def _tile_budget(sizes: list[tuple[int, int]], tiles: str, model: ServedModel, settings: Settings, *,
                 extra_passes: int = 0) -> int:
    """The most windows per image this request may use (models/tiling.py `max_tiles`).

    Every model pass of a request must fit the queue at once. With `tiles=auto` the request
    gets fewer (larger) windows per image until they do; with `tiles=on` a request that cannot
    fit is refused (422). The header's size may be the image's before EXIF rotation: a plan's
    window count does not change when width and height swap. `extra_passes` (the example
    images') count against the queue too.
    """
    prep = model.detector.preprocessing

    def passes(max_tiles: int) -> int:
        return extra_passes + sum(len(plan_tiles(h, w, prep, tiles, max_tiles=max_tiles).windows) for w, h in sizes)

    budget = settings.max_tiles
    if tiles == "auto":
        while budget > 1 and passes(budget) > settings.max_queue:
            budget = max(1, min(budget - 1, (settings.max_queue - extra_passes) // len(sizes) - 1))
    if passes(budget) > settings.max_queue:
        raise ApiError(422, "too_many_model_passes",
                       f"the request needs {passes(budget)} model passes (images x tiles) and the queue holds "
                       f"{settings.max_queue} (OVD_MAX_QUEUE): send fewer images per request, or tiles=auto "
                       "(fewer, larger windows) or off")
    return budget


def _decode_one(blob: bytes, tiles: str, max_tiles: int, index: int, count: int, model: ServedModel,
                settings: Settings) -> tuple[TilePlan, list[dict], float]:
    """Decode one image and preprocess each of its windows (a decode-pool thread):
    (its tile plan, model inputs in `plan.windows` order, seconds)."""
    t0 = time.perf_counter()
    try:
        rgb = decode_image(blob, max_pixels=settings.max_image_pixels)
    except ApiError as e:
        if count > 1:
            e.message = f"image {index}: {e.message}"
        raise
    prep = model.detector.preprocessing
    plan = plan_tiles(*rgb.shape[:2], prep, tiles, max_tiles=max_tiles)
    inputs = [prep(rgb[y0:y1, x0:x1]) for x0, y0, x1, y1 in plan.windows]
    return plan, inputs, time.perf_counter() - t0


async def _decode_all(data: list[bytes], sizes: list[tuple[int, int]], tiles: str, max_tiles: int,
                      model: ServedModel, settings: Settings, metrics: Metrics) -> list[tuple[TilePlan, list[dict], float]]:
    """Decode a request's images in the shared decode pool (cheapest first, by their header's
    pixels); on an error or a cancellation the images not yet started are taken out of the
    pool's queue (counted as abandoned when cancelled)."""
    dropped = []
    tasks = [asyncio.ensure_future(model.decoder.run(_decode_one, blob, tiles, max_tiles, i, len(data), model, settings,
                                                     cost=w * h, on_dropped=lambda: dropped.append(1)))
             for i, (blob, (w, h)) in enumerate(zip(data, sizes, strict=True))]
    try:
        return [await t for t in tasks]
    except BaseException as e:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if isinstance(e, asyncio.CancelledError) and dropped:
            metrics.abandoned_jobs.labels("decode").inc(len(dropped))
        raise


def _examples_by_image(opts: schemas.DetectOptions) -> list[tuple[int | None, list[list[float]]]]:
    """[(image index, or None for the searched image; its example boxes)] in first-seen order."""
    groups: dict[int | None, list[list[float]]] = {}
    for ex in opts.examples or []:
        groups.setdefault(ex.image, []).append(ex.box)
    return list(groups.items())


def _check_examples(opts: schemas.DetectOptions, groups: list[tuple[int | None, list[list[float]]]],
                    names: list[str], data: list[bytes], example_data: list[bytes],
                    settings: Settings, *, batch: bool) -> tuple[list[str], list[bytes]]:
    """(each example's normalised label, the image bytes of each group of `_examples_by_image`),
    every check done before any work: counts, image references, labels."""
    examples = opts.examples or []
    if example_data and not examples:
        raise ApiError(422, "invalid_request", "`example_images` were sent without `examples` boxes")
    if not examples:
        return [], []
    if len(examples) > settings.max_examples:
        raise ApiError(422, "too_many_examples", "query by example is off on this server (OVD_MAX_EXAMPLES=0)"
                       if not settings.max_examples else
                       f"{len(examples)} example boxes; the limit is {settings.max_examples}")
    labels = []
    for k, ex in enumerate(examples):
        check_text(ex.label, "example label")
        label = " ".join(ex.label.split())
        if not label or len(label) > settings.max_class_name_chars:
            raise ApiError(422, "invalid_request", f"examples.{k}.label must have 1 to "
                           f"{settings.max_class_name_chars} characters")
        labels.append(label)
        if ex.image is None and batch:
            raise ApiError(422, "invalid_request", f"examples.{k}.image: give the index of an `example_images` "
                           "entry (a batch request has no single searched image)")
        if ex.image is not None and ex.image >= len(example_data):
            raise ApiError(422, "invalid_request", f"examples.{k}.image is {ex.image}, but "
                           f"{len(example_data)} example_images were sent")
    clash = sorted({label.casefold() for label in labels} & {n.casefold() for n in names})
    if clash:
        raise ApiError(422, "invalid_request", f"example labels {clash} are also class names: give the examples "
                       "labels of their own")
    if len(names) + len(set(labels)) > settings.max_classes:
        raise ApiError(422, "too_many_classes", f"{len(names)} names and {len(set(labels))} example labels; "
                       f"the limit is {settings.max_classes}")
    return labels, [data[0] if i is None else example_data[i] for i, _ in groups]


def _example_passes(size: tuple[int, int], boxes: int, model: ServedModel) -> int:
    """Model passes that embed `boxes` example boxes of one image of (width, height) pixels
    (models/examples.py `example_inputs`: one, or a window per box in a large image)."""
    return 1 if min(size) / model.detector.preprocessing.min_size <= AUTO_SHRINK else boxes


def _decode_example(blob: bytes, boxes: list[list[float]], model: ServedModel, settings: Settings) -> list:
    """Decode an example image and preprocess the inputs that embed its boxes (a decode-pool
    thread): `example_inputs`' [(model input, box indices, boxes in that input's pixels)]."""
    rgb = decode_image(blob, max_pixels=settings.max_image_pixels)
    try:
        return example_inputs(rgb, boxes, model.detector.preprocessing)
    except ValueError as e:
        raise ApiError(422, "invalid_example", str(e)) from e


async def _example_rows(model: ServedModel, opts: schemas.DetectOptions,
                        groups: list[tuple[int | None, list[list[float]]]], labels: list[str],
                        parts: list[list]) -> tuple[np.ndarray, list[dict]]:
    """((L, D) query rows, one per distinct label; warnings for weak examples): the example
    images' inputs are encoded by the shared batcher (encode-only jobs), then turned into rows."""
    flat = [x for image_parts in parts for x in image_parts]
    try:
        futures = model.batcher.submit([Job(x, None, ()) for x, _, _ in flat])
    except Overloaded as e:
        raise ApiError(503, "overloaded", f"the server is busy: {e}", headers={"Retry-After": "1"}) from e
    results = iter(await asyncio.gather(*futures))
    examples = opts.examples or []
    rows: list = [None] * len(examples)
    for (image, _), image_parts in zip(groups, parts, strict=True):
        of_image = [k for k, ex in enumerate(examples) if ex.image == image]  # its boxes' request indices
        for x, which, boxes in image_parts:
            try:
                found = example_rows(next(results).regions, x, boxes, model.text_mean)
            except ValueError as e:
                raise ApiError(422, "invalid_example", str(e)) from e
            for j, row in zip(which, found, strict=True):
                rows[of_image[j]] = row
    _, matrix = prototypes(labels, rows)
    return matrix, weak_example_warnings(labels, rows)
