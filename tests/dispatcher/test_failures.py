"""Deterministic failures through the dispatcher: out of memory, a model too large for the
capacity (issue "Hangs and failures")."""

from __future__ import annotations

import redis.asyncio as aioredis

from tests.dispatcher.dispatch_support import World, database, eventually, make_settings, running
from vidmaas.bus.events import read_task_events
from vidmaas.bus.queue import TaskQueue
from vidmaas.dispatcher.executors.base import JobState, JobStatus
from vidmaas.dispatcher.executors.fake import FakeExecutor, FakeOutcome
from vidmaas.dispatcher.outcomes import failure_of
from vidmaas.domain.events import EventType
from vidmaas.domain.ids import job_name
from vidmaas.domain.jobs import ExitCode, JobSpec, job_args


async def _running(world: World, task_id: str) -> bool:
    return (await world.get(task_id)).status == "running"


async def _ended(world: World, task_id: str) -> bool:
    return (await world.get(task_id)).status in ("completed", "failed", "cancelled")


def _out_of_memory_unless_saving(spec: JobSpec) -> FakeOutcome:
    """A job that runs out of memory under the model's plan (exit 4) and again under the
    memory-saving plan (exit 7), as the runtime exits for each, without reporting."""
    code = ExitCode.OUT_OF_MEMORY_FINAL if spec.memory_saving else ExitCode.OUT_OF_MEMORY
    return FakeOutcome(exit_code=code, report=False)


async def test_the_retry_after_an_out_of_memory_runs_the_memory_saving_plan_and_a_second_fails(
        db_url: str, redis: aioredis.Redis, redis_url: str) -> None:
    settings = make_settings(db_url=db_url, redis_url=redis_url, max_attempts=3)
    seen: list[JobSpec] = []

    def outcome(spec: JobSpec) -> FakeOutcome:
        seen.append(spec)
        return _out_of_memory_unless_saving(spec)

    async with database(db_url) as sessions:
        world = World(settings=settings, sessions=sessions, redis=redis)
        task = await world.submit("alice")
        executor = FakeExecutor(duration_s=0.01, outcome=outcome)
        async with running(world.dispatcher(executor)):
            await eventually(lambda: _ended(world, task.id))
        await executor.close()
        final = await world.get(task.id)
    assert [(s.attempt, s.memory_saving) for s in seen] == [(1, False), (2, True)]
    assert "--memory-saving" not in job_args(seen[0])
    assert "--memory-saving" in job_args(seen[1])
    # Final after the second attempt although a third was allowed: deterministic.
    assert (final.status, final.error_code, final.attempts) == ("failed", "out_of_memory", 2)
    assert "under the memory-saving plan" in (final.error_message or "")
    assert "not retried" in (final.error_message or "")
    assert await TaskQueue(redis).gpus_in_use() == 0


async def test_a_runtime_reported_out_of_memory_makes_the_next_attempt_save_memory(
        sqlite_url: str, redis: aioredis.Redis, redis_url: str) -> None:
    """The relay's path: the runtime's ``failed`` (code out_of_memory, retryable) retried
    through the one retry rule; the dispatcher's next job then has ``--memory-saving``."""
    settings = make_settings(db_url=sqlite_url, redis_url=redis_url, max_attempts=3)
    seen: list[JobSpec] = []
    async with database(sqlite_url) as sessions:
        world = World(settings=settings, sessions=sessions, redis=redis)

        async def relay(spec: JobSpec, kind: str) -> None:
            if kind == "started" and not spec.memory_saving:
                await eventually(lambda: _running(world, spec.task_id))
                task = await world.get(spec.task_id)
                await world.lifecycle.fail_or_retry(
                    task, code="out_of_memory", retryable=True, publish_failed=False,
                    message="out of memory on cuda:0; retried once with the memory-saving plan")
            elif kind == "completed":
                await world.relay_finish(spec, kind)

        def outcome(spec: JobSpec) -> FakeOutcome:
            seen.append(spec)
            return FakeOutcome(hang=not spec.memory_saving)

        task = await world.submit("alice")
        executor = FakeExecutor(duration_s=0.01, outcome=outcome, on_event=relay)
        async with running(world.dispatcher(executor)):
            await eventually(lambda: _ended(world, task.id))
        await executor.close()
        final = await world.get(task.id)
    assert [s.memory_saving for s in seen] == [False, True]
    assert (final.status, final.attempts) == ("completed", 2)


