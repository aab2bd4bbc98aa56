"""Event streams to clients: SSE and WebSocket per task, and a multiplexed WebSocket.

Routes (message formats in docs/streams-and-openai.md; the engine in the
``api.streams`` package):

- ``GET /v1/tasks/{id}/events`` — Server-Sent Events. ``id:`` is the event id (the
  snapshot's is the resume point), ``event:`` the type. Resume with ``Last-Event-ID`` or
  ``?after=``. A finished stream sends ``event: end`` and closes; reconnecting to a
  finished task whose terminal event the client already has answers 204, which tells an
  ``EventSource`` to stop reconnecting.
- ``WS /v1/tasks/{id}/events`` — the same messages as JSON text frames; resume with
  ``?after=``; closes with 1000 after the task is terminal.
- ``WS /v1/events`` — every unfinished task of the caller, and each new one as it is
  created: per task a snapshot, its events, and ``end``. It stays open until the client
  leaves. It resumes per task: ``?after=<task_id>:<event_id>,…``, or ``?resume=message``
  and a first client message ``{"type": "resume", "after": {task_id: event_id}}`` (sent
  within ``api.stream_resume_wait_s``). The tasks listed are attached from those points
  first (terminal ones too: their last events, then ``end``), a listed task that is
  missing or someone else's gets ``not_found``, then every other unfinished task comes
  with a fresh snapshot. Bad resume input (syntax, more than
  ``api.stream_resume_max_tasks`` tasks, no message in time) closes with 4400 and a
  reason.

Guarantees: the same authentication as REST (``Authorization: Bearer`` or a ``?token=``
stream token); someone else's task is 404 (SSE) / close 4404 (WebSocket) / ``not_found``
(a resume list), exactly like a missing one. WebSocket close codes: 1000 stream
complete, 1001 server going away, 1011 internal error, 4400 bad request (a malformed
``after`` or resume message), 4401 unauthenticated, 4404 no such task, 4408 the client
fell too far behind (reserved: a lagging connection catches up from Redis instead;
resume with ``?after=`` the last id if it is ever sent).
Every per-connection task is named and ends with its connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Mapping
from typing import Annotated, Any

from fastapi import APIRouter, FastAPI, Header, Query, Request, WebSocket
from fastapi.responses import Response, StreamingResponse
from starlette.requests import HTTPConnection
from starlette.websockets import WebSocketDisconnect, WebSocketState

from vidmaas.api.deps import CallerOrTokenDep, authenticate, services_of
from vidmaas.api.routes.tasks import load_own
from vidmaas.api.schemas import ErrorBody
from vidmaas.api.streams import (
    Connection,
    GoingAway,
    StreamHub,
    TooSlow,
    dumps,
    install_hub,
    open_connection,
    parse_after,
    parse_resume_message,
    sse_frame,
    valid_stream_id,
)
from vidmaas.bus.events import id_key
from vidmaas.db import tasks as repo
from vidmaas.db.models import Task
from vidmaas.domain import events as ev
from vidmaas.domain.ids import is_task_id
from vidmaas.domain.status import TaskStatus
from vidmaas.errors import InvalidRequest, NotFound, Unauthenticated, VidmaasError

log = logging.getLogger(__name__)

router = APIRouter(tags=["events"])

CLOSE_COMPLETE = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_INTERNAL = 1011
CLOSE_BAD_REQUEST = 4400
CLOSE_UNAUTHENTICATED = 4401
CLOSE_NOT_FOUND = 4404
CLOSE_TOO_SLOW = 4408

_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
_PING = dumps(ev.ping())


def hub_of(app: Any) -> StreamHub:
    hub: StreamHub | None = getattr(app.state, "stream_hub", None)
    if hub is None:
        raise VidmaasError("the event streams are not running")
    return hub


def _check_after(after: str | None) -> str | None:
    if after is None or after == "":
        return None
    if not valid_stream_id(after):
        raise InvalidRequest("after must be an event id such as 1700000000000-0",
                             field="after", code="invalid_event_id")
    return after


async def _already_finished(hub: StreamHub, *, status: str, task_id: str,
                            after: str | None) -> bool:
    """The task is terminal and the client already has its terminal event."""
    if after is None or not TaskStatus(status).terminal:
        return False
    last_id, last_event = await hub.last_entry(task_id)
    return (last_id is not None and last_event is not None and last_event.type.terminal
            and id_key(last_id) <= id_key(after))


@router.get("/v1/tasks/{task_id}/events", summary="Follow a task's events (Server-Sent Events)",
            response_class=StreamingResponse,
            responses={**{code: {"model": ErrorBody} for code in (401, 404, 422)},
                       200: {"content": {"text/event-stream": {}}},
                       204: {"description": "the task finished and the client has it all"}})
async def task_events_sse(
    request: Request, task_id: str, caller: CallerOrTokenDep,
    after: Annotated[str | None, Query(max_length=48)] = None,
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID", max_length=48)] = None,
) -> Response:
    resume = _check_after(last_event_id or after)
    task = await load_own(request, task_id=task_id, scope=caller.scope)
    hub = hub_of(request.app)
    if await _already_finished(hub, status=task.status, task_id=task.id, after=resume):
        return Response(status_code=204)
    async def body() -> AsyncIterator[str]:
        # Registered inside the body, so a client gone before it starts leaves nothing.
        conn = open_connection(hub, user_id=caller.id, scope=caller.scope, single=task.id)
        try:
            yield "retry: 1000\n\n"
            if not await conn.attach(task.id, after=resume):
                return
            async for batch in conn.messages():
                yield "".join(sse_frame(m) for m in batch) if batch else ": ping\n\n"
        except (TooSlow, GoingAway):
            return
        finally:
            conn.close()

    return StreamingResponse(body(), media_type="text/event-stream", headers=_SSE_HEADERS)


async def _load_own(conn: HTTPConnection, *, task_id: str, scope: str | None) -> Task:
    """``routes.tasks.load_own`` for a WebSocket: the caller's task or ``NotFound``."""
    task = None
    if is_task_id(task_id):
        async with services_of(conn).sessions() as s:
            task = await repo.get_task(session=s, task_id=task_id, user_id=scope)
    if task is None:
        raise NotFound("no such task", code="task_not_found")
    return task


