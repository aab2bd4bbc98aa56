"""Task creation throughput: the real API against the bare minimum, in the same run.

C concurrent clients create tasks for a fixed time against (1) ``vidmaas api`` — the
real role, uvicorn on 127.0.0.1, PostgreSQL and Redis — and (2) a minimal ASGI app
under the same uvicorn doing only the same database insert (``db.tasks.create_task``)
and the same enqueue (``TaskQueue.enqueue``). Both print requests/s and p50/p99
latency; the ratio says what authentication, validation, the registry, the queue cap,
the ``queued`` event and the queue position cost on top of the unavoidable writes.
Both servers are single processes; the load generator runs on the same machine.

The requests come from ``--users`` users in turn (160; the minimal app writes its rows
for the same users in turn), so the API runs every quota check against queues of the
size a shared center has. ``--users 0`` is one user without a queued-task limit, whose
queue grows by every create: the counts of queued tasks then read the whole queue.

    python bench/submit.py [--clients 16] [--duration-s 10] [--users 160] [--short]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx

from bench import backing_services, machine, make_user, mean, ms, pct, vidmaas_bin

BODY = {"prompt": "a paper boat in the rain", "model": "tiny-t2v"}
QUEUED_QUOTA = 1000
"""Each user's queued-task quota: checked on every create, and high enough that no
user of the run reaches it (nothing dispatches their tasks)."""


# ---------------------------------------------------------------- the minimal app


def minimal_app(db_url: str, redis_url: str):  # type: ignore[no-untyped-def]
    """A raw ASGI app: parse the JSON, insert the task row, enqueue it, answer 202."""
    from vidmaas.bus.client import connect
    from vidmaas.bus.queue import TaskQueue
    from vidmaas.db import tasks as repo
    from vidmaas.db.engine import make_engine, make_sessionmaker
    from vidmaas.domain.ids import new_task_id

    state: dict[str, object] = {}
    params = {"size": "64*64", "width": 64, "height": 64, "num_frames": 9, "steps": 4,
              "seed": 1, "fps": 8}
    user_ids = os.environ["BENCH_USER_IDS"].split(",")
    turn = itertools.count()

    async def app(scope, receive, send):  # type: ignore[no-untyped-def]
        if scope["type"] == "lifespan":
            while True:
                msg = await receive()
                if msg["type"] == "lifespan.startup":
                    engine = make_engine(db_url)
                    state["engine"] = engine
                    state["sessions"] = make_sessionmaker(engine)
                    state["redis"] = connect(redis_url)
                    state["queue"] = TaskQueue(state["redis"])  # type: ignore[arg-type]
                    await send({"type": "lifespan.startup.complete"})
                elif msg["type"] == "lifespan.shutdown":
                    await state["redis"].aclose()  # type: ignore[attr-defined]
                    await state["engine"].dispose()  # type: ignore[attr-defined]
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        body = b""
        while True:
            msg = await receive()
            body += msg.get("body", b"")
            if not msg.get("more_body"):
                break
        data = json.loads(body)
        task_id = new_task_id()
        user_id = user_ids[next(turn) % len(user_ids)]
        async with state["sessions"]() as s:  # type: ignore[operator]
            await repo.create_task(session=s, new=repo.NewTask(
                id=task_id, user_id=user_id, model=data["model"], prompt=data["prompt"],
                params=params, gpus=1))
        await state["queue"].enqueue(user_id=user_id, task_id=task_id, gpus=1)  # type: ignore[attr-defined]
        out = json.dumps({"id": task_id, "status": "queued"}).encode()
        await send({"type": "http.response.start", "status": 202,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": out})

    return app


def serve_minimal(port: int) -> None:
    import uvicorn

    app = minimal_app(os.environ["VIDMAAS_DATABASE_URL"], os.environ["VIDMAAS_REDIS_URL"])
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


# ---------------------------------------------------------------- load


@dataclass
class Result:
    name: str
    ok: int
    errors: int
    duration_s: float
    latencies_s: list[float]

    @property
    def rps(self) -> float:
        return self.ok / self.duration_s if self.duration_s else 0.0

    def line(self) -> str:
        lat = self.latencies_s
        return (f"{self.name:<14} {self.rps:8.1f} req/s  p50 {ms(pct(lat, 50)):>10}  "
                f"p99 {ms(pct(lat, 99)):>10}  mean {ms(mean(lat)):>10}  "
                f"({self.ok} created, {self.errors} errors)")


async def load(name: str, url: str, api_keys: list[str], *, clients: int,
               duration_s: float, warmup_s: float) -> Result:
    """``clients`` clients create tasks back to back, each request with the next of
    ``api_keys`` (the users take turns)."""
    latencies: list[float] = []
    counts = {"ok": 0, "errors": 0}
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    turn = itertools.count()
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30) as client:
        start = time.perf_counter()
        measure_from = start + warmup_s
        stop_at = measure_from + duration_s

        async def worker() -> None:
            while (now := time.perf_counter()) < stop_at:
                try:
                    key = api_keys[next(turn) % len(api_keys)]
                    r = await client.post("/v1/tasks", json=BODY,
                                          headers={"Authorization": f"Bearer {key}"})
                    good = r.status_code == 202
                except httpx.HTTPError:
                    good = False
                took = time.perf_counter() - now
                if now >= measure_from:
                    if good:
                        counts["ok"] += 1
                        latencies.append(took)
                    else:
                        counts["errors"] += 1

        await asyncio.gather(*(worker() for _ in range(clients)))
    return Result(name, counts["ok"], counts["errors"], duration_s, latencies)


def wait_http(url: str, proc: subprocess.Popen[bytes], timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise SystemExit(f"{url} did not answer")


def start(cmd: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


async def make_users(db_url: str, n: int) -> list[tuple[str, str]]:
    return [await make_user(db_url, f"bench-{i}") for i in range(n)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--duration-s", type=float, default=10.0)
    parser.add_argument("--warmup-s", type=float, default=2.0)
    parser.add_argument("--users", type=int, default=160,
                        help="users taking turns, each under a queued-task quota of "
                             f"{QUEUED_QUOTA} (0: one user without a queued-task limit, "
                             "whose queue grows by every create)")
    parser.add_argument("--short", action="store_true", help="3 s per server, 8 clients")
    parser.add_argument("--serve-minimal", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_minimal:
        serve_minimal(args.serve_minimal)
        return
    if args.short:
        args.clients, args.duration_s, args.warmup_s = min(args.clients, 8), 3.0, 1.0
    from tests.support.services import free_port, stop

    print(machine())
    print(f"submit: {args.clients} concurrent clients, {args.duration_s:.0f} s per server "
          f"after {args.warmup_s:.0f} s warm-up; PostgreSQL + Redis; one uvicorn process each; "
          + (f"{args.users} users taking turns, queued-task quota {QUEUED_QUOTA}" if args.users
             else "one user, no queued-task limit"))
    with backing_services() as (pg_url, redis_url, tmp):
        made = asyncio.run(make_users(pg_url, max(1, args.users)))
        env = {**os.environ, "VIDMAAS_DATABASE_URL": pg_url, "VIDMAAS_REDIS_URL": redis_url,
               "VIDMAAS_STORAGE_URL": (tmp / "objects").as_uri(),
               "VIDMAAS_LOG_LEVEL": "WARNING", "VIDMAAS_DEFAULT_MODEL": "tiny-t2v",
               "BENCH_USER_IDS": ",".join(uid for uid, _ in made),
               "VIDMAAS_DATABASE_POOL_SIZE": str(max(10, args.clients))}
        env["VIDMAAS_API_MAX_QUEUED_PER_USER"] = str(QUEUED_QUOTA if args.users else 100_000_000)
        api_keys = [key for _, key in made]
        results = []
        for name in ("vidmaas api", "minimal ASGI"):
            port = free_port()
            if name == "vidmaas api":
                cmd = [vidmaas_bin(), "api", "--host", "127.0.0.1", "--port", str(port)]
            else:
                cmd = [sys.executable, str(Path(__file__).resolve()), "--serve-minimal",
                       str(port)]
            proc = start(cmd, env)
            try:
                base = f"http://127.0.0.1:{port}"
                wait_http(base + "/", proc)
                results.append(asyncio.run(load(
                    name, base, api_keys, clients=args.clients,
                    duration_s=args.duration_s, warmup_s=args.warmup_s)))
            finally:
                stop(proc)
        for r in results:
            print(r.line())
        api, minimal = results
        if api.rps:
            print(f"ratio: the API does {api.rps / minimal.rps:.2f}× the minimal app's "
                  f"requests/s (minimal/API = {minimal.rps / api.rps:.2f}); p50 "
                  f"{ms(pct(api.latencies_s, 50))} vs {ms(pct(minimal.latencies_s, 50))}")


if __name__ == "__main__":
    main()
