"""Cancel flags and short-lived stream tokens.

Guarantees: a cancel flag, once set, stays until the task's stream expires, so a job
that starts late still sees it; checking a flag is one cheap ``EXISTS``.
"""

from __future__ import annotations

import hashlib
import secrets

import redis
import redis.asyncio as aioredis

from vidmaas.bus import keys

CANCEL_FLAG_TTL_S = 7 * 24 * 3600


async def request_cancel(client: aioredis.Redis, task_id: str, *, by: str) -> None:
    await client.set(keys.cancel_flag(task_id), by, ex=CANCEL_FLAG_TTL_S)


async def cancel_requested(client: aioredis.Redis, task_id: str) -> str | None:
    value = await client.get(keys.cancel_flag(task_id))
    return None if value is None else str(value)


def cancel_requested_sync(client: redis.Redis, task_id: str) -> str | None:
    value = client.get(keys.cancel_flag(task_id))
    return None if value is None else str(value)


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


async def issue_stream_token(client: aioredis.Redis, user_id: str, *, ttl_s: int) -> str:
    """A random token for WebSocket/SSE URLs, valid ``ttl_s``; only its hash is stored."""
    token = "st_" + secrets.token_urlsafe(24)
    await client.set(keys.stream_token(_hash(token)), user_id, ex=ttl_s)
    return token


async def user_of_stream_token(client: aioredis.Redis, token: str) -> str | None:
    value = await client.get(keys.stream_token(_hash(token)))
    return None if value is None else str(value)
