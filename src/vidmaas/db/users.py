"""Users and API keys, and what a user row means for the queue and the quotas.

Guarantees:
- An API key is shown once, at creation, and stored only as its SHA-256 hash (keys
  are 256-bit random, so a fast hash is enough); ``identify`` compares hashes, never
  plaintext. A key authenticates only while it is not revoked, not past its
  ``expires_at``, and its user is not disabled. ``identify`` writes the key's
  ``last_used_at`` only when the stored one is unset or older than
  ``LAST_USED_RESOLUTION_S`` (callers cache identities, so it runs on a cache miss).
- ``check_changes`` is the one validation of what an admin may set on a user (name,
  admin role, weight, highest priority, the four quotas): a bad value raises
  ``InvalidRequest`` with a machine-readable code (``invalid_name``,
  ``invalid_weight``, ``invalid_priority``, ``invalid_quota``) naming the field. A
  taken name is ``Conflict`` ``user_exists``.
- ``share_of``, ``limits_of`` and ``priority_for`` turn a user row into what the queue
  and the quota check use: the user's own values where set, the settings' defaults
  (``config.QuotaSettings``) otherwise. Weight and highest priority are stored on
  every row (a new user gets the settings' defaults; setting them to None resets them
  to those defaults); a quota left None follows the default as it changes.
"""

from __future__ import annotations

import hashlib
import math
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol

from sqlalchemy import or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from vidmaas.config import QuotaSettings, Settings
from vidmaas.db.models import ApiKey, User, utcnow
from vidmaas.domain.fairness import MAX_WEIGHT, MIN_WEIGHT, Priority, Share, allowed
from vidmaas.domain.ids import new_user_id
from vidmaas.domain.quotas import Limits
from vidmaas.errors import Conflict, InvalidRequest, NotFound

KEY_PREFIX = "vmk_"
LAST_USED_RESOLUTION_S = 60.0
"""``last_used_at`` is kept to about this precision (it is not rewritten more often)."""
NAME_MAX = 128
KEY_NAME_MAX = 64

QUOTAS: tuple[str, ...] = ("queued_tasks", "gpus_at_once", "gpu_seconds_day",
                           "gpu_seconds_month")
"""The quotas, as ``domain.quotas.Limits`` names them (columns ``quota_<name>``)."""
_INTEGER_QUOTAS = frozenset({"queued_tasks", "gpus_at_once"})
EDITABLE: frozenset[str] = frozenset(
    {"name", "is_admin", "weight", "max_priority", *(f"quota_{q}" for q in QUOTAS)})


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


# ---------------------------------------------------------------- validation

def _number(field: str, value: Any, *, integer: bool) -> float | int:
    if isinstance(value, bool) or not isinstance(value, int | float) \
            or not math.isfinite(value):
        raise InvalidRequest(f"{field} must be a number", code="invalid_quota" if
                             field.startswith("quota_") else "invalid_weight", field=field)
    if integer and value != int(value):
        raise InvalidRequest(f"{field} must be a whole number", code="invalid_quota",
                             field=field)
    return int(value) if integer else float(value)


def check_changes(changes: Mapping[str, Any]) -> dict[str, Any]:
    """The validated column values of an admin's change (see the module docstring);
    None stays None (the caller resets it to the default)."""
    unknown = changes.keys() - EDITABLE
    if unknown:
        raise InvalidRequest(f"cannot set {', '.join(sorted(unknown))}",
                             field=sorted(unknown)[0])
    out: dict[str, Any] = {}
    for field, value in changes.items():
        if field == "name":
            if not isinstance(value, str) or not value.strip() or len(value) > NAME_MAX \
                    or not value.isprintable() or value != value.strip():
                raise InvalidRequest(f"a name is 1–{NAME_MAX} printable characters without "
                                     "leading or trailing spaces", code="invalid_name",
                                     field="name")
            out[field] = value
        elif field == "is_admin":
            if not isinstance(value, bool):
                raise InvalidRequest("is_admin must be true or false", field="is_admin")
            out[field] = value
        elif value is None:
            out[field] = None
        elif field == "weight":
            weight = _number(field, value, integer=False)
            if not MIN_WEIGHT <= weight <= MAX_WEIGHT:
                raise InvalidRequest(f"weight must be within {MIN_WEIGHT}..{MAX_WEIGHT}",
                                     code="invalid_weight", field="weight")
            out[field] = weight
        elif field == "max_priority":
            if value not in tuple(Priority):
                raise InvalidRequest("max_priority must be one of low, normal, high",
                                     code="invalid_priority", field="max_priority")
            out[field] = str(value)
        else:
            quota = _number(field, value, integer=field[len("quota_"):] in _INTEGER_QUOTAS)
            if quota < 0:
                raise InvalidRequest(f"{field} must not be negative", code="invalid_quota",
                                     field=field)
            out[field] = quota
    return out


