"""The relay's writes: they keep a task's ``last_event_id`` moving forward only.

Guarantees:
- The relay's writes keep ``last_event_id`` moving forward only: stream ids are
  compared in SQL (``advance_last_event_id`` as a transition field, ``mark_event``),
  and ``write_bookkeeping`` writes a run of progress/stage/heartbeat events in one
  UPDATE guarded on the task being active, progress not decreasing and none of the
  run applied before.
- What the relay reads and writes for a task also says whether the task's user has an
  enabled webhook endpoint (``has_endpoints``), so a user without one costs no
  further query for webhooks.
- Stream ids (``<ms>-<seq>``) are compared part by part, numerically, inside the
  UPDATE that records one, on SQLite and PostgreSQL alike, so no read before it can
  be overtaken by another relay.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple, cast

from sqlalchemy import (
    BigInteger,
    ColumnElement,
    String,
    Table,
    and_,
    bindparam,
    case,
    exists,
    literal,
    or_,
    select,
    update,
)
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.functions import FunctionElement

from vidmaas.db.models import Task, WebhookEndpoint, utcnow
from vidmaas.domain.status import ACTIVE

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


_BOOKKEEPING_FIELDS = frozenset({"progress", "stage", "eta_s", "last_heartbeat_at",
                                 "last_step_at"})


class Subscription(NamedTuple):
    """What a task asked to hear about by webhook (and whose endpoints hear of it)."""

    user_id: str
    webhook_url: str | None
    webhook_events: list[str] | None
    has_endpoints: bool = True
    """Whether the user has an enabled webhook endpoint (read in the same UPDATE, so a
    user without one costs no further query)."""


def _has_endpoints(user_id: Any) -> Any:
    """Whether the user has an enabled webhook endpoint (a correlated EXISTS)."""
    return exists().where(WebhookEndpoint.user_id == user_id,
                          WebhookEndpoint.enabled.is_(True)).label("has_endpoints")


async def task_with_endpoints(*, session: AsyncSession, task_id: str,
                              ) -> tuple[Task, bool] | None:
    """The task and whether its user has an enabled webhook endpoint, in one SELECT."""
    row = (await session.execute(select(Task, _has_endpoints(Task.user_id))
                                 .where(Task.id == task_id))).one_or_none()
    return None if row is None else (row[0], bool(row[1]))


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
            .returning(t.c.user_id, t.c.webhook_url, t.c.webhook_events,
                       _has_endpoints(t.c.user_id)))
    if "progress" in values:
        stmt = stmt.where(t.c.progress <= values["progress"])
    return stmt


async def write_bookkeeping(*, session: AsyncSession, task_id: str, values: dict[str, Any],
                            first_event_id: str, last_event_id: str) -> Subscription | None:
    """Write what a run of events ``first_event_id``…``last_event_id`` says (progress,
    stage, eta, heartbeat, last denoising step) and record ``last_event_id``, in one
    UPDATE; then the task's webhook subscription.

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
    if row is None:
        return None
    return Subscription(row.user_id, row.webhook_url, row.webhook_events,
                        bool(row.has_endpoints))
