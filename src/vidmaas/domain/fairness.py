"""Who goes next: priority classes and fair shares (the rule is written out in
docs/dispatcher.md).

Guarantees:
- ``Priority`` is the only set of priority classes a task may ask for; ``allowed``
  is the one judge of whether a user may ask for one (up to their maximum).
- ``order_key_ms`` is the one place a task's place within its user's queue is
  computed: enqueue time, moved ``priority_step_s`` earlier per class above
  ``normal`` (later below it). A higher class therefore goes first among a user's
  tasks, but only by a bounded amount of time: a task waits behind later tasks of a
  higher class for at most that step per class, so nothing waits forever (aging).
- ``Share`` is a user's fairness weight and GPUs-at-once quota; across users, the
  queue serves the user with the least weighted service received (GPU-seconds
  divided by weight), so over time each backlogged user's GPU-seconds approach the
  proportion of their weight.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

MIN_WEIGHT = 0.01
MAX_WEIGHT = 100.0


class Priority(enum.StrEnum):
    LOW = "low"
    NORMAL = "normal"
    HIGH = "high"

    @property
    def rank(self) -> int:
        """-1, 0, 1: how many steps above ``normal``."""
        return {Priority.LOW: -1, Priority.NORMAL: 0, Priority.HIGH: 1}[self]


def allowed(asked: Priority, *, maximum: Priority) -> bool:
    """May a user whose highest class is ``maximum`` ask for ``asked``?"""
    return asked.rank <= maximum.rank


def order_key_ms(*, enqueued_ms: int, priority: Priority, priority_step_s: float) -> int:
    """The score that orders a task among its user's queued tasks (smaller first)."""
    return enqueued_ms - priority.rank * int(priority_step_s * 1000)


@dataclass(frozen=True, slots=True)
class Share:
    """A user's claim on the GPUs: a fairness ``weight`` (relative; 1 is the default)
    and a quota of GPUs held at once (``gpu_cap``; 0: only the global caps apply)."""

    weight: float = 1.0
    gpu_cap: int = 0

    def __post_init__(self) -> None:
        if not MIN_WEIGHT <= self.weight <= MAX_WEIGHT:
            raise ValueError(f"weight must be within {MIN_WEIGHT}..{MAX_WEIGHT}")
        if self.gpu_cap < 0:
            raise ValueError("gpu_cap must not be negative")

    def encode(self) -> str:
        """The form the queue scripts read (``weight|gpu_cap``)."""
        return f"{self.weight!r}|{self.gpu_cap}"
