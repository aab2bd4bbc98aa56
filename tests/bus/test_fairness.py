"""Fair share by GPU-seconds, weights, priorities and aging, against a real Redis."""

from __future__ import annotations

import asyncio
import random

import pytest
import redis.asyncio as aioredis

from vidmaas.bus import keys
from vidmaas.bus.queue import TaskQueue
from vidmaas.domain.fairness import Priority, Share, allowed, order_key_ms


async def _claim(q: TaskQueue, *, capacity: int = 100, cap: int = 100) -> str | None:
    res = await q.claim_next(dispatcher_id="d1", capacity=capacity, per_user_cap=cap, lease_s=60)
    return None if res.claim is None else res.claim.task_id


async def _drain(q: TaskQueue, **kw: int) -> list[str]:
    order = []
    while (tid := await _claim(q, **kw)) is not None:
        order.append(tid)
    return order


async def test_a_user_who_arrives_while_another_is_served_starts_second_not_third(
        redis: aioredis.Redis) -> None:
    # Capacity 1: alice queues 4 and her first starts; bob then queues 1.
    q = TaskQueue(redis)
    for i in range(4):
        await q.enqueue(user_id="alice", task_id=f"a{i}", gpus=1)
    assert await _claim(q, capacity=1) == "a0"
    await q.enqueue(user_id="bob", task_id="b0", gpus=1)
    assert await q.position(user_id="bob", task_id="b0") == 1
    await asyncio.sleep(0.01)  # a0 really is served (a release in the same millisecond
    # as its claim would charge alice nothing, a tie that goes to the earlier user)
    await q.release("a0", completed=True)
    assert await _claim(q, capacity=1) == "b0"


async def test_weights_share_admissions_in_proportion(redis: aioredis.Redis) -> None:
    q = TaskQueue(redis)
    for i in range(30):
        await q.enqueue(user_id="heavy", task_id=f"h{i:02}", gpus=1, share=Share(weight=2.0))
        await q.enqueue(user_id="light", task_id=f"l{i:02}", gpus=1, share=Share(weight=1.0))
    first = (await _drain(q))[:30]
    heavy = sum(t.startswith("h") for t in first)
    assert heavy == 20, first  # 2:1 of equal-cost tasks


async def test_gpu_seconds_not_turns_decide_who_goes_next(redis: aioredis.Redis) -> None:
    # Both users are estimated alike, but alice's first task holds its GPUs far longer
    # than the estimate; settling the charge on release puts bob ahead twice.
    q = TaskQueue(redis, default_run_s=0.05)
    for i in range(3):
        await q.enqueue(user_id="alice", task_id=f"a{i}", gpus=1)
        await q.enqueue(user_id="bob", task_id=f"b{i}", gpus=1)
    assert await _claim(q, capacity=1) == "a0"
    await asyncio.sleep(0.25)
    await q.release("a0")
    assert await _claim(q, capacity=1) == "b0"
    await q.release("b0")
    assert await _claim(q, capacity=1) == "b1"
    vt = await q.virtual_times()
    assert vt["alice"] > vt["bob"] - 0.06


async def test_a_long_absence_earns_no_credit(redis: aioredis.Redis) -> None:
    q = TaskQueue(redis)
    for i in range(10):
        await q.enqueue(user_id="busy", task_id=f"x{i}", gpus=1)
    for _ in range(8):  # served (and still holding the GPUs: charged, not yet settled)
        assert await _claim(q) is not None
    # Back after being away: alternates with busy instead of taking eight turns in a row.
    for i in range(4):
        await q.enqueue(user_id="back", task_id=f"y{i}", gpus=1)
    order = await _drain(q)
    assert order[:4] in (["y0", "x8", "y1", "x9"], ["x8", "y0", "x9", "y1"]), order


async def test_a_higher_priority_goes_first_within_its_users_share_only(
        redis: aioredis.Redis) -> None:
    q = TaskQueue(redis)
    await q.enqueue(user_id="alice", task_id="a-normal", gpus=1)
    await q.enqueue(user_id="bob", task_id="b-normal", gpus=1)
    await q.enqueue(user_id="alice", task_id="a-high", gpus=1, priority=Priority.HIGH)
    await q.enqueue(user_id="alice", task_id="a-low", gpus=1, priority=Priority.LOW)
    # alice's high task overtakes her own normal one, not bob's turn.
    assert await _drain(q) == ["a-high", "b-normal", "a-normal", "a-low"]


