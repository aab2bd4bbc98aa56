"""Engines and sessions.

Guarantees: one function makes an engine from a URL (``postgresql://`` is rewritten to
asyncpg); SQLite engines use WAL, foreign keys and a busy timeout so the embedded
instance's roles can share the file; sessions never expire objects on commit, so a
returned row stays readable after its transaction. ``Session`` is the session type
the roles annotate with, so that only ``db`` imports SQLAlchemy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import event, text
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
        kwargs.update(pool_size=cfg.pool_size, max_overflow=cfg.pool_size, pool_pre_ping=True)
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
