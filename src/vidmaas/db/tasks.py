"""The task repository and the one function that changes a task's status.

Guarantees:
- ``create_task`` inserts a task as ``queued``; with an idempotency key, a second
  create by the same user returns the first task (``created`` is False) instead of
  inserting again, also when two creates race (the unique constraint decides). The
  caller compares the stored ``idempotency_fingerprint`` with its own.
- ``transition`` is the only writer of ``status`` after creation: it checks the move
  against ``domain.status.TRANSITIONS``, performs it as a compare-and-set
  (``UPDATE … WHERE status IN expected``), stamps the matching timestamp, stores the
  given event in the outbox (``db.outbox``) in the same transaction, commits, and then
  hands the stored event to ``publish`` (which puts it on the streams and deletes the
  row; a failure there leaves the row for the sweep). It raises ``IllegalTransition`` for a move the
  state machine forbids (``expected → to``), ``StaleTransition`` when the task was not
  in an expected status (someone else moved it first: of many concurrent identical
  moves exactly one succeeds and the others get this), and ``NotFound`` for an
  unknown task.
- Usage is recorded by ``transition`` in the transaction of the move itself
  (``db.usage``): a move that ends an attempt (to a terminal status, or back to
  ``queued`` from an active one) adds the attempt's GPU-seconds to the task and to its
  user's day; the first move to ``dispatching`` records the queue wait. Those moves
  first read the row (``SELECT … FOR UPDATE`` on PostgreSQL) and then set status and
  usage in one compare-and-set, guarded by the status and attempt read, then upsert
  the day's usage row: two statements more than another move, in the same commit.
- A move with an event costs one INSERT more in its transaction (the outbox row; the
  task's ``event_seq`` is set by the move's own UPDATE and read back by the read of the
  row, which then happens before the commit), and whatever ``publish`` does after it.
  ``event`` may be a function of the moved row (``dispatched`` carries the attempt the
  UPDATE counted).
- With ``queued_limit``, ``create_task`` inserts only if the user has fewer queued
  tasks than that, in the same statement (``INSERT … SELECT … WHERE``), and raises
  ``RateLimited`` ``too_many_queued`` otherwise; together with ``usage.standing``'s
  row lock no number of concurrent creates exceeds the limit.
- Reads scoped to a user never return another user's task (None, as if missing).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from sqlalchemy import (
    Table,
    bindparam,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from vidmaas.db import outbox, usage
from vidmaas.db.models import Task, utcnow
from vidmaas.domain.events import Event
from vidmaas.domain.status import ACTIVE, TaskStatus, check_transition
from vidmaas.errors import NotFound, RateLimited, StaleTransition
from vidmaas.logs import TaskLog

log = logging.getLogger(__name__)
tlog = TaskLog(log)

Publisher = Callable[[outbox.Entry], Awaitable[None]]
"""Called with the stored event after the commit (``Lifecycle`` publishes and deletes it)."""
EventOf = Callable[[Task], Event]
"""An event built from the row as the move left it."""

_STAMP: dict[TaskStatus, str] = {
    TaskStatus.QUEUED: "queued_at",
    TaskStatus.DISPATCHING: "dispatched_at",
    TaskStatus.RUNNING: "started_at",
    TaskStatus.CANCELLING: "cancel_requested_at",
    TaskStatus.COMPLETED: "finished_at",
    TaskStatus.FAILED: "finished_at",
    TaskStatus.CANCELLED: "finished_at",
}

# Columns a transition may set besides status (guards against typos and against
# anyone sneaking ``status`` through ``fields``).
_TRANSITION_FIELDS = frozenset({
    "progress", "stage", "eta_s", "attempts", "job_name", "executor", "video_key",
    "poster_key", "result", "error_code", "error_message", "last_event_id",
    "last_heartbeat_at", "last_step_at", "started_at", "dispatched_at",
})


@dataclass(frozen=True, slots=True)
class NewTask:
    id: str
    user_id: str
    model: str
    prompt: str
    params: dict[str, Any]
    gpus: int
    input_key: str | None = None
    negative_prompt: str | None = None
    idempotency_key: str | None = None
    idempotency_fingerprint: str | None = None
    """What the key was sent with (``api.creation.request_fingerprint``)."""
    webhook_url: str | None = None
    webhook_events: list[str] | None = None
    source: str = "native"
    priority: str = "normal"
    rerun_of: str | None = None


QUEUED_RETRY_AFTER_S = 30
"""``Retry-After`` of a create refused for too many queued tasks (they free up as tasks
start, not at a known time)."""


async def create_task(*, session: AsyncSession, new: NewTask,
                      queued_limit: int | None = None) -> tuple[Task, bool]:
    """Insert a queued task; (task, created). Idempotent on (user, idempotency key).

    ``queued_limit``: insert only while the user has fewer queued tasks (see the
    module docstring)."""
    if new.idempotency_key is not None:
        existing = await find_by_idempotency_key(session=session, user_id=new.user_id,
                                                 key=new.idempotency_key)
        if existing is not None:
            return existing, False
    now = utcnow()
    # One set of columns for both ways of inserting, so neither can leave one out.
    columns: dict[str, Any] = dict(
        id=new.id, user_id=new.user_id, model=new.model, prompt=new.prompt,
        negative_prompt=new.negative_prompt, params=new.params, gpus=new.gpus,
        input_key=new.input_key, idempotency_key=new.idempotency_key,
        idempotency_fingerprint=new.idempotency_fingerprint, webhook_url=new.webhook_url,
        webhook_events=new.webhook_events, source=new.source,
        status=TaskStatus.QUEUED, progress=0.0, attempts=0,
        created_at=now, updated_at=now, queued_at=now, priority=new.priority,
        rerun_of=new.rerun_of,
    )
    task = Task(**columns)
    try:
        if queued_limit is None:
            session.add(task)
        else:
            await _insert_within(session, columns, queued_limit=queued_limit)
        await session.commit()
    except IntegrityError:
        await session.rollback()
        if new.idempotency_key is None:
            raise
        existing = await find_by_idempotency_key(session=session, user_id=new.user_id,
                                                 key=new.idempotency_key)
        if existing is None:
            raise
        return existing, False
    return task, True


@functools.cache
def _insert_within_stmt(names: tuple[str, ...]) -> Any:
    """``INSERT … SELECT`` of one task's bound columns ``names`` (``v_<column>``) only
    while its user has fewer than the bound ``queued_limit`` queued. Built once per set
    of columns (there is one): building it per create cost more CPU than the database
    spent on it."""
    table = cast(Table, Task.__table__)
    values = [bindparam(f"v_{c}", type_=table.c[c].type).label(c) for c in names]
    queued = (select(func.count()).select_from(Task)
              .where(Task.user_id == bindparam("v_user_id", type_=Task.user_id.type),
                     Task.status == TaskStatus.QUEUED)
              .scalar_subquery())
    return insert(table).from_select(
        list(names), select(*values).where(queued < bindparam("queued_limit")))


async def _insert_within(session: AsyncSession, columns: dict[str, Any], *,
                         queued_limit: int) -> None:
    """Insert the task's ``columns`` only while its user has fewer than
    ``queued_limit`` queued (``_insert_within_stmt``)."""
    params = {f"v_{c}": v for c, v in columns.items()}
    params["queued_limit"] = queued_limit
    res = await session.execute(_insert_within_stmt(tuple(columns)), params)
    if res.rowcount != 1:  # type: ignore[attr-defined]
        await session.rollback()
        raise RateLimited(f"you have {queued_limit} tasks waiting; wait for some to start",
                          retry_after_s=QUEUED_RETRY_AFTER_S, code="too_many_queued",
                          field="queued_tasks")


async def find_by_idempotency_key(*, session: AsyncSession, user_id: str, key: str,
                                  ) -> Task | None:
    res = await session.execute(
        select(Task).where(Task.user_id == user_id, Task.idempotency_key == key))
    return res.scalar_one_or_none()


async def get_task(*, session: AsyncSession, task_id: str, user_id: str | None = None,
                   ) -> Task | None:
    """The task, or None if missing or (with ``user_id``) someone else's."""
    stmt = select(Task).where(Task.id == task_id).execution_options(populate_existing=True)
    if user_id is not None:
        stmt = stmt.where(Task.user_id == user_id)
    return (await session.execute(stmt)).scalar_one_or_none()


