"""ETA and fairness: how good the start-time estimate is, and whether weights hold.

A simulated day, compressed in time, on the fake executor over real PostgreSQL and
Redis: four users of weights 1, 1, 2 and 4 submit tasks of three models with
different GPU counts and run times (a 1-GPU model of ~0.3 s, a 2-GPU one of ~1 s and
an 8-GPU one of ~2.5 s, each ±30 %; capacity 8 GPUs), as a quiet morning, a burst
from two users, a busy afternoon, and an evening rush in which every user queues a
backlog at once (in proportion to their weight, the same mix of models for all). A
stand-in relay finishes each task when its job ends (``Lifecycle.finish``), as in
``bench/dispatch.py``. Before the day a few tasks of each model run, so that the
queue knows typical run times.

At each task's creation the bench records the estimate of ``api.estimates``
(``domain.eta.estimate_starts`` over the tasks running now, the waiting ones in
``TaskQueue.order`` and ``TaskQueue.model_run_s``); the fake executor records the
actual start. Prints:
- the estimate's absolute error as a fraction of the actual wait: median and p90,
  over tasks that waited at least ``--min-wait-s`` (and the absolute error in
  seconds over all of them); and the same for the estimates of every waiting task
  recomputed each second, as the event streams push them when the queue moves;
- fairness: each user's share of the GPU-seconds of the tasks admitted while every
  user had tasks waiting (the evening rush, which starts once the afternoon's queue has drained, so
  that no one carries credit into it, until the first user's backlog is admitted),
  against the share their weight entitles them to, and the whole day's shares;
- that the GPU-seconds recorded per task and per user's day agree.
No assertions.

    python bench/eta.py [--scale 1.0] [--rush 24] [--seed 7] [--short]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import backing_services, machine, make_user, pct

CAPACITY = 8
MODELS = {  # model id → (typical run s, share of submissions)
    "tiny-t2v": (0.3, 0.5),
    "wan2.2-ti2v-5b": (1.0, 0.35),
    "wan2.2-t2v-a14b": (2.5, 0.15),
}
USERS = {"ana": 1.0, "ben": 1.0, "chen": 2.0, "dita": 4.0}
RUSH_CYCLE = ("tiny-t2v", "wan2.2-ti2v-5b", "tiny-t2v", "wan2.2-t2v-a14b", "tiny-t2v",
              "wan2.2-ti2v-5b", "tiny-t2v", "wan2.2-ti2v-5b")


@dataclass
class Record:
    user: str
    model: str
    gpus: int
    created: float
    estimate_s: float | None
    started: float | None = None
    ended: float | None = None


@dataclass
class Day:
    """Arrivals: (seconds from the start, user, model, priority)."""

    arrivals: list[tuple[float, str, str, str]] = field(default_factory=list)
    rush_at: float = 0.0


def plan_day(*, scale: float, rush: int, rng: random.Random) -> Day:
    day = Day()
    names, weights = list(MODELS), [share for _, share in MODELS.values()]

    def model() -> str:
        return rng.choices(names, weights)[0]

    def poisson(start: float, length: float, rate: float) -> None:
        for user in USERS:
            t = start + rng.expovariate(rate / len(USERS))
            while t < start + length:
                day.arrivals.append((t, user, model(), "high" if rng.random() < 0.1
                                     else "normal"))
                t += rng.expovariate(rate / len(USERS))

    poisson(0.0, 20 * scale, 1.0)  # morning: about 40 % of the GPUs
    burst = 20 * scale
    for user in ("ana", "chen"):  # a burst from two users
        day.arrivals += [(burst + 0.01 * i, user, model(), "normal") for i in range(8)]
    poisson(24 * scale, 30 * scale, 2.2)  # afternoon: about 90 %
    # Evening rush: everyone queues a backlog at once, in proportion to their weight, so
    # that under a fair share all of them would be served until about the same time.
    day.rush_at = 56 * scale
    # Every user's backlog has the same mix, in the same order (RUSH_CYCLE).
    for user, weight in USERS.items():
        for i in range(round(rush * weight)):
            day.arrivals.append((day.rush_at + 0.002 * i, user,
                                 RUSH_CYCLE[i % len(RUSH_CYCLE)], "normal"))
    day.arrivals.sort()
    return day


def make_dispatcher(*, settings: Any, sessions: Any, redis: Any, executor: Any) -> Any:
    """The one place a dispatcher is built (its constructor is the dispatcher's API)."""
    from vidmaas.dispatcher.service import Dispatcher
    from vidmaas.domain.models import ModelRegistry

    return Dispatcher(settings=settings, sessions=sessions, redis=redis, executor=executor,
                      registry=ModelRegistry.load())


async def run(args: argparse.Namespace, db_url: str, redis_url: str) -> None:
    from vidmaas.api.estimates import estimated_starts
    from vidmaas.bus.client import connect
    from vidmaas.config import DispatcherSettings, Settings
    from vidmaas.db import tasks as repo
    from vidmaas.db import usage
    from vidmaas.db.engine import make_engine, make_sessionmaker
    from vidmaas.db.models import utcnow
    from vidmaas.dispatcher.executors.fake import FakeExecutor, FakeOutcome
    from vidmaas.domain.fairness import Share
    from vidmaas.domain.ids import new_task_id
    from vidmaas.domain.jobs import JobSpec
    from vidmaas.domain.models import ModelRegistry
    from vidmaas.domain.quotas import day_start
    from vidmaas.domain.status import TaskStatus
    from vidmaas.errors import VidmaasError
    from vidmaas.lifecycle import Lifecycle

    rng = random.Random(args.seed)
    settings = Settings(gpu_capacity=CAPACITY, database={"url": db_url},  # type: ignore[arg-type]
                        redis={"url": redis_url},  # type: ignore[arg-type]
                        dispatcher=DispatcherSettings(per_user_running_cap=CAPACITY))
    registry = ModelRegistry.load()
    engine = make_engine(db_url)
    sessions = make_sessionmaker(engine)
    redis = connect(redis_url)
    lifecycle = Lifecycle(sessions=sessions, redis=redis, settings=settings)
    queue = lifecycle.queue
    user_ids = {name: (await make_user(db_url, f"eta-{name}"))[0]
                for name in [*USERS, "warmup"]}
    records: dict[str, Record] = {}
    finished = asyncio.Event()
    expected = 0

    def outcome(spec: JobSpec) -> FakeOutcome:
        typical = MODELS[spec.model.id][0] * args.time_scale
        return FakeOutcome(duration_s=typical * rng.uniform(0.7, 1.3))

    async def relay(spec: JobSpec, kind: str) -> None:
        rec = records.get(spec.task_id)
        if kind == "started":
            if rec is not None and rec.started is None:
                rec.started = time.monotonic()
            return
        # The job may end before the dispatcher recorded "running": move it on first,
        # as the relay does.
        with contextlib.suppress(VidmaasError):
            await lifecycle.transition(task_id=spec.task_id, to=TaskStatus.RUNNING,
                                       expected=TaskStatus.DISPATCHING)
        for _ in range(500):
            try:
                await lifecycle.finish(task_id=spec.task_id, to=TaskStatus.COMPLETED,
                                       expected=TaskStatus.RUNNING)
                break
            except VidmaasError:
                await asyncio.sleep(0.005)
        if rec is not None:
            rec.ended = time.monotonic()
        if sum(1 for r in records.values() if r.ended is not None) >= expected:
            finished.set()

    async def submit(user: str, model: str, priority: str) -> None:
        spec = registry.get_or_raise(model)
        async with sessions() as s:
            task, _ = await repo.create_task(session=s, new=repo.NewTask(
                id=new_task_id(), user_id=user_ids[user], model=model, prompt="eta",
                params={"size": spec.default_size, "num_frames": spec.default_frames,
                        "steps": 2, "seed": 1, "fps": spec.fps},
                gpus=spec.gpus_per_job, priority=priority))
        records[task.id] = Record(user=user, model=model, gpus=spec.gpus_per_job,
                                  created=time.monotonic(), estimate_s=None)
        await lifecycle.admit_new(task, share=Share(weight=USERS.get(user, 1.0)))
        starts = await estimated_starts(queue=queue, sessions=sessions, capacity=CAPACITY)
        # Not in the queue any more: a dispatcher took it already (it starts now).
        records[task.id].estimate_s = starts.get(task.id, 0.0)

    samples: list[tuple[str, float, float | None]] = []

    async def sample(every_s: float) -> None:
        """The estimates the event streams would push as the queue moves."""
        while True:
            await asyncio.sleep(every_s)
            at = time.monotonic()
            for task_id, est in (await estimated_starts(queue=queue, sessions=sessions,
                                                        capacity=CAPACITY)).items():
                samples.append((task_id, at, est))

    executor = FakeExecutor(name="fake-eta", duration_s=0.5, outcome=outcome, on_event=relay)
    dispatcher = make_dispatcher(settings=settings, sessions=sessions, redis=redis,
                                 executor=executor)
    runner = asyncio.create_task(dispatcher.run(), name="bench-eta-dispatcher")
    try:
        # Warm-up: the queue learns each model's run time.
        expected = 2 * len(MODELS)
        for model in MODELS:
            for _ in range(2):
                await submit("warmup", model, "normal")
        await asyncio.wait_for(finished.wait(), timeout=120)
        warm = set(records)
        finished.clear()
        day = plan_day(scale=args.scale, rush=args.rush, rng=rng)
        expected = len(records) + len(day.arrivals)
        began = time.monotonic()
        sampler = asyncio.create_task(sample(1.0), name="bench-eta-sampler")
        shift = 0.0
        for at, user, model, priority in day.arrivals:
            if at >= day.rush_at and not shift:
                # A quiet hour first: the rush starts from an empty queue, so every user
                # starts from the same virtual time and the shares can be compared.
                total, expected = expected, len(records)
                finished.clear()
                if any(r.ended is None for r in records.values()):
                    await asyncio.wait_for(finished.wait(), timeout=600)
                expected = total
                finished.clear()
                shift = max(1e-9, time.monotonic() - (began + day.rush_at))
            delay = began + shift + at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            await submit(user, model, priority)
        day.rush_at += shift
        await asyncio.wait_for(finished.wait(), timeout=900)
        wall = time.monotonic() - began
        sampler.cancel()
        await asyncio.gather(sampler, return_exceptions=True)
        today = day_start(utcnow())
        async with sessions() as s:
            rows = await usage.usage_rows(s, user_id=None, since=today, until=today)
            charged = {t.id: t.gpu_seconds or 0.0 for t in await repo.list_tasks(
                session=s, user_id=None, limit=100_000)}
    finally:
        dispatcher.stop()
        await runner
        await executor.close()
        await redis.aclose()
        await engine.dispose()

    day_records = {k: r for k, r in records.items() if k not in warm}
    report(args, day, day_records, began=began, wall=wall, usage_rows=rows, charged=charged,
           warm=warm, samples=samples)


def report(args: argparse.Namespace, day: Day, records: dict[str, Record], *, began: float,
           wall: float, usage_rows: list[Any], charged: dict[str, float],
           warm: set[str], samples: list[tuple[str, float, float | None]]) -> None:
    done = [r for r in records.values() if r.started is not None]
    waits = [(r, r.started - r.created) for r in done]  # type: ignore[operator]
    long_waits = [(r, w) for r, w in waits if w >= args.min_wait_s and r.estimate_s is not None]
    rel = [abs(r.estimate_s - w) / w for r, w in long_waits]  # type: ignore[operator]
    absolute = [abs(r.estimate_s - w) for r, w in waits if r.estimate_s is not None]  # type: ignore[operator]
    under = sum(1 for r, w in long_waits if r.estimate_s < w)  # type: ignore[operator]
    print(f"eta: {len(records)} tasks from {len(USERS)} users (weights "
          f"{', '.join(f'{u} {w:g}' for u, w in USERS.items())}), models "
          f"{', '.join(f'{m} ({r:.1f} s)' for m, (r, _) in MODELS.items())} ×{args.time_scale:g}, "
          f"capacity {CAPACITY} GPUs; day of {wall:.1f} s; {machine()}")
    print(f"  start estimate, |error| / actual wait   median {pct(rel, 50):.2f}   "
          f"p90 {pct(rel, 90):.2f}   (n={len(rel)} tasks that waited >= "
          f"{args.min_wait_s:g} s; {under} estimated too early)")
    print(f"  start estimate, |error| in seconds      median {pct(absolute, 50):.2f} s   "
          f"p90 {pct(absolute, 90):.2f} s   (all {len(absolute)} tasks; median wait "
          f"{pct([w for _, w in waits], 50):.2f} s, p90 {pct([w for _, w in waits], 90):.2f} s)")

    refreshed = []
    for task_id, at, est in samples:
        rec = records.get(task_id)
        if rec is None or rec.started is None or est is None:
            continue
        left = rec.started - at
        if left >= args.min_wait_s:
            refreshed.append(abs(est - left) / left)
    print(f"  refreshed every second (as pushed)     median {pct(refreshed, 50):.2f}   "
          f"p90 {pct(refreshed, 90):.2f}   (n={len(refreshed)} estimates of a remaining "
          f"wait >= {args.min_wait_s:g} s)")

    rush_at = began + day.rush_at
    rush = [r for r in records.values() if r.created >= rush_at - 0.01]
    last_start = {u: max((r.started or 0.0) for r in rush if r.user == u) for u in USERS}
    window_end = min(last_start.values())
    # Service as the rule counts it: the GPU-seconds of the tasks admitted in the window.
    got: dict[str, float] = defaultdict(float)
    biggest = 0.0
    for r in rush:
        if r.started is None or r.ended is None:
            continue
        cost = (r.ended - r.started) * r.gpus
        biggest = max(biggest, cost)
        if r.started <= window_end:
            got[r.user] += cost
    total_w = sum(USERS.values())
    total = sum(got.values()) or 1.0
    errors = []
    print(f"  fairness in the rush (all users waiting, {window_end - rush_at:.1f} s, "
          f"{total:.0f} GPU-s admitted; largest task {biggest:.0f} GPU-s): "
          "user: share of GPU-seconds / share by weight")
    for user, weight in USERS.items():
        share, due = got[user] / total, weight / total_w
        errors.append(share / due - 1)
        print(f"    {user:<5} weight {weight:g}: {share:.3f} / {due:.3f}  "
              f"({share / due - 1:+.1%})")
    print(f"  fairness error (max |share / due - 1|)  {max(abs(e) for e in errors):.1%}")
    whole: dict[str, float] = defaultdict(float)
    for task_id, r in records.items():
        whole[r.user] += charged.get(task_id, 0.0)
    all_gs = sum(whole.values()) or 1.0
    print("  whole day's GPU-seconds (recorded per task): "
          + ", ".join(f"{u} {whole[u]:.0f} ({whole[u] / all_gs:.0%})" for u in USERS))
    per_task = sum(charged.values())
    per_day = sum(r.gpu_seconds for r in usage_rows)
    print(f"  GPU-seconds per task {per_task:.1f} = per user and day {per_day:.1f} "
          f"(warm-up included: {len(warm)} tasks)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0, help="length of the day")
    parser.add_argument("--time-scale", type=float, default=1.0,
                        help="multiplies every run time")
    parser.add_argument("--rush", type=int, default=24,
                        help="tasks per unit of weight each user queues in the evening rush")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--min-wait-s", type=float, default=0.5,
                        help="relative errors only over tasks that waited this long")
    parser.add_argument("--short", action="store_true", help="a shorter day (under a minute)")
    args = parser.parse_args()
    if args.short:
        args.scale, args.rush = min(args.scale, 0.2), min(args.rush, 8)
    with backing_services() as (pg_url, redis_url, _tmp):
        asyncio.run(run(args, pg_url, redis_url))


if __name__ == "__main__":
    main()
