"""The OpenAI-compatible Videos API (``/v1/videos``) on top of tasks.

Routes: ``POST /v1/videos`` (JSON or multipart), ``GET /v1/videos/{id}``, ``GET /v1/videos``
(cursor pages: ``after``, ``limit``, ``order``), ``DELETE /v1/videos/{id}``,
``GET /v1/videos/{id}/content?variant=video|thumbnail|spritesheet``; the remix is in
``routes.video_remix``. Mapping and decisions are in docs/streams-and-openai.md.

Guarantees:
- A video is a task created through this API (``source = "openai"``); its id is the task
  id, so the native event streams work on it too. Tasks created natively are not videos
  (404 here), and a caller sees only their own.
- Creation goes through ``api.creation.create_task`` (the one way to create a task):
  ``size`` ``WxH`` must be one of the model's sizes; ``seconds`` becomes the smallest
  frame count the model allows that lasts at least that long; what the model cannot do
  is refused before anything is written.
- Every error on these routes has OpenAI's body ``{"error": {"message", "type",
  "param", "code"}}`` (invalid requests are 400, as OpenAI answers them, with the same
  codes as the native API for a body that does not parse); the status otherwise
  follows ``api.errors``, a backing service that is down included (503 with
  ``Retry-After``).
- A form's unknown text fields are ignored, as OpenAI's are; a file under any name but
  ``input_reference`` is refused, and so is an empty one (``empty_image``).
- A create and a retrieve of an unfinished video carry ``openai-poll-after-ms``
  (``api.pacing``), the interval the openai SDK's ``create_and_poll`` then uses.
- ``DELETE`` cancels an unfinished video and removes a finished one's files (video,
  thumbnail, spritesheet, last preview); a deleted completed video answers 404 afterwards.
- ``content`` serves also ``variant=spritesheet`` (a JPEG grid of frames); a video completed
  without one (made before spritesheets) answers 404 ``no_spritesheet``.
"""

from __future__ import annotations

import base64
import binascii
import logging
import math
from collections.abc import Callable, Coroutine
from typing import Annotated, Any, Literal

from fastapi import APIRouter, FastAPI, Header, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt

from vidmaas.api import creation, pacing
from vidmaas.api.body import read_body, validated
from vidmaas.api.deps import CallerDep, CallerOrTokenDep, services_of
from vidmaas.api.errors import as_ours, retry_headers, status_of_any
from vidmaas.api.routes.tasks import _download, cancel
from vidmaas.db import tasks as repo
from vidmaas.db.models import Task
from vidmaas.domain.ids import is_task_id
from vidmaas.domain.models import ModelSpec, parse_size
from vidmaas.domain.status import TaskStatus
from vidmaas.errors import InvalidRequest, NotFound, ServiceUnavailable, VidmaasError
from vidmaas.storage.base import outputs_prefix

log = logging.getLogger(__name__)

OPENAI_SOURCE = "openai"
MAX_SECONDS = 3600.0

_STATUS = {
    TaskStatus.QUEUED: "queued",
    TaskStatus.DISPATCHING: "in_progress",
    TaskStatus.RUNNING: "in_progress",
    TaskStatus.CANCELLING: "in_progress",
    TaskStatus.COMPLETED: "completed",
    TaskStatus.FAILED: "failed",
    TaskStatus.CANCELLED: "failed",
}

_TYPES = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}


# ------------------------------------------------------------------ error bodies

def openai_error(status: int, *, message: str, code: str | None, param: str | None,
                 headers: dict[str, str] | None = None) -> JSONResponse:
    kind = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return JSONResponse({"error": {"message": message, "type": kind, "param": param,
                                   "code": code}}, status_code=status, headers=headers)


def _from_ours(exc: VidmaasError) -> JSONResponse:
    status = status_of_any(exc)
    if isinstance(exc, InvalidRequest):
        status = 400
    headers = retry_headers(exc)
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    message = exc.message if status < 500 or isinstance(exc, ServiceUnavailable) \
        else "internal error"
    return openai_error(status, message=message, code=exc.code, param=exc.field,
                        headers=headers or None)


