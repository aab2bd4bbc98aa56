"""Usage recorded by transition() itself, and quota-bounded creates, on both databases."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta

import pytest
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from vidmaas.db import tasks as repo
from vidmaas.db import usage, users
from vidmaas.db.engine import make_engine, make_sessionmaker
from vidmaas.db.models import Task, User, utcnow
from vidmaas.domain.ids import new_task_id
from vidmaas.domain.quotas import day_start
from vidmaas.domain.status import TaskStatus
from vidmaas.errors import RateLimited, StaleTransition

PARAMS = {"size": "64*64", "width": 64, "height": 64, "num_frames": 9, "steps": 2, "seed": 1,
          "fps": 8}
S = TaskStatus


@pytest.fixture
async def sessions(db_url: str) -> AsyncIterator[async_sessionmaker[AsyncSession]]:
    engine = make_engine(db_url)
    yield make_sessionmaker(engine)
    await engine.dispose()


async def _user(sessions: async_sessionmaker[AsyncSession], name: str = "alice") -> str:
    async with sessions() as s:
        return (await users.create_user(session=s, name=name)).id


async def _task(sessions: async_sessionmaker[AsyncSession], user_id: str, *, gpus: int = 2,
                model: str = "m1") -> str:
    async with sessions() as s:
        task, _ = await repo.create_task(session=s, new=repo.NewTask(
            id=new_task_id(), user_id=user_id, model=model, prompt="p", params=PARAMS,
            gpus=gpus))
    return task.id


async def _move(sessions: async_sessionmaker[AsyncSession], task_id: str, to: TaskStatus,
                expected: TaskStatus | tuple[TaskStatus, ...], **fields: object) -> Task:
    if "started_at" in fields:  # as if dispatched just before it started
        fields["dispatched_at"] = fields["started_at"]
    async with sessions() as s:
        return await repo.transition(session=s, task_id=task_id, to=to, expected=expected,
                                     fields=dict(fields) or None)


async def _rows(sessions: async_sessionmaker[AsyncSession], user_id: str,
                ) -> list[usage.UsageRow]:
    today = day_start(utcnow())
    async with sessions() as s:
        return await usage.usage_rows(s, user_id=user_id, since=today, until=today)


async def test_a_finished_task_is_charged_its_running_gpu_seconds_and_counted_once(
        sessions: async_sessionmaker[AsyncSession]) -> None:
    alice = await _user(sessions)
    tid = await _task(sessions, alice)
    dispatched = await _move(sessions, tid, S.DISPATCHING, S.QUEUED,
                             attempts=Task.attempts + 1)
    assert dispatched.queue_wait_s is not None and dispatched.dispatched_at is not None
    assert dispatched.queue_wait_s == pytest.approx(
        (dispatched.dispatched_at - dispatched.created_at).total_seconds(), abs=0.05)
    # Running for 30 s on 2 GPUs: 60 GPU-seconds.
    await _move(sessions, tid, S.RUNNING, S.DISPATCHING, started_at=utcnow() - timedelta(
        seconds=30))
    done = await _move(sessions, tid, S.COMPLETED, S.RUNNING)
    assert done.gpu_seconds == pytest.approx(60.0, abs=0.5)
    [row] = await _rows(sessions, alice)
    assert (row.model, row.tasks) == ("m1", 1)
    assert row.gpu_seconds == pytest.approx(done.gpu_seconds)
    assert row.queue_wait_s == pytest.approx(dispatched.queue_wait_s)


async def test_retried_attempts_add_up_and_the_queue_wait_is_the_first_dispatchs(
        sessions: async_sessionmaker[AsyncSession]) -> None:
    alice = await _user(sessions)
    tid = await _task(sessions, alice, gpus=1)
    first = await _move(sessions, tid, S.DISPATCHING, S.QUEUED, attempts=Task.attempts + 1)
    await _move(sessions, tid, S.RUNNING, S.DISPATCHING,
                started_at=utcnow() - timedelta(seconds=10))
    retried = await _move(sessions, tid, S.QUEUED, (S.DISPATCHING, S.RUNNING))
    assert retried.gpu_seconds == pytest.approx(10.0, abs=0.5)
    [row] = await _rows(sessions, alice)
    assert row.tasks == 0  # not finished yet
    second = await _move(sessions, tid, S.DISPATCHING, S.QUEUED, attempts=Task.attempts + 1)
    assert second.queue_wait_s == first.queue_wait_s
    # Cancelled before the second attempt started: the first attempt's start stamp must
    # not be charged again.
    await _move(sessions, tid, S.CANCELLING, S.DISPATCHING)
    cancelled = await _move(sessions, tid, S.CANCELLED, S.CANCELLING)
    assert cancelled.gpu_seconds == pytest.approx(retried.gpu_seconds)
    [row] = await _rows(sessions, alice)
    assert row.tasks == 1
    assert row.gpu_seconds == pytest.approx(retried.gpu_seconds)
    assert row.queue_wait_s == pytest.approx(first.queue_wait_s)


async def test_a_task_cancelled_while_queued_records_no_usage(
        sessions: async_sessionmaker[AsyncSession]) -> None:
    alice = await _user(sessions)
    tid = await _task(sessions, alice)
    cancelled = await _move(sessions, tid, S.CANCELLED, S.QUEUED)
    assert cancelled.gpu_seconds is None and cancelled.queue_wait_s is None
    assert await _rows(sessions, alice) == []


async def test_of_many_concurrent_finishes_one_wins_and_usage_is_charged_once(
        sessions: async_sessionmaker[AsyncSession]) -> None:
    alice = await _user(sessions)
    tid = await _task(sessions, alice, gpus=4)
    await _move(sessions, tid, S.DISPATCHING, S.QUEUED, attempts=Task.attempts + 1)
    await _move(sessions, tid, S.RUNNING, S.DISPATCHING,
                started_at=utcnow() - timedelta(seconds=5))

    async def finish(to: TaskStatus) -> bool:
        try:
            await _move(sessions, tid, to, (S.RUNNING, S.CANCELLING))
        except StaleTransition:
            return False
        return True

    won = await asyncio.gather(*(finish(S.COMPLETED if i % 2 else S.FAILED)
                                 for i in range(8)))
    assert sum(won) == 1
    [row] = await _rows(sessions, alice)
    assert row.tasks == 1
    assert row.gpu_seconds == pytest.approx(20.0, abs=1.0)


async def test_concurrent_creates_never_exceed_the_queued_quota(
        sessions: async_sessionmaker[AsyncSession]) -> None:
    alice = await _user(sessions)
    bob = await _user(sessions, "bob")
    limit = 3

    async def create(user_id: str) -> bool:
        async with sessions() as s:
            found = await usage.standing(s, user_id=user_id, now=utcnow())
            assert found is not None
            try:
                await repo.create_task(session=s, new=repo.NewTask(
                    id=new_task_id(), user_id=user_id, model="m", prompt="p", params=PARAMS,
                    gpus=1, priority="high"), queued_limit=limit)
            except RateLimited as e:
                assert e.code == "too_many_queued" and e.retry_after_s > 0
                return False
            return True

    made = await asyncio.gather(*(create(alice) for _ in range(12)), create(bob))
    assert sum(made[:-1]) == limit and made[-1]
    async with sessions() as s:
        now = await usage.usage_now(s, user_id=alice, now=utcnow())
        mine = await repo.list_tasks(session=s, user_id=alice, limit=50)
    assert now.queued_tasks == limit
    assert {t.priority for t in mine} == {"high"}


async def test_standing_reads_the_users_terms_and_their_usage_in_one_go(
        sessions: async_sessionmaker[AsyncSession]) -> None:
    alice = await _user(sessions)
    async with sessions() as s:
        user = await s.get(User, alice)
        assert user is not None
        user.weight, user.max_priority, user.quota_gpu_seconds_day = 2.5, "high", 900.0
        await s.commit()
    await _task(sessions, alice)
    async with sessions() as s:
        found = await usage.standing(s, user_id=alice, now=utcnow())
        missing = await usage.standing(s, user_id="u-nobody", now=utcnow())
    assert found is not None and missing is None
    assert (found.weight, found.max_priority, found.quota_gpu_seconds_day) == (2.5, "high", 900.0)
    assert found.quota_queued_tasks is None and found.quota_gpus_at_once is None
    assert found.usage.queued_tasks == 1 and found.usage.gpu_seconds_day == 0.0
