"""An API under test over real services, and users with keys."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
import pytest
from fastapi import FastAPI

from vidmaas.api.app import create_app
from vidmaas.config import DatabaseSettings, RedisSettings, Settings, StorageSettings
from vidmaas.db import users
from vidmaas.db.engine import make_engine, make_sessionmaker


@dataclass
class Api:
    app: FastAPI
    settings: Settings
    client: httpx.AsyncClient
    keys: dict[str, str]

    def auth(self, user: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[user]}"}


async def make_users(db_url: str) -> dict[str, str]:
    engine = make_engine(db_url)
    keys = {}
    try:
        async with make_sessionmaker(engine)() as s:
            for name, admin in (("alice", False), ("bob", False), ("root", True)):
                u = await users.create_user(session=s, name=name, is_admin=admin)
                keys[name] = await users.create_key(session=s, user_id=u.id)
    finally:
        await engine.dispose()
    return keys


def api_settings(*, db_url: str, redis_url: str, storage: StorageSettings, **extra: object,
                 ) -> Settings:
    return Settings(database=DatabaseSettings(url=db_url), redis=RedisSettings(url=redis_url),
                    storage=storage, default_model="tiny-t2v", **extra)  # type: ignore[arg-type]


@pytest.fixture(params=["local", "s3"])
def storage(request: pytest.FixtureRequest) -> StorageSettings:
    name = "local_storage" if request.param == "local" else "s3_storage"
    return request.getfixturevalue(name)  # type: ignore[no-any-return]


async def start_api(settings: Settings, db_url: str) -> AsyncIterator[Api]:
    keys = await make_users(db_url)
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        await app.state.services.store.ensure_ready()
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield Api(app=app, settings=settings, client=client, keys=keys)


@pytest.fixture
async def api(db_url: str, redis_url: str, local_storage: StorageSettings) -> AsyncIterator[Api]:
    """The API on SQLite and PostgreSQL, a local object store."""
    async for a in start_api(api_settings(db_url=db_url, redis_url=redis_url,
                                          storage=local_storage), db_url):
        yield a


@pytest.fixture
async def api_any_store(sqlite_url: str, redis_url: str, storage: StorageSettings,
                        ) -> AsyncIterator[Api]:
    """The API over a local directory and over real S3."""
    async for a in start_api(api_settings(db_url=sqlite_url, redis_url=redis_url,
                                          storage=storage), sqlite_url):
        yield a