async def list_tasks(*, session: AsyncSession, user_id: str | None, limit: int,
                     before: str | None = None,
                     statuses: Collection[TaskStatus] | None = None,
                     source: str | None = None) -> list[Task]:
    """Newest first; ``before`` is the cursor (the last id of the previous page)."""
    stmt = select(Task).order_by(Task.id.desc()).limit(limit)
    if user_id is not None:
        stmt = stmt.where(Task.user_id == user_id)
    if before is not None:
        stmt = stmt.where(Task.id < before)
    if statuses:
        stmt = stmt.where(Task.status.in_(list(statuses)))
    if source is not None:
        stmt = stmt.where(Task.source == source)
    return list((await session.execute(stmt)).scalars())


async def tasks_with_status(*, session: AsyncSession, statuses: Collection[TaskStatus],
                            limit: int = 10_000, model: str | None = None) -> list[Task]:
    """Tasks in ``statuses`` (of ``model`` only, if given), oldest first."""
    stmt = (select(Task).where(Task.status.in_(list(statuses)))
            .order_by(Task.id).limit(limit).execution_options(populate_existing=True))
    if model is not None:
        stmt = stmt.where(Task.model == model)
    return list((await session.execute(stmt)).scalars())


async def count_by_status(*, session: AsyncSession) -> dict[str, int]:
    res = await session.execute(select(Task.status, func.count()).group_by(Task.status))
    return {str(s): int(n) for s, n in res.all()}