async def _open(websocket: WebSocket) -> tuple[StreamHub, Any] | None:
    """Accept, then authenticate; close with 4401 and return None if that fails."""
    await websocket.accept()
    try:
        caller = await authenticate(websocket, allow_token=True)
    except Unauthenticated as e:
        await websocket.close(CLOSE_UNAUTHENTICATED, e.message[:120])
        return None
    return hub_of(websocket.app), caller


async def _resume_points(websocket: WebSocket) -> dict[str, str] | None:
    """The multiplexed stream's resume list (task id → last event id), from ``?after=`` or
    the first client message; None if the client left before sending it. Raises
    ``InvalidRequest`` for anything malformed (see ``api.streams.resume``)."""
    cfg = services_of(websocket).settings.api
    max_tasks = cfg.stream_resume_max_tasks
    query = websocket.query_params
    mode = query.get("resume")
    after = query.getlist("after")
    if len(after) > 1:
        raise InvalidRequest("give after once", field="after", code="invalid_resume")
    if mode not in (None, "", "message"):
        raise InvalidRequest("resume must be 'message'", field="resume",
                             code="invalid_resume")
    if mode != "message":
        return parse_after(after[0] if after else "", max_tasks=max_tasks)
    if after:
        raise InvalidRequest("give after on the URL or in the resume message, not both",
                             field="after", code="invalid_resume")
    try:
        async with asyncio.timeout(cfg.stream_resume_wait_s):
            msg = await websocket.receive()
    except TimeoutError:
        raise InvalidRequest(f"no resume message within {cfg.stream_resume_wait_s:g} s",
                             field="after", code="invalid_resume") from None
    if msg["type"] == "websocket.disconnect":
        return None
    text = msg.get("text")
    if text is None:
        raise InvalidRequest("the resume message must be a text frame", field="after",
                             code="invalid_resume")
    return parse_resume_message(text, max_tasks=max_tasks)


