"""The task repository and the one function that changes a task's status.

Guarantees:
- ``create_task`` inserts a task as ``queued``; with an idempotency key, a second
  create by the same user returns the first task (``created`` is False) instead of
  inserting again, also when two creates race (the unique constraint decides). The
  caller compares the stored ``idempotency_fingerprint`` with its own.
- ``transition`` is the only writer of ``status`` after creation: it checks the move
  against ``domain.status.TRANSITIONS``, performs it as a compare-and-set
  (``UPDATE … WHERE status IN expected``), stamps the matching timestamp, commits,
  and then publishes the given event. It raises ``IllegalTransition`` for a move the
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
- With ``queued_limit``, ``create_task`` inserts only if the user has fewer queued
  tasks than that, in the same statement (``INSERT … SELECT … WHERE``), and raises
  ``RateLimited`` ``too_many_queued`` otherwise; together with ``usage.standing``'s
  row lock no number of concurrent creates exceeds the limit.
- Reads scoped to a user never return another user's task (None, as if missing).
- The relay's writes keep ``last_event_id`` moving forward only: stream ids are
  compared in SQL (``advance_last_event_id`` as a transition field, ``mark_event``),
  and ``write_bookkeeping`` writes a run of progress/stage/heartbeat events in one
  UPDATE guarded on the task being active, progress not decreasing and none of the
  run applied before.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple, cast

from sqlalchemy import (
    BigInteger,
    ColumnElement,
    String,
    Table,
    and_,
    bindparam,
    case,
    func,
    insert,
    literal,
    or_,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.functions import FunctionElement

from vidmaas.db import usage
from vidmaas.db.models import Task, utcnow
from vidmaas.domain.events import Event
from vidmaas.domain.status import ACTIVE, TaskStatus, check_transition
from vidmaas.errors import NotFound, RateLimited, StaleTransition
from vidmaas.logs import TaskLog

log = logging.getLogger(__name__)
tlog = TaskLog(log)

Publisher = Callable[[Event], Awaitable[str]]

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
    "last_heartbeat_at", "started_at", "dispatched_at",
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
    task = Task(
        id=new.id, user_id=new.user_id, model=new.model, prompt=new.prompt,
        negative_prompt=new.negative_prompt, params=new.params, gpus=new.gpus,
        input_key=new.input_key, idempotency_key=new.idempotency_key,
        idempotency_fingerprint=new.idempotency_fingerprint, webhook_url=new.webhook_url,
        webhook_events=new.webhook_events, source=new.source,
        status=TaskStatus.QUEUED, progress=0.0, attempts=0,
        created_at=now, updated_at=now, queued_at=now, priority=new.priority,
    )
    try:
        if queued_limit is None:
            session.add(task)
        else:
            await _insert_within(session, task, queued_limit=queued_limit)
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


_INSERTED = ("id", "user_id", "model", "prompt", "negative_prompt", "params", "gpus",
             "input_key", "idempotency_key", "webhook_url", "webhook_events", "source",
             "status", "progress", "attempts", "created_at", "updated_at", "queued_at",
             "priority")


async def _insert_within(session: AsyncSession, task: Task, *, queued_limit: int) -> None:
    """``INSERT … SELECT`` the task only while its user has < ``queued_limit`` queued."""
    table = Task.__table__
    values = [literal(getattr(task, c), table.c[c].type).label(c) for c in _INSERTED]
    queued = (select(func.count()).select_from(Task)
              .where(Task.user_id == task.user_id, Task.status == TaskStatus.QUEUED)
              .scalar_subquery())
    res = await session.execute(insert(Task).from_select(
        list(_INSERTED), select(*values).where(queued < queued_limit)))
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
                            limit: int = 10_000) -> list[Task]:
    stmt = (select(Task).where(Task.status.in_(list(statuses)))
            .order_by(Task.id).limit(limit).execution_options(populate_existing=True))
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
    event: Event | None = None,
    publish: Publisher | None = None,
) -> Task:
    """Compare-and-set ``status`` from one of ``expected`` to ``to``; then publish ``event``.

    The event is published after the commit: the database is the source of truth, and
    a reader that missed the event still sees the new status in its next snapshot.
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
    if not await _compare_and_set(session, task_id=task_id, expected=exp, to=to,
                                  values=values, now=now):
        await session.rollback()
        current = await get_task(session=session, task_id=task_id)
        if current is None:
            raise NotFound(f"no task {task_id}")
        status = current.status
        raise StaleTransition(
            f"task {task_id} is {status.value}, not {'/'.join(e.value for e in exp)}")
    await session.commit()
    tlog.info(task_id, "%s -> %s", "/".join(e.value for e in exp), to.value)
    task = await get_task(session=session, task_id=task_id)
    assert task is not None
    if event is not None and publish is not None:
        try:
            await publish(event)
        except Exception:
            tlog.exception(task_id, "could not publish %s event", event.type.value)
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


# ---------------------------------------------------------------- the relay's writes
# ``last_event_id`` holds a task-stream id, ``<ms>-<seq>``, ordered numerically part by
# part. The database compares ids the same way, so "newer than what is stored" is
# decided inside the UPDATE that records one, not by a read before it that another
# relay could overtake.


class _StreamIdMs(FunctionElement[int]):
    """The millisecond part of a stream id stored as text."""

    type = BigInteger()
    inherit_cache = True
    name = "stream_id_ms"


class _StreamIdSeq(FunctionElement[int]):
    """The sequence part of a stream id stored as text (``0`` when it has none)."""

    type = BigInteger()
    inherit_cache = True
    name = "stream_id_seq"


