"""Engines and sessions.

Guarantees: one function makes an engine from a URL (``postgresql://`` is rewritten to
asyncpg); SQLite engines use WAL, foreign keys and a busy timeout so the embedded
instance's roles can share the file; sessions never expire objects on commit, so a
returned row stays readable after its transaction. ``Session`` is the session type
the roles annotate with, so that only ``db`` imports SQLAlchemy.

A database that is down never hangs a caller: a PostgreSQL connection attempt gives
up after ``connect_timeout_s``, waiting for a pooled connection after
``pool_timeout_s``, and every pooled connection is pinged when checked out, so after a
restart the first request reconnects instead of failing on a dead connection (no
process restart needed). ``is_unavailable(exc)`` tells an error that means "the
database cannot be reached right now" (connection refused or lost, server shutting
down or starting up, timeouts, out of connections, SQLite busy) from every other one,
for the roles to map to a retryable answer.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import asyncpg
from sqlalchemy import event, exc, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from vidmaas.config import DatabaseSettings

Session = AsyncSession
"""A database session (what ``Services.sessions()`` opens)."""
Sessions = async_sessionmaker[AsyncSession]
"""The session factory a role holds (``Services.sessions``)."""
Engine = AsyncEngine
"""The session factory a role holds (``Services.sessions``)."""


def normalize_url(url: str) -> str:
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        return "postgresql+asyncpg://" + url.split("://", 1)[1]
    if url.startswith("sqlite:///"):
        return "sqlite+aiosqlite:///" + url[len("sqlite:///"):]
    return url


def is_sqlite(url: str) -> bool:
    return make_url(normalize_url(url)).get_backend_name() == "sqlite"


def make_engine(settings: DatabaseSettings | str) -> AsyncEngine:
    cfg = DatabaseSettings(url=settings) if isinstance(settings, str) else settings
    url = normalize_url(cfg.url)
    kwargs: dict[str, Any] = {"echo": cfg.echo_sql}
    if is_sqlite(url):
        db_path = make_url(url).database
        if db_path and db_path != ":memory:":
            Path(db_path).parent.mkdir(parents=True, exist_ok=True)
        kwargs["connect_args"] = {"timeout": 30}
    else:
        kwargs.update(pool_size=cfg.pool_size, max_overflow=cfg.pool_size, pool_pre_ping=True,
                      pool_timeout=cfg.pool_timeout_s,
                      connect_args={"timeout": cfg.connect_timeout_s})
    engine = create_async_engine(url, **kwargs)
    if is_sqlite(url):
        @event.listens_for(engine.sync_engine, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()
    return engine


def make_sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False)


async def ping(engine: AsyncEngine) -> None:
    """Raise unless the database answers a trivial query."""
    async with engine.connect() as conn:
        await conn.execute(text("SELECT 1"))


_SA_UNAVAILABLE = (exc.OperationalError, exc.InterfaceError, exc.DisconnectionError,
                   exc.TimeoutError)
_PG_UNAVAILABLE = (asyncpg.PostgresConnectionError,
                   asyncpg.exceptions.OperatorInterventionError,
                   asyncpg.exceptions.TooManyConnectionsError, asyncpg.InterfaceError)
_DRIVERS = ("sqlalchemy", "asyncpg", "aiosqlite")
DRIVER_ERRORS: tuple[type[Exception], ...] = (
    exc.SQLAlchemyError, asyncpg.PostgresError, asyncpg.InterfaceError, sqlite3.Error, OSError)
"""The classes of error a database call may raise (for handlers at a role's boundary)."""


def _chain(error: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _raised_by_driver(tb: TracebackType | None) -> bool:
    while tb is not None:
        module = str(tb.tb_frame.f_globals.get("__name__", ""))
        if module.split(".", 1)[0] in _DRIVERS:
            return True
        tb = tb.tb_next
    return False


def is_unavailable(error: BaseException) -> bool:
    """Whether ``error`` (or what caused it) means the database cannot be reached now.

    True for SQLAlchemy's operational, interface, disconnection and pool-timeout errors,
    an invalidated connection, asyncpg's connection errors (lost, refused, shutting
    down, starting up, too many clients), and an ``OSError`` (refused, unreachable,
    timed out) raised from inside the database driver while connecting. False for
    everything else: a constraint violation or a bug stays what it is."""
    for e in _chain(error):
        if isinstance(e, _SA_UNAVAILABLE):
            return True
        if isinstance(e, exc.DBAPIError) and e.connection_invalidated:
            return True
        if isinstance(e, _PG_UNAVAILABLE):
            return True
        if isinstance(e, sqlite3.OperationalError):
            return True
        if isinstance(e, OSError) and _raised_by_driver(e.__traceback__):
            return True
    return False
