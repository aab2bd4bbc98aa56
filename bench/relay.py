"""Relay throughput: events applied per second by one relay, against a bare consumer loop.

T running tasks on PostgreSQL (a fresh database, the project's migrations) and a private
Redis. Two phases, each published onto the global stream before it is consumed:

1. ``progress``: P progress events per task, interleaved across the tasks (so a batch
   of 100 entries holds 100 different tasks and the relay's per-task coalescing does
   not help);
2. ``terminal``: one ``completed`` per task.

Each phase is published in R rounds; each round is consumed first by one real
``Relay`` (in this process, its own consumer group, default settings but no webhook
sender, started for the round and timed until it has applied the round's entries) and
then, on the same entries, by a bare loop in a group of its own doing only
``XREADGROUP`` (100 at a time), then per event one ``UPDATE`` of the task row (its own
transaction, on the same engine) and one ``XACK``. Taking turns spreads a change in
the machine's load over both. Prints events/s of both and the ratio relay/bare per
phase. No assertions.

    python bench/relay.py [--tasks 200] [--progress 10] [--rounds 5] [--short]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import backing_services, machine, make_user

COMPLETED = {"video_key": "outputs/x/video.mp4", "poster_key": "outputs/x/poster.jpg",
             "width": 64, "height": 64, "num_frames": 5, "fps": 8, "duration_s": 0.6,
             "seed": 7, "timings": {"denoise_s": 1.0}}
BARE_GROUP = "bench-bare"


@dataclass
class Figure:
    name: str
    events: int
    seconds: float

    @property
    def per_s(self) -> float:
        return self.events / self.seconds if self.seconds else 0.0


def _no_sender() -> dict[str, Any]:
    """Relay arguments that leave the webhook sender out (no task here has a webhook, and
    starting its HTTP client in every round would be timed too). The relay before the
    settings group took them as ``options``; accepting both lets one script compare."""
    try:
        from vidmaas.config import RelaySettings
    except ImportError:
        from vidmaas.relay.service import RelayOptions  # type: ignore[attr-defined]

        return {"options": RelayOptions(send_webhooks=False)}
    return {"settings": RelaySettings(send_webhooks=False)}


async def relay_phase(svc: Any, n: int, name: str) -> Figure:
    """Run one relay until it has applied ``n`` entries; time from its start."""
    from vidmaas.relay.service import Relay

    done = asyncio.Event()
    seen = 0

    async def counted(_outcome: object) -> None:
        nonlocal seen
        seen += 1
        if seen >= n:
            done.set()

    relay = Relay(svc, consumer_name="bench-relay", on_outcome=counted, **_no_sender())
    started = time.perf_counter()
    task = asyncio.create_task(relay.run(), name="bench-relay")
    try:
        await asyncio.wait_for(done.wait(), 600)
        took = time.perf_counter() - started
    finally:
        relay.stop()
        await asyncio.gather(task, return_exceptions=True)
    return Figure(f"relay {name}", n, took)


async def bare_phase(svc: Any, n: int, name: str) -> Figure:
    """XREADGROUP 100, then per event one UPDATE and one XACK, until ``n`` are done."""
    from sqlalchemy import text

    from vidmaas.bus import keys

    redis = svc.redis
    update_progress = text("UPDATE tasks SET progress = :p, updated_at = now() WHERE id = :id")
    update_done = text("UPDATE tasks SET progress = 100, video_key = :v, poster_key = :k, "
                       "updated_at = now() WHERE id = :id")
    handled = 0
    started = time.perf_counter()
    while handled < n:
        resp: Any = await redis.xreadgroup(BARE_GROUP, "bare", {keys.EVENTS: ">"}, count=100,
                                           block=1000)
        for entry_id, fields in resp[0][1] if resp else []:
            data = json.loads(fields["data"])
            async with svc.sessions() as s:
                if fields["type"] == "progress":
                    await s.execute(update_progress, {"p": data["percent"],
                                                      "id": fields["task_id"]})
                else:
                    await s.execute(update_done, {"v": data.get("video_key"),
                                                  "k": data.get("poster_key"),
                                                  "id": fields["task_id"]})
                await s.commit()
            await redis.xack(keys.EVENTS, BARE_GROUP, entry_id)
            handled += 1
    return Figure(f"bare {name}", n, time.perf_counter() - started)


PARAMS = {"size": "64*64", "width": 64, "height": 64, "num_frames": 5, "steps": 2, "seed": 7,
          "fps": 8}


async def running_task(svc: Any, user_id: str) -> str:
    """A task moved the dispatcher's way to ``running``, holding one GPU."""
    from vidmaas.db import tasks as repo
    from vidmaas.domain import events as ev
    from vidmaas.domain.ids import new_task_id
    from vidmaas.domain.status import TaskStatus

    lifecycle = svc.lifecycle
    async with svc.sessions() as s:
        task, _ = await repo.create_task(session=s, new=repo.NewTask(
            id=new_task_id(), user_id=user_id, model="tiny-t2v", prompt="bench",
            params=PARAMS, gpus=1))
    await lifecycle.enqueue(task)
    claim = await lifecycle.queue.claim_next(dispatcher_id="bench", capacity=10**6,
                                             per_user_cap=10**6, lease_s=600)
    assert claim.claim is not None and claim.claim.task_id == task.id
    await lifecycle.transition(
        task_id=task.id, to=TaskStatus.DISPATCHING, expected=TaskStatus.QUEUED,
        fields={"attempts": 1},
        event=ev.dispatched(task.id, executor="fake", job_name="j", attempt=1))
    await lifecycle.queue.ack(task.id)
    await lifecycle.transition(task_id=task.id, to=TaskStatus.RUNNING,
                               expected=TaskStatus.DISPATCHING)
    return str(task.id)


