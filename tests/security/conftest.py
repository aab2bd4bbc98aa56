"""Fixtures for the security tests: a live API over SQLite, real Redis and a local store."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.api.conftest import api_settings
from tests.security.live import LiveApi, live_api
from vidmaas.config import Settings, StorageSettings


@pytest.fixture
def live_settings(sqlite_url: str, redis_url: str, local_storage: StorageSettings) -> Settings:
    return api_settings(db_url=sqlite_url, redis_url=redis_url, storage=local_storage)


@pytest.fixture
async def live(live_settings: Settings) -> AsyncIterator[LiveApi]:
    with live_api(live_settings) as api:
        yield api
