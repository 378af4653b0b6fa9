"""/v1/models: the served model's manifest and its model card (API key when configured)."""

from __future__ import annotations

from fastapi import APIRouter

from ovd.models.model_card import model_card

from .deps import API_KEY_REQUIRED, ModelDep
from .schemas import ERROR_RESPONSES

router = APIRouter()


@router.get("/v1/models", tags=["models"], dependencies=API_KEY_REQUIRED, responses=ERROR_RESPONSES,
            summary="the loaded model's manifest")
async def model_manifest(model: ModelDep) -> dict:
    return model.manifest


@router.get("/v1/models/card", tags=["models"], dependencies=API_KEY_REQUIRED, responses=ERROR_RESPONSES,
            summary="what the loaded model knows: training data, evaluated categories and metrics, the words "
                    "its text encoder can read")
async def card(model: ModelDep) -> dict:
    return model_card(model.manifest)