def test_aging_bounds_how_long_a_lower_class_can_be_overtaken() -> None:
    step_s = 600.0
    low = order_key_ms(enqueued_ms=0, priority=Priority.LOW, priority_step_s=step_s)
    # A high task enqueued within two steps goes first; any later one goes after.
    soon = order_key_ms(enqueued_ms=int(2 * step_s * 1000) - 1, priority=Priority.HIGH,
                        priority_step_s=step_s)
    late = order_key_ms(enqueued_ms=int(2 * step_s * 1000) + 1, priority=Priority.HIGH,
                        priority_step_s=step_s)
    assert soon < low < late


def test_a_user_may_ask_for_a_priority_up_to_their_maximum_only() -> None:
    assert allowed(Priority.LOW, maximum=Priority.NORMAL)
    assert allowed(Priority.NORMAL, maximum=Priority.NORMAL)
    assert not allowed(Priority.HIGH, maximum=Priority.NORMAL)
    with pytest.raises(ValueError):
        Share(weight=0)


async def test_a_users_gpu_quota_caps_what_they_hold_at_once(redis: aioredis.Redis) -> None:
    q = TaskQueue(redis)
    for i in range(3):
        await q.enqueue(user_id="alice", task_id=f"a{i}", gpus=2, share=Share(gpu_cap=4))
    await q.enqueue(user_id="bob", task_id="b0", gpus=2)
    assert await _drain(q) == ["a0", "b0", "a1"]
    res = await q.claim_next(dispatcher_id="d", capacity=100, per_user_cap=100, lease_s=60)
    assert res.outcome == "capped"
    await q.release("a0")
    assert await _drain(q) == ["a2"]


async def test_a_completed_task_teaches_its_model_a_run_time(redis: aioredis.Redis) -> None:
    q = TaskQueue(redis, default_run_s=1000.0)
    await q.enqueue(user_id="u", task_id="t1", gpus=2, model="m")
    assert await _claim(q) == "t1"
    await asyncio.sleep(0.1)
    await q.release("t1", completed=True)
    learnt = (await q.model_run_s())["m"]
    assert 0.05 < learnt < 5
    await q.enqueue(user_id="u", task_id="t2", gpus=1, model="other")
    assert await _claim(q) == "t2"
    await q.release("t2")  # a failure teaches nothing
    assert "other" not in await q.model_run_s()


@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5, 6])
async def test_positions_predict_the_order_under_weights_priorities_and_settled_charges(
        redis: aioredis.Redis, seed: int) -> None:
    rng = random.Random(seed)
    q = TaskQueue(redis, default_run_s=10.0)
    users = [f"u{i}" for i in range(5)]
    # Some history first, so that virtual times differ.
    for i in range(6):
        await q.enqueue(user_id=rng.choice(users), task_id=f"old{i}", gpus=1 + i % 2)
    for _ in range(6):
        tid = await _claim(q)
        assert tid is not None
        await q.release(tid, completed=rng.random() < 0.5)
    plan = []
    for i in range(40):
        user = rng.choice(users)
        task = f"t{i:02}"
        plan.append((user, task))
        await q.enqueue(user_id=user, task_id=task, gpus=rng.choice([1, 2, 4]),
                        model=rng.choice(["m1", "m2"]), priority=rng.choice(list(Priority)),
                        share=Share(weight=float(users.index(user) + 1)))
    for user, task in rng.sample(plan, 5):  # cancels from the middle
        assert await q.remove(user_id=user, task_id=task)
        plan.remove((user, task))
    await q.set_share("u0", Share(weight=3.5))
    await q.enqueue(user_id="u1", task_id="retry", gpus=2, front=True)
    plan.append(("u1", "retry"))
    predicted = await q.positions(plan)
    listed = [c.task_id for c in await q.order(limit=100)]
    assert len(listed) == len(plan)
    assert sorted(p for p in predicted.values() if p is not None) == list(range(1, len(plan) + 1))
    order = await _drain(q)
    assert order == listed
    assert {task: order.index(task) + 1 for task in order} == predicted


