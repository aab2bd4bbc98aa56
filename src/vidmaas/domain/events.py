"""The event protocol, wire format v1 (DESIGN §4).

Guarantees:
- ``Event`` is the one shape of every event, written by the api, dispatcher and
  runtime and read by the relay, the streams to clients and the web page.
- ``encode`` gives the exact Redis stream fields (``v``, ``task_id``, ``type``,
  ``data`` as a JSON object); ``decode`` accepts only what ``encode`` can produce and
  raises ``MalformedEvent`` for anything else (it never returns a half-valid event).
- ``data`` is checked per type for the fields the table in DESIGN §4 requires.
- ``preview`` (runtime, rank 0, a few per task while it denoises): ``key`` (the preview
  image's object key, the same for every preview of a task), ``step``, ``total``,
  ``width``, ``height`` (non-negative integers). It changes no task row; clients fetch
  the bytes from ``GET /v1/tasks/{id}/preview``.
- ``completed`` (runtime, rank 0) carries, besides its required fields, two optional ones
  (results made before them lack both, and every reader takes that as "no spritesheet"):
  ``spritesheet_key`` (the object key of ``spritesheet.jpg``, a JPEG grid of evenly spaced
  frames of the delivered video) and ``spritesheet``, its layout: ``columns``, ``rows``,
  ``count`` (tiles used, filled row by row), ``tile_width``, ``tile_height`` (positive
  integers; the image is ``columns·tile_width`` × ``rows·tile_height``). ``spritesheet_of``
  reads them from a result.
- The stream entry id is the event id; it is not part of the fields.
- The client messages that are not events (``snapshot``, ``queued`` position pushes,
  ``end``, ``not_found``, ``ping``) are built only by the constructors of the last
  section, so each has one shape; they take plain values (``TaskState``), never
  database rows. The one message a client sends (``resume`` on the multiplexed
  stream) is spelled there too.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from vidmaas.domain.ids import is_task_id
from vidmaas.domain.status import TaskStatus

WIRE_VERSION = 1


class EventType(enum.StrEnum):
    QUEUED = "queued"
    DISPATCHED = "dispatched"
    STARTED = "started"
    STAGE = "stage"
    PROGRESS = "progress"
    HEARTBEAT = "heartbeat"
    LOG = "log"
    PREVIEW = "preview"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    # Not in the runtime's vocabulary: written by transition() for the status moves
    # that have no event of their own (running → cancelling).
    STATUS = "status"

    @property
    def terminal(self) -> bool:
        return self in (EventType.COMPLETED, EventType.FAILED, EventType.CANCELLED)


class Stage(enum.StrEnum):
    FETCH_INPUT = "fetch_input"
    LOAD_MODEL = "load_model"
    ENCODE_PROMPT = "encode_prompt"
    DENOISE = "denoise"
    DECODE = "decode"
    POSTPROCESS = "postprocess"
    UPLOAD = "upload"


# Required keys of ``data`` per type; extra keys are allowed (forward compatible).
REQUIRED_DATA: dict[EventType, frozenset[str]] = {
    EventType.QUEUED: frozenset({"position"}),
    EventType.DISPATCHED: frozenset({"executor", "job_name", "attempt"}),
    EventType.STARTED: frozenset({"world_size", "host"}),
    EventType.STAGE: frozenset({"stage"}),
    EventType.PROGRESS: frozenset({"step", "total", "percent"}),
    EventType.HEARTBEAT: frozenset(),
    EventType.LOG: frozenset({"level", "message"}),
    EventType.PREVIEW: frozenset({"key", "step", "total", "width", "height"}),
    EventType.COMPLETED: frozenset({"video_key", "poster_key", "width", "height", "num_frames",
                                    "fps", "duration_s", "seed", "timings"}),
    EventType.FAILED: frozenset({"code", "message", "retryable"}),
    EventType.CANCELLED: frozenset({"by"}),
    EventType.STATUS: frozenset({"status"}),
}

# The task status an event implies, for events that move a task.
STATUS_OF_EVENT: dict[EventType, TaskStatus] = {
    EventType.QUEUED: TaskStatus.QUEUED,
    EventType.DISPATCHED: TaskStatus.DISPATCHING,
    EventType.STARTED: TaskStatus.RUNNING,
    EventType.COMPLETED: TaskStatus.COMPLETED,
    EventType.FAILED: TaskStatus.FAILED,
    EventType.CANCELLED: TaskStatus.CANCELLED,
}

MAX_LOG_MESSAGE_CHARS = 2000
SPRITESHEET_FIELDS = ("columns", "rows", "count", "tile_width", "tile_height")


class MalformedEvent(ValueError):
    """Stream fields that are not a valid v1 event."""


@dataclass(frozen=True, slots=True)
class Event:
    task_id: str
    type: EventType
    data: Mapping[str, Any] = field(default_factory=dict)
    v: int = WIRE_VERSION

    def to_json(self, *, event_id: str | None = None) -> dict[str, Any]:
        """The shape sent to clients over WebSocket/SSE and to webhooks."""
        out: dict[str, Any] = {"v": self.v, "task_id": self.task_id, "type": self.type.value,
                               "data": dict(self.data)}
        if event_id is not None:
            out["id"] = event_id
        return out


def encode(event: Event) -> dict[str, str]:
    """Redis stream fields of an event."""
    validate_data(event.type, event.data)
    return {
        "v": str(event.v),
        "task_id": event.task_id,
        "type": event.type.value,
        "data": json.dumps(dict(event.data), separators=(",", ":"), ensure_ascii=False),
    }


def decode(fields: Mapping[str | bytes, str | bytes]) -> Event:
    """An event from Redis stream fields; ``MalformedEvent`` if they are not one."""
    try:
        text = {_s(k): _s(v) for k, v in fields.items()}
    except UnicodeDecodeError as e:
        raise MalformedEvent("fields are not UTF-8") from e
    try:
        version = int(text["v"])
        task_id = text["task_id"]
        type_ = EventType(text["type"])
        data = json.loads(text["data"])
    except KeyError as e:
        raise MalformedEvent(f"missing field {e.args[0]!r}") from e
    except (ValueError, TypeError) as e:
        raise MalformedEvent(f"bad field: {e}") from e
    if version != WIRE_VERSION:
        raise MalformedEvent(f"unsupported event version {version}")
    if not is_task_id(task_id):
        raise MalformedEvent(f"bad task id {task_id[:40]!r}")
    if not isinstance(data, dict):
        raise MalformedEvent("data is not a JSON object")
    validate_data(type_, data)
    return Event(task_id=task_id, type=type_, data=data, v=version)


def validate_data(type_: EventType, data: Mapping[str, Any]) -> None:
    missing = REQUIRED_DATA[type_] - data.keys()
    if missing:
        raise MalformedEvent(f"{type_.value} event lacks {sorted(missing)}")
    if type_ is EventType.PROGRESS:
        percent = data["percent"]
        if not isinstance(percent, int | float) or isinstance(percent, bool) \
                or not 0 <= percent <= 100:
            raise MalformedEvent("progress percent must be a number in 0..100")
    if type_ is EventType.STAGE and data["stage"] not in Stage.__members__.values():
        raise MalformedEvent(f"unknown stage {str(data['stage'])[:40]!r}")
    if type_ is EventType.FAILED and not isinstance(data["retryable"], bool):
        raise MalformedEvent("failed.retryable must be a boolean")
    if type_ is EventType.PREVIEW:
        if not isinstance(data["key"], str) or not data["key"]:
            raise MalformedEvent("preview.key must be an object key")
        for name in ("step", "total", "width", "height"):
            value = data[name]
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise MalformedEvent(f"preview.{name} must be a non-negative integer")
    if type_ is EventType.COMPLETED and ("spritesheet_key" in data or "spritesheet" in data) \
            and spritesheet_of(data) is None:
        raise MalformedEvent("completed.spritesheet_key must be an object key and "
                             f"completed.spritesheet {{{', '.join(SPRITESHEET_FIELDS)}}} "
                             "positive integers")


def spritesheet_of(result: Mapping[str, Any] | None) -> tuple[str, dict[str, int]] | None:
    """The spritesheet's key and layout in a ``completed`` result, or None (none made)."""
    if not result:
        return None
    key, layout = result.get("spritesheet_key"), result.get("spritesheet")
    if not isinstance(key, str) or not key or not isinstance(layout, Mapping):
        return None
    out = {name: layout.get(name) for name in SPRITESHEET_FIELDS}
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0
               for v in out.values()):
        return None
    return key, {k: int(v) for k, v in out.items() if v is not None}


