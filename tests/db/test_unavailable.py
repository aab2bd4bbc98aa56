"""``db.engine.is_unavailable`` tells "the database cannot be reached now" from other
errors, and the engine's timeouts bound how long a caller waits for a connection."""

from __future__ import annotations

import time

import pytest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

from tests.support.services import free_port
from vidmaas.config import DatabaseSettings
from vidmaas.db import users
from vidmaas.db.engine import is_unavailable, make_engine, make_sessionmaker
from vidmaas.errors import Conflict


async def test_a_refused_connection_is_unavailable_and_a_constraint_violation_is_not(
        pg_url: str) -> None:
    closed = pg_url.rsplit("@", 1)[0] + f"@127.0.0.1:{free_port()}/nothing"
    engine = make_engine(closed)
    try:
        with pytest.raises(Exception) as refused:
            async with engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
        assert is_unavailable(refused.value)
    finally:
        await engine.dispose()
    engine = make_engine(pg_url)
    try:
        async with make_sessionmaker(engine)() as s:
            await users.create_user(session=s, name="twice", is_admin=False)
            with pytest.raises(Conflict) as dup:
                await users.create_user(session=s, name="twice", is_admin=False)
        assert isinstance(dup.value.__cause__, IntegrityError)
        assert not is_unavailable(dup.value)
    finally:
        await engine.dispose()
    assert not is_unavailable(ValueError("no"))
    assert not is_unavailable(OSError("a file, not the database"))


async def test_waiting_for_a_pooled_connection_gives_up_after_the_pool_timeout(
        pg_url: str) -> None:
    engine = make_engine(DatabaseSettings(url=pg_url, pool_size=1, pool_timeout_s=0.3))
    try:
        held = [await engine.connect(), await engine.connect()]  # pool_size + overflow
        t0 = time.monotonic()
        with pytest.raises(Exception) as waited:
            await engine.connect()
        assert 0.25 < time.monotonic() - t0 < 3
        assert is_unavailable(waited.value)
        for conn in held:
            await conn.close()
    finally:
        await engine.dispose()
