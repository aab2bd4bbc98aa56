"""Warm pools end to end: the dispatcher, the relay, the local executor and a worker double
that speaks the pool protocol, over real Redis and a real database."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from tests.dispatcher import pool_double
from tests.dispatcher.dispatch_support import World, database, eventually, make_settings
from vidmaas.bus import keys
from vidmaas.bus.client import connect_sync
from vidmaas.bus.events import parse_entries, publish_fenced_sync
from vidmaas.bus.pools import PoolRegistry, WorkerLink, fence_value
from vidmaas.bus.queue import TaskQueue
from vidmaas.config import PoolModelSettings, PoolSettings, Settings
from vidmaas.db.models import Task
from vidmaas.dispatcher.executors.base import JobState, JobStatus
from vidmaas.dispatcher.executors.local import LocalExecutor
from vidmaas.dispatcher.service import Dispatcher
from vidmaas.domain import events as ev
from vidmaas.domain.events import EventType
from vidmaas.domain.ids import new_worker_id
from vidmaas.domain.status import TaskStatus
from vidmaas.relay.service import Relay

ONE = {"tiny-t2v": PoolModelSettings(max_workers=1, idle_s=60)}


def _settings(tmp_path: Path, *, db_url: str, redis_url: str, capacity: int = 2,
              models: dict[str, PoolModelSettings] | None = None, **pools: Any) -> Settings:
    s = make_settings(db_url=db_url, redis_url=redis_url, capacity=capacity,
                      cancel_grace_s=1.0, cancel_scan_interval_s=0.1, requeue_grace_s=0.5,
                      reconcile_interval_s=0.5)
    s.local.work_root = tmp_path / "jobs"
    s.model_root = tmp_path / "models"
    s.pools = PoolSettings(models=ONE if models is None else models, manage_interval_s=0.1,
                           worker_lease_s=2.0, start_timeout_s=30, stop_grace_s=1.0, **pools)
    return s


def _executor(settings: Settings, tmp_path: Path) -> LocalExecutor:
    return LocalExecutor(settings=settings, program=[sys.executable, pool_double.__file__],
                         extra_env={"TEST_POOL_LOG": str(tmp_path / "pool.log")})


def _log(tmp_path: Path, kind: str) -> list[list[str]]:
    path = tmp_path / "pool.log"
    lines = path.read_text().splitlines() if path.exists() else []
    return [line.split()[1:] for line in lines if line.split()[0] == kind]


@contextlib.asynccontextmanager
async def _system(world: World, executor: LocalExecutor) -> AsyncIterator[Dispatcher]:
    """A dispatcher and a relay over ``world``; workers outlive the block (like pods)."""
    dispatcher = world.dispatcher(executor)
    relay = Relay(world.services(), consumer_name="test-relay")
    tasks = [asyncio.create_task(dispatcher.run(), name="test-dispatcher"),
             asyncio.create_task(relay.run(), name="test-relay")]
    try:
        await asyncio.wait_for(dispatcher.ready.wait(), 10)
        yield dispatcher
    finally:
        dispatcher.stop()
        relay.stop()
        await asyncio.gather(*tasks)
        await executor.close()


async def _stop_workers(executor: LocalExecutor) -> None:
    for wid in await executor.list_workers():
        await executor.stop_worker(wid, grace_s=0)


@pytest.fixture(autouse=True)
async def _no_worker_outlives_its_test(tmp_path: Path) -> AsyncIterator[None]:
    """Workers outlive dispatchers by design; a test must not leave one behind, even
    when it fails before stopping them."""
    yield
    settings = Settings()
    settings.local.work_root = tmp_path / "jobs"
    leftover = LocalExecutor(settings=settings)
    await _stop_workers(leftover)
    await leftover.close()


async def _status(world: World, task_id: str) -> TaskStatus:
    return (await world.get(task_id)).status


async def test_tasks_of_a_pooled_model_run_back_to_back_on_one_warm_worker(
        tmp_path: Path, sqlite_url: str, redis: aioredis.Redis, redis_url: str) -> None:
    settings = _settings(tmp_path, db_url=sqlite_url, redis_url=redis_url)
    executor = _executor(settings, tmp_path)
    async with database(sqlite_url) as sessions:
        world = World(settings=settings, sessions=sessions, redis=redis)
        async with _system(world, executor):
            tasks = [await world.submit("alice", prompt="ok") for _ in range(3)]
            for t in tasks:
                await eventually(lambda t=t: _done(world, t.id), timeout_s=30)
        await _stop_workers(_executor(settings, tmp_path))
    assert len(_log(tmp_path, "start")) == 1
    worker = _log(tmp_path, "start")[0][0]
    assert sorted(_log(tmp_path, "run")) == sorted([worker, t.id, "1"] for t in tasks)
    assert _log(tmp_path, "job") == []


async def _done(world: World, task_id: str) -> bool:
    return (await _status(world, task_id)) is TaskStatus.COMPLETED


async def test_two_pooled_models_get_separate_pools_and_plain_models_keep_their_jobs(
        tmp_path: Path, sqlite_url: str, redis: aioredis.Redis, redis_url: str) -> None:
    settings = _settings(tmp_path, db_url=sqlite_url, redis_url=redis_url, capacity=3,
                         models={"tiny-t2v": PoolModelSettings(max_workers=1),
                                 "tiny-ti2v": PoolModelSettings(max_workers=1)})
    executor = _executor(settings, tmp_path)
    async with database(sqlite_url) as sessions:
        world = World(settings=settings, sessions=sessions, redis=redis)
        async with _system(world, executor):
            tasks = [await world.submit("u", model=m, prompt="ok")
                     for m in ("tiny-t2v", "tiny-ti2v", "tiny-t2v", "tiny-ti2v")]
            plain = await world.submit("u", model="wan2.2-ti2v-5b", gpus=1)
            for t in [*tasks, plain]:
                await eventually(lambda t=t: _done(world, t.id), timeout_s=30)
        await _stop_workers(_executor(settings, tmp_path))
    starts = _log(tmp_path, "start")
    assert len(starts) == 2
    runs = {task: worker for worker, task, _ in _log(tmp_path, "run")}
    assert runs[tasks[0].id] == runs[tasks[2].id] != runs[tasks[1].id] == runs[tasks[3].id]
    assert _log(tmp_path, "job") == [[plain.id, "1"]]


async def test_a_worker_killed_mid_task_is_replaced_and_the_task_completes_on_the_new_one(
        tmp_path: Path, sqlite_url: str, redis: aioredis.Redis, redis_url: str) -> None:
    settings = _settings(tmp_path, db_url=sqlite_url, redis_url=redis_url, capacity=1)
    executor = _executor(settings, tmp_path)
    queue = TaskQueue(redis)
    peak = 0
    sampling = asyncio.Event()
    sampling.set()

    async def watch_capacity() -> None:
        # Stopped by its flag, never cancelled mid-command (a Redis call cut by a
        # cancellation can leave the shared connection pool waiting).
        nonlocal peak
        while sampling.is_set():
            peak = max(peak, await queue.gpus_in_use())
            await asyncio.sleep(0.01)

    async with database(sqlite_url) as sessions:
        world = World(settings=settings, sessions=sessions, redis=redis)
        sampler = asyncio.create_task(watch_capacity(), name="test-capacity-sampler")
        try:
            async with _system(world, executor):
                task = await world.submit("alice", prompt="die-once")
                await eventually(lambda: _done(world, task.id), timeout_s=40)
        finally:
            sampling.clear()
            await sampler
        await _stop_workers(_executor(settings, tmp_path))
        done = await world.get(task.id)
    starts = [w for w, _ in _log(tmp_path, "start")]
    runs = _log(tmp_path, "run")
    assert len(starts) == 2 and runs == [[starts[0], task.id, "1"], [starts[1], task.id, "2"]]
    assert done.attempts == 2 and done.job_name == starts[1]
    assert peak <= 1


async def test_a_cancelled_pooled_task_stops_and_its_worker_takes_the_next_one(
        tmp_path: Path, sqlite_url: str, redis: aioredis.Redis, redis_url: str) -> None:
    settings = _settings(tmp_path, db_url=sqlite_url, redis_url=redis_url)
    executor = _executor(settings, tmp_path)
    async with database(sqlite_url) as sessions:
        world = World(settings=settings, sessions=sessions, redis=redis)
        async with _system(world, executor):
            task = await world.submit("alice", prompt="sleep")
            await eventually(lambda: _is(world, task.id, TaskStatus.RUNNING), timeout_s=30)
            await world.lifecycle.cancel(await world.get(task.id), by="alice")
            await eventually(lambda: _is(world, task.id, TaskStatus.CANCELLED), timeout_s=10)
            after = await world.submit("alice", prompt="ok")
            await eventually(lambda: _done(world, after.id), timeout_s=30)
        await _stop_workers(_executor(settings, tmp_path))
    assert len(_log(tmp_path, "start")) == 1


async def test_a_worker_that_ignores_a_cancel_is_killed_after_the_grace_and_replaced(
        tmp_path: Path, sqlite_url: str, redis: aioredis.Redis, redis_url: str) -> None:
    settings = _settings(tmp_path, db_url=sqlite_url, redis_url=redis_url)
    executor = _executor(settings, tmp_path)
    async with database(sqlite_url) as sessions:
        world = World(settings=settings, sessions=sessions, redis=redis)
        async with _system(world, executor):
            task = await world.submit("alice", prompt="stubborn")
            await eventually(lambda: _is(world, task.id, TaskStatus.RUNNING), timeout_s=30)
            await world.lifecycle.cancel(await world.get(task.id), by="alice")
            await eventually(lambda: _is(world, task.id, TaskStatus.CANCELLED), timeout_s=15)
            after = await world.submit("alice", prompt="ok")
            await eventually(lambda: _done(world, after.id), timeout_s=30)
        await _stop_workers(_executor(settings, tmp_path))
    assert len(_log(tmp_path, "start")) == 2


async def _is(world: World, task_id: str, status: TaskStatus) -> bool:
    return (await _status(world, task_id)) is status


async def test_an_idle_pool_scales_to_zero_and_comes_back_for_the_next_task(
        tmp_path: Path, sqlite_url: str, redis: aioredis.Redis, redis_url: str) -> None:
    settings = _settings(tmp_path, db_url=sqlite_url, redis_url=redis_url,
                         models={"tiny-t2v": PoolModelSettings(max_workers=1, idle_s=0.5)})
    executor = _executor(settings, tmp_path)
    pools, queue = PoolRegistry(redis), TaskQueue(redis)
    async with database(sqlite_url) as sessions:
        world = World(settings=settings, sessions=sessions, redis=redis)
        async with _system(world, executor):
            first = await world.submit("alice", prompt="ok")
            await eventually(lambda: _done(world, first.id), timeout_s=30)

            async def scaled_to_zero() -> bool:
                return not await pools.workers() and not await executor.list_workers() \
                    and await queue.gpus_in_use() == 0

            await eventually(scaled_to_zero, timeout_s=15)
            second = await world.submit("alice", prompt="ok")
            await eventually(lambda: _done(world, second.id), timeout_s=30)
        await _stop_workers(_executor(settings, tmp_path))
    assert len(_log(tmp_path, "start")) == 2


async def test_idle_pool_gpus_go_to_a_waiting_task_of_another_model(
        tmp_path: Path, sqlite_url: str, redis: aioredis.Redis, redis_url: str) -> None:
    settings = _settings(tmp_path, db_url=sqlite_url, redis_url=redis_url, capacity=1)
    executor = _executor(settings, tmp_path)
    async with database(sqlite_url) as sessions:
        world = World(settings=settings, sessions=sessions, redis=redis)
        async with _system(world, executor):
            pooled = await world.submit("alice", prompt="ok")
            await eventually(lambda: _done(world, pooled.id), timeout_s=30)
            plain = await world.submit("bob", model="wan2.2-ti2v-5b", gpus=1)
            await eventually(lambda: _done(world, plain.id), timeout_s=30)
        await _stop_workers(_executor(settings, tmp_path))
    assert _log(tmp_path, "job") == [[plain.id, "1"]]


async def test_workers_outlive_a_dispatcher_restart_and_stay_warm(
        tmp_path: Path, sqlite_url: str, redis: aioredis.Redis, redis_url: str) -> None:
    settings = _settings(tmp_path, db_url=sqlite_url, redis_url=redis_url)
    async with database(sqlite_url) as sessions:
        world = World(settings=settings, sessions=sessions, redis=redis)
        async with _system(world, _executor(settings, tmp_path)):
            first = await world.submit("alice", prompt="ok")
            await eventually(lambda: _done(world, first.id), timeout_s=30)
        async with _system(world, _executor(settings, tmp_path)):
            second = await world.submit("alice", prompt="ok")
            await eventually(lambda: _done(world, second.id), timeout_s=30)
        await _stop_workers(_executor(settings, tmp_path))
    assert len(_log(tmp_path, "start")) == 1


async def test_a_live_worker_registers_again_after_redis_lost_its_data_and_nothing_runs_twice(
        tmp_path: Path, sqlite_url: str, redis: aioredis.Redis, redis_url: str) -> None:
    settings = _settings(tmp_path, db_url=sqlite_url, redis_url=redis_url, capacity=1)
    executor = LocalExecutor(settings=settings, program=[sys.executable, pool_double.__file__],
                             extra_env={"TEST_POOL_LOG": str(tmp_path / "pool.log"),
                                        "TEST_POOL_SLOW_S": "3"})
    pools, queue = PoolRegistry(redis), TaskQueue(redis)
    async with database(sqlite_url) as sessions:
        world = World(settings=settings, sessions=sessions, redis=redis)
        async with _system(world, executor):
            first = await world.submit("alice", prompt="ok")
            await eventually(lambda: _done(world, first.id), timeout_s=30)
            busy = await world.submit("alice", prompt="slow")
            await eventually(lambda: _is(world, busy.id, TaskStatus.RUNNING), timeout_s=10)
            await redis.flushall()  # a restart without persistence: every key is gone

            async def registered_again() -> bool:
                workers = await pools.workers()
                return [(w.state.value, w.task_id) for w in workers] == [("busy", busy.id)] \
                    and await queue.gpus_in_use() == 1

            await eventually(registered_again, timeout_s=15)
            await eventually(lambda: _done(world, busy.id), timeout_s=30)
            after = await world.submit("alice", prompt="ok")
            await eventually(lambda: _done(world, after.id), timeout_s=30)
        await _stop_workers(_executor(settings, tmp_path))
    starts = _log(tmp_path, "start")
    runs = _log(tmp_path, "run")
    assert [r[1:] for r in runs] == [[first.id, "1"], [busy.id, "1"], [after.id, "1"]]
    assert len(starts) == 1 and {r[0] for r in runs} == {starts[0][0]}  # warm all along
    assert (await world.get(busy.id)).attempts == 1


async def _assigned_to_an_in_process_worker(
        world: World, dispatcher: Dispatcher) -> tuple[WorkerLink, Task]:
    """A worker registered and ready (no process: the test plays it), and a task the
    dispatcher assigned to it."""
    worker_id = new_worker_id("tiny-t2v")
    assert await PoolRegistry(world.redis).reserve(worker_id=worker_id, model="tiny-t2v", gpus=1,
                                                   capacity=2, start_lease_s=30)
    link = WorkerLink(connect_sync(world.settings.redis.url), worker_id=worker_id, lease_s=30)
    assert link.ready()
    task = await world.submit("alice", prompt="ok")
    assert await dispatcher.admit() == 1
    a = link.next_assignment(timeout_s=5)
    assert a is not None and (a.task_id, a.attempt) == (task.id, 1)
    assert link.owns(task.id, 1)
    publish_fenced_sync(link._r, ev.started(task.id, world_size=1, host="w"),
                        fence=fence_value(worker_id, 1))
    task = await world.get(task.id)
    assert task.status is TaskStatus.RUNNING
    return link, task


async def _stale_publish_is_refused(world: World, link: WorkerLink, task: Task) -> None:
    """The worker, which does not know it lost the task, reports it done."""
    fence = fence_value(link.worker_id, 1)
    assert publish_fenced_sync(link._r, pool_double._completed(task.id), fence=fence) is None
    assert not link.owns(task.id, 1)
    relay = Relay(world.services(), consumer_name="test-relay")
    running = asyncio.create_task(relay.run(), name="test-relay")
    await asyncio.sleep(1.0)
    relay.stop()
    await running
    row = await world.get(task.id)
    assert (row.status, row.attempts) == (TaskStatus.QUEUED, 1)
    types = [e.type for _, e in parse_entries(
        await world.redis.xrange(keys.task_events(task.id)))]  # type: ignore[arg-type]
    assert EventType.COMPLETED not in types


async def test_a_retired_worker_is_fenced_out_of_its_task_at_once(
        tmp_path: Path, sqlite_url: str, redis: aioredis.Redis, redis_url: str) -> None:
    settings = _settings(tmp_path, db_url=sqlite_url, redis_url=redis_url)
    async with database(sqlite_url) as sessions:
        world = World(settings=settings, sessions=sessions, redis=redis)
        executor = _executor(settings, tmp_path)
        dispatcher = world.dispatcher(executor)
        link, task = await _assigned_to_an_in_process_worker(world, dispatcher)
        # The executor reports the worker's process ended; it lingers (a stale pod).
        await dispatcher.pools.on_worker_status(JobStatus(link.worker_id, JobState.FAILED,
                                                          exit_code=137))
        assert (await world.get(task.id)).status is TaskStatus.QUEUED  # retried
        await _stale_publish_is_refused(world, link, task)
        await executor.close()


async def test_a_task_the_watchdog_takes_back_from_a_silent_worker_is_fenced_out_of_it_at_once(
        tmp_path: Path, sqlite_url: str, redis: aioredis.Redis, redis_url: str) -> None:
    settings = _settings(tmp_path, db_url=sqlite_url, redis_url=redis_url)
    settings.dispatcher.heartbeat_timeout_s = 0.5
    async with database(sqlite_url) as sessions:
        world = World(settings=settings, sessions=sessions, redis=redis)
        executor = _executor(settings, tmp_path)
        dispatcher = world.dispatcher(executor)
        link, task = await _assigned_to_an_in_process_worker(world, dispatcher)
        await asyncio.sleep(0.8)  # no heartbeat of the task: it went silent
        await dispatcher.watchdog()  # it finds no process of the worker: retried
        row = await world.get(task.id)
        assert (row.status, row.error_code) == (TaskStatus.QUEUED, "job_vanished")
        assert await PoolRegistry(redis).get(link.worker_id) is not None  # not retired
        await _stale_publish_is_refused(world, link, task)
        await executor.close()
