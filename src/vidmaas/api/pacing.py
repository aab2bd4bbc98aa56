"""How long a client should wait before it polls an unfinished video again.

Guarantees: ``poll_after_ms`` is None for a finished task (no header) and otherwise a
whole number of milliseconds from the task's state alone: running or cancelling 1000
(progress moves every step); dispatching 2000 (a job is starting: image pull, model
load); queued 2000 per place in the fair order (1-based), at most 10 000, and 2000 when
the place is unknown. ``headers`` is the ``openai-poll-after-ms`` header the openai
SDK's ``poll``/``create_and_poll`` read (once, from the first unfinished answer) for
their interval; without it they poll every second.
"""

from __future__ import annotations

from vidmaas.db.models import Task
from vidmaas.domain.status import TaskStatus

HEADER = "openai-poll-after-ms"
RUNNING_MS = 1000
STARTING_MS = 2000
QUEUED_MS_PER_PLACE = 2000
QUEUED_MAX_MS = 10_000

RESPONSES: dict[int | str, dict[str, object]] = {200: {"headers": {HEADER: {
    "description": "Unfinished videos only: milliseconds to wait before polling again",
    "schema": {"type": "string"}}}}}


def poll_after_ms(status: TaskStatus, position: int | None) -> int | None:
    if status.terminal:
        return None
    if status is TaskStatus.QUEUED:
        return min(QUEUED_MAX_MS, QUEUED_MS_PER_PLACE * max(1, position or 1))
    if status is TaskStatus.DISPATCHING:
        return STARTING_MS
    return RUNNING_MS


def headers(task: Task, position: int | None) -> dict[str, str]:
    """``{HEADER: ms}`` for an unfinished task, ``{}`` for a finished one."""
    ms = poll_after_ms(task.status, position)
    return {} if ms is None else {HEADER: str(ms)}
