"""API keys: remembered briefly once they authenticate; revocation takes effect."""

from __future__ import annotations

import asyncio

from tests.api.conftest import api_settings, start_api
from vidmaas.config import StorageSettings
from vidmaas.db import users
from vidmaas.db.engine import make_engine, make_sessionmaker


async def _revoke(db_url: str, name: str) -> None:
    engine = make_engine(db_url)
    try:
        async with make_sessionmaker(engine)() as s:
            user = await users.get_user_by_name(session=s, name=name)
            assert user is not None
            assert await users.revoke_keys(session=s, user_id=user.id) == 1
    finally:
        await engine.dispose()


async def test_a_revoked_key_stops_working_within_the_cache_time(
        sqlite_url: str, redis_url: str, local_storage: StorageSettings) -> None:
    settings = api_settings(db_url=sqlite_url, redis_url=redis_url, storage=local_storage)
    settings.api.key_cache_ttl_s = 0.5
    async for api in start_api(settings, sqlite_url):
        assert (await api.client.get("/v1/me", headers=api.auth("alice"))).status_code == 200
        await _revoke(sqlite_url, "alice")
        await asyncio.sleep(0.6)
        r = await api.client.get("/v1/me", headers=api.auth("alice"))
        assert r.status_code == 401
        assert (await api.client.get("/v1/me", headers=api.auth("bob"))).status_code == 200


async def test_without_a_cache_revocation_is_immediate_and_unknown_keys_are_never_cached(
        sqlite_url: str, redis_url: str, local_storage: StorageSettings) -> None:
    settings = api_settings(db_url=sqlite_url, redis_url=redis_url, storage=local_storage)
    settings.api.key_cache_ttl_s = 0
    async for api in start_api(settings, sqlite_url):
        assert (await api.client.get("/v1/me", headers=api.auth("alice"))).status_code == 200
        await _revoke(sqlite_url, "alice")
        assert (await api.client.get("/v1/me", headers=api.auth("alice"))).status_code == 401
        bad = {"Authorization": "Bearer vmk_unknown"}
        for _ in range(3):
            assert (await api.client.get("/v1/me", headers=bad)).status_code == 401
