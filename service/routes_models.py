"""/v1/models: the served model's manifest (API key when configured)."""

from __future__ import annotations

from fastapi import APIRouter

from .deps import API_KEY_REQUIRED, ModelDep
from .schemas import ERROR_RESPONSES

router = APIRouter()


@router.get("/v1/models", tags=["models"], dependencies=API_KEY_REQUIRED, responses=ERROR_RESPONSES,
            summary="the loaded model's manifest")
async def model_manifest(model: ModelDep) -> dict:
    return model.manifest
