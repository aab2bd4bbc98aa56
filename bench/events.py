"""Event delivery: publish → WebSocket receipt through the real API, three ways, in one run.

T tasks each publish ``progress`` events at R events/s (with ``bus.events.publish``, as the
job runtime does) while B "browsers" (the same user, like open tabs) follow all T tasks:

1. ``vidmaas api`` (the real role in its own process: authentication, snapshots, the
   shared XREAD reader, bounded outboxes), one WebSocket per task per browser on
   ``/v1/tasks/{id}/events`` — B×T connections, the page's old way;
2. the same server, one multiplexed ``/v1/events`` connection per browser carrying all T
   tasks — B connections, the page's way now; the same events are delivered;
3. a bare relay in its own process: one blocking ``XREAD`` per WebSocket (B×T of them),
   forwarding each entry as JSON, nothing else.

Each prints the p50/p99 latency from publish to receipt, the messages/s delivered, and
the server process's CPU time (user + system, from ``/proc/<pid>/stat``) per delivered
event; the ratios compare figures of the same run. The load generator runs in this
process, so its CPU is not counted. Bounded in time; no assertions.

    python bench/events.py [--tasks 20] [--rate 10] [--browsers 10] [--duration-s 10]
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


def cpu_s(pid: int) -> float:
    """User + system CPU seconds used so far by process ``pid`` (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def load() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.2f} (1 min), {five:.2f} (5 min)"


@dataclass
class Result:
    name: str
    connections: int
    published: int = 0
    received: int = 0
    duration_s: float = 0.0
    server_cpu_s: float = 0.0
    rounds: int = 1
    latencies_s: list[float] = field(default_factory=list)

    def add(self, other: Result) -> Result:
        """This result and another window of the same load, pooled."""
        return Result(self.name, self.connections, self.published + other.published,
                      self.received + other.received, self.duration_s + other.duration_s,
                      self.server_cpu_s + other.server_cpu_s, self.rounds + other.rounds,
                      self.latencies_s + other.latencies_s)

    @property
    def per_s(self) -> float:
        return self.received / self.duration_s if self.duration_s else 0.0

    @property
    def cpu_per_event_us(self) -> float:
        return 1e6 * self.server_cpu_s / self.received if self.received else 0.0

    def line(self, expected: int) -> str:
        lat = self.latencies_s
        return (f"{self.name:<22} {self.connections:>4} conns  p50 {ms(pct(lat, 50)):>10}  "
                f"p99 {ms(pct(lat, 99)):>10}  {self.per_s:8.1f} msgs/s  server CPU "
                f"{self.server_cpu_s:6.2f} s = {self.cpu_per_event_us:6.1f} µs/event  "
                f"({self.received}/{expected} expected deliveries, {self.published} "
                "events published)")


