"""The fair queue and capacity leases against a real Redis."""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis

from vidmaas.bus.queue import TaskQueue


async def _drain(q: TaskQueue, *, capacity: int = 100, cap: int = 100) -> list[str]:
    order = []
    while True:
        res = await q.claim_next(dispatcher_id="d1", capacity=capacity, per_user_cap=cap,
                                 lease_s=60)
        if res.claim is None:
            return order
        order.append(res.claim.task_id)


async def test_tasks_are_taken_round_robin_across_users_and_fifo_within_a_user(
        redis: aioredis.Redis) -> None:
    q = TaskQueue(redis)
    for i in range(3):
        await q.enqueue(user_id="alice", task_id=f"a{i}", gpus=1)
    await q.enqueue(user_id="bob", task_id="b0", gpus=1)
    await q.enqueue(user_id="carol", task_id="c0", gpus=1)
    await q.enqueue(user_id="carol", task_id="c1", gpus=1)
    assert await _drain(q) == ["a0", "b0", "c0", "a1", "c1", "a2"]


async def test_queue_position_predicts_the_order_tasks_are_taken_in(redis: aioredis.Redis) -> None:
    q = TaskQueue(redis)
    plan = [("alice", "a0"), ("alice", "a1"), ("alice", "a2"), ("bob", "b0"), ("carol", "c0"),
            ("carol", "c1"), ("bob", "b1")]
    for user, task in plan:
        await q.enqueue(user_id=user, task_id=task, gpus=1)
    predicted = {task: await q.position(user_id=user, task_id=task) for user, task in plan}
    order = await _drain(q)
    assert {task: order.index(task) + 1 for task in order} == predicted


async def test_a_user_with_fifty_tasks_does_not_hold_back_a_user_with_one(
        redis: aioredis.Redis) -> None:
    q = TaskQueue(redis)
    for i in range(50):
        await q.enqueue(user_id="heavy", task_id=f"h{i}", gpus=1)
    await q.enqueue(user_id="light", task_id="l0", gpus=1)
    assert await q.position(user_id="light", task_id="l0") == 2


async def test_claims_never_exceed_capacity_and_release_frees_it(redis: aioredis.Redis) -> None:
    q = TaskQueue(redis)
    for i in range(4):
        await q.enqueue(user_id=f"u{i}", task_id=f"t{i}", gpus=2)
    taken = await _drain(q, capacity=5)
    assert taken == ["t0", "t1"]
    assert await q.gpus_in_use() == 4
    assert (await q.claim_next(dispatcher_id="d", capacity=5, per_user_cap=9,
                               lease_s=60)).outcome == "full"
    assert await q.release("t0") is True
    assert await q.release("t0") is False
    assert await _drain(q, capacity=5) == ["t2"]


async def test_the_per_user_running_cap_skips_a_capped_user_without_losing_their_place(
        redis: aioredis.Redis) -> None:
    q = TaskQueue(redis)
    for i in range(3):
        await q.enqueue(user_id="alice", task_id=f"a{i}", gpus=1)
    await q.enqueue(user_id="bob", task_id="b0", gpus=1)
    assert await _drain(q, cap=1) == ["a0", "b0"]
    await q.release("a0")
    assert await _drain(q, cap=1) == ["a1"]


async def test_enqueue_is_idempotent_for_queued_and_claimed_tasks(redis: aioredis.Redis) -> None:
    q = TaskQueue(redis)
    assert await q.enqueue(user_id="u", task_id="t1", gpus=1)
    assert not await q.enqueue(user_id="u", task_id="t1", gpus=1)
    await _drain(q)
    assert not await q.enqueue(user_id="u", task_id="t1", gpus=1)
    await q.ack("t1")
    assert await q.enqueue(user_id="u", task_id="t1", gpus=1)


async def test_concurrent_dispatchers_never_take_the_same_task_or_overcommit(
        redis: aioredis.Redis) -> None:
    q = TaskQueue(redis)
    for i in range(40):
        await q.enqueue(user_id=f"u{i % 7}", task_id=f"t{i}", gpus=1 + i % 2)

    async def worker(name: str) -> list[str]:
        got = []
        for _ in range(30):
            res = await q.claim_next(dispatcher_id=name, capacity=10, per_user_cap=10, lease_s=60)
            if res.claim:
                got.append(res.claim.task_id)
        return got

    results = await asyncio.gather(*(worker(f"d{i}") for i in range(5)))
    flat = [t for r in results for t in r]
    assert len(flat) == len(set(flat))
    assert await q.gpus_in_use() <= 10


async def test_removing_a_queued_task_takes_it_out_of_the_order(redis: aioredis.Redis) -> None:
    q = TaskQueue(redis)
    await q.enqueue(user_id="u", task_id="t1", gpus=1)
    await q.enqueue(user_id="u", task_id="t2", gpus=1)
    assert await q.remove(user_id="u", task_id="t1")
    assert await q.position(user_id="u", task_id="t1") is None
    assert await q.position(user_id="u", task_id="t2") == 1


async def test_positions_of_many_tasks_at_once_equal_their_single_positions(
        redis: aioredis.Redis) -> None:
    q = TaskQueue(redis)
    plan = [(f"u{i % 5}", f"t{i}") for i in range(23)]
    for user, task in plan:
        await q.enqueue(user_id=user, task_id=task, gpus=1)
    await q.remove(user_id="u2", task_id="t7")
    asked = [*plan, ("u9", "nope")]
    many = await q.positions(asked)
    for user, task in asked:
        assert many[task] == await q.position(user_id=user, task_id=task)
    assert many["t7"] is None and many["nope"] is None