def _s(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


# Constructors used by the writers, so the field names are spelled once.

def queued(task_id: str, *, position: int) -> Event:
    return Event(task_id, EventType.QUEUED, {"position": position})


def dispatched(task_id: str, *, executor: str, job_name: str, attempt: int) -> Event:
    return Event(task_id, EventType.DISPATCHED,
                 {"executor": executor, "job_name": job_name, "attempt": attempt})


def started(task_id: str, *, world_size: int, host: str, worker: str | None = None,
            pid: int | None = None) -> Event:
    """``worker`` and ``pid``: the pool worker running the task (DESIGN §12), if any."""
    data: dict[str, Any] = {"world_size": world_size, "host": host}
    if worker is not None:
        data["worker"] = worker
    if pid is not None:
        data["pid"] = pid
    return Event(task_id, EventType.STARTED, data)


def stage(task_id: str, stage_: Stage) -> Event:
    return Event(task_id, EventType.STAGE, {"stage": stage_.value})


def progress(task_id: str, *, step: int, total: int, percent: float,
             eta_s: float | None, stage_: Stage | None = None) -> Event:
    data: dict[str, Any] = {"step": step, "total": total, "percent": round(percent, 2),
                            "eta_s": None if eta_s is None else round(eta_s, 1)}
    if stage_ is not None:
        data["stage"] = stage_.value
    return Event(task_id, EventType.PROGRESS, data)


def heartbeat(task_id: str) -> Event:
    return Event(task_id, EventType.HEARTBEAT, {})


def log(task_id: str, *, level: str, message: str) -> Event:
    return Event(task_id, EventType.LOG,
                 {"level": level, "message": message[:MAX_LOG_MESSAGE_CHARS]})


def preview(task_id: str, *, key: str, step: int, total: int, width: int,
            height: int) -> Event:
    """A new preview image of the denoising task is stored at ``key`` (the same key each
    time: the newest overwrites the last); ``step`` of ``total`` denoising steps, the
    image ``width`` × ``height`` pixels. Best-effort: a client may miss some."""
    return Event(task_id, EventType.PREVIEW, {"key": key, "step": step, "total": total,
                                              "width": width, "height": height})


def failed(task_id: str, *, code: str, message: str, retryable: bool) -> Event:
    return Event(task_id, EventType.FAILED,
                 {"code": code, "message": message[:MAX_LOG_MESSAGE_CHARS], "retryable": retryable})


def cancelled(task_id: str, *, by: str) -> Event:
    return Event(task_id, EventType.CANCELLED, {"by": by})


def status_changed(task_id: str, *, status: TaskStatus) -> Event:
    return Event(task_id, EventType.STATUS, {"status": status.value})


# ------------------------------------------------------------------ client messages
# What a client receives on a stream besides events (docs/streams-and-openai.md): per
# task a snapshot first, queue-position pushes, ``end``, ``not_found`` (a task a client
# resumed that is missing or not theirs); and keep-alive pings. Events themselves go
# out as ``Event.to_json(event_id=…)``. These constructors are the one place their
# fields are spelled; the web page and the clients read exactly these. ``resume`` is
# the other direction: what a client sends to resume the multiplexed stream.

ClientMessage = dict[str, Any]
"""One message as sent to a client (JSON object)."""


class ClientMessageType(enum.StrEnum):
    SNAPSHOT = "snapshot"
    END = "end"
    NOT_FOUND = "not_found"
    PING = "ping"


RESUME = "resume"
"""The type of the message a client sends first on ``WS /v1/events?resume=message``."""


@dataclass(frozen=True, slots=True)
class TaskState:
    """The part of a task a snapshot shows, as plain values (the api converts its rows)."""

    task_id: str
    status: TaskStatus
    progress: float
    stage: str | None
    eta_s: float | None
    attempts: int
    error_code: str | None = None
    error_message: str | None = None
    result: Mapping[str, Any] | None = None


def shown_error(*, status: TaskStatus, code: str | None,
                message: str | None) -> dict[str, str] | None:
    """The error a client sees: a failed task's, or (while it waits for a retry) the
    failure that sent a task back to ``queued``; None otherwise."""
    if code and status in (TaskStatus.FAILED, TaskStatus.QUEUED):
        return {"code": code, "message": message or ""}
    return None


def snapshot(state: TaskState, *, resume_id: str, last_event_id: str | None,
             queue_position: int | None, starts_in_s: float | None = None) -> ClientMessage:
    """The first message for a task.

    ``resume_id`` is its ``id``: the point the events that follow start after, so a
    client that remembers the last ``id`` it saw resumes correctly from a snapshot too.
    ``last_event_id`` is the newest event id when the snapshot was taken. A queued
    task's snapshot carries ``starts_in_s`` when the server has an estimate.
    """
    completed = state.status is TaskStatus.COMPLETED
    msg: ClientMessage = {"v": WIRE_VERSION, "type": ClientMessageType.SNAPSHOT.value,
            "task_id": state.task_id, "id": resume_id, "data": {
                "status": state.status.value, "progress": round(state.progress, 2),
                "stage": state.stage, "eta_s": state.eta_s, "queue_position": queue_position,
                "last_event_id": last_event_id, "attempts": state.attempts,
                "error": shown_error(status=state.status, code=state.error_code,
                                     message=state.error_message),
                "result": dict(state.result) if completed and state.result is not None
                else None}}
    if starts_in_s is not None and state.status is TaskStatus.QUEUED:
        msg["data"]["starts_in_s"] = round(starts_in_s, 1)
    return msg


def position_push(task_id: str, *, position: int,
                  starts_in_s: float | None = None) -> ClientMessage:
    """A queue position push: a ``queued`` message without an event id (positions move
    for every queued task when the queue moves, so they are not stream events), with
    the estimated seconds until the task starts when there is an estimate."""
    data: dict[str, Any] = {"position": position}
    if starts_in_s is not None:
        data["starts_in_s"] = round(starts_in_s, 1)
    return {"v": WIRE_VERSION, "type": EventType.QUEUED.value, "task_id": task_id,
            "data": data}


def end(task_id: str) -> ClientMessage:
    """Nothing more will come for this task (it is terminal)."""
    return {"v": WIRE_VERSION, "type": ClientMessageType.END.value, "task_id": task_id,
            "data": {}}


def not_found(task_id: str) -> ClientMessage:
    """A task the client asked to resume is missing or is someone else's (the two look
    the same): nothing will come for it."""
    return {"v": WIRE_VERSION, "type": ClientMessageType.NOT_FOUND.value,
            "task_id": task_id, "data": {}}


def resume_request(after: Mapping[str, str]) -> ClientMessage:
    """What a client sends to resume the multiplexed stream: per task it knows, the last
    event id it has (``{task_id: event_id}``)."""
    return {"type": RESUME, "after": dict(after)}


def ping() -> ClientMessage:
    """A WebSocket keep-alive (SSE sends a ``: ping`` comment instead)."""
    return {"type": ClientMessageType.PING.value}
