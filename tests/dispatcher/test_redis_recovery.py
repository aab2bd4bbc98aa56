"""Redis killed hard under live tasks: after a restart on its append-only file (synced
every second, or before each write), on an older copy of that file (the tail lost, as a
machine crash loses what was not synced yet), or with no data at all, admission and the
reconciler rebuild queue, leases, cancel flags and streams from the database. No
accepted task is lost, none runs twice, capacity is never exceeded.

(SIGKILL alone loses nothing with ``everysec``: what Redis wrote is in the kernel's
page cache. The lost-tail case is what a machine crash does to ``everysec``.)"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from tests.dispatcher.dispatch_support import World, database, eventually, make_settings, running
from tests.support import services
from vidmaas.bus import control, keys
from vidmaas.bus.client import connect
from vidmaas.bus.events import parse_entries
from vidmaas.bus.queue import TaskQueue
from vidmaas.config import OutboxSettings
from vidmaas.dispatcher.executors.fake import FakeExecutor, FakeOutcome
from vidmaas.domain import events as ev
from vidmaas.domain.ids import job_name
from vidmaas.domain.status import TaskStatus

CAPACITY = 2


def _restart(tmp: Path, port: int, mode: str) -> subprocess.Popen[bytes]:
    if mode == "empty":  # a Redis without persistence: everything is gone
        return services.start_redis(tmp / "fresh", port=port)
    if mode == "lost-tail":  # back on the append-only file as it was at the snapshot
        shutil.rmtree(tmp / "aof")
        shutil.copytree(tmp / "snapshot", tmp / "aof")
        return services.start_redis(tmp / "aof", port=port, appendonly=True,
                                    appendfsync="always")
    return services.start_redis(tmp / "aof", port=port, appendonly=True,
                                appendfsync=mode)  # type: ignore[arg-type]


async def _stream_types(client: aioredis.Redis, task_id: str) -> list[str]:
    raw: Any = await client.xrange(keys.task_events(task_id))
    return [e.type.value for _id, e in parse_entries(raw)]


@pytest.mark.parametrize("mode", ["everysec", "always", "lost-tail", "empty"])
async def test_after_redis_is_killed_hard_the_database_rebuilds_queue_leases_flags_and_events(
        mode: str, db_url: str, tmp_path: Path) -> None:
    port = services.free_port()
    proc = services.start_redis(tmp_path / "aof", port=port, appendonly=mode != "empty",
                                appendfsync="everysec" if mode == "everysec" else "always")
    url = f"redis://127.0.0.1:{port}/0"
    settings = make_settings(db_url=db_url, redis_url=url, capacity=CAPACITY,
                             requeue_grace_s=0.0, per_user_running_cap=1)
    settings = settings.model_copy(update={"outbox": OutboxSettings(sweep_grace_s=0.0)})
    executor = FakeExecutor(outcome=lambda _spec: FakeOutcome(hang=True))
    client = connect(url)
    q = TaskQueue(client)
    try:
        async with database(db_url) as sessions:
            world = World(settings=settings, sessions=sessions, redis=client)
            d = world.dispatcher(executor)
            running = await world.submit("alice")
            cancelling = await world.submit("bob")
            assert await d.admit() == 2
            if mode == "lost-tail":
                shutil.copytree(tmp_path / "aof", tmp_path / "snapshot")
            await world.lifecycle.cancel(await world.get(cancelling.id), by="bob")
            waiting = [await world.submit("carol"), await world.submit("dave")]
            withdrawn = await world.submit("erin")
            assert await q.gpus_in_use() == CAPACITY

            proc.kill()  # SIGKILL: no shutdown, no final fsync
            proc.wait()
            # While Redis is down a queued task is cancelled: committed, event in the outbox.
            await world.lifecycle.transition(task_id=withdrawn.id, to=TaskStatus.CANCELLED,
                                             expected=TaskStatus.QUEUED,
                                             event=ev.cancelled(withdrawn.id, by="erin"))
            proc = _restart(tmp_path, port, mode)

            # A task accepted right after the restart waits: admission rebuilds the leases
            # before it claims anything, and finds no free GPU.
            waiting.append(await world.submit("frank"))
            assert await d.admit() == 0
            assert await q.leases() == {running.id: 1, cancelling.id: 1}
            await d.reconcile()
            for t in waiting:
                assert await q.is_queued(user_id=t.user_id, task_id=t.id), t.user_id
            assert await q.leases() == {running.id: 1, cancelling.id: 1}
            assert await q.user_running() == {running.user_id: 1, cancelling.user_id: 1}
            assert await control.cancel_requested(client, cancelling.id) is not None
            assert (await _stream_types(client, withdrawn.id))[-1:] == ["cancelled"]
            assert await world.lifecycle.outbox_pending() == 0

            # Capacity frees as the two jobs end; the waiting tasks run, each once.
            await world.lifecycle.finish(task_id=running.id, to=TaskStatus.COMPLETED,
                                         expected=TaskStatus.RUNNING)
            await world.lifecycle.finish(task_id=cancelling.id, to=TaskStatus.CANCELLED,
                                         expected=TaskStatus.CANCELLING)
            assert await d.admit() == 2
            assert await q.gpus_in_use() == CAPACITY
            await d.reconcile()
            assert await d.admit() == 0
            statuses = [(await world.get(t.id)).status for t in waiting]
            assert (await world.get(withdrawn.id)).status == TaskStatus.CANCELLED
    finally:
        await client.aclose()
        await executor.close()
        services.stop(proc)
    assert sorted(statuses) == [TaskStatus.QUEUED] + [TaskStatus.RUNNING] * 2
    started = [t for t, status in zip(waiting, statuses, strict=True)
               if status is TaskStatus.RUNNING]
    launched = [name for name, _attempt, _t in executor.launches]
    assert sorted(launched) == sorted(job_name(t.id) for t in (running, cancelling, *started))


async def test_a_running_dispatcher_requeues_what_an_emptied_redis_lost_without_waiting(
        db_url: str, redis: aioredis.Redis, redis_url: str) -> None:
    settings = make_settings(db_url=db_url, redis_url=redis_url, capacity=1,
                             requeue_grace_s=0.0, wake_max_s=0.1, reconcile_interval_s=60.0)
    executor = FakeExecutor(outcome=lambda _spec: FakeOutcome(hang=True))
    q = TaskQueue(redis)
    async with database(db_url) as sessions:
        world = World(settings=settings, sessions=sessions, redis=redis)
        first = await world.submit("alice")
        waiting = await world.submit("bob")
        async with running(world.dispatcher(executor)):
            await eventually(lambda: _status_is(world, first.id, TaskStatus.RUNNING))
            await redis.flushdb()
            # Long before the next scheduled pass (60 s): leases back, the queue refilled.
            await eventually(lambda: q.is_queued(user_id=waiting.user_id,
                                                 task_id=waiting.id), timeout_s=5.0)
            assert await q.leases() == {first.id: 1}
            await world.lifecycle.finish(task_id=first.id, to=TaskStatus.COMPLETED,
                                         expected=TaskStatus.RUNNING)
            await eventually(lambda: _status_is(world, waiting.id, TaskStatus.RUNNING))
    await executor.close()
    assert [name for name, _a, _t in executor.launches] == [job_name(first.id),
                                                           job_name(waiting.id)]


async def _status_is(world: World, task_id: str, status: TaskStatus) -> bool:
    return (await world.get(task_id)).status == status
