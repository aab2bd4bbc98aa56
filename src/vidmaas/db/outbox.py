"""The event outbox: events that commit with the status change that caused them.

Guarantees:
- ``add`` inserts one event in the caller's transaction (``db.tasks.transition`` calls
  it after its compare-and-set, before the commit), so a status change and its event
  are both stored or neither is. Its ``seq`` is the task's ``event_seq`` the same
  UPDATE incremented: 1, 2, 3… per task, without gaps, in the order of the moves (the
  moves of one task are serialised by their compare-and-set on its row).
- A row lives only until its event is on the Redis streams: the publisher deletes it
  (``delete``) once the stream write succeeded or was found done before.
- ``of_task`` lists one task's rows in ``seq`` order; ``oldest`` the rows older than a
  cutoff, in id order, which for any one task is its ``seq`` order too, and which never
  holds a task's row without that task's older rows (they were inserted, and got their
  ids, before it).
- ``count`` is the number of rows waiting (what the gauge, the bound and ``/readyz``
  read).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import delete as sql_delete
from sqlalchemy import func, insert, select
from sqlalchemy.ext.asyncio import AsyncSession

from vidmaas.db.models import OutboxEvent, utcnow
from vidmaas.domain.events import Event, EventType


@dataclass(frozen=True, slots=True)
class Entry:
    """One stored event: its row id, the task's per-task ``seq`` and the event itself."""

    id: int
    task_id: str
    seq: int
    event: Event


def _entry(row: OutboxEvent) -> Entry:
    return Entry(id=int(row.id), task_id=row.task_id, seq=int(row.seq),
                 event=Event(row.task_id, EventType(row.type), dict(row.data)))


async def add(session: AsyncSession, *, seq: int, event: Event) -> Entry:
    """Store ``event`` as the task's ``seq``-th; in the caller's transaction (no commit)."""
    res = await session.execute(
        insert(OutboxEvent).values(task_id=event.task_id, seq=seq, type=event.type.value,
                                   data=dict(event.data), created_at=utcnow())
        .returning(OutboxEvent.id))
    return Entry(id=int(res.scalar_one()), task_id=event.task_id, seq=seq, event=event)


async def of_task(session: AsyncSession, *, task_id: str) -> list[Entry]:
    """The task's rows still waiting, oldest first."""
    res = await session.execute(select(OutboxEvent).where(OutboxEvent.task_id == task_id)
                                .order_by(OutboxEvent.seq))
    return [_entry(r) for r in res.scalars()]


async def oldest(session: AsyncSession, *, before: datetime, limit: int) -> list[Entry]:
    """Up to ``limit`` rows created before ``before``, oldest (lowest id) first."""
    res = await session.execute(select(OutboxEvent).where(OutboxEvent.created_at < before)
                                .order_by(OutboxEvent.id).limit(limit))
    return [_entry(r) for r in res.scalars()]


async def delete(session: AsyncSession, ids: Sequence[int]) -> None:
    """Forget rows whose events are on the streams, and commit. Deleting a row another
    publisher deleted first is a no-op."""
    if not ids:
        return
    await session.execute(sql_delete(OutboxEvent).where(OutboxEvent.id.in_(list(ids)))
                          .execution_options(synchronize_session=False))
    await session.commit()


async def count(session: AsyncSession) -> int:
    """Rows waiting to be published."""
    res = await session.execute(select(func.count()).select_from(OutboxEvent))
    return int(res.scalar_one())
