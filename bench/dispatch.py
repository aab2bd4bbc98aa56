"""Dispatch: how well the dispatcher keeps GPU slots busy, and how fast it refills one.

A backlog of T short jobs from U users on the fake executor (each job "runs" D ms),
capacity C GPUs, over real PostgreSQL and Redis. A stand-in relay finishes each task
when its job completes (``Lifecycle.finish``: the database write, then the capacity
release and its wake-up signal), exactly the path a real relay takes. Prints:
- GPU-slot utilisation = busy slot-time / total slot-time, where a slot is busy from
  its job's launch to its release, over the span from the first launch to the last
  release (1.0 would be every slot always running a job);
- the p50/p99/max gap between a slot being freed and the next launch, over the
  releases that happened while tasks were waiting;
- tasks per second.
No assertions.

    python bench/dispatch.py [--tasks 400] [--users 8] [--capacity 8] [--job-ms 50]
                             [--dispatchers 1] [--short]
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import (
    backing_services,
    complete_when_running,
    machine,
    make_user,
    ms,
    pct,
    queued_backlog,
)


async def run(args: argparse.Namespace, db_url: str, redis_url: str) -> None:
    from vidmaas.bus.client import connect
    from vidmaas.config import DispatcherSettings, Settings
    from vidmaas.db.engine import make_engine, make_sessionmaker
    from vidmaas.dispatcher.executors.fake import FakeExecutor
    from vidmaas.dispatcher.service import Dispatcher
    from vidmaas.domain.jobs import JobSpec
    from vidmaas.domain.models import ModelRegistry
    from vidmaas.lifecycle import Lifecycle
    from vidmaas.services import Services
    from vidmaas.storage import store_from_settings

    settings = Settings(gpu_capacity=args.capacity, database={"url": db_url},  # type: ignore[arg-type]
                        redis={"url": redis_url},  # type: ignore[arg-type]
                        dispatcher=DispatcherSettings(per_user_running_cap=args.capacity))
    engine = make_engine(db_url)
    sessions = make_sessionmaker(engine)
    redis = connect(redis_url)
    lifecycle = Lifecycle(sessions=sessions, redis=redis, settings=settings)
    users = [(await make_user(db_url, f"bench-user-{i}"))[0] for i in range(args.users)]
    await queued_backlog(lifecycle, sessions, users, args.tasks)

    released_at: dict[str, float] = {}
    launched_at: dict[str, float] = {}
    done = asyncio.Event()

    async def relay(spec: JobSpec, kind: str) -> None:
        if kind == "started":
            launched_at[spec.task_id] = time.monotonic()
            return
        await complete_when_running(lifecycle, spec.task_id)
        released_at[spec.task_id] = time.monotonic()
        if len(released_at) == args.tasks:
            done.set()

    executors = [FakeExecutor(name=f"fake{i}", duration_s=args.job_ms / 1000, on_event=relay)
                 for i in range(args.dispatchers)]
    services = Services(settings=settings, engine=engine, sessions=sessions, redis=redis,
                        store=store_from_settings(settings.storage),
                        registry=ModelRegistry.load(), lifecycle=lifecycle)
    dispatchers = [Dispatcher(services, e) for e in executors]
    began = time.monotonic()
    runs = [asyncio.create_task(d.run(), name=f"bench-dispatcher-{i}")
            for i, d in enumerate(dispatchers)]
    try:
        await asyncio.wait_for(done.wait(), timeout=600)
    finally:
        for d in dispatchers:
            d.stop()
        await asyncio.gather(*runs)
        for e in executors:
            await e.close()
        await redis.aclose()
        await engine.dispose()
    wall = time.monotonic() - began

    launches = sorted(launched_at.values())
    releases = sorted(released_at.values())
    span = releases[-1] - launches[0]
    busy = sum(released_at[t] - launched_at[t] for t in released_at)
    utilisation = busy / (args.capacity * span)
    # A release while tasks still wait should be followed by a launch: measure the gap.
    gaps = []
    for r in releases[: args.tasks - args.capacity]:
        i = bisect.bisect_left(launches, r)
        if i < len(launches):
            gaps.append(launches[i] - r)
    print(f"dispatch: {args.tasks} tasks of {args.job_ms} ms from {args.users} users, "
          f"capacity {args.capacity} GPUs, {args.dispatchers} dispatcher(s); {machine()}")
    print(f"  GPU-slot utilisation        {utilisation:.3f}  "
          f"(busy {busy:.2f} slot-s of {args.capacity * span:.2f})")
    print(f"  slot freed -> next launch   p50 {ms(pct(gaps, 50))}  p99 {ms(pct(gaps, 99))}  "
          f"max {ms(max(gaps))}  (n={len(gaps)})")
    print(f"  throughput                  {args.tasks / span:.1f} tasks/s "
          f"(ideal {args.capacity / (args.job_ms / 1000):.1f}); wall {wall:.2f}s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=400)
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--capacity", type=int, default=8)
    parser.add_argument("--job-ms", type=float, default=50.0)
    parser.add_argument("--dispatchers", type=int, default=1)
    parser.add_argument("--short", action="store_true", help="a smaller backlog")
    args = parser.parse_args()
    if args.short:
        args.tasks = min(args.tasks, 120)
    with backing_services() as (pg_url, redis_url, _tmp):
        asyncio.run(run(args, pg_url, redis_url))


if __name__ == "__main__":
    main()
