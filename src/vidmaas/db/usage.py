"""Usage in GPU-seconds: recorded as each attempt of a task ends, read for quotas and reports.

Guarantees:
- ``charge_attempt`` runs inside the transaction that moves a task out of a running
  state (to a terminal status, or back to ``queued`` for a retry): the attempt's
  GPUs × seconds since it started are added to the task's ``gpu_seconds`` and to
  its user's row for that UTC day and model, in the same commit, so usage is never
  counted twice nor lost when a process dies. ``note_dispatch`` records the queue
  wait at a task's first dispatch the same way.
- ``usage_now`` answers what the quota check needs (tasks waiting, GPU-seconds today
  and this month) in one statement.
- Reads for a user never include another user's rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from vidmaas.db.models import Task, UsageDaily
from vidmaas.domain.quotas import Usage, day_start, month_start
from vidmaas.domain.status import TaskStatus


async def _add(session: AsyncSession, *, user_id: str, day: date, model: str,
               tasks: int = 0, gpu_seconds: float = 0.0, queue_wait_s: float = 0.0) -> None:
    values: dict[str, Any] = {"user_id": user_id, "day": day, "model": model, "tasks": tasks,
                              "gpu_seconds": gpu_seconds, "queue_wait_s": queue_wait_s}
    insert = postgresql.insert if session.get_bind().dialect.name == "postgresql" \
        else sqlite.insert
    stmt = insert(UsageDaily).values(**values)
    stmt = stmt.on_conflict_do_update(
        index_elements=["user_id", "day", "model"],
        set_={"tasks": UsageDaily.tasks + stmt.excluded.tasks,
              "gpu_seconds": UsageDaily.gpu_seconds + stmt.excluded.gpu_seconds,
              "queue_wait_s": UsageDaily.queue_wait_s + stmt.excluded.queue_wait_s})
    await session.execute(stmt)


def attempt_gpu_seconds(task: Task, *, now: datetime) -> float:
    """GPUs × seconds the current attempt has been running (0 if it never started)."""
    if task.started_at is None or task.status not in (TaskStatus.RUNNING,
                                                       TaskStatus.CANCELLING):
        return 0.0
    return task.gpus * max(0.0, (now - task.started_at).total_seconds())


async def charge_attempt(session: AsyncSession, *, task: Task, now: datetime,
                         finished: bool) -> float:
    """Add the ending attempt's GPU-seconds to the task and to its user's day (the
    caller commits). ``task`` is the row as it was *before* the move. Returns them."""
    used = attempt_gpu_seconds(task, now=now)
    task.gpu_seconds = (task.gpu_seconds or 0.0) + used
    if used or finished:
        await _add(session, user_id=task.user_id, day=day_start(now), model=task.model,
                   tasks=1 if finished else 0, gpu_seconds=used)
    return used


async def note_dispatch(session: AsyncSession, *, task: Task, now: datetime) -> None:
    """Record the queue wait of a task's first dispatch (the caller commits)."""
    if task.queue_wait_s is not None:
        return
    wait = max(0.0, (now - task.created_at).total_seconds())
    task.queue_wait_s = wait
    await _add(session, user_id=task.user_id, day=day_start(now), model=task.model,
               queue_wait_s=wait)


async def usage_now(session: AsyncSession, *, user_id: str, now: datetime) -> Usage:
    """Tasks waiting, GPU-seconds today and this month, for one user (one statement)."""
    today, month = day_start(now), month_start(now)
    queued = (select(func.count()).select_from(Task)
              .where(Task.user_id == user_id, Task.status == TaskStatus.QUEUED)
              .scalar_subquery())
    day_sum = (select(func.coalesce(func.sum(UsageDaily.gpu_seconds), 0.0))
               .where(UsageDaily.user_id == user_id, UsageDaily.day == today)
               .scalar_subquery())
    month_sum = (select(func.coalesce(func.sum(UsageDaily.gpu_seconds), 0.0))
                 .where(UsageDaily.user_id == user_id, UsageDaily.day >= month)
                 .scalar_subquery())
    row = (await session.execute(select(queued, day_sum, month_sum))).one()
    return Usage(queued_tasks=int(row[0]), gpu_seconds_day=float(row[1]),
                 gpu_seconds_month=float(row[2]))


@dataclass(frozen=True, slots=True)
class UsageRow:
    user_id: str
    day: date
    model: str
    tasks: int
    gpu_seconds: float
    queue_wait_s: float


async def usage_rows(session: AsyncSession, *, user_id: str | None, since: date,
                     until: date) -> list[UsageRow]:
    """Rows of ``since`` ≤ day ≤ ``until``, for one user (or every user: None), by day
    then model."""
    stmt = (select(UsageDaily).where(UsageDaily.day >= since, UsageDaily.day <= until)
            .order_by(UsageDaily.day, UsageDaily.user_id, UsageDaily.model))
    if user_id is not None:
        stmt = stmt.where(UsageDaily.user_id == user_id)
    return [UsageRow(r.user_id, r.day, r.model, r.tasks, r.gpu_seconds, r.queue_wait_s)
            for r in (await session.execute(stmt)).scalars()]
