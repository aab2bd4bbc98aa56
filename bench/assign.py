"""Assignments per second to idle pool workers, against the per-task launch rate.

One dispatcher over real PostgreSQL and Redis, in the same run, twice:
- **per-task jobs**: a backlog of T zero-length tasks on the fake executor, capacity N
  GPUs (each launch is a job that ends at once);
- **warm pool**: the same backlog of a pooled model handed to N idle fake workers
  (threads speaking the worker's side of ``bus.pools``: ready, fenced assignment from
  the inbox, ready again), registered before the dispatcher starts.
In both, a stand-in relay finishes each task as soon as its job starts or its worker
takes it (``Lifecycle.finish``: the database write, then the release and its wake-up
signal), exactly the path a real relay takes, so the figure is the dispatcher's own
hand-off rate. Prints tasks per second from the first hand-off to the last finish, and
the ratio pool / per-task. No assertions.

    python bench/assign.py [--tasks 300] [--workers 8] [--users 8] [--short]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import threading
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import (
    backing_services,
    complete_when_running,
    machine,
    make_user,
    queued_backlog,
)

MODEL = "tiny-t2v"


async def run_phase(args: argparse.Namespace, db_url: str, redis_url: str, *,
                    pooled: bool) -> float:
    """Tasks per second of one phase, from the first hand-off to the last finish."""
    from vidmaas.bus.client import connect, connect_sync
    from vidmaas.bus.pools import PoolRegistry, WorkerLink
    from vidmaas.config import (
        DispatcherSettings,
        PoolModelSettings,
        PoolSettings,
        Settings,
    )
    from vidmaas.db.engine import make_engine, make_sessionmaker
    from vidmaas.dispatcher.executors.base import JobState, JobStatus, WorkerSpec
    from vidmaas.dispatcher.executors.fake import FakeExecutor
    from vidmaas.dispatcher.service import Dispatcher
    from vidmaas.domain.ids import is_worker_id, new_worker_id
    from vidmaas.domain.jobs import JobSpec
    from vidmaas.domain.models import ModelRegistry
    from vidmaas.lifecycle import Lifecycle
    from vidmaas.services import Services
    from vidmaas.storage import store_from_settings

    n = args.workers
    pools = PoolSettings(enabled=pooled, models={MODEL: PoolModelSettings(
        max_workers=n, idle_s=3600)} if pooled else {}, worker_lease_s=600)
    settings = Settings(gpu_capacity=n, database={"url": db_url},  # type: ignore[arg-type]
                        redis={"url": redis_url},  # type: ignore[arg-type]
                        dispatcher=DispatcherSettings(per_user_running_cap=n), pools=pools)
    engine = make_engine(db_url)
    sessions = make_sessionmaker(engine)
    redis = connect(redis_url)
    await redis.flushdb()
    lifecycle = Lifecycle(sessions=sessions, redis=redis, settings=settings)
    tag = "pool" if pooled else "jobs"
    users = [(await make_user(db_url, f"bench-{tag}-{i}"))[0] for i in range(args.users)]
    loop = asyncio.get_running_loop()
    handed: dict[str, float] = {}
    finished: dict[str, float] = {}
    done = asyncio.Event()

    async def finish(task_id: str) -> None:
        handed[task_id] = time.monotonic()
        await complete_when_running(lifecycle, task_id)
        finished[task_id] = time.monotonic()
        if len(finished) == args.tasks:
            done.set()

    async def on_event(spec: JobSpec, kind: str) -> None:
        if kind == "started":
            await finish(spec.task_id)

    worker_ids = [new_worker_id(MODEL) for _ in range(n)] if pooled else []

    class FakePoolExecutor(FakeExecutor):
        """The fake executor, plus workers the bench registered and plays itself."""

        async def status(self, job_name: str) -> JobStatus:
            if is_worker_id(job_name):
                return JobStatus(job_name, JobState.RUNNING)
            return await super().status(job_name)

        async def start_worker(self, spec: WorkerSpec) -> None:
            raise RuntimeError("the bench's workers are registered before it starts")

        async def stop_worker(self, worker_id: str, *, grace_s: float) -> None:
            return None

        async def worker_status(self, worker_id: str) -> JobStatus:
            return JobStatus(worker_id, JobState.RUNNING)

        async def list_workers(self) -> list[str]:
            return list(worker_ids)

    stop = threading.Event()

    def play(worker_id: str) -> None:
        link = WorkerLink(connect_sync(redis_url), worker_id=worker_id, lease_s=600, model=MODEL)
        link.ready()
        while not stop.is_set():
            a = link.next_assignment(timeout_s=0.2)
            if a is None or a.task_id is None:
                continue
            asyncio.run_coroutine_threadsafe(finish(a.task_id), loop).result()
            link.ready(finished_task=True)

    registry = PoolRegistry(redis)
    for wid in worker_ids:
        await registry.reserve(worker_id=wid, model=MODEL, gpus=1, capacity=n,
                               start_lease_s=600)
    threads = [threading.Thread(target=play, args=(w,), name=f"bench-{w}", daemon=True)
               for w in worker_ids]
    for t in threads:
        t.start()
    executor = FakePoolExecutor(duration_s=0.0, on_event=on_event)
    services = Services(settings=settings, engine=engine, sessions=sessions, redis=redis,
                        store=store_from_settings(settings.storage),
                        registry=ModelRegistry.load(), lifecycle=lifecycle)
    dispatcher = Dispatcher(services, executor)
    running = asyncio.create_task(dispatcher.run(), name=f"bench-dispatcher-{tag}")
    await asyncio.wait_for(dispatcher.ready.wait(), 30)
    await queued_backlog(lifecycle, sessions, users, args.tasks)
    try:
        await asyncio.wait_for(done.wait(), timeout=600)
    finally:
        dispatcher.stop()
        await running
        stop.set()
        for t in threads:
            t.join()
        await executor.close()
        await redis.aclose()
        await engine.dispose()
    return args.tasks / (max(finished.values()) - min(handed.values()))


async def run(args: argparse.Namespace, db_url: str, redis_url: str) -> None:
    jobs_rate = await run_phase(args, db_url, redis_url, pooled=False)
    pool_rate = await run_phase(args, db_url, redis_url, pooled=True)
    print(f"assign: {args.tasks} zero-length tasks from {args.users} users, {args.workers} "
          f"GPUs, one dispatcher, fake executor; {machine()}")
    print(f"  per-task jobs (launch)         {jobs_rate:7.1f} tasks/s")
    print(f"  warm pool, {args.workers} idle workers    {pool_rate:7.1f} assignments/s")
    print(f"  ratio pool / per-task          {pool_rate / jobs_rate:7.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=300)
    parser.add_argument("--workers", type=int, default=8, help="idle workers = GPUs")
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--short", action="store_true", help="a smaller backlog")
    args = parser.parse_args()
    if args.short:
        args.tasks = min(args.tasks, 100)
    with backing_services() as (pg_url, redis_url, _tmp):
        asyncio.run(run(args, pg_url, redis_url))


if __name__ == "__main__":
    main()
