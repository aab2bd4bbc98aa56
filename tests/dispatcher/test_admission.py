"""Admission and fairness: real Redis, real databases, the fake executor."""

from __future__ import annotations

import time
from collections import Counter

import redis.asyncio as aioredis

from tests.dispatcher.dispatch_support import World, database, eventually, make_settings, running
from vidmaas.bus import keys
from vidmaas.bus.queue import TaskQueue
from vidmaas.dispatcher.executors.fake import FakeExecutor, FakeOutcome
from vidmaas.domain.jobs import JobSpec
from vidmaas.domain.status import TaskStatus


async def _done(world: World, task_ids: list[str]) -> bool:
    for tid in task_ids:
        if not TaskStatus((await world.get(tid)).status).terminal:
            return False
    return True


async def test_tasks_start_by_fair_share_across_users_and_fifo_within_a_user(
        db_url: str, redis: aioredis.Redis, redis_url: str) -> None:
    settings = make_settings(db_url=db_url, redis_url=redis_url, capacity=1)
    async with database(db_url) as sessions:
        world = World(settings=settings, sessions=sessions, redis=redis)
        plan = ["alice", "alice", "alice", "bob", "carol", "carol"]
        tasks = [await world.submit(u) for u in plan]
        executor = FakeExecutor(duration_s=0.01, on_event=world.relay_finish)
        async with running(world.dispatcher(executor)):
            await eventually(lambda: _done(world, [t.id for t in tasks]))
        await executor.close()
    a0, a1, a2, b0, c0, c1 = (t.id for t in tasks)
    launched = [name.removeprefix("wan22-job-") for name, _, _ in executor.launches]
    # bob and carol, who have received nothing, go before alice's second task; then
    # alice and carol are even (their first tasks held the GPU about as long): either
    # may go next, and alice's last task goes last.
    assert launched[:3] == [a0, b0, c0]
    assert set(launched[3:5]) == {a1, c1} and launched[5] == a2
    assert {(await world.get(t.id)).status for t in tasks} == {"completed"}


async def test_several_dispatchers_never_exceed_capacity_nor_start_a_task_twice(
        sqlite_url: str, redis: aioredis.Redis, redis_url: str) -> None:
    settings = make_settings(db_url=sqlite_url, redis_url=redis_url, capacity=4,
                             per_user_running_cap=3)
    in_use: list[int] = []
    running_gpus = Counter[str]()
    gpus_of: dict[str, int] = {}

    async def observe(spec: JobSpec, kind: str) -> None:
        if kind == "started":
            running_gpus["all"] += gpus_of[spec.task_id]
            in_use.append(running_gpus["all"])
        else:
            running_gpus["all"] -= gpus_of[spec.task_id]
            await world.relay_finish(spec, kind)

    async with database(sqlite_url) as sessions:
        world = World(settings=settings, sessions=sessions, redis=redis)
        tasks = []
        for i in range(24):
            task = await world.submit(f"user{i % 4}", gpus=2 if i % 3 == 0 else 1)
            gpus_of[task.id] = task.gpus
            tasks.append(task)
        executors = [FakeExecutor(name=f"fake{i}", duration_s=0.02, on_event=observe)
                     for i in range(3)]
        dispatchers = [world.dispatcher(e) for e in executors]
        async with running(*dispatchers):
            await eventually(lambda: _done(world, [t.id for t in tasks]), timeout_s=30)
        for e in executors:
            await e.close()
    launched = Counter(name for e in executors for name, _, _ in e.launches)
    assert len(launched) == 24, launched
    assert set(launched.values()) == {1}, [x for e in executors for x in e.launches]
    assert max(in_use) <= 4
    assert max(in_use) >= 3, "capacity was left idle"
    assert sum(1 for e in executors if e.launches) >= 2, "only one dispatcher worked"
    assert await TaskQueue(redis).gpus_in_use() == 0