async def run_load(name: str, urls: list[str], headers: dict[str, str] | None,
                   task_ids: list[str], *, redis_url: str, rate: float,
                   duration_s: float, server_pid: int, snapshots: int) -> Result:
    """Connect every URL, wait for ``snapshots`` snapshots on each (0: none are sent),
    publish for ``duration_s``, and count what arrives."""
    from vidmaas.bus.client import connect
    from vidmaas.bus.events import publish
    from vidmaas.domain import events as ev

    result = Result(name, connections=len(urls))
    ready = 0

    async def subscriber(url: str) -> None:
        nonlocal ready
        async with ws_connect(url, additional_headers=headers, max_queue=None) as ws:
            for _ in range(snapshots):
                json.loads(await ws.recv())  # one snapshot per task
            if not snapshots:
                await asyncio.sleep(0.5)  # the relay's first XREAD must be blocking on "$"
            ready += 1
            async for raw in ws:  # until cancelled at the end
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

    cpu_before = cpu_s(server_pid)
    started = time.monotonic()
    await asyncio.gather(*(publisher(t) for t in task_ids))
    result.duration_s = time.monotonic() - started
    await asyncio.sleep(1.0)  # stragglers
    result.server_cpu_s = cpu_s(server_pid) - cpu_before
    for t in subs:
        t.cancel()
    await asyncio.gather(*subs, return_exceptions=True)
    await redis.aclose()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=20, help="live tasks per browser")
    parser.add_argument("--rate", type=float, default=10.0, help="events/s per task")
    parser.add_argument("--browsers", type=int, default=10,
                        help="browsers (tabs) following every task")
    parser.add_argument("--duration-s", type=float, default=10.0, help="per window")
    parser.add_argument("--rounds", type=int, default=3,
                        help="windows per way, per-task and multiplexed alternating")
    parser.add_argument("--short", action="store_true",
                        help="20 tasks, 3 browsers, 2 rounds of 3 s")
    parser.add_argument("--serve-bare", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--redis-url", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_bare:
        serve_bare(args.serve_bare, args.redis_url)
        return
    if args.short:
        args.tasks, args.browsers, args.duration_s, args.rounds = 20, 3, 3.0, 2
    from tests.support.services import free_port, stop, wait_port

    print(machine())
    print(load())
    per_task = args.browsers * args.tasks
    print(f"events: {args.tasks} tasks × {args.rate:g} progress events/s, followed by "
          f"{args.browsers} browsers: {per_task} per-task WebSockets, or {args.browsers} "
          f"multiplexed ones; {args.rounds} windows of {args.duration_s:g} s each, "
          "per-task and multiplexed alternating on the same server; each server one "
          "process on 127.0.0.1, the load generator in this one")
    expected = int(args.rate * args.duration_s * per_task * args.rounds)
    with backing_services() as (pg_url, redis_url, tmp):
        _user_id, key = asyncio.run(make_user(pg_url, "bench"))
        env = {**os.environ, "VIDMAAS_DATABASE_URL": pg_url, "VIDMAAS_REDIS_URL": redis_url,
               "VIDMAAS_STORAGE_URL": (tmp / "objects").as_uri(),
               "VIDMAAS_API_MAX_QUEUED_PER_USER": "100000000", "VIDMAAS_LOG_LEVEL": "WARNING",
               "VIDMAAS_DEFAULT_MODEL": "tiny-t2v"}
        headers = {"Authorization": f"Bearer {key}"}
        results: dict[str, Result] = {}
        task_ids: list[str] = []

        def load_on(name: str, urls: list[str], *, hdrs: dict[str, str] | None, pid: int,
                    snapshots: int) -> None:
            got = asyncio.run(run_load(
                name, urls, hdrs, task_ids, redis_url=redis_url, rate=args.rate,
                duration_s=args.duration_s, server_pid=pid, snapshots=snapshots))
            results[name] = results[name].add(got) if name in results else got

        for server in ("vidmaas", "bare relay"):
            port = free_port()
            if server == "vidmaas":
                cmd = [vidmaas_bin(), "api", "--host", "127.0.0.1", "--port", str(port)]
            else:
                cmd = [sys.executable, str(Path(__file__).resolve()), "--serve-bare",
                       str(port), "--redis-url", redis_url]
            proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE)
            try:
                wait_port(port, timeout_s=60, proc=proc)
                base = f"ws://127.0.0.1:{port}"
                if server == "vidmaas":
                    with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=headers,
                                      timeout=30) as http:
                        for _ in range(args.tasks):
                            r = http.post("/v1/tasks", json={"prompt": "bench"})
                            r.raise_for_status()
                            task_ids.append(r.json()["id"])
                    ways = [("vidmaas per-task", [f"{base}/v1/tasks/{t}/events"
                                                  for _ in range(args.browsers)
                                                  for t in task_ids], 1),
                            ("vidmaas multiplexed", [f"{base}/v1/events"] * args.browsers,
                             args.tasks)]
                    for n in range(args.rounds):  # ABBA…: drift in the load evens out
                        for name, urls, snapshots in ways[::1 if n % 2 == 0 else -1]:
                            load_on(name, urls, hdrs=headers, pid=proc.pid,
                                    snapshots=snapshots)
                else:
                    for _ in range(args.rounds):
                        load_on("bare relay (per-task)", [f"{base}/{t}"
                                                          for _ in range(args.browsers)
                                                          for t in task_ids],
                                hdrs=None, pid=proc.pid, snapshots=0)
            finally:
                stop(proc)
        for r in results.values():
            print(r.line(expected))
        print(load())
        per, mux, bare = (results["vidmaas per-task"], results["vidmaas multiplexed"],
                          results["bare relay (per-task)"])
        if all(r.latencies_s and r.received for r in (per, mux, bare)):
            def ratio(a: float, b: float) -> str:
                return f"{a / b:.2f}×" if b else "n/a"

            print(f"ratio multiplexed/per-task: p50 "
                  f"{ratio(pct(mux.latencies_s, 50), pct(per.latencies_s, 50))}, p99 "
                  f"{ratio(pct(mux.latencies_s, 99), pct(per.latencies_s, 99))}, server CPU "
                  f"per delivered event {ratio(mux.cpu_per_event_us, per.cpu_per_event_us)}"
                  f", connections {args.browsers}/{per_task}")
            print(f"ratio vidmaas per-task/bare: p50 "
                  f"{ratio(pct(per.latencies_s, 50), pct(bare.latencies_s, 50))}, p99 "
                  f"{ratio(pct(per.latencies_s, 99), pct(bare.latencies_s, 99))}, server CPU "
                  f"per delivered event {ratio(per.cpu_per_event_us, bare.cpu_per_event_us)}"
                  f"; Redis connections held: vidmaas 1 blocked reader, bare {per_task}")


if __name__ == "__main__":
    main()
