"""A live API server per test (real Redis, SQLite, a local object store)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.client.live import LiveServer, live_server
from vidmaas.config import StorageSettings


@pytest.fixture
async def live(sqlite_url: str, redis_url: str, local_storage: StorageSettings,
               ) -> AsyncIterator[LiveServer]:
    async with live_server(db_url=sqlite_url, redis_url=redis_url,
                           storage=local_storage) as server:
        yield server
