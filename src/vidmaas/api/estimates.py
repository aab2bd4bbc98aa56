"""Start-time estimates of queued tasks, from what runs now and what waits ahead.

Guarantees: ``estimated_starts`` feeds ``domain.eta.estimate_starts`` with the live
state and nothing else: the tasks holding GPUs (their GPUs, model, time since dispatch
and progress, from the database), the first ``limit`` waiting tasks in the order
admission takes them (``TaskQueue.order``), each model's moving-average run time
(``TaskQueue.model_run_s``, the queue's default before a model has completed a task)
and the configured GPU capacity. Two reads of Redis and one narrow query; a task past
``limit`` gets no estimate. GPUs held by idle pool workers are not modelled.
"""

from __future__ import annotations

from vidmaas.bus.queue import Claim, TaskQueue
from vidmaas.db import tasks as repo
from vidmaas.db.engine import Sessions
from vidmaas.db.models import utcnow
from vidmaas.domain import eta

ORDER_LIMIT = 1000


async def estimated_starts(*, queue: TaskQueue, sessions: Sessions,
                           capacity: int, order: list[Claim] | None = None,
                           limit: int = ORDER_LIMIT) -> dict[str, float | None]:
    """task id → estimated seconds until it starts (None: it can never fit)."""
    waiting = order if order is not None else await queue.order(limit=limit)
    if not waiting:
        return {}
    run_s = await queue.model_run_s()
    async with sessions() as s:
        active = await repo.active_for_estimates(session=s)
    now = utcnow()
    running = [eta.Running(gpus=gpus, model=model, percent=progress,
                           elapsed_s=0.0 if at is None else (now - at).total_seconds())
               for gpus, model, at, progress in active]
    return eta.estimate_starts(
        capacity=capacity, running=running,
        waiting=[eta.Waiting(c.task_id, c.gpus, c.model) for c in waiting],
        run_s=run_s, default_run_s=queue.default_run_s)