class OpenAIRoute(APIRoute):
    """A route whose errors (ours and request validation) have OpenAI's error body."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def wrapped(request: Request) -> Response:
            try:
                return await handler(request)
            except VidmaasError as e:
                return _from_ours(e)
            except RequestValidationError as e:
                first = e.errors()[0] if e.errors() else {}
                loc = [str(p) for p in first.get("loc", ()) if p not in ("query", "path",
                                                                        "body", "header")]
                param = ".".join(loc) or None
                msg = str(first.get("msg", "invalid request"))
                return openai_error(400, message=f"{param}: {msg}" if param else msg,
                                    code="invalid_request", param=param)
            except Exception as e:
                ours = as_ours(e)  # a backing service down: 503 in OpenAI's shape too
                if ours is None:
                    raise
                log.warning("request failed: %s (%s)", ours.code, type(e).__name__)
                return _from_ours(ours)

        return wrapped


router = APIRouter(prefix="/v1/videos", tags=["openai"], route_class=OpenAIRoute)


class OpenAIErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class OpenAIErrorBody(BaseModel):
    """OpenAI's error body, which every error of these routes has."""

    error: OpenAIErrorInfo


_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": OpenAIErrorBody} for code in (400, 401, 404, 409, 413, 415, 429, 503)}


# ------------------------------------------------------------------ shapes

class VideoError(BaseModel):
    code: str
    message: str


class Video(BaseModel):
    """OpenAI's ``video`` object."""

    id: str
    object: Literal["video"] = "video"
    status: Literal["queued", "in_progress", "completed", "failed"]
    progress: int = Field(ge=0, le=100)
    created_at: int
    completed_at: int | None
    expires_at: int | None = Field(description="Always null: outputs are kept until deleted")
    model: str
    prompt: str
    size: str = Field(description="WxH, e.g. 1280x720")
    seconds: str
    remixed_from_video_id: str | None = None
    error: VideoError | None


class VideoList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Video]
    first_id: str | None
    last_id: str | None
    has_more: bool


class VideoDeleted(BaseModel):
    id: str
    object: Literal["video.deleted"] = "video.deleted"
    deleted: bool = True


class VideoCreate(BaseModel):
    """JSON body of ``POST /v1/videos`` (multipart takes the same fields)."""

    model_config = ConfigDict(extra="ignore")

    prompt: str = Field(min_length=1, max_length=10_000)
    model: str | None = Field(default=None, max_length=64)
    size: str | None = Field(default=None, max_length=16)
    seconds: str | StrictInt | StrictFloat | None = None
    """OpenAI sends a string (``"4"``); a number is taken too, a boolean is not."""
    input_reference: dict[str, str] | None = None


def seconds_label(num_frames: int, fps: int) -> str:
    """A clip's length as OpenAI's ``seconds`` string: whole seconds when the 4k+1 frame
    count only overshoots a whole number slightly (``81`` frames at 16 fps is ``"5"``)."""
    duration = num_frames / fps
    whole = math.floor(duration)
    if whole >= 1 and duration - whole < 0.15:
        return str(whole)
    return f"{duration:.2f}".rstrip("0").rstrip(".")


def video_out(task: Task) -> Video:
    status = task.status
    error = None
    if status is TaskStatus.CANCELLED:
        error = VideoError(code="cancelled", message="the video was cancelled")
    elif status is TaskStatus.FAILED:
        error = VideoError(code=task.error_code or "failed",
                           message=task.error_message or "generation failed")
    p = task.params
    progress = 100 if status is TaskStatus.COMPLETED else max(0, min(99, int(task.progress)))
    return Video(
        id=task.id, status=_STATUS[status], progress=progress,  # type: ignore[arg-type]
        created_at=int(task.created_at.timestamp()),
        completed_at=int(task.finished_at.timestamp()) if task.finished_at else None,
        expires_at=None, model=task.model, prompt=task.prompt,
        size=f"{p['width']}x{p['height']}", seconds=seconds_label(p["num_frames"], p["fps"]),
        remixed_from_video_id=task.rerun_of, error=error)


