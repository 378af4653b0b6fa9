"""The app's main module: `create_app`, the uvicorn factory (`ovd.service.app:create_app`).

It wires one app together: the serving runtime (service/serving.py: settings, metrics, Redis,
the model loaded in the background by the lifespan), the error handlers and the body limit
(service/error_handlers.py), the metrics middleware, the static web page, and the routers:
routes_ops (/, /livez, /readyz, /metrics; open), routes_models (/v1/models), routes_detect
(/v1/detect, /v1/detect/batch) and routes_vocabularies (/v1/vocabularies[/{id}]), the /v1
routes behind the API key when one is configured. /openapi.json is FastAPI's own; /docs
(Swagger UI) and /redoc (ReDoc) load their scripts from this server, bundled by the
`fastapi-offline` package, so they work on a network without internet.

A detect request whose client disconnects is cancelled (service/disconnect.py), like one that
passes `request_timeout_s`: its queued work is dropped. Every response carries the security
headers of service/security_headers.py; with API keys on, the OpenAPI document declares the
bearer scheme.

Shutdown (SIGTERM) stops accepting connections (uvicorn), lets in-flight requests finish,
then the lifespan drains the batcher.
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline

from . import routes_detect, routes_models, routes_ops, routes_vocabularies
from .disconnect import DisconnectMiddleware
from .error_handlers import BodyLimitMiddleware, install_error_handlers
from .metrics import MetricsMiddleware
from .security_headers import SecurityHeadersMiddleware
from .serving import ServingRuntime
from .settings import Settings

#: Where Swagger UI's and ReDoc's scripts and styles are served from (fastapi-offline's files).
DOCS_ASSETS = "/docs-assets"


def create_app(settings: Settings | None = None, runtime: ServingRuntime | None = None) -> FastAPI:
    """Build the service.

    Args:
        settings: configuration; default: the runtime's, else read from the environment (OVD_*).
        runtime: what the app serves with; default: a `ServingRuntime(settings)`, which loads
            `settings.model_dir` with `settings.backend` when the app starts.

    Raises:
        ValueError: both are given and `settings` is not the runtime's.
    """
    if runtime is None:
        runtime = ServingRuntime(settings or Settings())
    elif settings is not None and settings is not runtime.settings:
        raise ValueError("create_app got settings other than its runtime's: pass one of them")
    settings = runtime.settings
    app = FastAPIOffline(title="ovd detection service", version="1", static_url=DOCS_ASSETS,
                  description="Open-vocabulary object detection: send an image and class names in "
                              "plain words, get boxes back.",
                  lifespan=runtime.lifespan)
    app.state.runtime = runtime  # read by the dependencies of service/deps.py only
    install_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(DisconnectMiddleware, paths=("/v1/detect", "/v1/detect/batch"))
    app.add_middleware(MetricsMiddleware, metrics=runtime.metrics)
    app.add_middleware(SecurityHeadersMiddleware)
    app.mount("/static", StaticFiles(directory=routes_ops.STATIC_DIR), name="static")
    for routes in (routes_ops, routes_models, routes_detect, routes_vocabularies):
        app.include_router(routes.router)
    if settings.api_key_list:
        _declare_bearer_auth(app)
    return app


def _declare_bearer_auth(app: FastAPI) -> None:
    """With API keys on, the OpenAPI document declares the bearer scheme on the /v1 routes (the
    check itself is service/deps.py's require_api_key), so clients and Swagger UI know it."""
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = build()
            schema.setdefault("components", {}).setdefault("securitySchemes", {})["bearer"] = {
                "type": "http", "scheme": "bearer", "description": "one of OVD_API_KEYS"}
            for path, operations in schema["paths"].items():
                if path.startswith("/v1/"):
                    for operation in operations.values():
                        operation["security"] = [{"bearer": []}]
        return app.openapi_schema

    app.openapi = openapi
