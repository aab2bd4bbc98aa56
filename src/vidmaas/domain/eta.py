"""When will a queued task start? An estimate from what runs now and what waits ahead.

Guarantees:
- ``remaining_s`` estimates how long a running task still needs: from its progress
  once that says something (elapsed / fraction done), from its model's typical run
  time before, and a blend of both in between; never negative.
- ``estimate_starts`` replays admission as the dispatcher does it: tasks start in the
  given (fair) order, each when enough GPUs are free, the head never skipped for a
  smaller task behind it; a task ends after its model's typical run time. It returns
  each waiting task's estimated start in seconds from now, non-decreasing along the
  order, or None for a task that can never fit the capacity.
- It is an estimate: users' caps, retries and cancels are not foreseen; its error is
  measured by ``bench/eta.py``.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

PROGRESS_TRUSTED_PERCENT = 30.0
"""From this much progress on, the progress alone predicts the end."""


@dataclass(frozen=True, slots=True)
class Running:
    gpus: int
    model: str
    elapsed_s: float
    """Seconds since it was dispatched (its GPUs were taken)."""
    percent: float = 0.0
    """Overall progress, 0–100."""


@dataclass(frozen=True, slots=True)
class Waiting:
    task_id: str
    gpus: int
    model: str


def remaining_s(task: Running, *, typical_s: float) -> float:
    """Seconds ``task`` still needs (see the module docstring)."""
    by_history = max(0.0, typical_s - task.elapsed_s)
    p = min(max(task.percent, 0.0), 100.0)
    if p <= 0.0:
        return by_history
    by_progress = task.elapsed_s * (100.0 - p) / p
    trust = min(1.0, p / PROGRESS_TRUSTED_PERCENT)
    return max(0.0, trust * by_progress + (1.0 - trust) * by_history)


def estimate_starts(*, capacity: int, running: Sequence[Running], waiting: Sequence[Waiting],
                    run_s: Mapping[str, float], default_run_s: float,
                    ) -> dict[str, float | None]:
    """task id → estimated seconds until it starts (see the module docstring)."""
    def typical(model: str) -> float:
        return max(0.0, run_s.get(model, default_run_s))

    ends: list[tuple[float, int]] = []
    free = capacity
    for r in running:
        heapq.heappush(ends, (remaining_s(r, typical_s=typical(r.model)), r.gpus))
        free -= r.gpus
    clock = 0.0
    out: dict[str, float | None] = {}
    for w in waiting:
        if w.gpus > capacity:
            out[w.task_id] = None
            continue
        while free < w.gpus and ends:
            at, gpus = heapq.heappop(ends)
            clock = max(clock, at)
            free += gpus
        out[w.task_id] = clock
        heapq.heappush(ends, (clock + typical(w.model), w.gpus))
        free -= w.gpus
    return out
