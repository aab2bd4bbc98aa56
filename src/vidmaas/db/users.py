"""Users and API keys.

Guarantees: an API key is shown once, at creation, and stored only as its SHA-256
hash (keys are 256-bit random, so a fast hash is enough); ``authenticate`` compares
hashes, never plaintext; revoked keys do not authenticate.
"""

from __future__ import annotations

import hashlib
import secrets

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from vidmaas.db.models import ApiKey, User, utcnow
from vidmaas.domain.ids import new_user_id
from vidmaas.errors import Conflict

KEY_PREFIX = "vmk_"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


async def create_user(*, session: AsyncSession, name: str, is_admin: bool = False) -> User:
    user = User(id=new_user_id(), name=name, is_admin=is_admin, created_at=utcnow())
    session.add(user)
    try:
        await session.commit()
    except IntegrityError as e:
        await session.rollback()
        raise Conflict(f"user {name!r} exists", code="user_exists", field="name") from e
    return user


async def get_user_by_name(*, session: AsyncSession, name: str) -> User | None:
    return (await session.execute(select(User).where(User.name == name))).scalar_one_or_none()


async def create_key(*, session: AsyncSession, user_id: str, key: str | None = None) -> str:
    """A new key for the user; the plaintext is returned once and never stored."""
    plain = key or new_key()
    session.add(ApiKey(user_id=user_id, key_hash=hash_key(plain), prefix=plain[:10],
                       created_at=utcnow()))
    await session.commit()
    return plain


async def revoke_keys(*, session: AsyncSession, user_id: str) -> int:
    keys = (await session.execute(select(ApiKey).where(
        ApiKey.user_id == user_id, ApiKey.revoked_at.is_(None)))).scalars().all()
    for k in keys:
        k.revoked_at = utcnow()
    await session.commit()
    return len(keys)


async def authenticate(*, session: AsyncSession, key: str) -> User | None:
    if not key.startswith(KEY_PREFIX) or len(key) > 128:
        return None
    res = await session.execute(
        select(User).join(ApiKey, ApiKey.user_id == User.id)
        .where(ApiKey.key_hash == hash_key(key), ApiKey.revoked_at.is_(None)))
    return res.scalar_one_or_none()


async def get_user(*, session: AsyncSession, user_id: str) -> User | None:
    return await session.get(User, user_id)


async def list_users(*, session: AsyncSession) -> list[User]:
    return list((await session.execute(select(User).order_by(User.name))).scalars())
