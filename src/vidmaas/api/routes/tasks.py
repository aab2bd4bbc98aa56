"""Native task API: create, rerun, read, list, cancel, download.

Guarantees: a caller sees, cancels and downloads only their own tasks (an admin all);
someone else's task answers exactly like a missing one (404 ``task_not_found``);
the list is newest first with an opaque cursor; downloads redirect to a presigned
URL when the store can make one, and stream the file (with Range support) otherwise
(a store that is down is 503 ``storage_error``). The latest live preview of a task
is served as bytes, never cached (``no-store``); 404 ``no_preview`` while there is none.
A completed task's spritesheet (``completed`` data, ``spritesheet_of``) is downloaded as
its video and poster are; one completed without a spritesheet answers 404
``no_spritesheet``.
A create's body, JSON or form, is read by ``api.body``; a form takes exactly the JSON
body's fields plus ``image`` (any other field is refused, as in JSON). A cancel that the
database recorded stands even if Redis then fails. A rerun (``api.rerun``) makes a new
task from any task of the caller's, whatever its status, through the same
``creation.create_task`` and answers exactly like a create (202, ``Location``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, StreamingResponse

from vidmaas.api import creation, rerun
from vidmaas.api.body import read_body, validated
from vidmaas.api.deps import CallerDep, CallerOrTokenDep, SessionDep, services_of
from vidmaas.api.forms import Form
from vidmaas.api.schemas import ErrorBody, TaskCreate, TaskList, TaskOut, TaskRerun, task_out
from vidmaas.bus import client as bus_client
from vidmaas.db import tasks as repo
from vidmaas.db.models import Task
from vidmaas.domain.ids import is_task_id
from vidmaas.domain.status import TaskStatus
from vidmaas.errors import Conflict, InvalidRequest, NotFound
from vidmaas.storage.base import LocalStore, preview_key

router = APIRouter(prefix="/v1/tasks", tags=["tasks"])

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody} for code in (401, 404, 409, 413, 415, 422, 429, 503)}

_FORM_SCHEMA: dict[str, Any] = {
    "type": "object", "required": ["prompt"], "additionalProperties": False,
    "properties": {
        "prompt": {"type": "string", "minLength": 1, "maxLength": 10000},
        "model": {"type": "string"}, "size": {"type": "string"},
        "num_frames": {"type": "integer"}, "steps": {"type": "integer"},
        "seed": {"type": "integer", "minimum": 0, "maximum": 4294967295},
        "negative_prompt": {"type": "string"},
        "webhook_url": {"type": "string"},
        "webhook_events": {"type": "string", "description": "comma-separated event types"},
        "priority": {"type": "string", "description": "low, normal or high"},
        "image": {"type": "string", "format": "binary",
                  "description": "PNG, JPEG or WebP; a part with a file name and no bytes "
                                 "is refused (empty_image)"},
    }}

_CREATE_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": TaskCreate.model_json_schema()},
            "multipart/form-data": {"schema": _FORM_SCHEMA},
            "application/x-www-form-urlencoded": {"schema": {
                **_FORM_SCHEMA, "properties": {
                    k: v for k, v in _FORM_SCHEMA["properties"].items() if k != "image"}}},
        },
    }
}


async def load_own(request: Request, *, task_id: str, scope: str | None) -> Task:
    """The caller's task, or 404 (also for someone else's)."""
    if not is_task_id(task_id):
        raise NotFound("no such task", code="task_not_found")
    async with services_of(request).sessions() as s:
        task = await repo.get_task(session=s, task_id=task_id, user_id=scope)
    if task is None:
        raise NotFound("no such task", code="task_not_found")
    return task


@router.post("", status_code=202, response_model=TaskOut, responses=_ERRORS,
             openapi_extra=_CREATE_BODY, summary="Create a video generation task")
async def create_task(
    request: Request, caller: CallerDep,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None,
) -> JSONResponse:
    svc = services_of(request)
    body = await read_body(request, limit_bytes=svc.settings.api.max_upload_bytes)
    req = _from_form(body.form) if body.form is not None else _from_json(body.json)
    task, _created, position = await creation.create_task(
        svc=svc, caller=caller, req=req, idempotency_key=idempotency_key)
    out = task_out(task, position=position)
    return JSONResponse(out.model_dump(mode="json"), status_code=202,
                        headers={"Location": f"/v1/tasks/{task.id}"})


_RERUN_BODY = {"requestBody": {"required": False, "content": {
    "application/json": {"schema": TaskRerun.model_json_schema()}}}}


@router.post("/{task_id}/rerun", status_code=202, response_model=TaskOut, responses=_ERRORS,
             openapi_extra=_RERUN_BODY, summary="Run a task again, with changes")
async def rerun_task(
    request: Request, task_id: str, caller: CallerDep,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None,
) -> JSONResponse:
    """A new task with the source's parameters (its resolved seed and its input image
    included) and the body's overrides, any create field; no body: the same again. The
    source may have any status; the new task's ``rerun_of`` names it."""
    source = await load_own(request, task_id=task_id, scope=caller.scope)
    svc = services_of(request)
    raw = await rerun.read_overrides(request, limit_bytes=svc.settings.api.max_upload_bytes)
    data = validated(TaskRerun, raw)
    overrides = {k: getattr(data, k) for k in data.model_fields_set}
    req = await rerun.request_from(svc, source, overrides=overrides, origin="native")
    task, _created, position = await creation.create_task(
        svc=svc, caller=caller, req=req, idempotency_key=idempotency_key)
    return JSONResponse(task_out(task, position=position).model_dump(mode="json"),
                        status_code=202, headers={"Location": f"/v1/tasks/{task.id}"})


