"""The watchdog and the reconciler, each behaviour on its own (sweeps called directly)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest
import redis.asyncio as aioredis

from tests.dispatcher.dispatch_support import World, database, eventually, make_settings, running
from vidmaas.bus import control, keys
from vidmaas.bus.queue import TaskQueue
from vidmaas.db import tasks as repo
from vidmaas.dispatcher.executors.fake import FakeExecutor, FakeOutcome
from vidmaas.domain.ids import job_name, new_task_id
from vidmaas.domain.jobs import JobSpec
from vidmaas.domain.status import TaskStatus


def _hanging(**kwargs: object) -> FakeExecutor:
    return FakeExecutor(outcome=lambda _spec: FakeOutcome(hang=True), **kwargs)  # type: ignore[arg-type]


async def test_a_running_task_without_heartbeats_is_stopped_and_retried(
        db_url: str, redis: aioredis.Redis, redis_url: str) -> None:
    settings = make_settings(db_url=db_url, redis_url=redis_url, heartbeat_timeout_s=0.2,
                             retry_backoff_s=30)
    executor = _hanging()
    async with database(db_url) as sessions:
        world = World(settings=settings, sessions=sessions, redis=redis)
        task = await world.submit("alice")
        d = world.dispatcher(executor)
        assert await d.admit() == 1
        await d.watchdog()
        assert (await world.get(task.id)).status == "running"  # not silent for long yet
        await asyncio.sleep(0.3)
        await d.watchdog()
        final = await world.get(task.id)
    await executor.close()
    assert (final.status, final.error_code) == ("queued", "heartbeat_lost")
    assert executor.cancels == [job_name(task.id)]
    assert await TaskQueue(redis).is_delayed(task.id)
    assert await TaskQueue(redis).gpus_in_use() == 0


async def test_heartbeats_keep_a_running_task_alive(
        sqlite_url: str, redis: aioredis.Redis, redis_url: str) -> None:
    settings = make_settings(db_url=sqlite_url, redis_url=redis_url, heartbeat_timeout_s=0.3)
    executor = _hanging()
    async with database(sqlite_url) as sessions:
        world = World(settings=settings, sessions=sessions, redis=redis)
        task = await world.submit("alice")
        d = world.dispatcher(executor)
        await d.admit()
        for _ in range(4):
            await asyncio.sleep(0.1)
            async with sessions() as s:
                await repo.update_progress(session=s, task_id=task.id,
                                           values={"last_heartbeat_at": datetime.now(UTC)})
            await d.watchdog()
        assert (await world.get(task.id)).status == "running"
    await executor.close()


async def test_a_task_past_its_deadline_is_stopped_and_failed_without_retry(
        sqlite_url: str, redis: aioredis.Redis, redis_url: str) -> None:
    settings = make_settings(db_url=sqlite_url, redis_url=redis_url, task_deadline_s=0.2)
    executor = _hanging()
    async with database(sqlite_url) as sessions:
        world = World(settings=settings, sessions=sessions, redis=redis)
        task = await world.submit("alice")
        d = world.dispatcher(executor)
        await d.admit()
        await asyncio.sleep(0.3)
        await d.watchdog()
        final = await world.get(task.id)
    await executor.close()
    assert (final.status, final.error_code, final.attempts) == ("failed", "deadline_exceeded", 1)
    assert executor.cancels == [job_name(task.id)]


async def test_a_task_dispatching_too_long_is_resolved_by_asking_the_executor(
        db_url: str, redis: aioredis.Redis, redis_url: str) -> None:
    settings = make_settings(db_url=db_url, redis_url=redis_url, dispatching_timeout_s=0,
                             retry_backoff_s=30)
    executor = _hanging()
    async with database(db_url) as sessions:
        world = World(settings=settings, sessions=sessions, redis=redis)
        no_job = await world.submit("alice", enqueue=False)
        has_job = await world.submit("bob", enqueue=False)
        d = world.dispatcher(executor)
        for t in (no_job, has_job):
            await world.lifecycle.transition(
                task_id=t.id, to=TaskStatus.DISPATCHING, expected=TaskStatus.QUEUED,
                fields={"attempts": 1, "job_name": job_name(t.id), "executor": "fake"})
        await executor.launch(d.job_spec(await world.get(has_job.id), 1))
        await asyncio.sleep(0.01)
        await d.watchdog()
        a, b = await world.get(no_job.id), await world.get(has_job.id)
    await executor.close()
    assert (a.status, a.error_code) == ("queued", "dispatch_timeout")
    assert b.status == "running"


async def test_the_reconciler_enqueues_a_queued_task_missing_from_the_queue(
        db_url: str, redis: aioredis.Redis, redis_url: str) -> None:
    settings = make_settings(db_url=db_url, redis_url=redis_url, requeue_grace_s=0.0)
    executor = FakeExecutor()
    async with database(db_url) as sessions:
        world = World(settings=settings, sessions=sessions, redis=redis)
        lost = await world.submit("alice", enqueue=False)  # the api's enqueue failed
        d = world.dispatcher(executor)
        await d.reconcile()
        assert await TaskQueue(redis).is_queued(user_id=lost.user_id, task_id=lost.id)
        await d.reconcile()
        assert (await TaskQueue(redis).depths()) == {lost.user_id: 1}
    await executor.close()


async def test_an_expired_claim_of_a_queued_task_goes_back_to_the_front_of_the_queue(
        db_url: str, redis: aioredis.Redis, redis_url: str) -> None:
    settings = make_settings(db_url=db_url, redis_url=redis_url, capacity=4)
    executor = FakeExecutor()
    q = TaskQueue(redis)
    async with database(db_url) as sessions:
        world = World(settings=settings, sessions=sessions, redis=redis)
        first = await world.submit("alice")
        second = await world.submit("alice")
        res = await q.claim_next(dispatcher_id="crashed", capacity=4, per_user_cap=2,
                                 lease_s=0.01)
        assert res.claim is not None and res.claim.task_id == first.id
        await asyncio.sleep(0.05)
        await world.dispatcher(executor).reconcile()
        assert (await world.get(first.id)).status == "queued"
    await executor.close()
    assert not await q.is_claimed(first.id)
    assert await q.gpus_in_use() == 0
    assert await q.position(user_id=first.user_id, task_id=first.id) == 1
    assert await q.position(user_id=second.user_id, task_id=second.id) == 2


@pytest.mark.parametrize("launched_before_crash", [False, True])
async def test_an_expired_claim_of_a_dispatching_task_launches_its_job_once_and_runs_it(
        launched_before_crash: bool, db_url: str, redis: aioredis.Redis,
        redis_url: str) -> None:
    settings = make_settings(db_url=db_url, redis_url=redis_url)
    executor = _hanging()
    q = TaskQueue(redis)
    async with database(db_url) as sessions:
        world = World(settings=settings, sessions=sessions, redis=redis)
        task = await world.submit("alice")
        await q.claim_next(dispatcher_id="crashed", capacity=1, per_user_cap=2, lease_s=0.01)
        d = world.dispatcher(executor)
        await world.lifecycle.transition(
            task_id=task.id, to=TaskStatus.DISPATCHING, expected=TaskStatus.QUEUED,
            fields={"attempts": 1, "job_name": job_name(task.id), "executor": "fake"})
        if launched_before_crash:
            await executor.launch(d.job_spec(await world.get(task.id), 1))
        await asyncio.sleep(0.05)
        await d.reconcile()
        final = await world.get(task.id)
    await executor.close()
    assert final.status == "running" and final.attempts == 1
    assert [(name, attempt) for name, attempt, _ in executor.launches] == \
        [(job_name(task.id), 1)]
    assert not await q.is_claimed(task.id)
    assert await q.leases() == {task.id: 1}


async def test_capacity_held_by_a_task_that_is_no_longer_active_is_released(
        db_url: str, redis: aioredis.Redis, redis_url: str) -> None:
    settings = make_settings(db_url=db_url, redis_url=redis_url, lease_grace_s=0.0)
    executor = FakeExecutor()
    q = TaskQueue(redis)
    async with database(db_url) as sessions:
        world = World(settings=settings, sessions=sessions, redis=redis)
        task = await world.submit("alice")
        await q.claim_next(dispatcher_id="d", capacity=1, per_user_cap=2, lease_s=60)
        await q.ack(task.id)  # as if it ran, and its release got lost when it ended
        await world.lifecycle.transition(task_id=task.id, to=TaskStatus.FAILED,
                                         expected=TaskStatus.QUEUED)
        assert await q.gpus_in_use() == 1
        await world.dispatcher(executor).reconcile()
    await executor.close()
    assert await q.gpus_in_use() == 0
    assert await q.user_running() == {}


async def test_a_running_task_whose_job_vanished_is_retried(
        db_url: str, redis: aioredis.Redis, redis_url: str) -> None:
    settings = make_settings(db_url=db_url, redis_url=redis_url, retry_backoff_s=30)
    executor = _hanging()
    async with database(db_url) as sessions:
        world = World(settings=settings, sessions=sessions, redis=redis)
        task = await world.submit("alice")
        d = world.dispatcher(executor)
        await d.admit()
        executor.vanish(job_name(task.id))
        await d.reconcile()
        final = await world.get(task.id)
    await executor.close()
    assert (final.status, final.error_code) == ("queued", "job_vanished")
    assert await TaskQueue(redis).gpus_in_use() == 0


@pytest.mark.parametrize("delete", [False, True])
async def test_jobs_of_no_active_task_are_reported_and_deleted_when_configured(
        delete: bool, sqlite_url: str, redis: aioredis.Redis, redis_url: str) -> None:
    settings = make_settings(db_url=sqlite_url, redis_url=redis_url, delete_unknown_jobs=delete)
    executor = _hanging()
    async with database(sqlite_url) as sessions:
        world = World(settings=settings, sessions=sessions, redis=redis)
        d = world.dispatcher(executor)
        stray = new_task_id()
        await executor.launch(JobSpec(task_id=stray, job_name=job_name(stray), user_id="nobody",
                                      model=d.registry["tiny-t2v"], prompt="stray", params={},
                                      attempt=1))
        await d.reconcile()
    await executor.close()
    assert (executor.cancels == [job_name(stray)]) is delete



async def test_a_job_the_executor_reports_stuck_is_stopped_and_its_task_retried(
        sqlite_url: str, redis: aioredis.Redis, redis_url: str) -> None:
    settings = make_settings(db_url=sqlite_url, redis_url=redis_url, retry_backoff_s=30)
    executor = FakeExecutor(outcome=lambda _spec: FakeOutcome(stuck=True))
    async with database(sqlite_url) as sessions:
        world = World(settings=settings, sessions=sessions, redis=redis)
        task = await world.submit("alice")
        async with running(world.dispatcher(executor)):
            await eventually(lambda: _status_is(world, task.id, "queued", "job_stuck"))
    await executor.close()
    assert executor.cancels == [job_name(task.id)]
    assert await TaskQueue(redis).gpus_in_use() == 0


async def _status_is(world: World, task_id: str, status: str, code: str) -> bool:
    task = await world.get(task_id)
    return (task.status, task.error_code) == (status, code)


async def test_the_reconciler_gives_a_cancelling_task_whose_flag_redis_lost_its_flag_back(
        db_url: str, redis: aioredis.Redis, redis_url: str) -> None:
    settings = make_settings(db_url=db_url, redis_url=redis_url)
    executor = _hanging()
    async with database(db_url) as sessions:
        world = World(settings=settings, sessions=sessions, redis=redis)
        task = await world.submit("alice")
        d = world.dispatcher(executor)
        await d.admit()
        await world.lifecycle.cancel(await world.get(task.id), by="alice")
        await redis.delete(keys.cancel_flag(task.id))  # lost with Redis's last second
        await d.reconcile()
        assert (await world.get(task.id)).status == "cancelling"
    await executor.close()
    assert await control.cancel_requested(redis, task.id) == "recovery"


async def test_after_redis_lost_everything_leases_come_back_before_anything_is_admitted(
        db_url: str, redis: aioredis.Redis, redis_url: str) -> None:
    settings = make_settings(db_url=db_url, redis_url=redis_url, capacity=1,
                             requeue_grace_s=0.0)
    executor = _hanging()
    q = TaskQueue(redis)
    async with database(db_url) as sessions:
        world = World(settings=settings, sessions=sessions, redis=redis)
        first = await world.submit("alice")
        d = world.dispatcher(executor)
        assert await d.admit() == 1
        await redis.flushdb()
        second = await world.submit("bob")  # enqueued into the empty Redis
        assert await d.admit() == 0  # the one GPU is still the first task's
        assert await q.leases() == {first.id: 1}
        await d.reconcile()
        assert await d.admit() == 0
        assert (await world.get(second.id)).status == "queued"
    await executor.close()
    assert [name for name, _a, _t in executor.launches] == [job_name(first.id)]
