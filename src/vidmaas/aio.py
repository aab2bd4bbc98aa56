"""Small asyncio helpers shared by the long-running roles.

Guarantees: ``supervise`` runs a loop until it returns or ``stopping`` is set, logs and
restarts it after a crash with exponential backoff (never a hot crash loop), lets
cancellation through, and wakes from a backoff pause at once when ``stopping`` is set.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable


async def pause(stopping: asyncio.Event, seconds: float) -> None:
    """Sleep ``seconds``, but wake at once when ``stopping`` is set."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stopping.wait(), seconds)


async def supervise(name: str, fn: Callable[[], Awaitable[None]], *, stopping: asyncio.Event,
                    log: logging.Logger, backoff_initial_s: float = 0.2,
                    backoff_max_s: float = 5.0) -> None:
    """Run ``fn`` until it returns or ``stopping`` is set; restart it when it crashes."""
    backoff_s = backoff_initial_s
    while not stopping.is_set():
        try:
            await fn()
            return
        except asyncio.CancelledError:
            raise
        except Exception:
            if stopping.is_set():
                return
            log.exception("%s failed; restarting in %.1fs", name, backoff_s)
            await pause(stopping, backoff_s)
            backoff_s = min(backoff_s * 2, backoff_max_s)
