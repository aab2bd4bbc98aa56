"""Usage in GPU-seconds: recorded as each attempt of a task ends, read for quotas and reports.

Guarantees:
- ``charge_attempt`` runs inside the transaction that moves a task out of a running
  state (to a terminal status, or back to ``queued`` for a retry): the attempt's
  GPUs × seconds since it started are added to the task's ``gpu_seconds`` and to
  its user's row for that UTC day and model, in the same commit, so usage is never
  counted twice nor lost when a process dies. ``note_dispatch`` records the queue
  wait at a task's first dispatch the same way.
- ``usage_now`` answers what the quota check needs (tasks waiting, GPU-seconds today
  and this month) in one statement; ``standing`` reads the same together with the
  user's row and locks that row until the caller's transaction ends (PostgreSQL), so
  concurrent creates of one user are checked one after another.
- ``row_before``, ``move_values`` and ``record_move`` are how ``db.tasks.transition``
  does the above inside its compare-and-set (see there); an attempt is charged only if
  it started (``started_at`` after the attempt's ``dispatched_at``), from then on.
- Reads for a user never include another user's rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

from sqlalchemy import bindparam, func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from vidmaas.db.models import Task, UsageDaily, User
from vidmaas.domain.quotas import Usage, day_start, month_start
from vidmaas.domain.status import TERMINAL, TaskStatus


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
    if task.dispatched_at is not None and task.started_at < task.dispatched_at:
        return 0.0  # cancelled before this attempt started: the stamp is an earlier one's
    return task.gpus * max(0.0, (now - task.started_at).total_seconds())


def first_wait_s(task: Task, *, now: datetime) -> float | None:
    """Seconds from creation to now, if the task was never dispatched before."""
    if task.queue_wait_s is not None:
        return None
    return max(0.0, (now - task.created_at).total_seconds())


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
    wait = first_wait_s(task, now=now)
    if wait is None:
        return
    task.queue_wait_s = wait
    await _add(session, user_id=task.user_id, day=day_start(now), model=task.model,
               queue_wait_s=wait)


def _usage_columns() -> tuple[Any, Any, Any]:
    """The three counts of ``usage_now``, on the bound ``user_id``, ``today`` and
    ``month``. Built once (below): a create runs them, and building them each time cost
    more CPU than the database spent on them."""
    user_id = bindparam("user_id", type_=Task.user_id.type)
    queued = (select(func.count()).select_from(Task)
              .where(Task.user_id == user_id, Task.status == TaskStatus.QUEUED)
              .scalar_subquery())
    day_sum = (select(func.coalesce(func.sum(UsageDaily.gpu_seconds), 0.0))
               .where(UsageDaily.user_id == user_id,
                      UsageDaily.day == bindparam("today", type_=UsageDaily.day.type))
               .scalar_subquery())
    month_sum = (select(func.coalesce(func.sum(UsageDaily.gpu_seconds), 0.0))
                 .where(UsageDaily.user_id == user_id,
                        UsageDaily.day >= bindparam("month", type_=UsageDaily.day.type))
                 .scalar_subquery())
    return queued, day_sum, month_sum


_USAGE_NOW = select(*_usage_columns())
_TERMS = (User.weight, User.max_priority, User.quota_queued_tasks, User.quota_gpus_at_once,
          User.quota_gpu_seconds_day, User.quota_gpu_seconds_month)
_STANDING = (select(*_TERMS, *_usage_columns()).where(User.id == bindparam("user_id"))
             .with_for_update(of=User))


@dataclass(frozen=True, slots=True)
class Standing:
    """A user's quota terms (``db.users.Terms``) and ``Usage``, as a create reads them."""

    weight: float
    max_priority: str
    quota_queued_tasks: int | None
    quota_gpus_at_once: int | None
    quota_gpu_seconds_day: float | None
    quota_gpu_seconds_month: float | None
    usage: Usage


def _usage_params(user_id: str, now: datetime) -> dict[str, Any]:
    return {"user_id": user_id, "today": day_start(now), "month": month_start(now)}


