"""Admitting a task in one script (enqueue, position, ``queued`` event, move announcement)
and scripts sent by digest, against a real Redis."""

from __future__ import annotations

import asyncio

import redis
import redis.asyncio as aioredis

from vidmaas.bus import keys
from vidmaas.bus.events import StreamLimits, read_task_events
from vidmaas.bus.queue import TaskQueue
from vidmaas.bus.scripts import Script
from vidmaas.domain import events as ev
from vidmaas.domain.fairness import Priority, Share
from vidmaas.domain.ids import new_task_id

PLAN = [("alice", Priority.NORMAL, None), ("alice", Priority.NORMAL, None),
        ("bob", Priority.LOW, Share(weight=2.0, gpu_cap=0)), ("alice", Priority.HIGH, None),
        ("carol", Priority.NORMAL, Share(weight=0.5, gpu_cap=0)), ("bob", Priority.HIGH, None)]


async def _admit_all(r: aioredis.Redis, ids: list[str], *, cluster: bool,
                     ) -> list[tuple[int | None, list[ev.Event]]]:
    q = TaskQueue(r)
    out = []
    for task_id, (user, priority, share) in zip(ids, PLAN, strict=True):
        position = await q.enqueue_announced(
            user_id=user, task_id=task_id, gpus=1, model="m", priority=priority, share=share,
            limits=StreamLimits(cluster=cluster))
        out.append((position, [e for _, e in await read_task_events(r, task_id)]))
    return out


async def test_the_one_script_answers_and_publishes_what_the_step_by_step_path_does(
        redis: aioredis.Redis) -> None:
    ids = [new_task_id() for _ in PLAN]
    stepwise = await _admit_all(redis, ids, cluster=True)
    await redis.flushdb()
    scripted = await _admit_all(redis, ids, cluster=False)
    assert scripted == stepwise
    positions = [p for p, _ in scripted]
    assert positions == [1, 2, 2, 1, 3, 2]
    for (position, events), task_id in zip(scripted, ids, strict=True):
        assert events == [ev.queued(task_id, position=position or 0)]
    # The positions it answered are the queue's own, at the time of each admission;
    # the last one is still exact now.
    q = TaskQueue(redis)
    assert await q.position(user_id="bob", task_id=ids[-1]) == positions[-1]


async def test_admitting_a_task_already_queued_adds_nothing_but_reports_its_place(
        redis: aioredis.Redis) -> None:
    q = TaskQueue(redis)
    first, second = new_task_id(), new_task_id()
    assert await q.enqueue_announced(user_id="u", task_id=first, gpus=1) == 1
    assert await q.enqueue_announced(user_id="u", task_id=second, gpus=1) == 2
    assert await q.enqueue_announced(user_id="u", task_id=first, gpus=1) == 1
    assert await q.depths() == {"u": 2}


async def test_admitting_a_task_announces_the_move_to_subscribers(
        redis: aioredis.Redis) -> None:
    pubsub = redis.pubsub()
    await pubsub.subscribe(keys.QUEUE_MOVED)
    try:
        assert (await pubsub.get_message(timeout=1.0) or {}).get("type") == "subscribe"
        await TaskQueue(redis).enqueue_announced(user_id="u", task_id=new_task_id(), gpus=1)
        msg = None
        for _ in range(20):
            msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.25)
            if msg:
                break
        assert msg is not None and msg["data"] in ("1", b"1")
    finally:
        await pubsub.aclose()


async def test_a_redis_that_lost_its_script_cache_runs_the_source_once_and_then_by_digest(
        redis: aioredis.Redis, redis_url: str) -> None:
    script = Script("redis.call('INCR', KEYS[1]); return redis.call('GET', KEYS[1])")
    await redis.script_flush()
    assert await redis.script_exists(script.sha) == [False]
    assert int(await script.run(redis, 1, "vidmaas-test:n")) == 1
    assert await redis.script_exists(script.sha) == [True]
    assert int(await script.run(redis, 1, "vidmaas-test:n")) == 2
    sync = redis_lib_client(redis_url)
    try:
        sync.script_flush()
        assert int(script.run_sync(sync, 1, "vidmaas-test:n")) == 3
        assert int(script.run_sync(sync, 1, "vidmaas-test:n")) == 4
    finally:
        sync.close()
    # The queue's own scripts recover the same way: nothing is lost after a flush.
    await redis.script_flush()
    task_id = new_task_id()
    assert await TaskQueue(redis).enqueue_announced(user_id="u", task_id=task_id, gpus=1) == 1
    assert [e.type for _, e in await read_task_events(redis, task_id)] == [ev.EventType.QUEUED]


async def test_concurrent_admissions_each_get_a_distinct_exact_place_in_arrival_order(
        redis: aioredis.Redis) -> None:
    q = TaskQueue(redis)
    ids = [new_task_id() for _ in range(12)]
    got = await asyncio.gather(*(q.enqueue_announced(user_id="u", task_id=t, gpus=1)
                                 for t in ids))
    # Most of them arrive within the same millisecond: each keeps the place it was told.
    assert sorted(p or 0 for p in got) == list(range(1, 13))
    assert await q.positions([("u", t) for t in ids]) == dict(zip(ids, got, strict=True))


def redis_lib_client(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, decode_responses=True)
