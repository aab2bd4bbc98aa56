"""Fixtures of the relay tests: a ``World`` over real Redis and SQLite/PostgreSQL."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.relay.support import World, make_settings, services
from vidmaas.config import StorageSettings


@pytest.fixture
async def world(db_url: str, redis_url: str, local_storage: StorageSettings,
                ) -> AsyncIterator[World]:
    async with services(make_settings(db_url=db_url, redis_url=redis_url,
                                      storage=local_storage)) as w:
        yield w