def frames_for(spec: ModelSpec, seconds: str | int | float) -> int:
    """The smallest allowed frame count lasting at least ``seconds``."""
    try:
        value = float(seconds)
    except (TypeError, ValueError) as e:
        raise InvalidRequest(f"seconds must be a number, not {str(seconds)[:20]!r}",
                             field="seconds", code="invalid_seconds") from e
    if not 0 < value <= MAX_SECONDS or math.isnan(value):
        raise InvalidRequest("seconds must be positive", field="seconds",
                             code="invalid_seconds")
    need = math.ceil(value * spec.fps - 1e-9)
    fits = [n for n in sorted(spec.frame_counts) if n >= need]
    if not fits:
        longest = max(spec.frame_counts) / spec.fps
        raise InvalidRequest(
            f"model {spec.id} makes clips of at most {longest:.2f} seconds; not {value:g}",
            field="seconds", code="unsupported_seconds")
    return fits[0]


def size_for(spec: ModelSpec, size: str) -> str:
    """``1280x720`` → the model's ``1280*720``, or ``unsupported_size``."""
    if "x" not in size.lower():
        raise InvalidRequest(f"size must be WIDTHxHEIGHT, such as 1280x720; not {size[:20]!r}",
                             field="size", code="invalid_size")
    width, height = parse_size(size.lower())
    wan = f"{width}*{height}"
    if wan not in spec.sizes:
        allowed = ", ".join(s.replace("*", "x") for s in spec.sizes)
        raise InvalidRequest(f"model {spec.id} supports sizes {allowed}; not {width}x{height}",
                             field="size", code="unsupported_size")
    return wan


def _data_url_image(value: str) -> bytes:
    """The bytes of a ``data:image/...;base64,`` URL; remote URLs are not fetched."""
    head, sep, payload = value.partition(",")
    if not (sep and head.startswith("data:") and head.endswith(";base64")):
        raise InvalidRequest("input_reference must be an uploaded file or a base64 data URL; "
                             "this server does not fetch URLs or file ids",
                             field="input_reference", code="unsupported_input_reference")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise InvalidRequest("input_reference is not valid base64", field="input_reference",
                             code="invalid_input_reference") from e
    if not data:
        raise InvalidRequest("input_reference is an empty image", field="input_reference",
                             code="empty_image")
    return data


# ------------------------------------------------------------------ routes

async def _parse_create(request: Request) -> tuple[VideoCreate, bytes | None]:
    svc = services_of(request)
    body = await read_body(request, limit_bytes=svc.settings.api.max_upload_bytes)
    image: bytes | None = None
    raw: Any = body.json
    if body.form is not None:
        form = body.form
        raw = {k: form.text(k) for k in ("prompt", "model", "size", "seconds")}
        # Unknown text fields are ignored (as OpenAI does), an unknown file never is.
        form.refuse_unknown({"input_reference"}, files_only=True)
        if "input_reference" in form:
            image = form.file("input_reference")
        ref_url = form.text("input_reference[image_url]")
        if ref_url is not None:
            image = _data_url_image(ref_url)
        if form.text("input_reference[file_id]") is not None:
            raise InvalidRequest("file ids are not supported; upload the image",
                                 field="input_reference", code="unsupported_input_reference")
        raw = {k: v for k, v in raw.items() if v is not None}
    data = validated(VideoCreate, raw)
    if data.input_reference is not None:
        if "file_id" in data.input_reference or "image_url" not in data.input_reference:
            raise InvalidRequest("file ids are not supported; send image_url as a data URL",
                                 field="input_reference", code="unsupported_input_reference")
        image = _data_url_image(data.input_reference["image_url"])
    return data, image


_VIDEO_FORM: dict[str, Any] = {
    "type": "object", "required": ["prompt"],
    "properties": {
        "prompt": {"type": "string", "minLength": 1, "maxLength": 10000},
        "model": {"type": "string"}, "size": {"type": "string", "description": "WxH"},
        "seconds": {"type": "string"},
        "input_reference": {"type": "string", "format": "binary",
                            "description": "PNG, JPEG or WebP"},
    }}

_CREATE_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": VideoCreate.model_json_schema()},
            "multipart/form-data": {"schema": _VIDEO_FORM},
            "application/x-www-form-urlencoded": {"schema": {
                **_VIDEO_FORM, "properties": {k: v for k, v in _VIDEO_FORM["properties"].items()
                                              if k != "input_reference"}}},
        },
    }
}


@router.post("", response_model=Video, responses={**_ERRORS, **pacing.RESPONSES},
             openapi_extra=_CREATE_BODY,
             summary="Create a video (OpenAI-compatible)")
