"""The stall rule: a running task whose steps stop while its heartbeats go on (a rank stuck
in a collective) is stopped and retried; loading, a first step and a slow model are not."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import redis.asyncio as aioredis

from tests.dispatcher.dispatch_support import World, database, make_settings
from vidmaas.bus import keys
from vidmaas.bus.queue import TaskQueue
from vidmaas.db import tasks as repo
from vidmaas.db.models import Task
from vidmaas.dispatcher.executors.fake import FakeExecutor, FakeOutcome
from vidmaas.domain.ids import job_name
from vidmaas.domain.models import ModelRegistry
from vidmaas.domain.stall import expected_step_s, stall_limit_s


def test_the_expected_step_is_the_declared_one_else_the_learnt_run_time_per_step() -> None:
    assert expected_step_s(declared_s=4.0, run_s=100.0, steps=10) == 4.0
    assert expected_step_s(declared_s=None, run_s=100.0, steps=10) == 10.0
    assert expected_step_s(declared_s=None, run_s=None, steps=10) is None
    assert expected_step_s(declared_s=None, run_s=100.0, steps=0) is None


def test_the_limit_is_a_multiple_of_the_step_never_below_the_floor_and_0_turns_it_off() -> None:
    assert stall_limit_s(step_s=10.0, factor=5, floor_s=20) == 50.0
    assert stall_limit_s(step_s=1.0, factor=5, floor_s=20) == 20.0
    assert stall_limit_s(step_s=None, factor=5, floor_s=20) == 20.0
    assert stall_limit_s(step_s=10.0, factor=0, floor_s=20) is None


def _hanging() -> FakeExecutor:
    return FakeExecutor(outcome=lambda _spec: FakeOutcome(hang=True))


async def _beating(world: World, task: Task, **values: Any) -> None:
    """The job's heartbeats are fresh (its parent process beats) and it was dispatched
    (and started) 20 minutes ago; ``values`` besides."""
    async with world.sessions() as s:
        await repo.update_progress(session=s, task_id=task.id, values={
            "last_heartbeat_at": datetime.now(UTC), "dispatched_at": _ago(1200),
            "started_at": _ago(1200), **values})


def _ago(seconds: float) -> datetime:
    return datetime.now(UTC) - timedelta(seconds=seconds)


async def _learnt(redis: aioredis.Redis, model: str, run_s: float) -> None:
    await redis.hset(keys.MODEL_RUN_S, model, run_s)


async def test_a_task_whose_steps_stop_while_it_beats_is_stopped_and_retried_as_stalled(
        db_url: str, redis: aioredis.Redis, redis_url: str) -> None:
    # The model's tasks ran 4 s on average, over 2 steps: 2 s a step, 5x that is 10 s.
    settings = make_settings(db_url=db_url, redis_url=redis_url, retry_backoff_s=30,
                             stall_factor=5, stall_floor_s=1)
    executor = _hanging()
    async with database(db_url) as sessions:
        world = World(settings=settings, sessions=sessions, redis=redis)
        await _learnt(redis, "tiny-t2v", 4.0)
        task = await world.submit("alice")
        d = world.dispatcher(executor)
        assert await d.admit() == 1
        await _beating(world, task, stage="denoise", last_step_at=_ago(8))
        await d.watchdog()
        assert (await world.get(task.id)).status == "running"  # within 10 s of its last step
        await _beating(world, task, last_step_at=_ago(12))
        await d.watchdog()
        final = await world.get(task.id)
    await executor.close()
    assert (final.status, final.error_code, final.attempts) == ("queued", "stalled", 1)
    message = final.error_message or ""
    assert "no denoising step for 12s" in message and "limit 10s" in message
    assert "expected step time of 2.0s" in message and "heartbeats went on" in message
    assert executor.cancels == [job_name(task.id)]
    assert await TaskQueue(redis).is_delayed(task.id)
    assert await TaskQueue(redis).gpus_in_use() == 0


async def test_a_step_time_declared_in_the_registry_wins_over_the_learnt_one(
        sqlite_url: str, redis: aioredis.Redis, redis_url: str) -> None:
    settings = make_settings(db_url=sqlite_url, redis_url=redis_url, stall_factor=5,
                             stall_floor_s=1)
    registry = ModelRegistry([m.model_copy(update={"step_s": 30.0}) if m.id == "tiny-t2v"
                              else m for m in ModelRegistry.load().values()])
    executor = _hanging()
    async with database(sqlite_url) as sessions:
        world = World(settings=settings, sessions=sessions, redis=redis)
        await _learnt(redis, "tiny-t2v", 4.0)  # learnt: 10 s; declared: 150 s
        task = await world.submit("alice")
        d = world.dispatcher(executor, registry=registry)
        await d.admit()
        await _beating(world, task, stage="denoise", last_step_at=_ago(100))
        await d.watchdog()
        assert (await world.get(task.id)).status == "running"
        await _beating(world, task, last_step_at=_ago(160))
        await d.watchdog()
        final = await world.get(task.id)
    await executor.close()
    assert (final.status, final.error_code) == ("queued", "stalled")
    assert "expected step time of 30.0s" in (final.error_message or "")


@pytest.mark.parametrize("case", ["loading", "no step yet", "earlier attempt", "decoding",
                                  "rule off"])
async def test_a_task_that_has_not_reported_a_step_of_this_attempt_is_not_stalled(
        case: str, sqlite_url: str, redis: aioredis.Redis, redis_url: str) -> None:
    settings = make_settings(db_url=sqlite_url, redis_url=redis_url, stall_factor=0
                             if case == "rule off" else 5, stall_floor_s=1)
    executor = _hanging()
    async with database(sqlite_url) as sessions:
        world = World(settings=settings, sessions=sessions, redis=redis)
        await _learnt(redis, "tiny-t2v", 4.0)
        task = await world.submit("alice")
        d = world.dispatcher(executor)
        await d.admit()
        stage, last = {"loading": ("load_model", None), "no step yet": ("denoise", None),
                       # The last step is from before this attempt's dispatch.
                       "earlier attempt": ("denoise", _ago(3600)),
                       "decoding": ("decode", _ago(600)),
                       "rule off": ("denoise", _ago(600))}[case]
        await _beating(world, task, stage=stage, last_step_at=last)
        await d.watchdog()
        final = await world.get(task.id)
    await executor.close()
    assert (final.status, final.error_code) == ("running", None)
    assert executor.cancels == []


async def test_a_task_that_stalls_on_its_last_attempt_fails_as_stalled(
        sqlite_url: str, redis: aioredis.Redis, redis_url: str) -> None:
    settings = make_settings(db_url=sqlite_url, redis_url=redis_url, max_attempts=1,
                             stall_factor=5, stall_floor_s=60)
    executor = _hanging()
    async with database(sqlite_url) as sessions:
        world = World(settings=settings, sessions=sessions, redis=redis)
        task = await world.submit("alice")  # nothing learnt, nothing declared: the floor
        d = world.dispatcher(executor)
        await d.admit()
        await _beating(world, task, stage="denoise", last_step_at=_ago(61))
        await d.watchdog()
        final = await world.get(task.id)
    await executor.close()
    assert (final.status, final.error_code, final.attempts) == ("failed", "stalled", 1)
    assert "expected step time of unknown" in (final.error_message or "")
    assert "at least 60s" in (final.error_message or "")