async def _serve(websocket: WebSocket, conn: Connection, *, task_id: str | None,
                 after: str | None, resume: Mapping[str, str] | None = None) -> None:
    """Run one WebSocket connection: send the connection's messages, watch for the client
    leaving, then close with the code the module docstring lists."""
    async def send() -> int:
        try:
            if task_id is not None:
                await conn.attach(task_id, after=after)
            else:
                # The resumed tasks first, each from its own point; then every other
                # unfinished task (fresh snapshots) and the new ones as they come.
                await conn.resume(resume or {})
                await hub_of(websocket.app).open_mux(conn)
            async for batch in conn.messages():
                if not batch:
                    await websocket.send_text(_PING)
                for m in batch:
                    await websocket.send_text(dumps(m))
            return CLOSE_COMPLETE
        except TooSlow:
            return CLOSE_TOO_SLOW
        except GoingAway:
            return CLOSE_GOING_AWAY

    async def receive() -> int:
        while True:
            msg = await websocket.receive()
            if msg["type"] == "websocket.disconnect":
                return -1

    name = f"vidmaas-ws-{id(conn):x}"
    sender = asyncio.create_task(send(), name=name + "-send")
    receiver = asyncio.create_task(receive(), name=name + "-receive")
    code = CLOSE_INTERNAL
    try:
        done, _ = await asyncio.wait({sender, receiver}, return_when=asyncio.FIRST_COMPLETED)
        first = done.pop()
        try:
            code = first.result()
        except (WebSocketDisconnect, OSError, RuntimeError):
            code = -1
        except Exception:
            log.exception("event stream failed")
            code = CLOSE_INTERNAL
    finally:
        for t in (sender, receiver):
            t.cancel()
        await asyncio.gather(sender, receiver, return_exceptions=True)
        conn.close()
    if code >= 0 and websocket.application_state is not WebSocketState.DISCONNECTED:
        with contextlib.suppress(Exception):
            await websocket.close(code)


@router.websocket("/v1/tasks/{task_id}/events")
async def task_events_ws(websocket: WebSocket, task_id: str) -> None:
    opened = await _open(websocket)
    if opened is None:
        return
    hub, caller = opened
    try:
        after = _check_after(websocket.query_params.get("after"))
        task = await _load_own(websocket, task_id=task_id, scope=caller.scope)
    except InvalidRequest as e:
        await websocket.close(CLOSE_BAD_REQUEST, e.message[:120])
        return
    except NotFound:
        await websocket.close(CLOSE_NOT_FOUND, "no such task")
        return
    conn = open_connection(hub, user_id=caller.id, scope=caller.scope, single=task.id)
    await _serve(websocket, conn, task_id=task.id, after=after)


@router.websocket("/v1/events")
async def all_events_ws(websocket: WebSocket) -> None:
    opened = await _open(websocket)
    if opened is None:
        return
    hub, caller = opened
    try:
        points = await _resume_points(websocket)
    except InvalidRequest as e:
        await websocket.close(CLOSE_BAD_REQUEST, e.message[:120])
        return
    except (WebSocketDisconnect, OSError, RuntimeError):
        return
    if points is None:
        return
    # Only the caller's own tasks, admins included: a firehose of everyone's is not this,
    # and someone else's task in the resume list looks exactly like a missing one.
    conn = open_connection(hub, user_id=caller.id, scope=caller.id, single=None)
    await _serve(websocket, conn, task_id=None, after=None, resume=points)


def install(app: FastAPI) -> None:
    install_hub(app)
    app.include_router(router)
