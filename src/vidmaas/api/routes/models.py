"""``GET /v1/models``: what each model can do (sizes, frame counts, steps, image)."""

from __future__ import annotations

from fastapi import APIRouter, Request

from vidmaas.api.deps import services_of
from vidmaas.api.schemas import ModelList, ModelOut

router = APIRouter(prefix="/v1/models", tags=["models"])


@router.get("", response_model=ModelList, summary="List the models")
async def list_models(request: Request) -> ModelList:
    svc = services_of(request)
    data = [ModelOut.model_validate(m.public()) for m in svc.registry.values()]
    default = svc.settings.default_model or svc.registry.default.id
    return ModelList(data=data, default=default)