async def test_weights_and_priorities_hold_with_several_dispatchers_claiming_at_once(
        redis_url: str) -> None:
    from vidmaas.bus.client import connect

    clients = [connect(redis_url) for _ in range(3)]
    # Estimates that match the work (30 ms a task), as the model's moving average does.
    queues = [TaskQueue(c, default_run_s=0.03) for c in clients]
    try:
        for i in range(24):
            await queues[0].enqueue(user_id="heavy", task_id=f"h{i:02}", gpus=1,
                                    share=Share(weight=2.0))
            await queues[0].enqueue(user_id="light", task_id=f"l{i:02}", gpus=1,
                                    share=Share(weight=1.0))
        await queues[0].enqueue(user_id="light", task_id="l-high", gpus=1,
                                priority=Priority.HIGH, share=Share(weight=1.0))
        started: list[tuple[int, str]] = []

        async def dispatcher(n: int, q: TaskQueue) -> None:
            # Capacity 2 for three dispatchers: a claim often finds the GPUs held by
            # another dispatcher's task and tries again once it is released.
            while True:
                res = await q.claim_next(dispatcher_id=f"d{n}", capacity=2, per_user_cap=100,
                                         lease_s=60)
                if res.claim is None:
                    if len(started) >= 49 or sum((await q.depths()).values()) == 0:
                        return
                    await asyncio.sleep(0.001)
                    continue
                started.append((n, res.claim.task_id))
                # Equal work per task (the settled charge is the time held), so a 2:1
                # weight is 2:1 in tasks.
                await asyncio.sleep(0.03)
                await q.release(res.claim.task_id, completed=True)

        async with asyncio.timeout(30):
            await asyncio.gather(*(dispatcher(n, q) for n, q in enumerate(queues)))
        order = [t for _, t in started]
        assert len(order) == len(set(order)) == 49  # none twice, none lost
        assert len({n for n, _ in started}) > 1  # the dispatchers really shared the work
        first = order[:30]
        heavy = sum(t.startswith("h") for t in first)
        assert 18 <= heavy <= 22, first  # 2:1 within the slack of concurrent claims
        # light's high task goes before light's normal ones, not before heavy's turns.
        lights = [t for t in order if t.startswith("l")]
        assert lights[0] == "l-high", lights
    finally:
        for c in clients:
            await c.aclose()


@pytest.mark.parametrize("seed", [3, 17])
async def test_positions_stay_the_admission_order_through_every_kind_of_queue_change(
        redis: aioredis.Redis, seed: int) -> None:
    """After each change (enqueue with a new share, a retry at the front, a cancel, a
    claim, a release that settles a charge, a weight change, and the index of starts
    lost as after an upgrade), every queued task's position is its place in the order
    admission would take (``order``, which merges the users' queues without the index)."""
    rng = random.Random(seed)
    q = TaskQueue(redis, default_run_s=5.0)
    users = [f"u{i}" for i in range(7)]
    queued: list[tuple[str, str]] = []
    held: list[str] = []
    for step in range(120):
        op = rng.random()
        if op < 0.45 or not queued:
            user, task = rng.choice(users), f"t{step:03}"
            share = Share(weight=rng.choice([0.5, 1.0, 2.0, 3.0])) if rng.random() < 0.3 \
                else None
            await q.enqueue(user_id=user, task_id=task, gpus=rng.choice([1, 2]),
                            model=rng.choice(["m1", "m2"]), priority=rng.choice(list(Priority)),
                            front=rng.random() < 0.1, share=share)
            queued.append((user, task))
        elif op < 0.55:
            user, task = rng.choice(queued)
            assert await q.remove(user_id=user, task_id=task)
            queued.remove((user, task))
        elif op < 0.75:
            tid = await _claim(q)
            assert tid is not None
            queued = [(u, t) for u, t in queued if t != tid]
            held.append(tid)
        elif op < 0.88 and held:
            await q.release(held.pop(rng.randrange(len(held))), completed=rng.random() < 0.5)
        elif op < 0.95:
            await q.set_share(rng.choice(users), Share(weight=rng.choice([0.5, 1.0, 4.0])))
        else:
            await redis.delete(keys.QUEUE_STARTS)
        listed = [c.task_id for c in await q.order(limit=1000)]
        assert sorted(listed) == sorted(t for _, t in queued)
        assert await q.positions(queued) == {t: listed.index(t) + 1 for _, t in queued}


async def test_among_equal_virtual_starts_who_started_queueing_first_goes_first_not_by_name(
        redis: aioredis.Redis) -> None:
    q = TaskQueue(redis)
    names = ["zed", "mia", "amy", "kim"]  # arrival order, not alphabetical
    for name in names:
        await q.enqueue(user_id=name, task_id=f"{name}-0", gpus=1)
    # Each starts at the same virtual time (nothing served yet): ties go by arrival.
    assert await q.positions([(n, f"{n}-0") for n in names]) == \
        {f"{n}-0": i + 1 for i, n in enumerate(names)}
    assert await _drain(q) == [f"{n}-0" for n in names]
