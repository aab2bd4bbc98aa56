"""The task state machine (DESIGN §3).

Guarantees: ``TaskStatus`` is the only set of statuses; ``TRANSITIONS`` is the only
table of legal moves; ``check_transition`` is the only judge of a move. Terminal
statuses have no way out. ``TERMINAL`` and ``ACTIVE`` are the only definitions of
those two groups.
"""

from __future__ import annotations

import enum

from vidmaas.errors import IllegalTransition


class TaskStatus(enum.StrEnum):
    QUEUED = "queued"
    DISPATCHING = "dispatching"
    RUNNING = "running"
    CANCELLING = "cancelling"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL

    @property
    def active(self) -> bool:
        """Holds (or is about to hold) GPUs."""
        return self in ACTIVE


TERMINAL = frozenset({TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.CANCELLED})
ACTIVE: tuple[TaskStatus, ...] = (TaskStatus.DISPATCHING, TaskStatus.RUNNING,
                                  TaskStatus.CANCELLING)
"""The statuses of a task that holds (or is about to hold) GPUs, in life order."""

S = TaskStatus
TRANSITIONS: dict[TaskStatus, frozenset[TaskStatus]] = {
    S.QUEUED: frozenset({S.DISPATCHING, S.CANCELLED, S.FAILED}),
    S.DISPATCHING: frozenset({S.RUNNING, S.QUEUED, S.CANCELLED, S.FAILED, S.CANCELLING}),
    S.RUNNING: frozenset({S.COMPLETED, S.FAILED, S.CANCELLING, S.QUEUED}),
    S.CANCELLING: frozenset({S.CANCELLED, S.FAILED, S.COMPLETED}),
    S.COMPLETED: frozenset(),
    S.FAILED: frozenset(),
    S.CANCELLED: frozenset(),
}
del S


def can_transition(current: TaskStatus, to: TaskStatus) -> bool:
    return to in TRANSITIONS[current]


def check_transition(current: TaskStatus, to: TaskStatus) -> None:
    if not can_transition(current, to):
        raise IllegalTransition(f"a {current.value} task cannot become {to.value}")