def _from_json(raw: Any) -> creation.CreateRequest:
    data = validated(TaskCreate, raw)
    return creation.CreateRequest(
        prompt=data.prompt, model=data.model, size=data.size, num_frames=data.num_frames,
        steps=data.steps, seed=data.seed, negative_prompt=data.negative_prompt,
        webhook_url=data.webhook_url,
        webhook_events=list(data.webhook_events) if data.webhook_events else None,
        priority=data.priority)


_FORM_FIELDS = frozenset({"prompt", "model", "size", "num_frames", "steps", "seed",
                          "negative_prompt", "image", "webhook_url", "webhook_events",
                          "priority"})


def _from_form(form: Form) -> creation.CreateRequest:
    form.refuse_unknown(_FORM_FIELDS)
    prompt = form.text("prompt")
    if prompt is None:
        raise InvalidRequest("prompt is required", field="prompt")
    events = form.text("webhook_events")
    req = creation.CreateRequest(
        prompt=prompt, model=form.text("model"), size=form.text("size"),
        num_frames=form.integer("num_frames"), steps=form.integer("steps"),
        seed=form.integer("seed"), negative_prompt=form.text("negative_prompt"),
        image=form.file("image"), webhook_url=form.text("webhook_url"),
        webhook_events=[e.strip() for e in events.split(",")] if events else None,
        priority=form.text("priority"))
    # Same field rules as the JSON body.
    validated(TaskCreate, {k: v for k, v in {
        "prompt": req.prompt, "model": req.model, "size": req.size,
        "num_frames": req.num_frames, "steps": req.steps, "seed": req.seed,
        "negative_prompt": req.negative_prompt, "webhook_url": req.webhook_url,
        "webhook_events": req.webhook_events, "priority": req.priority}.items()
        if v is not None})
    return req


@router.get("", response_model=TaskList, responses=_ERRORS, summary="List your tasks")
async def list_tasks(
    request: Request, caller: CallerDep, session: SessionDep,
    status: Annotated[list[TaskStatus] | None, Query()] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: Annotated[str | None, Query(max_length=64)] = None,
) -> TaskList:
    if cursor is not None and not is_task_id(cursor):
        raise InvalidRequest("bad cursor", field="cursor")
    rows = await repo.list_tasks(session=session, user_id=caller.scope, limit=limit + 1,
                                 before=cursor, statuses=status)
    page = rows[:limit]
    positions = await creation.positions_of(services_of(request), page)
    data = [task_out(t, position=positions.get(t.id)) for t in page]
    return TaskList(data=data, next_cursor=page[-1].id if len(rows) > limit else None)


@router.get("/{task_id}", response_model=TaskOut, responses=_ERRORS, summary="Get a task")
async def get_task(request: Request, task_id: str, caller: CallerDep) -> TaskOut:
    task = await load_own(request, task_id=task_id, scope=caller.scope)
    return task_out(task, position=await creation.position_of(services_of(request), task))


@router.post("/{task_id}/cancel", response_model=TaskOut, responses=_ERRORS,
             summary="Cancel a task")
async def cancel_task(request: Request, task_id: str, caller: CallerDep) -> TaskOut:
    """A queued task is cancelled at once; a running one becomes ``cancelling`` and the
    dispatcher stops its job. A finished task answers 409."""
    task = await load_own(request, task_id=task_id, scope=caller.scope)
    return task_out(await cancel(request, task, by=caller.name, scope=caller.scope),
                    position=None)


async def cancel(request: Request, task: Task, *, by: str, scope: str | None) -> Task:
    """Cancel ``task``; with Redis down after the cancel was recorded (a queued task's
    queue entry could not be removed: the dispatcher skips it), the cancel stands and
    is answered as done rather than as a 503 that a retry would turn into a 409."""
    svc = services_of(request)
    try:
        return await svc.lifecycle.cancel(task, by=by)
    except Exception as e:
        if not bus_client.is_unavailable(e):
            raise
        fresh = await load_own(request, task_id=task.id, scope=scope)
        if fresh.status not in (TaskStatus.CANCELLED, TaskStatus.CANCELLING):
            raise
        return fresh


