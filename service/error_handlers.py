"""How refused requests reach the client: every error as the JSON body of `ApiError`.

`install_error_handlers` renders ApiError, validation errors, framework HTTP errors (404,
405, ...) and anything unexpected (500, logged) in that one shape. `BodyLimitMiddleware`
refuses a body over the limit with 413, before reading it when Content-Length says so, else
while it streams in.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .errors import ApiError

logger = logging.getLogger(__name__)


def error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError):
        return error_response(exc)

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
            return error_response(exc.__cause__)
        if exc.status_code == 400 and isinstance(exc.__cause__, (RecursionError, ValueError)):
            # FastAPI could not parse a JSON body (e.g. nested 100,000 deep)
            return error_response(ApiError(400, "invalid_json", f"the body is not valid JSON: {exc.detail}"))
        codes = {404: "not_found", 405: "method_not_allowed", 400: "bad_request"}
        return error_response(ApiError(exc.status_code, codes.get(exc.status_code, "http_error"),
                                       str(exc.detail), headers=dict(exc.headers or {})))

    @app.exception_handler(Exception)
    async def internal_error(_: Request, exc: Exception):
        logger.exception("unhandled error", exc_info=exc)
        return error_response(ApiError(500, "internal_error", "internal server error"))


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
            return await error_response(error)(scope, receive, send)
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
