"""A 10 000-task backlog from 100 users: queue positions, task lists, memory.

Fills PostgreSQL and Redis through the repository (``db.tasks.create_task``) and the
queue (``TaskQueue.enqueue``) — not through HTTP, to be quick — then measures:

- the time to compute one task's queue position (``TaskQueue.position``, the Lua
  script the API runs for every queued task it shows), p50/p99 over many tasks;
- the time to list one user's tasks, first page and a deep cursor, through the
  repository and through the HTTP route (which adds a position per queued task);
- the Redis memory the queue holds (the sum of ``MEMORY USAGE`` over the queue keys,
  and the growth of ``used_memory``);
- the resident memory of a ``vidmaas dispatcher`` process holding that backlog, started
  with ``VIDMAAS_GPU_CAPACITY=0`` so it admits nothing, measured after its first
  reconcile pass (which reads every queued task).

    python bench/scale.py [--tasks 10000] [--users 100] [--short]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import backing_services, machine, make_user, ms, pct, vidmaas_bin

PARAMS = {"size": "64*64", "width": 64, "height": 64, "num_frames": 9, "steps": 4,
          "seed": 1, "fps": 8}


async def fill(db_url: str, redis_url: str, *, tasks: int, users: int,
               ) -> tuple[list[tuple[str, str]], dict[str, list[str]], dict[str, str], int, int]:
    """Insert and enqueue; (user, task) pairs in order, ids per user, keys, memory before
    and after."""
    from vidmaas.bus.client import connect
    from vidmaas.bus.queue import TaskQueue
    from vidmaas.db import tasks as repo
    from vidmaas.db.engine import make_engine, make_sessionmaker
    from vidmaas.domain.ids import new_task_id

    keys: dict[str, str] = {}
    ids: dict[str, list[str]] = {}
    for i in range(users):
        uid, key = await make_user(db_url, f"user{i:03d}")
        keys[uid], ids[uid] = key, []
    order = [(uid, new_task_id()) for _ in range(tasks // users) for uid in keys]
    engine = make_engine(db_url)
    sessions = make_sessionmaker(engine)
    redis = connect(redis_url)
    queue = TaskQueue(redis)
    before = int((await redis.info("memory"))["used_memory"])
    sem = asyncio.Semaphore(8)

    async def insert(uid: str, tid: str) -> None:
        async with sem, sessions() as s:
            await repo.create_task(session=s, new=repo.NewTask(
                id=tid, user_id=uid, model="tiny-t2v", prompt=f"prompt of {tid}",
                params=PARAMS, gpus=1))

    try:
        for start in range(0, len(order), 500):
            await asyncio.gather(*(insert(u, t) for u, t in order[start:start + 500]))
        for uid, tid in order:  # in order: FIFO within a user, round-robin across
            await queue.enqueue(user_id=uid, task_id=tid, gpus=1)
            ids[uid].append(tid)
        after = int((await redis.info("memory"))["used_memory"])
    finally:
        await redis.aclose()
        await engine.dispose()
    return order, ids, keys, before, after


async def queue_memory(redis_url: str) -> tuple[int, int]:
    """(bytes, keys) of every queue key by ``MEMORY USAGE``."""
    from vidmaas.bus import keys as k
    from vidmaas.bus.client import connect

    redis = connect(redis_url)
    total = n = 0
    try:
        prefix = k.PREFIX + "{q}:"
        async for key in redis.scan_iter(match=prefix.replace("{", "\\{").replace("}", "\\}")
                                         + "*", count=1000):
            total += int(await redis.memory_usage(key) or 0)
            n += 1
    finally:
        await redis.aclose()
    return total, n


async def time_positions(redis_url: str, order: list[tuple[str, str]], samples: int,
                         ) -> tuple[list[float], int]:
    from vidmaas.bus.client import connect
    from vidmaas.bus.queue import TaskQueue

    redis = connect(redis_url)
    queue = TaskQueue(redis)
    rng = random.Random(7)
    out = []
    last = 0
    try:
        for uid, tid in [order[-1], *rng.sample(order, min(samples, len(order)))]:
            t0 = time.perf_counter()
            pos = await queue.position(user_id=uid, task_id=tid)
            out.append(time.perf_counter() - t0)
            assert pos is not None
            last = max(last, pos)
    finally:
        await redis.aclose()
    return out, last


async def time_lists(db_url: str, redis_url: str, tmp: Path, ids: dict[str, list[str]],
                     keys: dict[str, str], rounds: int) -> dict[str, list[float]]:
    import httpx

    from vidmaas.api.app import create_app
    from vidmaas.config import DatabaseSettings, RedisSettings, Settings, StorageSettings
    from vidmaas.db import tasks as repo
    from vidmaas.db.engine import make_engine, make_sessionmaker

    uid = next(iter(ids))
    newest_first = sorted(ids[uid], reverse=True)
    deep = newest_first[min(len(newest_first) - 21, 4 * len(newest_first) // 5)]
    out: dict[str, list[float]] = {k: [] for k in (
        "repository, first page", "repository, deep cursor", "HTTP, first page",
        "HTTP, deep cursor")}
    engine = make_engine(db_url)
    sessions = make_sessionmaker(engine)
    try:
        for _ in range(rounds):
            for name, cursor in (("first page", None), ("deep cursor", deep)):
                async with sessions() as s:
                    t0 = time.perf_counter()
                    rows = await repo.list_tasks(session=s, user_id=uid, limit=21, before=cursor)
                    out[f"repository, {name}"].append(time.perf_counter() - t0)
                    assert rows
    finally:
        await engine.dispose()
    settings = Settings(database=DatabaseSettings(url=db_url), redis=RedisSettings(url=redis_url),
                        storage=StorageSettings(url=(tmp / "objects").as_uri()))
    app = create_app(settings)
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://bench",
            headers={"Authorization": f"Bearer {keys[uid]}"}) as client:
        for _ in range(rounds):
            for name, query in (("first page", ""), ("deep cursor", f"&cursor={deep}")):
                t0 = time.perf_counter()
                r = await client.get("/v1/tasks?limit=20" + query)
                out[f"HTTP, {name}"].append(time.perf_counter() - t0)
                assert r.status_code == 200 and len(r.json()["data"]) == 20, r.text
    return out


def dispatcher_rss(db_url: str, redis_url: str, tmp: Path, timeout_s: float) -> str:
    import psutil
    from tests.support.services import free_port, stop

    from vidmaas.bus import keys as k
    from vidmaas.bus.client import connect

    env = {**os.environ, "VIDMAAS_DATABASE_URL": db_url, "VIDMAAS_REDIS_URL": redis_url,
           "VIDMAAS_STORAGE_URL": (tmp / "objects").as_uri(), "VIDMAAS_GPU_CAPACITY": "0",
           "VIDMAAS_EXECUTOR": "local", "VIDMAAS_LOG_LEVEL": "WARNING",
           "VIDMAAS_LOCAL_WORK_ROOT": str(tmp / "jobs"), "VIDMAAS_METRICS_HOST": "127.0.0.1",
           "VIDMAAS_METRICS_PORT": str(free_port())}
    log = (tmp / "dispatcher.log").open("wb")
    proc = subprocess.Popen([vidmaas_bin(), "dispatcher"], env=env, stdout=log,
                            stderr=subprocess.STDOUT)

    async def reconciled() -> bool:
        redis = connect(redis_url)
        try:
            return bool(await redis.zcard(k.DISPATCHERS))
        finally:
            await redis.aclose()

    try:
        ps = psutil.Process(proc.pid)
        deadline = time.monotonic() + timeout_s
        started = time.monotonic()
        peak = 0
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                tail = (tmp / "dispatcher.log").read_text()[-600:]
                return f"not measured: the dispatcher exited with {proc.returncode}: {tail}"
            peak = max(peak, ps.memory_info().rss)
            if asyncio.run(reconciled()):
                took = time.monotonic() - started
                time.sleep(1.0)
                info = ps.memory_full_info()
                peak = max(peak, info.rss)
                return (f"{info.rss / 2**20:.1f} MiB RSS ({info.uss / 2**20:.1f} MiB USS, "
                        f"peak {peak / 2**20:.1f} MiB) after its first reconcile pass "
                        f"({took:.1f} s after start)")
            time.sleep(0.2)
        return f"not measured: no reconcile pass within {timeout_s:.0f} s"
    finally:
        stop(proc)
        log.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--users", type=int, default=100)
    parser.add_argument("--samples", type=int, default=1000, help="queue positions timed")
    parser.add_argument("--rounds", type=int, default=100, help="list calls timed per kind")
    parser.add_argument("--short", action="store_true",
                        help="the same backlog, fewer timed samples")
    args = parser.parse_args()
    if args.short:
        args.samples, args.rounds = 300, 30
    print(machine())
    print(f"scale: {args.tasks} queued tasks from {args.users} users "
          f"(PostgreSQL + Redis)")
    with backing_services() as (pg_url, redis_url, tmp):
        t0 = time.perf_counter()
        order, ids, keys, mem_before, mem_after = asyncio.run(
            fill(pg_url, redis_url, tasks=args.tasks, users=args.users))
        print(f"filled in {time.perf_counter() - t0:.1f} s")
        positions, deepest = asyncio.run(time_positions(redis_url, order, args.samples))
        print(f"queue position:  p50 {ms(pct(positions, 50))}  p99 {ms(pct(positions, 99))}  "
              f"max {ms(max(positions))}  ({len(positions)} tasks, deepest position "
              f"{deepest})")
        lists = asyncio.run(time_lists(pg_url, redis_url, tmp, ids, keys, args.rounds))
        for name, values in lists.items():
            print(f"list ({name + '):':<26} p50 {ms(pct(values, 50)):>10}  "
                  f"p99 {ms(pct(values, 99)):>10}")
        qbytes, qkeys = asyncio.run(queue_memory(redis_url))
        print(f"Redis memory of the queue: {qbytes / 2**20:.2f} MiB in {qkeys} keys "
              f"(MEMORY USAGE; {qbytes / max(1, len(order)):.0f} B per task); used_memory "
              f"grew by {(mem_after - mem_before) / 2**20:.2f} MiB while enqueuing")
        print("dispatcher memory:", dispatcher_rss(pg_url, redis_url, tmp, timeout_s=120))


if __name__ == "__main__":
    main()