@dataclass(frozen=True, slots=True)
class _Output:
    key: Callable[[Task], str | None]
    media: str
    suffix: str


def _sprite_key(task: Task) -> str | None:
    sprite = task.spritesheet
    return sprite[0] if sprite else None


_OUTPUTS = {
    "video": _Output(lambda t: t.video_key, "video/mp4", ".mp4"),
    "poster": _Output(lambda t: t.poster_key, "image/jpeg", ".jpg"),
    "spritesheet": _Output(_sprite_key, "image/jpeg", "-spritesheet.jpg"),
}
"""Each downloadable output: its key in the row, its media type, its file name's end."""
_IMMUTABLE = {"Cache-Control": "private, max-age=86400, immutable"}
"""A completed task's outputs never change: the browser keeps them (the card's poster
and its thumbnail are one fetch), and no shared cache does."""


async def _download(request: Request, *, task_id: str, scope: str | None, which: str,
                    ) -> Response:
    task = await load_own(request, task_id=task_id, scope=scope)
    out = _OUTPUTS[which]
    key = out.key(task)
    if task.status != TaskStatus.COMPLETED.value:
        raise Conflict(f"the task is {task.status}; its {which} is not ready",
                       code=f"{which}_not_ready")
    if key is None:
        if task.video_key is not None:  # an output this video was made without
            raise NotFound(f"the video was made without a {which}", code=f"no_{which}")
        raise Conflict(f"the task's {which} is not there", code=f"{which}_not_ready")
    svc = services_of(request)
    media, filename = out.media, f"{task.id}{out.suffix}"
    store = svc.store
    if svc.settings.storage.redirect_downloads:
        url = await store.presign_get(key, ttl_s=svc.settings.storage.presign_ttl_s,
                                      filename=filename if which == "video" else None)
        if url is not None:
            return RedirectResponse(url, status_code=307)
    if isinstance(store, LocalStore):
        path = store.path(key)
        if not path.is_file():
            raise NotFound(f"the {which} file is missing", code=f"{which}_missing")
        return FileResponse(path, media_type=media, filename=filename,
                            content_disposition_type="inline", headers=_IMMUTABLE)
    # Opened before the answer starts: a store that is down is still a 503 here.
    opened = await store.open(key)
    return StreamingResponse(opened.chunks, media_type=media,
                             headers={**_IMMUTABLE, "Content-Length": str(opened.size),
                                      "Content-Disposition": f'inline; filename="{filename}"'})


@router.get("/{task_id}/video", responses={**_ERRORS, 307: {"description": "presigned URL"},
                                           200: {"content": {"video/mp4": {}}}},
            response_class=Response, summary="Download the video")
async def get_video(request: Request, task_id: str, caller: CallerOrTokenDep) -> Response:
    return await _download(request, task_id=task_id, scope=caller.scope, which="video")


@router.get("/{task_id}/poster", responses={**_ERRORS, 307: {"description": "presigned URL"},
                                            200: {"content": {"image/jpeg": {}}}},
            response_class=Response, summary="Download the poster image")
async def get_poster(request: Request, task_id: str, caller: CallerOrTokenDep) -> Response:
    return await _download(request, task_id=task_id, scope=caller.scope, which="poster")


@router.get("/{task_id}/spritesheet", responses={
    **_ERRORS, 307: {"description": "presigned URL"}, 200: {"content": {"image/jpeg": {}}}},
            response_class=Response, summary="Download the spritesheet (a grid of frames)")
async def get_spritesheet(request: Request, task_id: str, caller: CallerOrTokenDep,
                          ) -> Response:
    """A JPEG grid of evenly spaced frames of the video, laid out as the task's
    ``spritesheet`` says; 404 ``no_spritesheet`` for a video completed without one."""
    return await _download(request, task_id=task_id, scope=caller.scope, which="spritesheet")


@router.get("/{task_id}/preview", responses={**_ERRORS, 200: {"content": {"image/jpeg": {}}}},
            response_class=Response, summary="The latest live preview image")
async def get_preview(request: Request, task_id: str, caller: CallerDep) -> Response:
    """A small JPEG of the denoising latents, replaced a few times while the task runs
    (announced by ``preview`` events); 404 ``no_preview`` before the first one."""
    task = await load_own(request, task_id=task_id, scope=caller.scope)
    try:
        data = await services_of(request).store.get_bytes(preview_key(task.id))
    except NotFound as e:
        raise NotFound("the task has no preview", code="no_preview") from e
    return Response(data, media_type="image/jpeg", headers={"Cache-Control": "no-store"})
