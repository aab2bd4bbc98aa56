"""``GET /v1/models``: what each model can do (sizes, frame counts, steps, image), and
whether it can run at all here (``available``: its GPUs per job fit the capacity)."""

from __future__ import annotations

from fastapi import APIRouter, Request

from vidmaas.api.deps import services_of
from vidmaas.api.schemas import ModelList, ModelOut

router = APIRouter(prefix="/v1/models", tags=["models"])


@router.get("", response_model=ModelList, summary="List the models")
async def list_models(request: Request) -> ModelList:
    svc = services_of(request)
    capacity = svc.settings.gpu_capacity
    data = []
    for m in svc.registry.values():
        reason = m.unavailable_reason(gpu_capacity=capacity)
        data.append(ModelOut.model_validate(m.public() | {"available": reason is None,
                                                          "unavailable_reason": reason}))
    default = svc.settings.default_model or svc.registry.default.id
    return ModelList(data=data, default=default)