async def count_queued(*, session: AsyncSession, user_id: str) -> int:
    res = await session.execute(select(func.count()).select_from(Task).where(
        Task.user_id == user_id, Task.status == TaskStatus.QUEUED))
    return int(res.scalar_one())


async def transition(
    *,
    session: AsyncSession,
    task_id: str,
    to: TaskStatus,
    expected: TaskStatus | Collection[TaskStatus],
    fields: dict[str, Any] | None = None,
    event: Event | EventOf | None = None,
    publish: Publisher | None = None,
) -> Task:
    """Compare-and-set ``status`` from one of ``expected`` to ``to``, storing ``event`` in
    the outbox in the same transaction; after the commit, hand it to ``publish``.

    The database is the source of truth: a reader that missed the event still sees the
    new status in its next snapshot, and the outbox keeps the event until it is out.
    """
    exp: tuple[TaskStatus, ...] = (expected,) if isinstance(expected, TaskStatus) \
        else tuple(expected)
    for e in exp:
        check_transition(e, to)
    extra = dict(fields or {})
    bad = extra.keys() - _TRANSITION_FIELDS
    if bad:
        raise ValueError(f"transition cannot set {sorted(bad)}")
    now = utcnow()
    values: dict[str, Any] = {"status": to.value, "updated_at": now, **extra}
    stamp = _STAMP[to]
    values.setdefault(stamp, now)
    if event is not None:
        values["event_seq"] = Task.event_seq + 1
    if not await _compare_and_set(session, task_id=task_id, expected=exp, to=to,
                                  values=values, now=now):
        await session.rollback()
        current = await get_task(session=session, task_id=task_id)
        if current is None:
            raise NotFound(f"no task {task_id}")
        status = current.status
        raise StaleTransition(
            f"task {task_id} is {status.value}, not {'/'.join(e.value for e in exp)}")
    entry: outbox.Entry | None = None
    task: Task | None = None
    if event is not None:
        task = await get_task(session=session, task_id=task_id)
        assert task is not None
        built = event if isinstance(event, Event) else event(task)
        entry = await outbox.add(session, seq=task.event_seq, event=built)
    await session.commit()
    tlog.info(task_id, "%s -> %s", "/".join(e.value for e in exp), to.value)
    if task is None:
        task = await get_task(session=session, task_id=task_id)
        assert task is not None
    if entry is not None and publish is not None:
        try:
            await publish(entry)
        except Exception:
            tlog.exception(task_id, "could not publish %s event; left in the outbox",
                           entry.event.type.value)
    return task


CAS_TRIES = 5
"""Reads of a usage-recording move before it gives up as stale (the status moved
between the read and the write within ``expected``: only possible without row locks)."""


