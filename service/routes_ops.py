"""Operations routes, open without an API key: the web page (/), /livez, /readyz, /metrics."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from . import schemas
from .deps import MetricsDep, RuntimeDep, StoreDep

STATIC_DIR = Path(__file__).parent / "static"

router = APIRouter()


@router.get("/", include_in_schema=False)
async def index():
    return FileResponse(STATIC_DIR / "index.html")


@router.get("/livez", tags=["ops"], summary="the process is alive")
async def livez(runtime: RuntimeDep):
    if runtime.load_error:
        return JSONResponse({"status": "failed", "error": runtime.load_error}, status_code=503)
    return {"status": "alive"}


@router.get("/readyz", tags=["ops"], response_model=schemas.Readiness,
            responses={503: {"model": schemas.Readiness}}, summary="ready to detect?")
async def readyz(runtime: RuntimeDep, store: StoreDep):
    redis = "disabled" if store is None else ("ok" if await store.ping() else "down")
    if runtime.model is None:
        status = "failed" if runtime.load_error else "loading"
        body = schemas.Readiness(status=status, model=False, redis=redis, error=runtime.load_error)
        return JSONResponse(body.model_dump(), status_code=503)
    degraded = store is not None and (redis == "down" or store.recently_failed)
    return schemas.Readiness(status="degraded" if degraded else "ready", model=True, redis=redis)


@router.get("/metrics", tags=["ops"], summary="Prometheus metrics")
async def prometheus_metrics(metrics: MetricsDep):
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)
