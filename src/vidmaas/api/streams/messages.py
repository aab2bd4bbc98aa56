"""What the streams send to clients, and how it is framed.

Guarantees:
- The messages themselves (events, ``snapshot``, ``queued`` position pushes, ``end``,
  ``ping``) are built by ``vidmaas.domain.events``, so every message has one shape;
  ``snapshot_of`` only converts a task row into the plain ``TaskState`` a snapshot
  takes.
- ``dumps`` is the JSON of one message (a WebSocket text frame, an SSE ``data:``
  line); ``sse_frame`` the Server-Sent Events frame, whose ``id:`` is the message's
  ``id`` when it has one (events and snapshots) and whose ``event:`` is its type.
- ``valid_stream_id`` accepts exactly the stream entry ids a client may resume from.
- ``TooSlow`` and ``GoingAway`` are how ``Connection.messages()`` ends a stream early;
  the routes map them to close codes 4408 and 1001.
"""

from __future__ import annotations

import json
import re

from vidmaas.db.models import Task
from vidmaas.domain import events as ev
from vidmaas.domain.events import ClientMessage

Message = ClientMessage
"""One message to a client (a JSON object)."""

STREAM_ID_RE = re.compile(r"^\d{1,20}(-\d{1,20})?$")


class TooSlow(Exception):
    """The client fell ``limit`` undroppable messages behind; it must reconnect and resume."""


class GoingAway(Exception):
    """The server is shutting down."""


def valid_stream_id(value: str) -> bool:
    return bool(STREAM_ID_RE.match(value))


def task_state(task: Task) -> ev.TaskState:
    """The part of a task row that a snapshot shows."""
    return ev.TaskState(task_id=task.id, status=task.status, progress=task.progress,
                        stage=task.stage, eta_s=task.eta_s, attempts=task.attempts,
                        error_code=task.error_code, error_message=task.error_message,
                        result=task.result)


def snapshot_of(task: Task, *, resume_id: str, last_event_id: str | None,
                position: int | None, starts_in_s: float | None = None) -> Message:
    """The first message for a task (``domain.events.snapshot``) from its row."""
    return ev.snapshot(task_state(task), resume_id=resume_id, last_event_id=last_event_id,
                       queue_position=position, starts_in_s=starts_in_s)


def dumps(msg: Message) -> str:
    return json.dumps(msg, separators=(",", ":"), ensure_ascii=False)


def sse_frame(msg: Message) -> str:
    lines = []
    if msg.get("id") is not None:
        lines.append(f"id: {msg['id']}")
    lines.append(f"event: {msg['type']}")
    lines.append(f"data: {dumps(msg)}")
    return "\n".join(lines) + "\n\n"
