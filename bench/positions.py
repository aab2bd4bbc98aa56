"""Queue positions against the number of waiting users: what one admission costs Redis.

For each number of users with tasks waiting (16 to 500 by default, ``--per-user`` tasks
each, on a private Redis), the script fills the queue, then admits one more task per
user with ``TaskQueue.enqueue_announced`` (the create path's one script: enqueue,
position, ``queued`` event, move announcement) and, as the baseline in the same run,
enqueues one more per user with the bare enqueue script (``TaskQueue.enqueue``). It
reads the microseconds Redis itself spent per call from ``INFO commandstats`` (Redis
runs scripts on its one thread, so this is what every other client waits for), and a
batch of positions (``TaskQueue.positions``, the stream hub's and the list page's
call) for 100 tasks. Prints, per user count, µs per admission, per bare enqueue, their
ratio, and µs per 100 positions; then the admission's cost at the most users over its
cost at the fewest (1.0: it does not grow with the number of users).

    python bench/positions.py [--users 16,64,160,500] [--per-user 10] [--short]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import machine


async def _usec_per_call(client: Any) -> float:
    """Redis's µs per script call since the last reset (by digest or by source)."""
    stats = await client.info("commandstats")
    calls = usec = 0.0
    for name in ("cmdstat_evalsha", "cmdstat_eval"):
        calls += stats.get(name, {}).get("calls", 0)
        usec += stats.get(name, {}).get("usec", 0)
    return usec / calls if calls else 0.0


async def measure(redis_url: str, users: int, per_user: int) -> tuple[float, float, float]:
    """(µs per admission, µs per bare enqueue, µs per 100 positions) at ``users``."""
    from vidmaas.bus.client import connect
    from vidmaas.bus.queue import TaskQueue
    from vidmaas.domain.ids import new_task_id

    client = connect(redis_url)
    try:
        await client.flushdb()
        q = TaskQueue(client)
        names = [f"user{i:04d}" for i in range(users)]
        for _ in range(per_user):
            for u in names:
                await q.enqueue(user_id=u, task_id=new_task_id(), gpus=1)
        await client.config_resetstat()
        admitted = []
        for u in names:
            task_id = new_task_id()
            await q.enqueue_announced(user_id=u, task_id=task_id, gpus=1)
            admitted.append((u, task_id))
        admission = await _usec_per_call(client)
        await client.config_resetstat()
        for u in names:
            await q.enqueue(user_id=u, task_id=new_task_id(), gpus=1)
        bare = await _usec_per_call(client)
        await client.config_resetstat()
        batch = (admitted * (100 // len(admitted) + 1))[:100]
        for _ in range(10):
            await q.positions(batch)
        positions = await _usec_per_call(client)
        return admission, bare, positions
    finally:
        await client.aclose()


async def run(args: argparse.Namespace, redis_url: str) -> None:
    counts = [int(x) for x in args.users.split(",")]
    print(f"positions: {args.per_user} waiting tasks per user, then one admission and one "
          f"bare enqueue per user; Redis-side µs per call; {machine()}")
    print(f"  {'users':>6} {'admission':>11} {'bare enqueue':>13} {'ratio':>6} "
          f"{'100 positions':>14}")
    first = last = 0.0
    for n in counts:
        admission, bare, positions = await measure(redis_url, n, args.per_user)
        first = first or admission
        last = admission
        print(f"  {n:>6} {admission:>9.1f}µs {bare:>11.1f}µs {admission / bare:>6.2f} "
              f"{positions:>12.1f}µs")
    print(f"  admission at {counts[-1]} users / at {counts[0]} users: {last / first:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", default="16,64,160,500")
    parser.add_argument("--per-user", type=int, default=10)
    parser.add_argument("--short", action="store_true", help="16,160 users, 5 tasks each")
    args = parser.parse_args()
    if args.short:
        args.users, args.per_user = "16,160", 5
    from tests.support.services import private_redis

    with tempfile.TemporaryDirectory(prefix="vidmaas-bench-") as tmp, \
            private_redis(Path(tmp) / "redis") as (redis_url, _proc):
        asyncio.run(run(args, redis_url))


if __name__ == "__main__":
    main()