async def _compare_and_set(session: AsyncSession, *, task_id: str,
                           expected: tuple[TaskStatus, ...], to: TaskStatus,
                           values: dict[str, Any], now: datetime) -> bool:
    """The move's one ``UPDATE … WHERE status IN expected``; for a move that records
    usage (``usage.accounts``), read first and guard on what was read instead, then
    record the usage in the same transaction. True if this call made the move."""
    if not usage.accounts(to, expected):
        res = await session.execute(
            update(Task).where(Task.id == task_id, Task.status.in_(expected))
            .values(**values).execution_options(synchronize_session=False))
        return bool(res.rowcount == 1)  # type: ignore[attr-defined]
    for _ in range(CAS_TRIES):
        before = await usage.row_before(session, task_id=task_id, statuses=expected)
        if before is None:
            return False
        res = await session.execute(
            update(Task).where(Task.id == task_id, Task.status == before.status,
                               Task.attempts == before.attempts)
            .values(**values, **usage.move_values(before, to=to, now=now))
            .execution_options(synchronize_session=False))
        if res.rowcount == 1:  # type: ignore[attr-defined]
            await usage.record_move(session, before=before, to=to, now=now)
            return True
    return False


async def update_progress(*, session: AsyncSession, task_id: str, values: dict[str, Any],
                          ) -> bool:
    """Write non-status bookkeeping (progress, stage, heartbeat, last event id).

    Progress never decreases: the update is skipped when it would lower it.
    """
    bad = values.keys() - _TRANSITION_FIELDS
    if bad:
        raise ValueError(f"cannot set {sorted(bad)}")
    stmt = update(Task).where(Task.id == task_id).values(updated_at=utcnow(), **values)
    if "progress" in values:
        stmt = stmt.where(Task.progress <= values["progress"])
    res = await session.execute(stmt.execution_options(synchronize_session=False))
    await session.commit()
    return bool(res.rowcount)  # type: ignore[attr-defined]



def _not_deleted() -> Any:
    """Not a completed task whose files were removed (a deleted OpenAI video)."""
    return ~((Task.status == TaskStatus.COMPLETED) & Task.video_key.is_(None))


async def get_visible_task(*, session: AsyncSession, task_id: str, source: str,
                           user_id: str | None = None) -> Task | None:
    """The task created through ``source`` (``"openai"``), or None if missing, someone
    else's (with ``user_id``), or completed with its files removed (deleted)."""
    stmt = (select(Task).where(Task.id == task_id, Task.source == source, _not_deleted())
            .execution_options(populate_existing=True))
    if user_id is not None:
        stmt = stmt.where(Task.user_id == user_id)
    return (await session.execute(stmt)).scalar_one_or_none()


async def list_visible_tasks(*, session: AsyncSession, source: str, user_id: str | None,
                             limit: int, after: str | None = None,
                             ascending: bool = False) -> list[Task]:
    """One page of the tasks created through ``source`` that are not deleted (see
    ``get_visible_task``), by id: newest first, or oldest first with ``ascending``;
    ``after`` is the last id of the previous page."""
    stmt = select(Task).where(Task.source == source, _not_deleted()).limit(limit)
    if user_id is not None:
        stmt = stmt.where(Task.user_id == user_id)
    if ascending:
        stmt = stmt.order_by(Task.id.asc())
        if after is not None:
            stmt = stmt.where(Task.id > after)
    else:
        stmt = stmt.order_by(Task.id.desc())
        if after is not None:
            stmt = stmt.where(Task.id < after)
    return list((await session.execute(stmt)).scalars())


async def owners_of(*, session: AsyncSession, task_ids: Collection[str]) -> dict[str, str]:
    """The owner (user id) of each of ``task_ids`` that exists; unknown ids are left out."""
    if not task_ids:
        return {}
    res = await session.execute(select(Task.id, Task.user_id).where(Task.id.in_(task_ids)))
    return {str(task_id): str(user_id) for task_id, user_id in res.all()}


async def active_tasks(*, session: AsyncSession, limit: int = 10_000) -> list[Task]:
    """Tasks that hold (or are about to hold) GPUs, oldest dispatch first."""
    stmt = (select(Task).where(Task.status.in_([s.value for s in ACTIVE]))
            .order_by(Task.dispatched_at, Task.id).limit(limit)
            .execution_options(populate_existing=True))
    return list((await session.execute(stmt)).scalars())


async def active_for_estimates(*, session: AsyncSession, limit: int = 10_000,
                               ) -> list[tuple[int, str, datetime | None, float]]:
    """(GPUs, model, dispatched at, progress) of every active task: what start-time
    estimates need of what runs, in one narrow query."""
    stmt = (select(Task.gpus, Task.model, Task.dispatched_at, Task.progress)
            .where(Task.status.in_([s.value for s in ACTIVE])).limit(limit))
    return [(int(g), str(m), d, float(p or 0.0)) for g, m, d, p in
            (await session.execute(stmt)).all()]
