"""/v1/vocabularies: list the built-in vocabularies, register one, read one, delete one (API key when configured)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from . import schemas
from .auth import key_owner
from .deps import API_KEY_REQUIRED, ModelDep, SettingsDep
from .schemas import ERROR_RESPONSES
from .settings import Settings
from .vocabulary import BUILTIN_DESCRIPTIONS, check_templates, normalise_names

router = APIRouter()


@router.get("/v1/vocabularies", tags=["vocabularies"], dependencies=API_KEY_REQUIRED,
            response_model=schemas.VocabularyList, responses=ERROR_RESPONSES,
            summary="the built-in vocabularies")
async def list_vocabularies(model: ModelDep):
    return {"vocabularies": [{"id": v.id, "size": len(v.names), "description": BUILTIN_DESCRIPTIONS[v.id]}
                             for v in model.vocabularies.builtins()]}


@router.post("/v1/vocabularies", tags=["vocabularies"], dependencies=API_KEY_REQUIRED, status_code=201,
             response_model=schemas.VocabularyCreated, responses=ERROR_RESPONSES,
             summary="register a named vocabulary (id = content hash)")
async def create_vocabulary(body: schemas.VocabularyCreate, request: Request, model: ModelDep,
                            settings: SettingsDep):
    names = normalise_names(body.names, max_classes=settings.max_classes,
                            max_chars=settings.max_class_name_chars)
    templates = check_templates(body.templates or [], max_templates=settings.max_templates,
                                max_chars=settings.max_class_name_chars)
    vocab = await model.vocabularies.register(names, templates, owner=_owner(request, settings))
    return {"id": vocab.id, "size": len(vocab.names)}


@router.get("/v1/vocabularies/{vocab_id}", tags=["vocabularies"], dependencies=API_KEY_REQUIRED,
            response_model=schemas.VocabularyInfo, responses=ERROR_RESPONSES, summary="one vocabulary")
async def get_vocabulary(vocab_id: str, model: ModelDep):
    v = await model.vocabularies.get(vocab_id)
    return {"id": v.id, "size": len(v.names), "builtin": v.builtin, "names": v.names,
            "templates": v.templates}


@router.delete("/v1/vocabularies/{vocab_id}", tags=["vocabularies"], dependencies=API_KEY_REQUIRED,
               status_code=204, responses=ERROR_RESPONSES,
               summary="delete a vocabulary this API key registered")
async def delete_vocabulary(vocab_id: str, request: Request, model: ModelDep, settings: SettingsDep):
    await model.vocabularies.delete(vocab_id, owner=_owner(request, settings))
    return Response(status_code=204)


def _owner(request: Request, settings: Settings) -> str:
    return key_owner(request.headers.get("authorization", ""), settings.api_key_list)
