"""Request dependencies: services, the database session, the caller.

Guarantees: a request is authenticated by ``Authorization: Bearer <api key>`` or, for
browsers on WebSocket/SSE/media URLs that cannot set headers, by a short-lived
``?token=`` stream token; a missing or unknown credential is 401 with the same body
either way. A key that authenticated is remembered (by its hash, never in plain) for
``api.key_cache_ttl_s``, and never past the key's own expiry, so a revoked or expired
key, or a disabled user's key, stops working within that time; unknown keys are never
remembered. The admin API forgets a user's entries in this process at once when it
changes them (``KeyCache.forget_user``); other processes follow within the TTL. A
stream token of a disabled user is refused too. ``AdminDep`` admits admins only (403
``admin_required`` for anyone else). Nothing here reads global state: everything hangs
off ``app.state``.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated

from fastapi import Depends, Request
from starlette.requests import HTTPConnection

from vidmaas.bus.control import user_of_stream_token
from vidmaas.db import users
from vidmaas.db.engine import Session
from vidmaas.db.models import utcnow
from vidmaas.errors import Forbidden, Unauthenticated
from vidmaas.services import Services


@dataclass(frozen=True, slots=True)
class Caller:
    id: str
    name: str
    is_admin: bool

    @property
    def scope(self) -> str | None:
        """The user id to scope reads to; None for an admin (sees all)."""
        return None if self.is_admin else self.id


def services_of(conn: HTTPConnection) -> Services:
    svc: Services = conn.app.state.services
    return svc


async def session(request: Request) -> AsyncIterator[Session]:
    async with services_of(request).sessions() as s:
        yield s


def _bearer(conn: HTTPConnection) -> str | None:
    header = conn.headers.get("authorization")
    if header:
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
        raise Unauthenticated("the Authorization header must be 'Bearer <api key>'")
    return None


class KeyCache:
    """Callers of recently seen API keys, by key hash, for a few seconds (bounded)."""

    MAX_ENTRIES = 10_000

    def __init__(self, *, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self._entries: dict[str, tuple[float, Caller]] = {}

    def get(self, key: str) -> Caller | None:
        if self.ttl_s <= 0:
            return None
        hit = self._entries.get(users.hash_key(key))
        if hit is None or hit[0] < time.monotonic():
            return None
        return hit[1]

    def put(self, key: str, caller: Caller, *, not_after: datetime | None = None) -> None:
        """Remember ``caller`` for the TTL, but never past ``not_after`` (the key's expiry)."""
        if self.ttl_s <= 0:
            return
        ttl_s = self.ttl_s
        if not_after is not None:
            ttl_s = min(ttl_s, (not_after - utcnow()).total_seconds())
            if ttl_s <= 0:
                return
        if len(self._entries) >= self.MAX_ENTRIES:
            self._entries.clear()
        self._entries[users.hash_key(key)] = (time.monotonic() + ttl_s, caller)

    def forget_user(self, user_id: str) -> None:
        """Drop every entry of one user (an admin changed, disabled or revoked them)."""
        for digest in [d for d, (_, c) in self._entries.items() if c.id == user_id]:
            self._entries.pop(digest, None)


def key_cache(conn: HTTPConnection) -> KeyCache:
    state = conn.app.state
    cache: KeyCache | None = getattr(state, "key_cache", None)
    if cache is None:
        cache = KeyCache(ttl_s=services_of(conn).settings.api.key_cache_ttl_s)
        state.key_cache = cache
    return cache


async def authenticate(conn: HTTPConnection, *, allow_token: bool) -> Caller:
    svc = services_of(conn)
    key = _bearer(conn)
    if key is not None and (cached := key_cache(conn).get(key)) is not None:
        return cached
    async with svc.sessions() as s:
        if key is not None:
            identity = await users.identify(session=s, key=key)
            if identity is None:
                raise Unauthenticated("unknown, revoked or expired API key")
            user = identity.user
            caller = Caller(user.id, user.name, user.is_admin)
            key_cache(conn).put(key, caller, not_after=identity.expires_at)
            return caller
        token = conn.query_params.get("token") if allow_token else None
        if token:
            user_id = await user_of_stream_token(svc.redis, token)
            found = None if user_id is None else await users.get_user(session=s, user_id=user_id)
            if found is None or found.disabled_at is not None:
                raise Unauthenticated("unknown or expired stream token")
            return Caller(found.id, found.name, found.is_admin)
    raise Unauthenticated("an API key is required: Authorization: Bearer <key>")


async def caller(request: Request) -> Caller:
    return await authenticate(request, allow_token=False)


async def caller_or_token(request: Request) -> Caller:
    """For media URLs used by <video>/<img>, which cannot send headers."""
    return await authenticate(request, allow_token=True)


async def admin(request: Request) -> Caller:
    """The caller, who must be an admin (403 ``admin_required`` otherwise)."""
    who = await authenticate(request, allow_token=False)
    if not who.is_admin:
        raise Forbidden("this needs an admin's API key", code="admin_required")
    return who


SessionDep = Annotated[Session, Depends(session)]
CallerDep = Annotated[Caller, Depends(caller)]
AdminDep = Annotated[Caller, Depends(admin)]
CallerOrTokenDep = Annotated[Caller, Depends(caller_or_token)]
