"""Shared fixtures: real Redis, PostgreSQL and SQLite, SeaweedFS S3, and the leak check.

- ``redis_url`` / ``redis``: a private Redis server for the session, flushed per test.
- ``db_url``: parametrised over SQLite and PostgreSQL (tests using it run on both);
  ``sqlite_url`` / ``pg_url`` for one backend. Migrated once, emptied per test.
- ``s3``: a SeaweedFS server for the session; ``s3_storage`` gives per-test settings
  under a fresh prefix.
- Every async test fails if it leaves an asyncio task running.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from hypothesis import settings as hypothesis_settings
from sqlalchemy import text

from tests.support import services
from vidmaas.bus.client import connect
from vidmaas.config import StorageSettings
from vidmaas.db.engine import make_engine
from vidmaas.db.migrate import upgrade_sync

_TABLES = ("outbox", "usage_daily", "webhook_deliveries", "webhook_endpoints", "tasks", "api_keys",
           "users")

# Timing depends on the machine's load (other suites, jobs); only correctness counts here.
hypothesis_settings.register_profile("vidmaas", deadline=None, derandomize=False)
hypothesis_settings.load_profile("vidmaas")


# ---------------------------------------------------------------- asyncio task leaks

@pytest.fixture(autouse=True)
async def _no_leaked_asyncio_tasks() -> AsyncIterator[None]:
    before = set(asyncio.all_tasks())
    yield
    for _ in range(3):
        await asyncio.sleep(0)
    leaked = [t for t in asyncio.all_tasks()
              if t is not asyncio.current_task() and t not in before and not t.done()]
    if leaked:
        for t in leaked:
            t.cancel()
        await asyncio.gather(*leaked, return_exceptions=True)
        pytest.fail(f"test leaked asyncio tasks: {[t.get_name() for t in leaked]}")


# ---------------------------------------------------------------- Redis

@pytest.fixture(scope="session")
def redis_server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    env = os.environ.get("VIDMAAS_TEST_REDIS_URL")
    if env:
        yield env
        return
    with services.private_redis(tmp_path_factory.mktemp("redis")) as (url, _proc):
        yield url


@pytest.fixture
async def redis_url(redis_server_url: str) -> AsyncIterator[str]:
    client = connect(redis_server_url)
    await client.flushdb()
    await client.aclose()
    yield redis_server_url


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = connect(redis_url)
    yield client
    await client.aclose()


# ---------------------------------------------------------------- databases

@pytest.fixture(scope="session")
def _sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("sqlite") / "template.db"
    upgrade_sync(f"sqlite+aiosqlite:///{path}")
    return path


@pytest.fixture
def sqlite_url(_sqlite_template: Path, tmp_path: Path) -> str:
    path = tmp_path / "vidmaas.db"
    shutil.copy(_sqlite_template, path)
    return f"sqlite+aiosqlite:///{path}"


@pytest.fixture(scope="session")
def _pg_database() -> Iterator[str]:
    if not services.postgres_reachable() and not os.environ.get("CI"):
        pytest.skip("no PostgreSQL server on 127.0.0.1:5432 (set VIDMAAS_TEST_PG_URL); "
                    "CI never skips this")
    with services.fresh_postgres() as url:
        upgrade_sync(url)
        yield url


@pytest.fixture
async def pg_url(_pg_database: str) -> str:
    engine = make_engine(_pg_database)
    async with engine.begin() as conn:
        await conn.execute(text(f"TRUNCATE {', '.join(_TABLES)} CASCADE"))
    await engine.dispose()
    return _pg_database


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest) -> str:
    name = "sqlite_url" if request.param == "sqlite" else "pg_url"
    return str(request.getfixturevalue(name))


# ---------------------------------------------------------------- S3

@pytest.fixture(scope="session")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[services.S3Server]:
    with services.seaweedfs(tmp_path_factory.mktemp("seaweedfs")) as server:
        yield server


@pytest.fixture
def s3_storage(s3: services.S3Server, request: pytest.FixtureRequest) -> StorageSettings:
    from pydantic import SecretStr

    prefix = "t-" + os.urandom(6).hex()
    return StorageSettings(
        url=f"s3://{s3.bucket}/{prefix}", s3_endpoint_url=s3.endpoint_url,
        s3_access_key_id=SecretStr(s3.access_key), s3_secret_access_key=SecretStr(s3.secret_key))


@pytest.fixture
def local_storage(tmp_path: Path) -> StorageSettings:
    return StorageSettings(url=(tmp_path / "objects").as_uri())


# ---------------------------------------------------------------- tiny models

@pytest.fixture(scope="session")
def tiny_model_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model root holding ``tiny-t2v`` and ``tiny-ti2v`` (the registry's model_dir names)."""
    from vidmaas.runtime.tiny import make_tiny

    root = tmp_path_factory.mktemp("models")
    make_tiny(root / "tiny-t2v", "t2v")
    make_tiny(root / "tiny-ti2v", "ti2v")
    return root


@pytest.fixture
def embedded_data_dir(tmp_path: Path, tiny_model_root: Path) -> Path:
    """A `vidmaas up` data directory whose tiny models are already made (generating them
    is tested by the runtime's own tests; here it would only cost time)."""
    d = tmp_path / "vidmaas-data"
    shutil.copytree(tiny_model_root, d / "models")
    return d
