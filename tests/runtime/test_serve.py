"""``vidmaas-job serve`` on its own, against the real Redis and S3, driven through the pool
protocol the way the dispatcher drives it (reserve, claim, assign, drain)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import pytest

from tests.runtime.conftest import VIDMAAS_JOB, Job
from vidmaas.bus.client import connect
from vidmaas.bus.pools import PoolRegistry, WorkerState
from vidmaas.bus.queue import TaskQueue
from vidmaas.domain.events import EventType
from vidmaas.domain.ids import new_worker_id
from vidmaas.domain.models import ModelRegistry
from vidmaas.domain.workers import ENV_WORKER_ID, WorkerLimits, worker_args

T = TypeVar("T")


def _redis(url: str, fn: Callable[[PoolRegistry, TaskQueue], Awaitable[T]]) -> T:
    async def go() -> T:
        client = connect(url)
        try:
            return await fn(PoolRegistry(client), TaskQueue(client))
        finally:
            await client.aclose()

    return asyncio.run(go())


def _until(check: Callable[[], bool], *, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not in {timeout_s:.0f}s")
        time.sleep(0.1)


def test_serve_parses_exactly_the_worker_args_of_every_registry_model() -> None:
    from vidmaas.runtime.cli import build_parser

    limits = WorkerLimits(lease_s=12.5, max_tasks=7, max_failures=2, max_rss_mib=900)
    for model in ModelRegistry.load().values():
        ns = build_parser().parse_args(["serve", *worker_args(model, limits)])
        assert (ns.model, ns.lease_s, ns.max_tasks, ns.max_failures, ns.max_rss_mib) == \
            (model.id, 12.5, 7, 2, 900)
        assert (ns.strategy, ns.flow_shift, ns.cpu_offload, ns.vae_tiling) == \
            (model.strategy, model.flow_shift, model.cpu_offload, model.vae_tiling)


@pytest.mark.slow
def test_a_two_rank_worker_runs_a_task_cfg_parallel_and_exits_cleanly_when_drained(
        job: Job) -> None:
    model = ModelRegistry.load()["tiny-t2v"]
    wid = new_worker_id(model.id)
    assert _redis(job.redis_url, lambda p, _q: p.reserve(
        worker_id=wid, model=model.id, gpus=1, capacity=8, start_lease_s=300))
    env = {k: v for k, v in job.env.items() if k != "VIDMAAS_TASK_ID"}
    env.update({ENV_WORKER_ID: wid, "PET_NPROC_PER_NODE": "2", "PET_NNODES": "1"})
    args = [*worker_args(model, WorkerLimits(lease_s=10)), "--strategy", "cfg_parallel"]
    proc = job.start([VIDMAAS_JOB, "serve", *args], extra_env=env)

    def state() -> WorkerState | None:
        w = _redis(job.redis_url, lambda p, _q: p.get(wid))
        return None if w is None else w.state

    _until(lambda: state() is WorkerState.IDLE or proc.poll() is not None, timeout_s=240,
           what="the worker never became idle")
    assert proc.poll() is None

    async def claim_and_assign(p: PoolRegistry, q: TaskQueue) -> bool:
        await q.enqueue(user_id="u", task_id=job.task_id, gpus=1, model=model.id)
        res = await q.claim_next(dispatcher_id="d", capacity=8, per_user_cap=4, lease_s=60,
                                 pooled=frozenset({model.id}))
        assert res.claim is not None and res.claim.worker_id == wid
        task_args = [*job.command("run")[2:], "--strategy", "cfg_parallel"]
        return await p.assign(worker_id=wid, task_id=job.task_id, attempt=1, args=task_args)

    assert _redis(job.redis_url, claim_and_assign)
    events = job.wait_for(lambda got: any(e.type is EventType.COMPLETED for e in got),
                          timeout_s=120)
    types = [e.type for e in events]
    started = [e.data for e in events if e.type is EventType.STARTED]
    assert len(started) == 1 and (started[0]["world_size"], started[0]["worker"]) == (2, wid)
    assert types.count(EventType.COMPLETED) == 1 and EventType.FAILED not in types
    steps = [e.data["step"] for e in events if e.type is EventType.PROGRESS
             and e.data["stage"] == "denoise" and e.data["step"] > 0]
    assert steps == [1, 2, 3]  # rank 0 alone reports
    assert job.object_keys() == [f"outputs/{job.task_id}/poster.jpg",
                                 f"outputs/{job.task_id}/spritesheet.jpg",
                                 f"outputs/{job.task_id}/video.mp4"]

    _until(lambda: state() is WorkerState.IDLE, timeout_s=30, what="not idle after its task")
    assert _redis(job.redis_url, lambda p, _q: p.drain(wid))
    _until(lambda: proc.poll() is not None, timeout_s=60, what="the drained worker did not exit")
    assert proc.returncode == 0
