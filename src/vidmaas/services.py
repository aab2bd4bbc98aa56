"""The connections a role holds: database, Redis, object store, model registry.

Guarantees: ``Services.open(settings)`` makes every client from the settings passed
in (nothing global), and ``close()`` releases all of them; roles sharing a process
(``vidmaas up``) share one ``Services``. Opening connects lazily: a backing service
that is down makes requests fail (and ``/readyz`` say so), not the process crash.
"""

from __future__ import annotations

from dataclasses import dataclass

import redis.asyncio as aioredis

from vidmaas.bus.client import connect
from vidmaas.config import Settings
from vidmaas.db.engine import Engine, Sessions, make_engine, make_sessionmaker
from vidmaas.domain.models import ModelRegistry
from vidmaas.lifecycle import Lifecycle
from vidmaas.storage import ObjectStore, store_from_settings


@dataclass
class Services:
    settings: Settings
    engine: Engine
    sessions: Sessions
    redis: aioredis.Redis
    store: ObjectStore
    registry: ModelRegistry
    lifecycle: Lifecycle

    @classmethod
    def open(cls, settings: Settings) -> Services:
        engine = make_engine(settings.database)
        sessions = make_sessionmaker(engine)
        redis = connect(settings.redis.url)
        return cls(settings=settings, engine=engine, sessions=sessions, redis=redis,
                   store=store_from_settings(settings.storage),
                   registry=ModelRegistry.load(settings.models_path),
                   lifecycle=Lifecycle(sessions=sessions, redis=redis, settings=settings))

    async def close(self) -> None:
        await self.redis.aclose()
        await self.engine.dispose()
