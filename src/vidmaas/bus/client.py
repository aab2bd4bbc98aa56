"""Redis connections.

Guarantees: clients are made only by these functions, from a URL passed in (never
from the environment), with a socket timeout so a dead server fails a call instead
of hanging it, and with retries on connection blips.
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
