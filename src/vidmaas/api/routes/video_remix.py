"""``POST /v1/videos/{id}/remix``: OpenAI's remix, a new video from a completed one with a
new prompt.

Guarantees:
- The source is the caller's own video (an admin's: anyone's); someone else's, a
  native task's, a missing one and a deleted completed one all answer 404
  ``video_not_found`` alike. A source that is not ``completed`` is 409
  ``video_not_completed`` (OpenAI remixes completed videos only).
- The body is JSON ``{"prompt": ...}`` (unknown fields ignored, as on create; a form is
  415); it is read only once the source is found.
- The remix is made by ``api.rerun`` through ``creation.create_task`` (quotas,
  idempotency with ``Idempotency-Key``, priorities): same model, size, frame count
  (so the same ``seconds``), steps, seed and input image as the source (the image
  copied, so deleting the source never affects the remix); its ``remixed_from_video_id``
  is the source's id. The answer carries ``openai-poll-after-ms`` like a create's.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, FastAPI, Header, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from vidmaas.api import creation, pacing, rerun
from vidmaas.api.body import validated
from vidmaas.api.deps import CallerDep, services_of
from vidmaas.api.routes.videos import (
    _ERRORS,
    _STATUS,
    OPENAI_SOURCE,
    OpenAIRoute,
    Video,
    load_video,
    video_out,
)
from vidmaas.domain.status import TaskStatus
from vidmaas.errors import Conflict

router = APIRouter(prefix="/v1/videos", tags=["openai"], route_class=OpenAIRoute)


class VideoRemix(BaseModel):
    """JSON body of ``POST /v1/videos/{id}/remix``."""

    model_config = ConfigDict(extra="ignore")

    prompt: str = Field(min_length=1, max_length=10_000)


_REMIX_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": VideoRemix.model_json_schema()}}}}


@router.post("/{video_id}/remix", response_model=Video,
             responses={**_ERRORS, **pacing.RESPONSES},
             openapi_extra=_REMIX_BODY, summary="Remix a completed video with a new prompt")
async def remix_video(
    request: Request, video_id: str, caller: CallerDep, response: Response,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None,
) -> Video:
    source = await load_video(request, video_id=video_id, scope=caller.scope)
    svc = services_of(request)
    raw = await rerun.read_overrides(request, limit_bytes=svc.settings.api.max_upload_bytes,
                                     required=True)
    data = validated(VideoRemix, raw)
    if source.status is not TaskStatus.COMPLETED:
        raise Conflict(f"only a completed video can be remixed; this one is "
                       f"{_STATUS[source.status]}", code="video_not_completed",
                       field="video_id")
    req = await rerun.request_from(svc, source, overrides={"prompt": data.prompt},
                                   origin=OPENAI_SOURCE)
    task, _created, position = await creation.create_task(
        svc=svc, caller=caller, req=req, idempotency_key=idempotency_key)
    response.headers.update(pacing.headers(task, position))
    return video_out(task)


def install(app: FastAPI) -> None:
    app.include_router(router)
