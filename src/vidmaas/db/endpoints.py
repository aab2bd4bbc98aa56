"""Webhook endpoints (``webhook_endpoints``) and their delivery log.

Guarantees:
- Every read or change a user makes is scoped to that user: another user's endpoint
  is the same None / False as a missing one.
- ``create`` refuses (``EndpointLimit``) an endpoint past the user's limit. It writes
  the user's row first (a no-op UPDATE: a row lock on PostgreSQL, the write lock on
  SQLite), so two creates at once count one after the other and cannot both take the
  last place.
- ``delete`` removes the endpoint and its deliveries (pending ones are never sent).
- ``enabled_for_user`` is what the relay records deliveries for; ``get_any`` is what
  the sender re-reads before each attempt (a disabled or deleted endpoint gets none).
- ``deliveries_page`` is the log of one endpoint, newest first, paged by row id.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from vidmaas.db.models import User, WebhookDelivery, WebhookEndpoint, utcnow


class EndpointLimit(Exception):
    """The user has as many endpoints as they may have."""


@dataclass(frozen=True, slots=True)
class NewEndpoint:
    id: str
    user_id: str
    url: str
    events: list[str]
    secret: str
    enabled: bool = True
    description: str | None = None


async def create(*, session: AsyncSession, new: NewEndpoint, limit: int) -> WebhookEndpoint:
    """Insert an endpoint unless the user already has ``limit``; commits."""
    await session.execute(update(User).where(User.id == new.user_id).values(id=User.id)
                          .execution_options(synchronize_session=False))
    count = (await session.execute(select(func.count()).select_from(WebhookEndpoint)
                                   .where(WebhookEndpoint.user_id == new.user_id))).scalar_one()
    if count >= limit:
        await session.rollback()
        raise EndpointLimit(f"at most {limit} webhook endpoints per user")
    now = utcnow()
    row = WebhookEndpoint(id=new.id, user_id=new.user_id, url=new.url, events=list(new.events),
                          secret=new.secret, enabled=new.enabled,
                          description=new.description, created_at=now, updated_at=now)
    session.add(row)
    await session.commit()
    return row


async def get(*, session: AsyncSession, endpoint_id: str, user_id: str,
              ) -> WebhookEndpoint | None:
    """The user's endpoint, or None (missing, or someone else's)."""
    res = await session.execute(select(WebhookEndpoint).where(
        WebhookEndpoint.id == endpoint_id, WebhookEndpoint.user_id == user_id))
    return res.scalar_one_or_none()


async def get_any(*, session: AsyncSession, endpoint_id: str) -> WebhookEndpoint | None:
    """An endpoint whoever it belongs to (the sender's re-read)."""
    return await session.get(WebhookEndpoint, endpoint_id, populate_existing=True)


async def list_for_user(*, session: AsyncSession, user_id: str, limit: int,
                        after: str | None = None) -> list[WebhookEndpoint]:
    """The user's endpoints in id order, those after ``after`` when it is given."""
    stmt = select(WebhookEndpoint).where(WebhookEndpoint.user_id == user_id)
    if after is not None:
        stmt = stmt.where(WebhookEndpoint.id > after)
    return list((await session.execute(stmt.order_by(WebhookEndpoint.id).limit(limit)))
                .scalars())


async def enabled_for_user(*, session: AsyncSession, user_id: str) -> list[WebhookEndpoint]:
    """The user's enabled endpoints (what a task's events are recorded for)."""
    res = await session.execute(select(WebhookEndpoint).where(
        WebhookEndpoint.user_id == user_id, WebhookEndpoint.enabled.is_(True))
        .order_by(WebhookEndpoint.id))
    return list(res.scalars())


async def change(*, session: AsyncSession, endpoint_id: str, user_id: str,
                 values: dict[str, Any]) -> WebhookEndpoint | None:
    """Change ``url``, ``events``, ``enabled`` or ``description``; None if not the user's."""
    row = await get(session=session, endpoint_id=endpoint_id, user_id=user_id)
    if row is None:
        return None
    allowed = {"url", "events", "enabled", "description"}
    for name, value in values.items():
        if name not in allowed:
            raise ValueError(f"{name} cannot be changed")
        setattr(row, name, list(value) if name == "events" else value)
    row.updated_at = utcnow()
    await session.commit()
    return row


async def delete_endpoint(*, session: AsyncSession, endpoint_id: str, user_id: str) -> bool:
    """Delete the user's endpoint and its deliveries; False if not the user's."""
    res = await session.execute(delete(WebhookEndpoint).where(
        WebhookEndpoint.id == endpoint_id, WebhookEndpoint.user_id == user_id)
        .execution_options(synchronize_session=False))
    if not res.rowcount:  # type: ignore[attr-defined]
        await session.rollback()
        return False
    # Also where foreign keys are not enforced: no delivery outlives its endpoint.
    await session.execute(delete(WebhookDelivery).where(
        WebhookDelivery.endpoint_id == endpoint_id)
        .execution_options(synchronize_session=False))
    await session.commit()
    return True


async def deliveries_page(*, session: AsyncSession, endpoint_id: str, limit: int,
                          before: int | None = None) -> list[WebhookDelivery]:
    """An endpoint's deliveries, newest first, those older than row ``before`` if given."""
    stmt = select(WebhookDelivery).where(WebhookDelivery.endpoint_id == endpoint_id)
    if before is not None:
        stmt = stmt.where(WebhookDelivery.id < before)
    return list((await session.execute(stmt.order_by(WebhookDelivery.id.desc()).limit(limit)))
                .scalars())