# ---------------------------------------------------------------- policy

class Terms(Protocol):
    """What a user's quotas, weight and priority ceiling are read from: a ``User`` row,
    or the plain ``db.usage.Standing`` a create reads (no ORM entity on that path)."""

    @property
    def weight(self) -> float: ...
    @property
    def max_priority(self) -> str: ...
    @property
    def quota_queued_tasks(self) -> int | None: ...
    @property
    def quota_gpus_at_once(self) -> int | None: ...
    @property
    def quota_gpu_seconds_day(self) -> float | None: ...
    @property
    def quota_gpu_seconds_month(self) -> float | None: ...


def share_of(user: Terms, defaults: QuotaSettings) -> Share:
    """The user's weight and GPUs-at-once quota, as the queue takes them."""
    cap = user.quota_gpus_at_once if user.quota_gpus_at_once is not None \
        else defaults.gpus_at_once
    return Share(weight=float(user.weight), gpu_cap=int(cap or 0))


def limits_of(user: Terms, settings: Settings) -> Limits:
    """The user's effective quotas: their own values over the settings' defaults."""
    q = settings.quotas
    return Limits(queued_tasks=settings.api.max_queued_per_user, gpus_at_once=q.gpus_at_once,
                  gpu_seconds_day=q.gpu_seconds_day, gpu_seconds_month=q.gpu_seconds_month,
                  ).merged(**{name: getattr(user, f"quota_{name}") for name in QUOTAS})


def priority_for(asked: str | None, *, maximum: str) -> Priority:
    """The class a task gets: ``asked`` (default ``normal``, or the maximum if that is
    lower) if the user may ask for it; ``InvalidRequest`` on field ``priority``
    otherwise (``invalid_priority``, ``priority_not_allowed``)."""
    top = Priority(maximum) if maximum in tuple(Priority) else Priority.NORMAL
    if asked is None:
        return Priority.NORMAL if allowed(Priority.NORMAL, maximum=top) else top
    if asked not in tuple(Priority):
        raise InvalidRequest("priority must be one of low, normal, high",
                             code="invalid_priority", field="priority")
    wanted = Priority(asked)
    if not allowed(wanted, maximum=top):
        raise InvalidRequest(f"you may ask for priority up to {top.value}",
                             code="priority_not_allowed", field="priority")
    return wanted


# ---------------------------------------------------------------- users

async def _commit_unique(session: AsyncSession, name: str | None) -> None:
    try:
        await session.commit()
    except IntegrityError as e:
        await session.rollback()
        raise Conflict(f"user {name!r} exists", code="user_exists", field="name") from e


async def create_user(*, session: AsyncSession, name: str, is_admin: bool = False,
                      weight: float = 1.0, max_priority: str = "normal",
                      quotas: Mapping[str, float | int | None] | None = None) -> User:
    """A new user (``quotas``: ``quota_<name>`` → value; the caller validated them)."""
    user = User(id=new_user_id(), name=name, is_admin=is_admin, created_at=utcnow(),
                weight=weight, max_priority=max_priority)
    for field, value in (quotas or {}).items():
        setattr(user, field, value)
    session.add(user)
    await _commit_unique(session, name)
    return user


async def update_user(*, session: AsyncSession, user_id: str, changes: Mapping[str, Any],
                      defaults: QuotaSettings) -> User:
    """Apply validated ``changes``; None weight or highest priority resets it to the
    defaults, a None quota makes it follow the default."""
    user = await get_user(session=session, user_id=user_id)
    if user is None:
        raise NotFound("no such user", code="user_not_found")
    reset = {"weight": defaults.weight, "max_priority": defaults.max_priority}
    for field, value in changes.items():
        setattr(user, field, reset[field] if value is None and field in reset else value)
    await _commit_unique(session, changes.get("name"))
    return user


async def set_disabled(*, session: AsyncSession, user_id: str, disabled: bool) -> User:
    """Disable (their keys stop working; their tasks go on) or enable a user."""
    user = await get_user(session=session, user_id=user_id)
    if user is None:
        raise NotFound("no such user", code="user_not_found")
    if disabled and user.disabled_at is None:
        user.disabled_at = utcnow()
    elif not disabled:
        user.disabled_at = None
    await session.commit()
    return user


