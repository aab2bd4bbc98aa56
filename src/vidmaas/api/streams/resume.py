"""What a client may send to resume the multiplexed stream (``WS /v1/events``), read
strictly.

A resume list maps task ids to the last event id the client has of each. It comes
either on the URL, ``?after=<task_id>:<event_id>,…``, or as the client's first message,
``{"type": "resume", "after": {"<task_id>": "<event_id>", …}}`` (with ``?resume=message``
on the URL; ``domain.events.resume_request`` builds it).

Guarantees:
- Every task id is a syntactically valid task id (``domain.ids.is_task_id``) and every
  event id a valid stream id (``messages.valid_stream_id``); nothing else is accepted.
- At most ``max_tasks`` tasks, each at most once (a task listed twice on the URL is
  refused, not resolved), and the raw text is bounded before it is parsed.
- Anything else raises ``InvalidRequest`` (field ``after``) with a message that says
  what was wrong; the route closes the WebSocket with 4400 and that message.

Whether a listed task exists, or is the caller's, is not decided here: the connection
answers a missing task and another user's task with the same ``not_found`` message.
"""

from __future__ import annotations

import json
from typing import Any

from vidmaas.api.streams.messages import valid_stream_id
from vidmaas.domain import events as ev
from vidmaas.domain.ids import is_task_id
from vidmaas.errors import InvalidRequest

_ENTRY_CHARS = 26 + 1 + 41 + 1
"""A task id, ``:``, the longest event id, and a separator."""
_MESSAGE_OVERHEAD_CHARS = 256
"""Room in the resume message for its keys, quotes and white space."""


def _bad(message: str) -> InvalidRequest:
    return InvalidRequest(message, field="after", code="invalid_resume")


def _check(task_id: object, event_id: object) -> tuple[str, str]:
    if not isinstance(task_id, str) or not is_task_id(task_id):
        raise _bad(f"not a task id: {str(task_id)[:40]!a}")
    if not isinstance(event_id, str) or not valid_stream_id(event_id):
        raise _bad(f"not an event id for {task_id}: {str(event_id)[:48]!a}")
    return task_id, event_id


def _bounded(n: int, *, max_tasks: int) -> None:
    if n > max_tasks:
        raise _bad(f"after lists {n} tasks; at most {max_tasks} may be resumed")


def parse_after(text: str, *, max_tasks: int) -> dict[str, str]:
    """``<task_id>:<event_id>,…`` (the URL form) as ``{task_id: event_id}``, in order."""
    if text == "":
        return {}
    if len(text) > max_tasks * _ENTRY_CHARS:
        raise _bad(f"after is too long; at most {max_tasks} tasks may be resumed")
    items = text.split(",")
    _bounded(len(items), max_tasks=max_tasks)
    out: dict[str, str] = {}
    for item in items:
        task_id, sep, event_id = item.partition(":")
        if not sep:
            raise _bad("after must be <task_id>:<event_id>,… such as "
                       "t0123456789abcdefghjkmnpqr:1700000000000-0")
        task_id, event_id = _check(task_id, event_id)
        if task_id in out:
            raise _bad(f"task {task_id} is listed twice in after")
        out[task_id] = event_id
    return out


def parse_resume_message(text: str, *, max_tasks: int) -> dict[str, str]:
    """The client's ``resume`` message as ``{task_id: event_id}``, in order."""
    if len(text) > max_tasks * (_ENTRY_CHARS + 6) + _MESSAGE_OVERHEAD_CHARS:
        raise _bad(f"the resume message is too long; at most {max_tasks} tasks may be "
                   "resumed")
    try:
        msg: Any = json.loads(text)
    except ValueError as e:
        raise _bad("the resume message is not JSON") from e
    if not isinstance(msg, dict) or msg.get("type") != ev.RESUME:
        raise _bad('the first message must be {"type": "resume", "after": {…}}')
    after = msg.get("after", {})
    if not isinstance(after, dict):
        raise _bad("after must be an object of task id → event id")
    _bounded(len(after), max_tasks=max_tasks)
    return dict(_check(task_id, event_id) for task_id, event_id in after.items())