async def test_a_user_never_runs_more_than_the_per_user_cap_and_others_overtake(
        sqlite_url: str, redis: aioredis.Redis, redis_url: str) -> None:
    settings = make_settings(db_url=sqlite_url, redis_url=redis_url, capacity=4,
                             per_user_running_cap=2)
    now_running = Counter[str]()
    peak = Counter[str]()
    user_of: dict[str, str] = {}

    async def observe(spec: JobSpec, kind: str) -> None:
        user = user_of[spec.task_id]
        if kind == "started":
            now_running[user] += 1
            peak[user] = max(peak[user], now_running[user])
        else:
            now_running[user] -= 1
            await world.relay_finish(spec, kind)

    async with database(sqlite_url) as sessions:
        world = World(settings=settings, sessions=sessions, redis=redis)
        heavy = [await world.submit("heavy") for _ in range(6)]
        light = await world.submit("light")
        for t in heavy:
            user_of[t.id] = "heavy"
        user_of[light.id] = "light"
        executor = FakeExecutor(duration_s=0.05, on_event=observe)
        async with running(world.dispatcher(executor)):
            await eventually(lambda: _done(world, [t.id for t in [*heavy, light]]))
        await executor.close()
    assert peak["heavy"] == 2
    order = [name.removeprefix("wan22-job-") for name, _, _ in executor.launches]
    assert order.index(light.id) <= 2


async def test_a_freed_slot_is_refilled_within_milliseconds(
        sqlite_url: str, redis: aioredis.Redis, redis_url: str) -> None:
    settings = make_settings(db_url=sqlite_url, redis_url=redis_url, capacity=1)
    freed: list[float] = []

    async def relay(spec: JobSpec, kind: str) -> None:
        await world.relay_finish(spec, kind)
        if kind == "completed":
            freed.append(time.monotonic())

    async with database(sqlite_url) as sessions:
        world = World(settings=settings, sessions=sessions, redis=redis)
        tasks = [await world.submit(f"u{i}") for i in range(4)]
        executor = FakeExecutor(duration_s=0.05, on_event=relay)
        async with running(world.dispatcher(executor)):
            await eventually(lambda: _done(world, [t.id for t in tasks]))
        await executor.close()
    starts = [at for _, _, at in executor.launches]
    gaps = [start - free for free, start in zip(freed, starts[1:], strict=False)]
    assert len(gaps) == 3
    # A signal wakes admission: without it the next launch would wait for the 5 s
    # fallback wake-up. (Generous bound: shared CI machines stall for a while.)
    assert max(gaps) < 1.5, gaps
    assert sorted(gaps)[1] < 0.5, gaps


async def test_a_task_cancelled_after_its_claim_never_starts_a_job(
        db_url: str, redis: aioredis.Redis, redis_url: str) -> None:
    settings = make_settings(db_url=db_url, redis_url=redis_url, capacity=1)
    async with database(db_url) as sessions:
        world = World(settings=settings, sessions=sessions, redis=redis)
        task = await world.submit("alice")
        await redis.hset(keys.TEST_HOOK, "after_claim", "0.3")  # type: ignore[misc]
        executor = FakeExecutor()
        async with running(world.dispatcher(executor, test_hooks=True)):
            await eventually(lambda: TaskQueue(redis).is_claimed(task.id))
            await world.lifecycle.cancel(await world.get(task.id), by="user")
            await eventually(lambda: _not_claimed(redis, task.id))
        await executor.close()
        assert (await world.get(task.id)).status == "cancelled"
    assert executor.launches == []
    assert await TaskQueue(redis).gpus_in_use() == 0


async def _not_claimed(redis: aioredis.Redis, task_id: str) -> bool:
    return not await TaskQueue(redis).is_claimed(task_id)


async def test_a_failing_launch_is_retried_with_backoff_and_then_fails(
        sqlite_url: str, redis: aioredis.Redis, redis_url: str) -> None:
    settings = make_settings(db_url=sqlite_url, redis_url=redis_url, max_attempts=3)
    async with database(sqlite_url) as sessions:
        world = World(settings=settings, sessions=sessions, redis=redis)
        task = await world.submit("alice")
        executor = FakeExecutor(fail_launch=lambda _spec: True)
        async with running(world.dispatcher(executor)):
            await eventually(lambda: _done(world, [task.id]))
        await executor.close()
        final = await world.get(task.id)
    assert (final.status, final.error_code, final.attempts) == ("failed", "launch_failed", 3)
    assert await TaskQueue(redis).gpus_in_use() == 0