async def get_user(*, session: AsyncSession, user_id: str) -> User | None:
    stmt = select(User).where(User.id == user_id).execution_options(populate_existing=True)
    return (await session.execute(stmt)).scalar_one_or_none()


async def get_user_by_name(*, session: AsyncSession, name: str) -> User | None:
    return (await session.execute(select(User).where(User.name == name))).scalar_one_or_none()


async def list_users(*, session: AsyncSession) -> list[User]:
    return list((await session.execute(select(User).order_by(User.name))).scalars())


async def list_users_page(*, session: AsyncSession, limit: int, after: str | None = None,
                          name: str | None = None) -> list[User]:
    """Users by id (oldest first); ``after`` is the last id of the previous page."""
    stmt = select(User).order_by(User.id).limit(limit)
    if after is not None:
        stmt = stmt.where(User.id > after)
    if name is not None:
        stmt = stmt.where(User.name == name)
    return list((await session.execute(stmt)).scalars())


async def names_of(*, session: AsyncSession, user_ids: list[str]) -> dict[str, str]:
    """user id → name, for the ids that exist."""
    if not user_ids:
        return {}
    res = await session.execute(select(User.id, User.name).where(User.id.in_(user_ids)))
    return {str(i): str(n) for i, n in res.all()}


# ---------------------------------------------------------------- keys

async def create_api_key(*, session: AsyncSession, user_id: str, name: str | None = None,
                         expires_at: datetime | None = None, key: str | None = None,
                         ) -> tuple[ApiKey, str]:
    """A new key for the user: (its row, the plaintext, returned once, never stored)."""
    plain = key or new_key()
    row = ApiKey(user_id=user_id, key_hash=hash_key(plain), prefix=plain[:10],
                 created_at=utcnow(), name=name, expires_at=expires_at)
    session.add(row)
    await session.commit()
    return row, plain


async def create_key(*, session: AsyncSession, user_id: str, key: str | None = None) -> str:
    """A new key for the user; the plaintext is returned once and never stored."""
    return (await create_api_key(session=session, user_id=user_id, key=key))[1]


async def list_keys(*, session: AsyncSession, user_id: str) -> list[ApiKey]:
    stmt = select(ApiKey).where(ApiKey.user_id == user_id).order_by(ApiKey.id)
    return list((await session.execute(stmt)).scalars())


async def revoke_key(*, session: AsyncSession, key_id: int) -> ApiKey:
    """Revoke one key (revoking twice keeps the first time); ``NotFound`` if unknown."""
    row = await session.get(ApiKey, key_id, populate_existing=True)
    if row is None:
        raise NotFound("no such key", code="key_not_found")
    if row.revoked_at is None:
        row.revoked_at = utcnow()
        await session.commit()
    return row


async def revoke_keys(*, session: AsyncSession, user_id: str) -> int:
    keys = (await session.execute(select(ApiKey).where(
        ApiKey.user_id == user_id, ApiKey.revoked_at.is_(None)))).scalars().all()
    for k in keys:
        k.revoked_at = utcnow()
    await session.commit()
    return len(keys)


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a key belongs to, and until when the key itself is valid."""

    user: User
    key_id: int
    expires_at: datetime | None


async def identify(*, session: AsyncSession, key: str, now: datetime | None = None,
                   ) -> Identity | None:
    """The user of a valid key (see the module docstring), or None."""
    if not key.startswith(KEY_PREFIX) or len(key) > 128:
        return None
    now = now or utcnow()
    res = await session.execute(
        select(User, ApiKey.id, ApiKey.expires_at, ApiKey.last_used_at)
        .join(ApiKey, ApiKey.user_id == User.id)
        .where(ApiKey.key_hash == hash_key(key), ApiKey.revoked_at.is_(None),
               User.disabled_at.is_(None),
               or_(ApiKey.expires_at.is_(None), ApiKey.expires_at > now)))
    row = res.one_or_none()
    if row is None:
        return None
    user, key_id, expires_at, last_used = row
    if last_used is None or now - last_used >= timedelta(seconds=LAST_USED_RESOLUTION_S):
        await session.execute(update(ApiKey).where(ApiKey.id == key_id)
                              .values(last_used_at=now)
                              .execution_options(synchronize_session=False))
        await session.commit()
    return Identity(user=user, key_id=int(key_id), expires_at=expires_at)


async def authenticate(*, session: AsyncSession, key: str) -> User | None:
    """The user of a valid key, or None (``identify`` without the expiry)."""
    found = await identify(session=session, key=key)
    return None if found is None else found.user
