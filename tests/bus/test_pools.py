"""The warm-pool protocol in Redis: one GPU budget, idle workers, assignments and fences."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis

from vidmaas.bus import keys, recovery
from vidmaas.bus.client import connect_sync
from vidmaas.bus.events import FenceLost, publish_fenced_sync, read_task_events
from vidmaas.bus.pools import PoolRegistry, WorkerLink, WorkerState, fence_value
from vidmaas.bus.queue import TaskQueue
from vidmaas.domain import events as ev
from vidmaas.domain.ids import new_task_id

POOLED = frozenset({"m"})


async def _claim(q: TaskQueue, *, capacity: int = 8) -> tuple[str, str | None] | None:
    res = await q.claim_next(dispatcher_id="d", capacity=capacity, per_user_cap=10,
                             lease_s=60, pooled=POOLED)
    return None if res.claim is None else (res.claim.task_id, res.claim.worker_id)


async def test_workers_and_jobs_share_one_gpu_budget(redis: aioredis.Redis) -> None:
    q, pools = TaskQueue(redis), PoolRegistry(redis)
    assert await pools.reserve(worker_id="w1", model="m", gpus=2, capacity=4, start_lease_s=60)
    assert await q.gpus_in_use() == 2
    assert not await pools.reserve(worker_id="w2", model="m", gpus=3, capacity=4,
                                   start_lease_s=60)
    await q.enqueue(user_id="u", task_id="job", gpus=3, model="other")
    res = await q.claim_next(dispatcher_id="d", capacity=4, per_user_cap=10, lease_s=60,
                             pooled=POOLED)
    assert res.outcome == "full"
    assert (await pools.retire("w1")) == (None, None)
    assert await _claim(q, capacity=4) == ("job", None)


async def test_a_pooled_task_waits_for_an_idle_worker_without_holding_back_others(
        redis: aioredis.Redis, redis_url: str) -> None:
    q, pools = TaskQueue(redis), PoolRegistry(redis)
    await q.enqueue(user_id="alice", task_id="pooled", gpus=2, model="m")
    await q.enqueue(user_id="bob", task_id="plain", gpus=1, model="other")
    assert await _claim(q) == ("plain", None)  # alice's head waits for a worker
    assert await q.queued_by_model() == {"m": 1}
    assert await pools.reserve(worker_id="w1", model="m", gpus=2, capacity=8, start_lease_s=60)
    assert await _claim(q) is None  # starting, not idle yet
    link = WorkerLink(connect_sync(redis_url), worker_id="w1", lease_s=30)
    assert link.ready()
    assert await _claim(q) == ("pooled", "w1")
    # The worker's GPUs are the task's: nothing more is leased.
    assert await q.gpus_in_use() == 1 + 2
    worker = await pools.get("w1")
    assert worker is not None and (worker.state, worker.task_id) == (WorkerState.BUSY, "pooled")
    assert await q.user_running() == {"bob": 1, "alice": 1}
    assert await q.release("pooled", completed=True)
    assert await q.gpus_in_use() == 1 + 2  # the worker keeps its lease
    assert await q.user_running() == {"bob": 1}


async def test_a_worker_whose_lease_ran_out_is_never_assigned(
        redis: aioredis.Redis, redis_url: str) -> None:
    q, pools = TaskQueue(redis), PoolRegistry(redis)
    assert await pools.reserve(worker_id="w1", model="m", gpus=1, capacity=8, start_lease_s=60)
    link = WorkerLink(connect_sync(redis_url), worker_id="w1", lease_s=0.2)
    assert link.ready()
    await asyncio.sleep(0.3)
    await q.enqueue(user_id="u", task_id="t", gpus=1, model="m")
    assert await _claim(q) is None
    assert link.heartbeat() is WorkerState.IDLE  # alive again
    assert await _claim(q) == ("t", "w1")


async def test_only_the_fenced_worker_and_attempt_publish_for_a_task(
        redis: aioredis.Redis, redis_url: str) -> None:
    q, pools = TaskQueue(redis), PoolRegistry(redis)
    tid = new_task_id()
    sync = connect_sync(redis_url)
    assert await pools.reserve(worker_id="w1", model="m", gpus=1, capacity=8, start_lease_s=60)
    w1 = WorkerLink(sync, worker_id="w1", lease_s=30)
    assert w1.ready()
    await q.enqueue(user_id="u", task_id=tid, gpus=1, model="m")
    assert await _claim(q) == (tid, "w1")
    assert await pools.assign(worker_id="w1", task_id=tid, attempt=1, args=["--model", "m"])
    got = w1.next_assignment(timeout_s=1)
    assert got is not None and (got.task_id, got.attempt, got.args) == (tid, 1, ["--model", "m"])
    assert publish_fenced_sync(sync, ev.heartbeat(tid), fence=fence_value("w1", 1)) is not None
    # The task is retried elsewhere (attempt 2, worker w2): w1 can no longer publish.
    await redis.set(keys.task_fence(tid), fence_value("w2", 2))
    late = ev.failed(tid, code="late", message="from attempt 1", retryable=True)
    assert publish_fenced_sync(sync, late, fence=fence_value("w1", 1)) is None
    assert not w1.owns(tid, 1)
    events = [e.type for _, e in await read_task_events(redis, tid)]
    assert events == [ev.EventType.HEARTBEAT]


async def test_a_stale_assignment_is_skipped_by_the_worker(
        redis: aioredis.Redis, redis_url: str) -> None:
    q, pools = TaskQueue(redis), PoolRegistry(redis)
    sync = connect_sync(redis_url)
    assert await pools.reserve(worker_id="w1", model="m", gpus=1, capacity=8, start_lease_s=60)
    w1 = WorkerLink(sync, worker_id="w1", lease_s=30)
    for tid in ("a", "b"):
        assert w1.ready()
        await q.enqueue(user_id="u", task_id=tid, gpus=1, model="m")
        assert await _claim(q) == (tid, "w1")
        assert await pools.assign(worker_id="w1", task_id=tid, attempt=1, args=[])
    await redis.set(keys.task_fence("a"), fence_value("w9", 2))  # "a" moved on meanwhile
    got = w1.next_assignment(timeout_s=1)
    assert got is not None and got.task_id == "b"
    assert w1.next_assignment(timeout_s=0.1) is None


async def test_drain_stops_assignments_and_tells_the_worker_to_exit(
        redis: aioredis.Redis, redis_url: str) -> None:
    q, pools = TaskQueue(redis), PoolRegistry(redis)
    assert await pools.reserve(worker_id="w1", model="m", gpus=1, capacity=8, start_lease_s=60)
    w1 = WorkerLink(connect_sync(redis_url), worker_id="w1", lease_s=30)
    assert w1.ready()
    assert await pools.drain("w1", only_if_idle=True)
    await q.enqueue(user_id="u", task_id="t", gpus=1, model="m")
    assert await _claim(q) is None
    got = w1.next_assignment(timeout_s=1)
    assert got is not None and got.exit
    assert not w1.ready()  # a draining worker does not come back
    assert await pools.retire("w1") == (None, None)
    await recovery.set_epoch(redis, await recovery.server_run_id(redis))  # not data loss
    assert w1.heartbeat() is None
    assert await q.gpus_in_use() == 0


async def _busy_worker(redis: aioredis.Redis, redis_url: str,
                       ) -> tuple[TaskQueue, PoolRegistry]:
    """Worker w1 (2 GPUs) ready, then claimed for task t (not assigned yet)."""
    q, pools = TaskQueue(redis), PoolRegistry(redis)
    assert await pools.reserve(worker_id="w1", model="m", gpus=2, capacity=8, start_lease_s=60)
    assert WorkerLink(connect_sync(redis_url), worker_id="w1", lease_s=30).ready()
    await q.enqueue(user_id="u", task_id="t", gpus=2, model="m")
    assert await _claim(q) == ("t", "w1")
    return q, pools


async def test_retiring_a_busy_worker_returns_its_task_for_a_retry(
        redis: aioredis.Redis, redis_url: str) -> None:
    q, pools = await _busy_worker(redis, redis_url)
    assert await pools.assign(worker_id="w1", task_id="t", attempt=3, args=[])
    assert not await pools.drain("w1", only_if_idle=True)  # busy: not reclaimed
    assert await pools.retire("w1") == ("t", 3)
    assert await q.gpus_in_use() == 0
    assert not await pools.assign(worker_id="w1", task_id="t", attempt=4, args=[])


async def test_a_worker_that_leaves_after_its_task_gets_no_more_and_retires_with_nothing_to_retry(
        redis: aioredis.Redis, redis_url: str) -> None:
    q, pools = TaskQueue(redis), PoolRegistry(redis)
    assert await pools.reserve(worker_id="w1", model="m", gpus=1, capacity=8, start_lease_s=60)
    w1 = WorkerLink(connect_sync(redis_url), worker_id="w1", lease_s=30)
    assert w1.ready()
    await q.enqueue(user_id="u", task_id="t", gpus=1, model="m")
    assert await _claim(q) == ("t", "w1")
    assert await pools.assign(worker_id="w1", task_id="t", attempt=1, args=[])
    assert w1.leave(finished_task=True)  # a limit reached: it exits after this task
    worker = await pools.get("w1")
    assert worker is not None and worker.state is WorkerState.DRAINING
    assert (worker.task_id, worker.tasks_done) == (None, 1)
    await q.enqueue(user_id="u", task_id="t2", gpus=1, model="m")
    assert await _claim(q) is None
    assert not w1.ready()
    assert await pools.retire("w1") == (None, None)
    assert not w1.leave()


@pytest.mark.parametrize("restored", [2, 1])
async def test_after_redis_lost_its_data_a_live_worker_waits_for_its_lease_then_registers_again(
        redis: aioredis.Redis, redis_url: str, restored: int) -> None:
    """``restored``: the GPUs the dispatcher's rebuild gives back (the registry's count,
    which may have changed since the worker started with two): the worker registers
    again with the two it holds, and the budget counts those."""
    q, pools = TaskQueue(redis), PoolRegistry(redis)
    assert await pools.reserve(worker_id="w1", model="m", gpus=2, capacity=8, start_lease_s=60)
    link = WorkerLink(connect_sync(redis_url), worker_id="w1", lease_s=30, model="m", gpus=2)
    assert link.ready()
    await redis.flushall()
    # No dispatcher has rebuilt this Redis yet: the worker keeps its own state and waits.
    assert link.heartbeat() is WorkerState.IDLE
    assert await pools.get("w1") is None
    # A dispatcher gave the live process its GPUs back: the next heartbeat registers it.
    assert await pools.restore_worker(worker_id="w1", gpus=restored)
    assert not await pools.restore_worker(worker_id="w1", gpus=restored)  # once
    assert await q.gpus_in_use() == restored
    await recovery.set_epoch(redis, await recovery.server_run_id(redis))
    assert link.heartbeat() is WorkerState.IDLE
    assert await q.gpus_in_use() == 2
    worker = await pools.get("w1")
    assert worker is not None and (worker.model, worker.gpus, worker.state, worker.alive) == \
        ("m", 2, WorkerState.IDLE, True)
    await q.enqueue(user_id="u", task_id="t", gpus=2, model="m")
    assert await _claim(q) == ("t", "w1")  # idle again, and used
    assert await q.gpus_in_use() == 2


async def test_a_retired_worker_is_told_so_on_a_rebuilt_redis_and_never_registers_again(
        redis: aioredis.Redis, redis_url: str) -> None:
    pools = PoolRegistry(redis)
    assert await pools.reserve(worker_id="w1", model="m", gpus=1, capacity=8, start_lease_s=60)
    link = WorkerLink(connect_sync(redis_url), worker_id="w1", lease_s=30, model="m")
    assert link.ready()
    await recovery.set_epoch(redis, await recovery.server_run_id(redis))
    await pools.retire("w1")
    assert link.heartbeat() is None
    assert await pools.get("w1") is None


async def test_a_fence_lost_with_redis_data_is_told_apart_from_one_taken_back(
        redis: aioredis.Redis, redis_url: str) -> None:
    pools, sync = PoolRegistry(redis), connect_sync(redis_url)
    lost, taken = new_task_id(), new_task_id()
    for tid in (lost, taken):
        assert await pools.restore_fence(task_id=tid, worker_id="w1", attempt=1)
    assert await pools.fence_out(task_id=taken, worker_id="w1", attempt=1)
    await redis.delete(keys.task_fence(lost))  # what an emptied Redis looks like
    with pytest.raises(FenceLost):  # a Redis error: the reporter retries it
        publish_fenced_sync(sync, ev.heartbeat(lost), fence=fence_value("w1", 1))
    assert publish_fenced_sync(sync, ev.heartbeat(taken), fence=fence_value("w1", 1)) is None
    # The rebuild gives the lost fence back, never the taken-back one.
    assert await pools.restore_fence(task_id=lost, worker_id="w1", attempt=1)
    assert not await pools.restore_fence(task_id=taken, worker_id="w1", attempt=1)
    assert publish_fenced_sync(sync, ev.heartbeat(lost), fence=fence_value("w1", 1))
    assert publish_fenced_sync(sync, ev.heartbeat(taken), fence=fence_value("w1", 1)) is None


async def test_a_retirement_that_keeps_losing_the_race_says_so_and_retires_nothing(
        redis: aioredis.Redis, redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    q, pools = await _busy_worker(redis, redis_url)
    real = await redis.hget(keys.POOL_WORKERS, "w1")
    assert real is not None
    stale = real.replace("|t|", "|other|")  # every read sees a task the script does not

    async def hget(key: str, field: str) -> str | None:
        return stale if (key, field) == (keys.POOL_WORKERS, "w1") else None

    monkeypatch.setattr(pools._r, "hget", hget)
    with pytest.raises(RuntimeError, match="not retired"):
        await pools.retire("w1")
    monkeypatch.undo()
    assert await redis.hget(keys.POOL_WORKERS, "w1") == real  # still there, GPUs held
    assert await q.gpus_in_use() == 2
    assert await pools.retire("w1") == ("t", None)  # claimed, never assigned