async def test_a_job_exiting_without_a_result_fails_by_its_exit_code(
        db_url: str, redis: aioredis.Redis, redis_url: str) -> None:
    settings = make_settings(db_url=db_url, redis_url=redis_url, max_attempts=3, capacity=2)
    async with database(db_url) as sessions:
        world = World(settings=settings, sessions=sessions, redis=redis)
        bad_input = await world.submit("alice")
        infra = await world.submit("bob")
        codes = {bad_input.id: 2, infra.id: 1}
        executor = FakeExecutor(duration_s=0.01, outcome=lambda spec: FakeOutcome(
            exit_code=codes[spec.task_id], report=False))
        async with running(world.dispatcher(executor)):
            await eventually(lambda: _done(world, [bad_input.id, infra.id]))
        await executor.close()
        bad, inf = await world.get(bad_input.id), await world.get(infra.id)
    assert (bad.status, bad.error_code, bad.attempts) == ("failed", "job_failed", 1)
    assert "exited with code 2" in (bad.error_message or "")
    assert (inf.status, inf.attempts) == ("failed", 3)  # retried until attempts ran out


async def test_cancelling_a_running_task_stops_its_job_and_frees_its_gpus(
        db_url: str, redis: aioredis.Redis, redis_url: str) -> None:
    settings = make_settings(db_url=db_url, redis_url=redis_url)
    async with database(db_url) as sessions:
        world = World(settings=settings, sessions=sessions, redis=redis)
        task = await world.submit("alice")
        nxt = await world.submit("alice")
        executor = FakeExecutor(outcome=lambda spec: FakeOutcome(
            hang=spec.task_id == task.id), on_event=world.relay_finish, duration_s=0.01)
        async with running(world.dispatcher(executor)):
            await eventually(lambda: _status_is(world, task.id, "running"))
            await world.lifecycle.cancel(await world.get(task.id), by="user")
            await eventually(lambda: _done(world, [task.id, nxt.id]))
        await executor.close()
        assert (await world.get(task.id)).status == "cancelled"
        assert (await world.get(nxt.id)).status == "completed"
    assert executor.cancels[0] == f"wan22-job-{task.id}"


async def _status_is(world: World, task_id: str, status: str) -> bool:
    return (await world.get(task_id)).status == status


async def test_scheduling_a_retry_wakes_a_sleeping_dispatcher(redis: aioredis.Redis) -> None:
    q = TaskQueue(redis)
    await redis.delete(keys.QUEUE_SIGNAL)
    await q.schedule_retry(user_id="u", task_id="t1", gpus=1, delay_s=0.05)
    assert await q.wait_signal(0.1) is True


async def test_launches_the_dispatch_gap_and_capacity_are_exported_as_metrics(
        sqlite_url: str, redis: aioredis.Redis, redis_url: str) -> None:
    from vidmaas.metrics import Heartbeat, Metrics

    settings = make_settings(db_url=sqlite_url, redis_url=redis_url, capacity=2)
    metrics = Metrics(role="dispatcher")
    now = [0.0]
    beat = Heartbeat(max_age_s=10, clock=lambda: now[0])
    now[0] = 100.0
    assert not beat.is_alive()
    async with database(sqlite_url) as sessions:
        world = World(settings=settings, sessions=sessions, redis=redis)
        tasks = [await world.submit(f"u{i}") for i in range(3)]
        executor = FakeExecutor(duration_s=0.01, on_event=world.relay_finish)
        async with running(world.dispatcher(executor, metrics=metrics, heartbeat=beat)):
            await eventually(lambda: _done(world, [t.id for t in tasks]))
            assert beat.is_alive()
        await executor.close()
    sample = metrics.registry.get_sample_value
    assert sample("vidmaas_dispatches_total", {"executor": "fake"}) == 3
    assert sample("vidmaas_dispatch_gap_seconds_count") == 3
    assert sample("vidmaas_gpu_capacity") == 2
