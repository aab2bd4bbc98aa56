"""Webhook delivery rows: the durable queue of outgoing webhooks (``webhook_deliveries``).

Guarantees:
- ``record`` inserts one ``pending`` row and commits; it writes nothing and answers
  False when a row with the same ``delivery_id`` exists (a redelivered event).
- ``claim_due`` hands out due ``pending`` rows, oldest due first, each claimed by a
  compare-and-set on its attempt count (``attempts`` + 1, ``next_attempt_at`` moved to
  the end of the claim lease), so two senders never hold the same attempt; a row
  another sender claimed meanwhile is left out.
- ``finish_attempt`` records the outcome of the attempt claimed (``delivered``,
  ``failed``, ``refused``, ``skipped``, or ``pending`` again with its next due time) only while the
  row is still at that attempt: a sender whose claim lapsed changes nothing.
- ``list_for_task`` returns a task's rows in the order they were recorded, optionally
  only those to one URL.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from vidmaas.db.models import WebhookDelivery, utcnow

PENDING, DELIVERED, FAILED, REFUSED = "pending", "delivered", "failed", "refused"
SKIPPED = "skipped"
"""The states of a delivery row."""


async def record(*, session: AsyncSession, task_id: str | None, delivery_id: str, url: str,
                 event_id: str, event_type: str, payload: dict[str, Any],
                 due_at: datetime, endpoint_id: str | None = None) -> bool:
    """Insert a pending delivery due at ``due_at``; False if ``delivery_id`` exists."""
    session.add(WebhookDelivery(
        task_id=task_id, endpoint_id=endpoint_id, delivery_id=delivery_id, url=url,
        event_id=event_id,
        event_type=event_type, attempts=0, status=PENDING, payload=payload,
        next_attempt_at=due_at, created_at=due_at))
    try:
        await session.commit()
    except IntegrityError:
        await session.rollback()
        return False
    return True


async def last_recorded_at(*, session: AsyncSession, task_id: str, url: str, event_type: str,
                           endpoint_id: str | None = None) -> datetime | None:
    """When the newest delivery of ``event_type`` for (task, url) was recorded, if ever;
    for (task, endpoint) when ``endpoint_id`` is given."""
    target = WebhookDelivery.url == url if endpoint_id is None \
        else WebhookDelivery.endpoint_id == endpoint_id
    res = await session.execute(
        select(func.max(WebhookDelivery.created_at)).where(
            WebhookDelivery.task_id == task_id, target,
            WebhookDelivery.event_type == event_type))
    last: datetime | None = res.scalar_one()
    return last


async def claim_due(*, session: AsyncSession, now: datetime, lease_until: datetime,
                    limit: int) -> list[WebhookDelivery]:
    """Claim up to ``limit`` due pending rows; each returned row holds its new attempt."""
    rows = list((await session.execute(
        select(WebhookDelivery)
        .where(WebhookDelivery.status == PENDING, WebhookDelivery.next_attempt_at <= now)
        .order_by(WebhookDelivery.next_attempt_at, WebhookDelivery.id)
        .limit(limit))).scalars())
    claimed: list[WebhookDelivery] = []
    for row in rows:
        res = await session.execute(
            update(WebhookDelivery)
            .where(WebhookDelivery.id == row.id, WebhookDelivery.status == PENDING,
                   WebhookDelivery.attempts == row.attempts)
            .values(attempts=row.attempts + 1, next_attempt_at=lease_until)
            .execution_options(synchronize_session=False))
        await session.commit()
        if res.rowcount == 1:  # type: ignore[attr-defined]
            row.attempts += 1
            claimed.append(row)
    return claimed


async def finish_attempt(*, session: AsyncSession, row_id: int, attempt: int, status: str,
                         attempts: int, status_code: int | None, error: str | None,
                         next_attempt_at: datetime | None) -> bool:
    """Record the outcome of attempt ``attempt`` of row ``row_id``; False if the row has
    moved on (another sender holds a later attempt). ``attempts`` is the count to keep
    (one less than ``attempt`` for an attempt that does not count)."""
    values: dict[str, Any] = {"attempts": attempts, "status": status,
                              "last_status_code": status_code, "last_error": error,
                              "next_attempt_at": next_attempt_at}
    if status == DELIVERED:
        values["delivered_at"] = utcnow()
    res = await session.execute(
        update(WebhookDelivery).where(WebhookDelivery.id == row_id,
                                      WebhookDelivery.attempts == attempt)
        .values(**values).execution_options(synchronize_session=False))
    await session.commit()
    return bool(res.rowcount)  # type: ignore[attr-defined]


async def list_for_task(*, session: AsyncSession, task_id: str, url: str | None = None,
                        limit: int = 500) -> list[WebhookDelivery]:
    """A task's deliveries, oldest first; only those to ``url`` when it is given."""
    stmt = select(WebhookDelivery).where(WebhookDelivery.task_id == task_id)
    if url is not None:
        stmt = stmt.where(WebhookDelivery.url == url)
    return list((await session.execute(stmt.order_by(WebhookDelivery.id).limit(limit)))
                .scalars())
