"""The create path's quota and priority check (api.quota) and Lifecycle.enqueue's priority
and share, on both databases and a real Redis."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest
import redis.asyncio as aioredis
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from vidmaas.api import quota
from vidmaas.bus import keys
from vidmaas.config import DatabaseSettings, RedisSettings, Settings
from vidmaas.db import tasks as repo
from vidmaas.db import users
from vidmaas.db.engine import make_engine, make_sessionmaker
from vidmaas.db.models import UsageDaily
from vidmaas.domain.fairness import Priority, Share
from vidmaas.domain.ids import new_task_id
from vidmaas.errors import InvalidRequest, RateLimited
from vidmaas.lifecycle import Lifecycle

PARAMS = {"size": "64*64", "width": 64, "height": 64, "num_frames": 9, "steps": 2, "seed": 1,
          "fps": 8}
NOW = datetime(2026, 12, 15, 18, 0, tzinfo=UTC)


@pytest.fixture
async def sessions(db_url: str) -> AsyncIterator[async_sessionmaker[AsyncSession]]:
    engine = make_engine(db_url)
    yield make_sessionmaker(engine)
    await engine.dispose()


async def _user(sessions: async_sessionmaker[AsyncSession], name: str, **quotas: object,
                ) -> str:
    async with sessions() as s:
        return (await users.create_user(session=s, name=name,
                                        quotas=quotas)).id  # type: ignore[arg-type]


async def _used(sessions: async_sessionmaker[AsyncSession], user_id: str, *, day: datetime,
                gpu_seconds: float) -> None:
    async with sessions() as s:
        s.add(UsageDaily(user_id=user_id, day=day.date(), model="m", tasks=1,
                         gpu_seconds=gpu_seconds, queue_wait_s=0.0))
        await s.commit()


async def _admit(sessions: async_sessionmaker[AsyncSession], settings: Settings, user_id: str,
                 priority: str | None = None, now: datetime = NOW) -> quota.Admission:
    async with sessions() as s:
        return await quota.admit(s, settings=settings, user_id=user_id, priority=priority,
                                 now=now)


async def test_gpu_second_quotas_refuse_with_the_quota_and_its_reset(
        sessions: async_sessionmaker[AsyncSession]) -> None:
    settings = Settings()
    settings.quotas.gpu_seconds_month = 1000.0
    alice = await _user(sessions, "alice", quota_gpu_seconds_day=100.0)
    await _used(sessions, alice, day=NOW, gpu_seconds=60.0)
    ok = await _admit(sessions, settings, alice)
    assert ok.priority is Priority.NORMAL and ok.share == Share(1.0, 0)
    assert ok.queued_limit == settings.api.max_queued_per_user
    await _used(sessions, alice, day=NOW - timedelta(days=1), gpu_seconds=500.0)
    async with sessions() as s:  # today: 60 → 120, over the day's 100
        await s.merge(UsageDaily(user_id=alice, day=NOW.date(), model="m", tasks=2,
                                 gpu_seconds=120.0, queue_wait_s=0.0))
        await s.commit()
    with pytest.raises(RateLimited) as e:
        await _admit(sessions, settings, alice)
    assert (e.value.code, e.value.field) == ("quota_exceeded", "gpu_seconds_day")
    assert e.value.retry_after_s == 6 * 3600 + 1  # until 00:00 UTC
    # The next day only the month's 1000 applies: 620 used, then 1020.
    tomorrow = NOW + timedelta(days=1)
    assert (await _admit(sessions, settings, alice, now=tomorrow)).queued_limit
    await _used(sessions, alice, day=NOW - timedelta(days=5), gpu_seconds=400.0)
    with pytest.raises(RateLimited) as e:
        await _admit(sessions, settings, alice, now=tomorrow)
    assert (e.value.code, e.value.field) == ("quota_exceeded", "gpu_seconds_month")
    first_of_next = datetime(2027, 1, 1, tzinfo=UTC)
    assert e.value.retry_after_s == int((first_of_next - tomorrow).total_seconds()) + 1


async def test_a_user_may_ask_up_to_their_maximum_priority(
        sessions: async_sessionmaker[AsyncSession]) -> None:
    settings = Settings()
    alice = await _user(sessions, "alice")
    assert (await _admit(sessions, settings, alice, "low")).priority is Priority.LOW
    with pytest.raises(InvalidRequest) as e:
        await _admit(sessions, settings, alice, "high")
    assert (e.value.code, e.value.field) == ("priority_not_allowed", "priority")
    async with sessions() as s:
        await users.update_user(session=s, user_id=alice, changes={"max_priority": "high",
                                                                   "weight": 3.0},
                                defaults=settings.quotas)
    got = await _admit(sessions, settings, alice, "high")
    assert got.priority is Priority.HIGH and got.share.weight == 3.0


async def test_concurrent_creates_through_the_check_never_exceed_the_users_queued_quota(
        sessions: async_sessionmaker[AsyncSession]) -> None:
    settings = Settings()
    alice = await _user(sessions, "alice", quota_queued_tasks=2)

    async def create() -> str:
        async with sessions() as s:
            try:
                adm = await quota.admit(s, settings=settings, user_id=alice, priority=None)
                await repo.create_task(session=s, new=repo.NewTask(
                    id=new_task_id(), user_id=alice, model="m", prompt="p", params=PARAMS,
                    gpus=1, priority=adm.priority.value), queued_limit=adm.queued_limit)
            except RateLimited as e:
                assert e.field == "queued_tasks" and e.retry_after_s == 30
                return e.code
            return "created"

    outcomes = await asyncio.gather(*(create() for _ in range(10)))
    assert outcomes.count("created") == 2
    assert set(outcomes) == {"created", "too_many_queued"}


async def test_enqueue_puts_a_task_in_its_priority_class_and_refreshes_the_share(
        db_url: str, redis_url: str, redis: aioredis.Redis) -> None:
    settings = Settings(database=DatabaseSettings(url=db_url), redis=RedisSettings(url=redis_url))
    engine = make_engine(db_url)
    sessions = make_sessionmaker(engine)
    lc = Lifecycle(sessions=sessions, redis=redis, settings=settings)
    try:
        alice = await _user(sessions, "alice")
        made = []
        async with sessions() as s:
            for priority in ("normal", "low", "high"):
                task, _ = await repo.create_task(session=s, new=repo.NewTask(
                    id=new_task_id(), user_id=alice, model="m", prompt=priority,
                    params=PARAMS, gpus=1, priority=priority))
                made.append(task)
        for task in made:
            await lc.admit_new(task, share=Share(weight=2.0, gpu_cap=1))
        order = await lc.queue.order(limit=10)
        assert [c.task_id for c in order] == [made[2].id, made[0].id, made[1].id]
        assert await redis.hget(keys.USER_SHARES, alice) == Share(2.0, 1).encode()
    finally:
        await engine.dispose()