@compiles(_StreamIdMs)
def _ms_sqlite(element: _StreamIdMs, compiler: SQLCompiler, **kw: Any) -> str:
    x = compiler.process(element.clauses, **kw)
    return (f"CAST(CASE WHEN instr({x}, '-') > 0 THEN substr({x}, 1, instr({x}, '-') - 1) "
            f"ELSE {x} END AS INTEGER)")


@compiles(_StreamIdSeq)
def _seq_sqlite(element: _StreamIdSeq, compiler: SQLCompiler, **kw: Any) -> str:
    x = compiler.process(element.clauses, **kw)
    return (f"CAST(CASE WHEN instr({x}, '-') > 0 THEN substr({x}, instr({x}, '-') + 1) "
            f"ELSE '0' END AS INTEGER)")


@compiles(_StreamIdMs, "postgresql")
def _ms_postgresql(element: _StreamIdMs, compiler: SQLCompiler, **kw: Any) -> str:
    return f"CAST(split_part({compiler.process(element.clauses, **kw)}, '-', 1) AS BIGINT)"


@compiles(_StreamIdSeq, "postgresql")
def _seq_postgresql(element: _StreamIdSeq, compiler: SQLCompiler, **kw: Any) -> str:
    x = compiler.process(element.clauses, **kw)
    return f"CAST(COALESCE(NULLIF(split_part({x}, '-', 2), ''), '0') AS BIGINT)"


def _split_event_id(event_id: str) -> tuple[int, int]:
    ms, _, seq = event_id.partition("-")
    return int(ms), int(seq or 0)


def _older(stored: Any, ms: Any, seq: Any) -> ColumnElement[bool]:
    """SQL: the stream id in ``stored`` is empty or older than (``ms``, ``seq``)."""
    return or_(stored.is_(None), _StreamIdMs(stored) < ms,
               and_(_StreamIdMs(stored) == ms, _StreamIdSeq(stored) < seq))


def _stored_event_id_older_than(event_id: str) -> ColumnElement[bool]:
    """SQL: the task's ``last_event_id`` is empty or older than ``event_id``."""
    return _older(Task.last_event_id, *_split_event_id(event_id))


def advance_last_event_id(event_id: str) -> ColumnElement[str]:
    """A value for ``last_event_id`` in an UPDATE (``transition(fields=…)``): ``event_id``
    when it is newer than the stored id, else the stored id. It never goes back, whatever
    another relay wrote meanwhile."""
    return case((_stored_event_id_older_than(event_id), literal(event_id, String(32))),
                else_=Task.last_event_id)


async def mark_event(*, session: AsyncSession, task_id: str, event_id: str) -> bool:
    """Record ``event_id`` as the newest event applied to the task, if it is newer than
    the stored one (one guarded UPDATE); True if it was."""
    res = await session.execute(
        update(Task).where(Task.id == task_id, _stored_event_id_older_than(event_id))
        .values(last_event_id=event_id).execution_options(synchronize_session=False))
    await session.commit()
    return bool(res.rowcount)  # type: ignore[attr-defined]


_BOOKKEEPING_FIELDS = frozenset({"progress", "stage", "eta_s", "last_heartbeat_at"})


class Subscription(NamedTuple):
    """What a task asked to hear about by webhook."""

    webhook_url: str | None
    webhook_events: list[str] | None


@functools.cache
def _bookkeeping_update(columns: frozenset[str]) -> Any:
    """The UPDATE of ``write_bookkeeping`` for one set of columns: built once, since a
    relay runs it for nearly every event."""
    t = cast(Table, Task.__table__)
    values: dict[str, Any] = {c: bindparam(f"bk_{c}") for c in sorted(columns)}
    stmt = (update(t)
            .where(t.c.id == bindparam("bk_task_id"), t.c.status.in_(ACTIVE),
                   _older(t.c.last_event_id, bindparam("bk_first_ms", type_=BigInteger()),
                          bindparam("bk_first_seq", type_=BigInteger())))
            .values(updated_at=bindparam("bk_now"), last_event_id=bindparam("bk_last"),
                    **values)
            .returning(t.c.webhook_url, t.c.webhook_events))
    if "progress" in values:
        stmt = stmt.where(t.c.progress <= values["progress"])
    return stmt


async def write_bookkeeping(*, session: AsyncSession, task_id: str, values: dict[str, Any],
                            first_event_id: str, last_event_id: str) -> Subscription | None:
    """Write what a run of events ``first_event_id``…``last_event_id`` says (progress,
    stage, eta, heartbeat) and record ``last_event_id``, in one UPDATE; then the task's
    webhook subscription.

    None, writing nothing, unless the task is active, its stored ``last_event_id`` is
    older than ``first_event_id`` (no event of the run was applied before) and, when
    ``values`` holds progress, its progress is not higher (progress never decreases).
    """
    bad = values.keys() - _BOOKKEEPING_FIELDS
    if bad:
        raise ValueError(f"bookkeeping cannot set {sorted(bad)}")
    ms, seq = _split_event_id(first_event_id)
    params = {"bk_task_id": task_id, "bk_first_ms": ms, "bk_first_seq": seq,
              "bk_now": utcnow(), "bk_last": last_event_id,
              **{f"bk_{c}": v for c, v in values.items()}}
    row = (await session.execute(_bookkeeping_update(frozenset(values)), params)).one_or_none()
    await session.commit()
    return None if row is None else Subscription(row.webhook_url, row.webhook_events)


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