def test_an_unreported_out_of_memory_exit_is_classified_as_out_of_memory() -> None:
    first = failure_of(JobStatus("wan22-job-x", JobState.FAILED, exit_code=4))
    final = failure_of(JobStatus("wan22-job-x", JobState.FAILED, exit_code=7))
    other = failure_of(JobStatus("wan22-job-x", JobState.FAILED, exit_code=1))
    assert (first[0], first[2]) == ("out_of_memory", True)
    assert "the retry runs the memory-saving plan" in first[1]
    assert (final[0], final[2]) == ("out_of_memory", False)
    assert other[0] == "job_failed"


async def test_a_queued_task_too_large_for_a_shrunk_capacity_fails_and_blocks_no_one(
        db_url: str, redis: aioredis.Redis, redis_url: str) -> None:
    settings = make_settings(db_url=db_url, redis_url=redis_url, capacity=1)
    async with database(db_url) as sessions:
        world = World(settings=settings, sessions=sessions, redis=redis)
        # Queued while the platform had 8 GPUs; it now has 1.
        big = await world.submit("alice", gpus=8, model="wan2.2-t2v-a14b")
        small = await world.submit("bob")
        executor = FakeExecutor(duration_s=0.01, on_event=world.relay_finish)
        async with running(world.dispatcher(executor)):
            await eventually(lambda: _ended(world, small.id))
            await eventually(lambda: _ended(world, big.id))
        await executor.close()
        big_final, small_final = await world.get(big.id), await world.get(small.id)
    assert small_final.status == "completed"
    assert (big_final.status, big_final.error_code, big_final.attempts) == \
        ("failed", "model_unavailable", 0)
    assert "needs 8 GPUs per job" in (big_final.error_message or "")
    assert "has 1 GPUs in all" in (big_final.error_message or "")
    assert [name for name, _, _ in executor.launches] == [job_name(small.id)]
    failed = [e for _, e in await read_task_events(redis, big.id) if e.type is EventType.FAILED]
    assert [(e.data["code"], e.data["retryable"]) for e in failed] == \
        [("model_unavailable", False)]
    q = TaskQueue(redis)
    assert not await q.is_queued(user_id=big.user_id, task_id=big.id)
    assert await q.gpus_in_use() == 0


async def test_the_reconciler_fails_a_queued_task_too_large_for_the_capacity(
        sqlite_url: str, redis: aioredis.Redis, redis_url: str) -> None:
    """Also when admission never meets it at the head (a pooled model's task is passed
    over while no worker of its model can start)."""
    settings = make_settings(db_url=sqlite_url, redis_url=redis_url, capacity=2)
    executor = FakeExecutor()
    async with database(sqlite_url) as sessions:
        world = World(settings=settings, sessions=sessions, redis=redis)
        big = await world.submit("alice", gpus=8, model="wan2.2-t2v-a14b")
        fits = await world.submit("bob", gpus=2, model="wan2.2-ti2v-5b")
        await world.dispatcher(executor).reconcile()
        big_final, fits_final = await world.get(big.id), await world.get(fits.id)
    await executor.close()
    assert (big_final.status, big_final.error_code) == ("failed", "model_unavailable")
    assert fits_final.status == "queued"
    assert await TaskQueue(redis).is_queued(user_id=fits.user_id, task_id=fits.id)
    assert executor.launches == []
