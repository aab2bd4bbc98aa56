"""The pool scaling policy: up when tasks wait and GPUs are free, down after idling,
idle GPUs back to other models' waiting tasks."""

from __future__ import annotations

from vidmaas.domain.pools import Need, PoolConfig, WorkerView, plan_pools

A = PoolConfig(gpus=2, min_workers=0, max_workers=2, idle_s=60)
B = PoolConfig(gpus=1, min_workers=1, max_workers=3, idle_s=60)


def idle(wid: str, model: str, since_s: float) -> WorkerView:
    return WorkerView(wid, model, "idle", since_s)


def busy(wid: str, model: str) -> WorkerView:
    return WorkerView(wid, model, "busy", None)


def test_a_pool_grows_by_one_while_tasks_wait_and_gpus_are_free() -> None:
    plan = plan_pools(pools={"a": A}, workers=[], queued={"a": 3}, free_gpus=8, blocked=None)
    assert plan.start == ["a"] and plan.drain == []
    plan = plan_pools(pools={"a": A}, workers=[busy("w1", "a")], queued={"a": 3}, free_gpus=8,
                      blocked=None)
    assert plan.start == ["a"]
    full = plan_pools(pools={"a": A}, workers=[busy("w1", "a"), busy("w2", "a")],
                      queued={"a": 3}, free_gpus=8, blocked=None)
    assert full.start == []  # at max_workers


def test_no_worker_starts_without_free_gpus_or_while_one_is_ready() -> None:
    assert plan_pools(pools={"a": A}, workers=[], queued={"a": 1}, free_gpus=1,
                      blocked=None).start == []
    starting = WorkerView("w1", "a", "starting", None)
    assert plan_pools(pools={"a": A}, workers=[starting], queued={"a": 1}, free_gpus=8,
                      blocked=None).start == []


def test_a_pool_is_kept_at_its_minimum_and_scaled_to_zero_when_that_is_zero() -> None:
    plan = plan_pools(pools={"b": B}, workers=[], queued={}, free_gpus=4, blocked=None)
    assert plan.start == ["b"]
    keep = plan_pools(pools={"b": B}, workers=[idle("w1", "b", 999)], queued={}, free_gpus=4,
                      blocked=None)
    assert keep.drain == []
    gone = plan_pools(pools={"a": A}, workers=[idle("w1", "a", 61), idle("w2", "a", 10)],
                      queued={}, free_gpus=4, blocked=None)
    assert gone.drain == ["w1"]


def test_idle_gpus_of_other_models_go_to_a_blocked_task_oldest_idle_first() -> None:
    workers = [idle("a1", "a", 5), idle("a2", "a", 30), idle("b1", "b", 40), idle("b2", "b", 2)]
    plan = plan_pools(pools={"a": A, "b": B}, workers=workers, queued={}, free_gpus=0,
                      blocked=Need("plain", 4))
    # a's two idle workers (2 GPUs each) are enough; b keeps its minimum of one.
    assert plan.drain == ["a2", "a1"]
    plan = plan_pools(pools={"a": A, "b": B}, workers=workers, queued={}, free_gpus=0,
                      blocked=Need("plain", 5))
    assert plan.drain == ["a2", "a1", "b1"]


def test_a_pooled_model_that_needs_a_worker_reclaims_idle_gpus_of_another() -> None:
    plan = plan_pools(pools={"a": A, "b": B}, workers=[idle("b1", "b", 1), idle("b2", "b", 1)],
                      queued={"a": 1}, free_gpus=1, blocked=None)
    assert plan.start == [] and plan.drain == ["b1"]
    # Next pass, with b1's GPU free, the worker starts.
    after = plan_pools(pools={"a": A, "b": B}, workers=[idle("b2", "b", 1)], queued={"a": 1},
                       free_gpus=2, blocked=None)
    assert after.start == ["a"] and after.drain == []


def test_dead_and_draining_workers_count_for_nothing() -> None:
    workers = [WorkerView("w1", "a", "idle", 0, alive=False),
               WorkerView("w2", "a", "draining", None)]
    plan = plan_pools(pools={"a": A}, workers=workers, queued={"a": 1}, free_gpus=2,
                      blocked=None)
    assert plan.start == ["a"] and plan.drain == []
