"""The real pool worker (``vidmaas-job serve``) with the real tiny model, started by the local
executor, driven by the dispatcher and the relay over real Redis and a real database."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from tests.dispatcher.dispatch_support import World, database, eventually, make_settings
from vidmaas.bus import keys
from vidmaas.bus.events import parse_entries
from vidmaas.config import PoolModelSettings, PoolSettings, Settings, StorageSettings
from vidmaas.db.models import Task
from vidmaas.dispatcher.executors.local import LocalExecutor
from vidmaas.dispatcher.service import Dispatcher
from vidmaas.domain.events import Event, EventType
from vidmaas.domain.status import TaskStatus
from vidmaas.relay.service import Relay

STEP_DELAY = {"VIDMAAS_TEST_FAULT": "step_delay_s=0.25"}
"""Slows each denoising step, so a test can act in the middle of a task."""


def _settings(tmp_path: Path, *, db_url: str, redis_url: str, model_root: Path,
              storage: StorageSettings) -> Settings:
    s = make_settings(db_url=db_url, redis_url=redis_url, capacity=2, cancel_grace_s=20.0,
                      cancel_scan_interval_s=0.1, requeue_grace_s=0.5, reconcile_interval_s=0.5)
    s.local.work_root = tmp_path / "jobs"
    s.model_root = model_root
    s.storage = storage
    s.runtime.heartbeat_interval_s = 0.5
    s.pools = PoolSettings(models={"tiny-t2v": PoolModelSettings(max_workers=1, idle_s=60)},
                           manage_interval_s=0.1, worker_lease_s=5.0, start_timeout_s=90,
                           stop_grace_s=1.0)
    return s


def _executor(settings: Settings, env: dict[str, str] | None = None) -> LocalExecutor:
    return LocalExecutor(settings=settings,
                         extra_env={"VIDMAAS_PROGRESS_INTERVAL_S": "0", **(env or {})})


@contextlib.asynccontextmanager
async def _system(world: World, executor: LocalExecutor) -> AsyncIterator[Dispatcher]:
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
        for wid in await executor.list_workers():
            await executor.stop_worker(wid, grace_s=0)
        await executor.close()


@pytest.fixture
async def world(tmp_path: Path, sqlite_url: str, redis: aioredis.Redis, redis_url: str,
                tiny_model_root: Path, local_storage: StorageSettings,
                ) -> AsyncIterator[World]:
    settings = _settings(tmp_path, db_url=sqlite_url, redis_url=redis_url,
                         model_root=tiny_model_root, storage=local_storage)
    async with database(sqlite_url) as sessions:
        yield World(settings=settings, sessions=sessions, redis=redis)
    # Workers outlive dispatchers by design; none may outlive its test, even a failing one.
    leftover = LocalExecutor(settings=settings)
    for wid in await leftover.list_workers():
        await leftover.stop_worker(wid, grace_s=0)
    await leftover.close()


async def _events(world: World, task_id: str) -> list[Event]:
    entries: Any = await world.redis.xrange(keys.task_events(task_id))
    return [e for _, e in parse_entries(entries)]


async def _of(world: World, task_id: str, type_: EventType) -> list[Event]:
    return [e for e in await _events(world, task_id) if e.type is type_]


async def _reaches(world: World, task: Task, status: TaskStatus, *, timeout_s: float) -> float:
    """Seconds until ``task`` is ``status``."""
    t = time.monotonic()

    async def check() -> bool:
        return (await world.get(task.id)).status is status

    await eventually(check, timeout_s=timeout_s, interval_s=0.02)
    return time.monotonic() - t


async def _denoising(world: World, task: Task, *, timeout_s: float = 90) -> None:
    async def check() -> bool:
        return any(e.data.get("stage") == "denoise" and int(e.data["step"]) >= 1
                   for e in await _of(world, task.id, EventType.PROGRESS))

    await eventually(check, timeout_s=timeout_s, interval_s=0.02)


def _model_loads(world: World, worker_id: str) -> int:
    text = (world.settings.local.work_root / worker_id / "job.log").read_text()
    return text.count("tiny-t2v loaded in")


async def test_two_tasks_back_to_back_run_on_one_worker_that_loaded_the_model_once(
        world: World, tmp_path: Path) -> None:
    executor = _executor(world.settings)
    async with _system(world, executor):
        first = await world.submit("alice", prompt="a lighthouse")
        cold_s = await _reaches(world, first, TaskStatus.COMPLETED, timeout_s=90)
        second = await world.submit("alice", prompt="a lighthouse at night")
        warm_s = await _reaches(world, second, TaskStatus.COMPLETED, timeout_s=30)
        workers = await executor.list_workers()
    started = [(await _of(world, t.id, EventType.STARTED))[0].data for t in (first, second)]
    assert started[0]["worker"] == started[1]["worker"] == workers[0]
    assert started[0]["pid"] == started[1]["pid"]
    assert _model_loads(world, workers[0]) == 1
    assert warm_s < cold_s / 2, (warm_s, cold_s)
    for t in (first, second):
        done = await _of(world, t.id, EventType.COMPLETED)
        assert len(done) == 1
        assert (tmp_path / "objects" / done[0].data["video_key"]).stat().st_size > 0
        assert (done[0].data["width"], done[0].data["num_frames"]) == (64, 5)


async def test_a_pooled_task_cancelled_mid_run_or_failing_ends_so_and_the_worker_takes_the_next(
        world: World) -> None:
    executor = _executor(world.settings, STEP_DELAY)
    async with _system(world, executor):
        long = await world.submit("alice", params={"steps": 30})
        await _denoising(world, long)
        await world.lifecycle.cancel(await world.get(long.id), by="alice")
        await _reaches(world, long, TaskStatus.CANCELLED, timeout_s=15)
        bad = await world.submit("alice", params={"size": "63*64", "width": 63})  # H.264: odd
        await _reaches(world, bad, TaskStatus.FAILED, timeout_s=90)
        after = await world.submit("alice")
        await _reaches(world, after, TaskStatus.COMPLETED, timeout_s=90)
    failed = [e.data for e in await _of(world, bad.id, EventType.FAILED)]
    assert [(f["code"], f["retryable"]) for f in failed] == [("bad_input", False)]
    assert (await world.get(bad.id)).attempts == 1
    cancelled = await _of(world, long.id, EventType.CANCELLED)
    assert [e.data["by"] for e in cancelled] == ["alice"]
    assert await _of(world, long.id, EventType.COMPLETED) == []
    steps = [int(e.data["step"]) for e in await _of(world, long.id, EventType.PROGRESS)
             if e.data.get("stage") == "denoise"]
    assert max(steps) < 30
    pids = [(await _of(world, t.id, EventType.STARTED))[0].data["pid"] for t in (long, after)]
    assert pids[0] == pids[1]
    assert len([d for d in world.settings.local.work_root.iterdir() if d.is_dir()]) == 1


async def test_a_worker_killed_mid_task_hands_the_task_to_another_worker_and_it_runs_once(
        world: World) -> None:
    executor = _executor(world.settings, STEP_DELAY)
    async with _system(world, executor):
        task = await world.submit("alice", params={"steps": 8})
        await _denoising(world, task)
        first = (await _of(world, task.id, EventType.STARTED))[0].data
        os.kill(int(first["pid"]), signal.SIGKILL)
        await _reaches(world, task, TaskStatus.COMPLETED, timeout_s=90)
    done = await world.get(task.id)
    started = [e.data for e in await _of(world, task.id, EventType.STARTED)]
    assert done.attempts == 2
    assert len(started) == 2 and started[1]["worker"] != first["worker"]
    assert done.job_name == started[1]["worker"]
    assert len(await _of(world, task.id, EventType.COMPLETED)) == 1


async def test_a_worker_that_cannot_load_its_model_is_restarted_with_a_growing_delay(
        world: World, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    world.settings.model_root = tmp_path / "no-models"  # every worker fails to load
    executor = _executor(world.settings)
    caplog.set_level(logging.WARNING, logger="vidmaas.dispatcher.pools")

    def holds() -> list[str]:
        return re.findall(r"the next start waits (\d+)s", caplog.text)

    async def two_holds() -> bool:
        return len(holds()) >= 2

    async with _system(world, executor):
        task = await world.submit("alice")
        await eventually(two_holds, timeout_s=60, interval_s=0.1)
        status = (await world.get(task.id)).status
        starts = [d for d in world.settings.local.work_root.iterdir() if d.is_dir()]
    assert holds()[:2] == ["1", "2"]
    assert len(starts) <= len(holds()) + 1  # each start after a failure waited its hold
    assert status is TaskStatus.QUEUED  # it waits for a worker; nothing is lost
    assert all("does not exist" in (d / "job.log").read_text() for d in starts
               if (d / "job.log").exists())


async def test_a_pooled_model_whose_workers_never_load_fails_its_queued_tasks_until_one_loads(
        world: World, tmp_path: Path, tiny_model_root: Path) -> None:
    world.settings.pools.max_failed_starts = 2
    world.settings.model_root = tmp_path / "no-models"  # every worker fails to load
    executor = _executor(world.settings)
    async with _system(world, executor) as dispatcher:
        waiting = [await world.submit(user) for user in ("alice", "bob")]
        for t in waiting:
            await _reaches(world, t, TaskStatus.FAILED, timeout_s=60)
        assert dispatcher.pools.unavailable("tiny-t2v")
        broken_starts = len([d for d in world.settings.local.work_root.iterdir() if d.is_dir()])
        world.settings.model_root = tiny_model_root  # the operator fixed the checkpoint
        later = await world.submit("alice")
        await _reaches(world, later, TaskStatus.COMPLETED, timeout_s=120)
        after = await world.submit("bob")
        await _reaches(world, after, TaskStatus.COMPLETED, timeout_s=30)
        assert not dispatcher.pools.unavailable("tiny-t2v")
    for t in waiting:
        row = await world.get(t.id)
        assert (row.error_code, row.attempts) == ("model_unavailable", 0)
        failed = [e.data for e in await _of(world, t.id, EventType.FAILED)]
        assert [(f["code"], f["retryable"]) for f in failed] == [("model_unavailable", False)]
        assert "unavailable" in str(row.error_message)
    assert broken_starts == 2  # failed after the second start, not one more
    assert (await world.get(later.id)).attempts == 1


async def test_a_worker_busy_when_redis_loses_its_data_finishes_its_task_and_stays_warm(
        world: World) -> None:
    executor = _executor(world.settings, STEP_DELAY)
    async with _system(world, executor):
        task = await world.submit("alice", params={"steps": 12})
        await _denoising(world, task)
        (worker,) = await executor.list_workers()
        await world.redis.flushall()  # a restart without persistence: every key is gone
        await _reaches(world, task, TaskStatus.COMPLETED, timeout_s=60)
        after = await world.submit("alice")
        await _reaches(world, after, TaskStatus.COMPLETED, timeout_s=30)
        assert await executor.list_workers() == [worker]
    assert (await world.get(task.id)).attempts == 1
    assert (await _of(world, after.id, EventType.STARTED))[0].data["worker"] == worker
    assert _model_loads(world, worker) == 1
    assert len([d for d in world.settings.local.work_root.iterdir() if d.is_dir()]) == 1