def _usage(values: Any) -> Usage:
    return Usage(queued_tasks=int(values[0]), gpu_seconds_day=float(values[1]),
                 gpu_seconds_month=float(values[2]))


async def usage_now(session: AsyncSession, *, user_id: str, now: datetime) -> Usage:
    """Tasks waiting, GPU-seconds today and this month, for one user (one statement)."""
    row = (await session.execute(_USAGE_NOW, _usage_params(user_id, now))).one()
    return _usage(row)


async def standing(session: AsyncSession, *, user_id: str, now: datetime) -> Standing | None:
    """The user's quota terms and ``usage_now``, in one statement that locks the user's
    row until the transaction ends (``FOR UPDATE`` on PostgreSQL; SQLite serialises
    writers anyway). After waiting for the lock the counts may predate the other
    transaction's commit: an insert that must not exceed a count re-checks it
    (``db.tasks.create_task``'s ``queued_limit``). None if the user does not exist.

    Run on the session's connection as a plain statement: a create runs it, and the
    ORM's entity loading cost more CPU than the database spent on the query."""
    conn = await session.connection()
    row = (await conn.execute(_STANDING, _usage_params(user_id, now))).one_or_none()
    if row is None:
        return None
    return Standing(weight=float(row[0]), max_priority=str(row[1]), quota_queued_tasks=row[2],
                    quota_gpus_at_once=row[3], quota_gpu_seconds_day=row[4],
                    quota_gpu_seconds_month=row[5], usage=_usage(row[len(_TERMS):]))


async def totals(session: AsyncSession, *, user_id: str, since: date,
                 ) -> tuple[int, float]:
    """(tasks ended, GPU-seconds) of one user from ``since`` on."""
    row = (await session.execute(
        select(func.coalesce(func.sum(UsageDaily.tasks), 0),
               func.coalesce(func.sum(UsageDaily.gpu_seconds), 0.0))
        .where(UsageDaily.user_id == user_id, UsageDaily.day >= since))).one()
    return int(row[0]), float(row[1])


# ---------------------------------------------------------------- inside transition()

_BEFORE = (Task.id, Task.user_id, Task.model, Task.status, Task.attempts, Task.gpus,
           Task.created_at, Task.dispatched_at, Task.started_at, Task.gpu_seconds,
           Task.queue_wait_s)


def accounts(to: TaskStatus, expected: tuple[TaskStatus, ...]) -> bool:
    """Does a move record usage? The first dispatch (queue wait), and every move that
    ends an attempt: to a terminal status or back to ``queued`` from an active one."""
    if to is TaskStatus.DISPATCHING:
        return True
    return (to in TERMINAL or to is TaskStatus.QUEUED) and any(e.active for e in expected)


async def row_before(session: AsyncSession, *, task_id: str,
                     statuses: tuple[TaskStatus, ...]) -> Task | None:
    """The task as it is now, if in one of ``statuses``, locked for this transaction on
    PostgreSQL; a detached copy (changing it writes nothing)."""
    stmt = (select(*_BEFORE).where(Task.id == task_id, Task.status.in_(statuses))
            .with_for_update())
    row = (await session.execute(stmt)).one_or_none()
    if row is None:
        return None
    return Task(**{c.key: v for c, v in zip(_BEFORE, row, strict=True)})


def move_values(before: Task, *, to: TaskStatus, now: datetime) -> dict[str, Any]:
    """Columns the move sets besides status: the summed GPU-seconds, the first wait."""
    if to is TaskStatus.DISPATCHING:
        wait = first_wait_s(before, now=now)
        return {} if wait is None else {"queue_wait_s": wait}
    return {"gpu_seconds": (before.gpu_seconds or 0.0) + attempt_gpu_seconds(before, now=now)}


async def record_move(session: AsyncSession, *, before: Task, to: TaskStatus,
                      now: datetime) -> None:
    """The usage rows of a move that won its compare-and-set (same transaction)."""
    if to is TaskStatus.DISPATCHING:
        await note_dispatch(session, task=before, now=now)
    else:
        await charge_attempt(session, task=before, now=now, finished=to in TERMINAL)


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