async def create_video(
    request: Request, caller: CallerDep, response: Response,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None,
) -> Video:
    svc = services_of(request)
    data, image = await _parse_create(request)
    spec = svc.registry.get_or_raise(data.model or svc.settings.api.openai_default_model)
    size = None if data.size is None else size_for(spec, data.size)
    frames = None if data.seconds is None else frames_for(spec, data.seconds)
    req = creation.CreateRequest(prompt=data.prompt, model=spec.id, size=size,
                                 num_frames=frames, image=image, source=OPENAI_SOURCE)
    task, _created, position = await creation.create_task(
        svc=svc, caller=caller, req=req, idempotency_key=idempotency_key)
    response.headers.update(pacing.headers(task, position))
    return video_out(task)


async def load_video(request: Request, *, video_id: str, scope: str | None) -> Task:
    if not is_task_id(video_id):
        raise NotFound("no such video", code="video_not_found", field="video_id")
    async with services_of(request).sessions() as s:
        task = await repo.get_visible_task(session=s, task_id=video_id, source=OPENAI_SOURCE,
                                           user_id=scope)
    if task is None:
        raise NotFound("no such video", code="video_not_found", field="video_id")
    return task


@router.get("/{video_id}", response_model=Video, responses={**_ERRORS, **pacing.RESPONSES},
            summary="Retrieve a video")
async def retrieve_video(request: Request, video_id: str, caller: CallerDep,
                         response: Response) -> Video:
    task = await load_video(request, video_id=video_id, scope=caller.scope)
    position = await creation.position_of(services_of(request), task)
    response.headers.update(pacing.headers(task, position))
    return video_out(task)


@router.get("", response_model=VideoList, responses=_ERRORS, summary="List videos")
async def list_videos(
    request: Request, caller: CallerDep,
    after: Annotated[str | None, Query(max_length=64)] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    order: Annotated[Literal["asc", "desc"], Query()] = "desc",
) -> VideoList:
    if after is not None and not is_task_id(after):
        raise InvalidRequest("after must be a video id", field="after")
    async with services_of(request).sessions() as s:
        rows = await repo.list_visible_tasks(session=s, source=OPENAI_SOURCE,
                                             user_id=caller.scope, limit=limit + 1,
                                             after=after, ascending=order == "asc")
    page = rows[:limit]
    return VideoList(data=[video_out(t) for t in page],
                     first_id=page[0].id if page else None,
                     last_id=page[-1].id if page else None, has_more=len(rows) > limit)


@router.delete("/{video_id}", response_model=VideoDeleted, responses=_ERRORS,
               summary="Delete a video")
async def delete_video(request: Request, video_id: str, caller: CallerDep) -> VideoDeleted:
    """Cancels an unfinished video; removes a finished one's files (a completed video then
    answers 404). A failed or cancelled video keeps its record."""
    task = await load_video(request, video_id=video_id, scope=caller.scope)
    svc = services_of(request)
    status = task.status
    if not status.terminal:
        if status is not TaskStatus.CANCELLING:
            await cancel(request, task, by=caller.name, scope=caller.scope)
    else:
        # Video, thumbnail, spritesheet, last preview: all under the task's outputs.
        await svc.store.delete_prefix(outputs_prefix(task.id))
        if task.video_key is not None or task.poster_key is not None:
            async with svc.sessions() as s:
                await repo.update_progress(session=s, task_id=task.id,
                                           values={"video_key": None, "poster_key": None})
    return VideoDeleted(id=task.id)


@router.get("/{video_id}/content", summary="Download a video's content",
            response_class=Response,
            responses={**_ERRORS, 200: {"content": {"video/mp4": {}, "image/jpeg": {}}},
                       307: {"description": "presigned URL"}})
async def video_content(
    request: Request, video_id: str, caller: CallerOrTokenDep,
    variant: Annotated[str, Query(max_length=16)] = "video",
) -> Response:
    which = {"video": "video", "thumbnail": "poster", "spritesheet": "spritesheet"}.get(variant)
    if which is None:
        raise InvalidRequest("variant must be video, thumbnail or spritesheet; not "
                             f"{variant[:16]!r}", field="variant", code="unsupported_variant")
    task = await load_video(request, video_id=video_id, scope=caller.scope)
    return await _download(request, task_id=task.id, scope=caller.scope, which=which)


def install(app: FastAPI) -> None:
    app.include_router(router)
