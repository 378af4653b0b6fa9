"""Typed dependencies of the routes (`Annotated[..., Depends(...)]`).

Everything a route needs from the app comes through here, from the app's one `ServingRuntime`
(`app.state.runtime`, set by `create_app`): its settings, metrics, Redis store and served model,
and the API-key check of the /v1 routes.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from .auth import check_api_key
from .errors import ApiError
from .metrics import Metrics
from .redis_store import RedisStore
from .serving import ServedModel, ServingRuntime
from .settings import Settings


def get_runtime(request: Request) -> ServingRuntime:
    return request.app.state.runtime


RuntimeDep = Annotated[ServingRuntime, Depends(get_runtime)]


def get_settings(runtime: RuntimeDep) -> Settings:
    return runtime.settings


def get_metrics(runtime: RuntimeDep) -> Metrics:
    return runtime.metrics


def get_store(runtime: RuntimeDep) -> RedisStore | None:
    return runtime.store


def get_model(runtime: RuntimeDep) -> ServedModel:
    """The loaded model; 503 `model_not_ready` (with Retry-After) while it loads or after it failed."""
    if runtime.model is None:
        raise ApiError(503, "model_not_ready", runtime.load_error or "the model is loading",
                       headers={"Retry-After": "5"})
    return runtime.model


SettingsDep = Annotated[Settings, Depends(get_settings)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
StoreDep = Annotated[RedisStore | None, Depends(get_store)]
ModelDep = Annotated[ServedModel, Depends(get_model)]


def require_api_key(request: Request, settings: SettingsDep) -> None:
    """Pass when auth is off or the request's bearer key is a configured one (else 401)."""
    check_api_key(request.headers.get("authorization", ""), settings.api_key_list)


API_KEY_REQUIRED = [Depends(require_api_key)]
