"""Redis connections.

Guarantees: clients are made only by these functions, from a URL passed in (never
from the environment), with a socket timeout so a dead server fails a call instead
of hanging it, and with retries on connection blips. ``is_unavailable(exc)`` tells
an error that means "Redis cannot be reached right now" from every other one.
"""

from __future__ import annotations

import redis
import redis.asyncio as aioredis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry


def connect(url: str, *, socket_timeout_s: float | None = 30.0) -> aioredis.Redis:
    """An asyncio client (connection pool) for ``url``."""
    return aioredis.Redis.from_url(
        url, decode_responses=True, socket_timeout=socket_timeout_s,
        socket_connect_timeout=5.0, health_check_interval=30,
        retry=Retry(ExponentialBackoff(cap=2.0, base=0.05), retries=3),
        retry_on_error=[redis.ConnectionError, redis.TimeoutError])


def connect_sync(url: str, *, socket_timeout_s: float | None = 10.0) -> redis.Redis:
    """A blocking client, for the job runtime's threads."""
    return redis.Redis.from_url(
        url, decode_responses=True, socket_timeout=socket_timeout_s,
        socket_connect_timeout=5.0,
        retry=Retry(ExponentialBackoff(cap=2.0, base=0.05), retries=3),
        retry_on_error=[redis.ConnectionError, redis.TimeoutError])

REDIS_ERRORS: tuple[type[Exception], ...] = (redis.RedisError,)
"""The classes of error a Redis call may raise (for handlers at a role's boundary)."""


def is_unavailable(error: BaseException) -> bool:
    """Whether ``error`` (or what caused it) is Redis being unreachable: refused, lost,
    timed out, or still loading its data after a restart."""
    current: BaseException | None = error
    for _ in range(16):
        if current is None:
            return False
        if isinstance(current, (redis.ConnectionError, redis.TimeoutError)):
            return True
        current = current.__cause__ or current.__context__
    return False