async def run(args: argparse.Namespace, db_url: str, redis_url: str) -> None:
    from vidmaas.bus import keys
    from vidmaas.config import DatabaseSettings, RedisSettings, Settings, StorageSettings
    from vidmaas.db import tasks as repo
    from vidmaas.domain import events as ev
    from vidmaas.services import Services

    settings = Settings(database=DatabaseSettings(url=db_url), redis=RedisSettings(url=redis_url),
                        storage=StorageSettings(url=(args.tmp / "objects").as_uri()))
    user_id, _key = await make_user(db_url, "bench")
    svc = Services.open(settings)
    try:
        t0 = time.perf_counter()
        tasks = [await running_task(svc, user_id) for _ in range(args.tasks)]
        print(f"setup: {len(tasks)} running tasks in {time.perf_counter() - t0:.1f} s")
        # The setup's own events (queued, dispatched) are applied before anything is timed.
        setup_entries = int(await svc.redis.xlen(keys.EVENTS))
        await relay_phase(svc, setup_entries, "setup")
        phases: list[tuple[str, list[ev.Event]]] = [
            ("progress", [ev.progress(t, step=i + 1, total=args.progress,
                                      percent=100.0 * (i + 1) / (args.progress + 1), eta_s=1.0)
                          for i in range(args.progress) for t in tasks]),
            ("terminal", [ev.Event(t, ev.EventType.COMPLETED, COMPLETED) for t in tasks]),
        ]
        figures: list[tuple[Figure, Figure]] = []
        for name, events in phases:
            newest: Any = await svc.redis.xrevrange(keys.EVENTS, count=1)
            start_id = newest[0][0] if newest else "0"
            await svc.redis.xgroup_destroy(keys.EVENTS, BARE_GROUP)  # 0 if there is none
            await svc.redis.xgroup_create(keys.EVENTS, BARE_GROUP, id=start_id)
            relay, bare = Figure(f"relay {name}", 0, 0.0), Figure(f"bare {name}", 0, 0.0)
            # Rounds: the two loops take turns, so that a change in the machine's load
            # falls on both alike.
            size = -(-len(events) // args.rounds)
            for chunk in (events[i:i + size] for i in range(0, len(events), size)):
                for e in chunk:
                    await svc.lifecycle.publish(e)
                for total, measured in ((relay, await relay_phase(svc, len(chunk), name)),
                                        (bare, await bare_phase(svc, len(chunk), name))):
                    total.events += measured.events
                    total.seconds += measured.seconds
            figures.append((relay, bare))
        done = 0
        for t in tasks:
            async with svc.sessions() as s:
                task = await repo.get_task(session=s, task_id=t)
            done += task is not None and task.status == "completed"
        print(f"tasks completed by the relay: {done}/{len(tasks)}")
        for relay, bare in figures:
            print(f"{relay.name:<16} {relay.events:>6} events in {relay.seconds:7.2f} s  "
                  f"{relay.per_s:8.1f} events/s")
            print(f"{bare.name:<16} {bare.events:>6} events in {bare.seconds:7.2f} s  "
                  f"{bare.per_s:8.1f} events/s")
            ratio = relay.per_s / bare.per_s if bare.per_s else 0.0
            print(f"ratio relay/bare ({relay.name.split()[-1]}): {ratio:.2f}×")
    finally:
        await svc.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=200)
    parser.add_argument("--progress", type=int, default=10, help="progress events per task")
    parser.add_argument("--rounds", type=int, default=5,
                        help="turns the relay and the bare loop take in each phase")
    parser.add_argument("--short", action="store_true", help="100 tasks × 5 progress events")
    args = parser.parse_args()
    if args.short:
        args.tasks, args.progress = 100, 5
    print(machine())
    print(f"relay: {args.tasks} running tasks, {args.progress} progress events each "
          f"(interleaved), then one completed each; in {args.rounds} rounds, one relay in "
          "this process, then a bare loop on the same entries; PostgreSQL and Redis on "
          "127.0.0.1")
    with backing_services() as (pg_url, redis_url, tmp):
        args.tmp = tmp
        asyncio.run(run(args, pg_url, redis_url))


if __name__ == "__main__":
    main()
