"""Event delivery: publish → WebSocket receipt through the real API, against a bare relay.

T tasks each publish ``progress`` events at R events/s (with ``bus.events.publish``, as the
job runtime does) while W WebSocket subscribers (spread evenly over the tasks) follow
them through (1) ``vidmaas api`` — the real role in its own process: authentication,
snapshot, the shared XREAD reader, bounded outboxes — and (2) a bare relay in its own
process: one blocking ``XREAD`` per WebSocket, forwarding each entry as JSON, nothing
else. Both print the p50/p99 latency from publish to receipt and the messages/s
delivered; the ratio is the figure. Bounded in time; no assertions.

    python bench/events.py [--tasks 20] [--rate 10] [--subscribers 200] [--duration-s 10]
                           [--short]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx
from websockets.asyncio.client import connect as ws_connect

from bench import backing_services, machine, make_user, ms, pct, vidmaas_bin

# ---------------------------------------------------------------- the bare relay


def serve_bare(port: int, redis_url: str) -> None:
    """One XREAD BLOCK loop per WebSocket on ``/{task_id}``, entries forwarded as JSON."""
    from websockets.asyncio.server import ServerConnection, serve

    from vidmaas.bus import keys
    from vidmaas.bus.client import connect

    async def handler(ws: ServerConnection) -> None:
        task_id = (ws.request.path if ws.request else "/").strip("/")
        redis = connect(redis_url)
        cursor = "$"
        try:
            while True:
                resp = await redis.xread({keys.task_events(task_id): cursor}, block=5000,
                                         count=100)
                for _key, entries in resp or []:
                    for entry_id, fields in entries:
                        cursor = entry_id
                        await ws.send(json.dumps({"id": entry_id, "type": fields["type"],
                                                  "data": json.loads(fields["data"])}))
        except Exception:
            return
        finally:
            await redis.aclose()

    async def main() -> None:
        async with serve(handler, "127.0.0.1", port) as server:
            await server.serve_forever()

    asyncio.run(main())


# ---------------------------------------------------------------- load


@dataclass
class Result:
    name: str
    published: int = 0
    received: int = 0
    duration_s: float = 0.0
    latencies_s: list[float] = field(default_factory=list)

    @property
    def per_s(self) -> float:
        return self.received / self.duration_s if self.duration_s else 0.0

    def line(self, expected: int) -> str:
        lat = self.latencies_s
        return (f"{self.name:<12} p50 {ms(pct(lat, 50)):>10}  p99 {ms(pct(lat, 99)):>10}  "
                f"{self.per_s:9.1f} msgs/s delivered  ({self.received}/{expected} of the "
                f"expected deliveries, {self.published} events published)")


async def run_load(name: str, urls: list[str], headers: dict[str, str] | None,
                   task_ids: list[str], *, redis_url: str, rate: float,
                   duration_s: float) -> Result:
    from vidmaas.bus.client import connect
    from vidmaas.bus.events import publish
    from vidmaas.domain import events as ev

    result = Result(name)
    stop = asyncio.Event()
    ready = 0

    async def subscriber(url: str) -> None:
        nonlocal ready
        async with ws_connect(url, additional_headers=headers, max_queue=None) as ws:
            if name == "vidmaas":
                json.loads(await ws.recv())  # the snapshot
            else:
                await asyncio.sleep(0.5)  # the relay's first XREAD must be blocking on "$"
            ready += 1
            while not stop.is_set():
                try:
                    raw = await asyncio.wait_for(ws.recv(), 0.5)
                except TimeoutError:
                    continue
                now = time.time()
                m = json.loads(raw)
                if m.get("type") == "progress" and "sent" in m.get("data", {}):
                    result.received += 1
                    result.latencies_s.append(now - m["data"]["sent"])

    subs = [asyncio.create_task(subscriber(u), name=f"sub-{i}") for i, u in enumerate(urls)]
    deadline = time.monotonic() + 60
    while ready < len(urls):
        if time.monotonic() > deadline or any(t.done() for t in subs):
            for t in subs:
                if t.done() and t.exception():
                    raise t.exception()  # type: ignore[misc]
            raise SystemExit(f"{name}: subscribers did not connect")
        await asyncio.sleep(0.05)
    redis = connect(redis_url)

    async def publisher(task_id: str) -> None:
        interval = 1 / rate
        step = 0
        next_at = time.monotonic()
        while time.monotonic() < started + duration_s:
            step += 1
            e = ev.Event(task_id, ev.EventType.PROGRESS, {
                "step": step, "total": 10**9, "percent": 1.0, "eta_s": None,
                "sent": time.time()})
            await publish(redis, e)
            result.published += 1
            next_at += interval
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))

    started = time.monotonic()
    await asyncio.gather(*(publisher(t) for t in task_ids))
    result.duration_s = time.monotonic() - started
    await asyncio.sleep(1.0)  # stragglers
    stop.set()
    await asyncio.gather(*subs, return_exceptions=True)
    await redis.aclose()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=20)
    parser.add_argument("--rate", type=float, default=10.0, help="events/s per task")
    parser.add_argument("--subscribers", type=int, default=200)
    parser.add_argument("--duration-s", type=float, default=10.0)
    parser.add_argument("--short", action="store_true", help="10 tasks, 50 subscribers, 3 s")
    parser.add_argument("--serve-bare", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--redis-url", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_bare:
        serve_bare(args.serve_bare, args.redis_url)
        return
    if args.short:
        args.tasks, args.subscribers, args.duration_s = 10, 50, 3.0
    from tests.support.services import free_port, stop, wait_port

    print(machine())
    print(f"events: {args.tasks} tasks × {args.rate:g} progress events/s, "
          f"{args.subscribers} WebSocket subscribers, {args.duration_s:g} s per server; "
          "each server one process on 127.0.0.1, the load generator in this one")
    expected_per_sub = args.rate * args.duration_s
    expected = int(expected_per_sub * args.subscribers)
    with backing_services() as (pg_url, redis_url, tmp):
        _user_id, key = asyncio.run(make_user(pg_url, "bench"))
        env = {**os.environ, "VIDMAAS_DATABASE_URL": pg_url, "VIDMAAS_REDIS_URL": redis_url,
               "VIDMAAS_STORAGE_URL": (tmp / "objects").as_uri(),
               "VIDMAAS_API_MAX_QUEUED_PER_USER": "100000000", "VIDMAAS_LOG_LEVEL": "WARNING",
               "VIDMAAS_DEFAULT_MODEL": "tiny-t2v"}
        results: list[Result] = []
        task_ids: list[str] = []
        for name in ("vidmaas", "bare relay"):
            port = free_port()
            if name == "vidmaas":
                cmd = [vidmaas_bin(), "api", "--host", "127.0.0.1", "--port", str(port)]
            else:
                cmd = [sys.executable, str(Path(__file__).resolve()), "--serve-bare",
                       str(port), "--redis-url", redis_url]
            proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE)
            try:
                wait_port(port, timeout_s=60, proc=proc)
                headers = {"Authorization": f"Bearer {key}"}
                if not task_ids:
                    with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=headers,
                                      timeout=30) as http:
                        for _ in range(args.tasks):
                            r = http.post("/v1/tasks", json={"prompt": "bench"})
                            r.raise_for_status()
                            task_ids.append(r.json()["id"])
                if name == "vidmaas":
                    urls = [f"ws://127.0.0.1:{port}/v1/tasks/{task_ids[i % args.tasks]}/events"
                            for i in range(args.subscribers)]
                else:
                    urls = [f"ws://127.0.0.1:{port}/{task_ids[i % args.tasks]}"
                            for i in range(args.subscribers)]
                results.append(asyncio.run(run_load(
                    name, urls, headers if name == "vidmaas" else None, task_ids,
                    redis_url=redis_url, rate=args.rate, duration_s=args.duration_s)))
            finally:
                stop(proc)
        for r in results:
            print(r.line(expected))
        api, bare = results
        if api.latencies_s and bare.latencies_s and bare.per_s:
            print(f"ratio: vidmaas/bare p50 {pct(api.latencies_s, 50) / pct(bare.latencies_s, 50):.2f}×, "  # noqa: E501
                  f"p99 {pct(api.latencies_s, 99) / pct(bare.latencies_s, 99):.2f}×, "
                  f"delivered msgs/s {api.per_s / bare.per_s:.2f}×; Redis connections held "
                  f"for {args.subscribers} subscribers: vidmaas 1 blocked reader, "
                  f"bare {args.subscribers}")


if __name__ == "__main__":
    main()
