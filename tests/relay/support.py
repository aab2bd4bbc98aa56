"""Helpers of the relay tests: services over real Redis and databases, tasks in a
given status holding GPUs, running relays, and a real HTTP receiver on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from pydantic import SecretStr
from sqlalchemy import select

from vidmaas.bus import keys
from vidmaas.config import (
    DatabaseSettings,
    DispatcherSettings,
    RedisSettings,
    RelaySettings,
    Settings,
    StorageSettings,
    WebhookSettings,
)
from vidmaas.db import tasks as repo
from vidmaas.db.models import Task, WebhookDelivery
from vidmaas.db.users import create_user
from vidmaas.domain import events as ev
from vidmaas.domain.ids import new_task_id
from vidmaas.domain.status import TaskStatus
from vidmaas.relay.service import Relay
from vidmaas.services import Services

PARAMS = {"size": "64*64", "width": 64, "height": 64, "num_frames": 5, "steps": 2, "seed": 7,
          "fps": 8}
COMPLETED_DATA = {"video_key": "outputs/x/video.mp4", "poster_key": "outputs/x/poster.jpg",
                  "width": 64, "height": 64, "num_frames": 5, "fps": 8, "duration_s": 0.6,
                  "seed": 7, "timings": {"denoise_s": 1.0},
                  "spritesheet_key": "outputs/x/spritesheet.jpg",
                  "spritesheet": {"columns": 5, "rows": 1, "count": 5, "tile_width": 64,
                                  "tile_height": 64}}
FAST = RelaySettings(block_ms=50, claim_idle_ms=200, claim_interval_s=0.1,
                    retry_backoff_max_s=0.2)


def make_settings(*, db_url: str, redis_url: str, storage: StorageSettings,
                  webhooks: WebhookSettings | None = None, max_attempts: int = 3) -> Settings:
    return Settings(database=DatabaseSettings(url=db_url), redis=RedisSettings(url=redis_url),
                    storage=storage,
                    dispatcher=DispatcherSettings(max_attempts=max_attempts,
                                                  retry_backoff_s=0.05),
                    webhooks=webhooks or WebhookSettings(signing_secret=SecretStr("test-secret"),
                                                         allow_hosts=["127.0.0.1"],
                                                         backoff_initial_s=0.05))


class World:
    """Services of one test, plus task helpers."""

    def __init__(self, svc: Services) -> None:
        self.svc = svc
        self.redis = svc.redis
        self.lifecycle = svc.lifecycle
        self._user: str | None = None

    async def user(self) -> str:
        if self._user is None:
            async with self.svc.sessions() as s:
                self._user = (await create_user(session=s, name="alice")).id
        return self._user

    async def task(self, status: TaskStatus = TaskStatus.RUNNING, *,
                   webhook_url: str | None = None,
                   webhook_events: list[str] | None = None, user_id: str | None = None,
                   source: str = "native") -> Task:
        """A task in ``status``; an active one holds its GPUs like a dispatched task."""
        uid = user_id or await self.user()
        async with self.svc.sessions() as s:
            task, _ = await repo.create_task(session=s, new=repo.NewTask(
                id=new_task_id(), user_id=uid, model="tiny-t2v", prompt="a cat", params=PARAMS,
                gpus=1, webhook_url=webhook_url, webhook_events=webhook_events, source=source))
        await self.lifecycle.enqueue(task)
        if status is TaskStatus.QUEUED:
            return task
        return await self.advance(task, status)

    async def advance(self, task: Task, status: TaskStatus) -> Task:
        """Take a queued, enqueued task (this helper's or the API's) to ``status``."""
        claim = await self.lifecycle.queue.claim_next(dispatcher_id="d", capacity=100,
                                                      per_user_cap=100, lease_s=60)
        assert claim.claim is not None and claim.claim.task_id == task.id
        await self.lifecycle.transition(
            task_id=task.id, to=TaskStatus.DISPATCHING, expected=TaskStatus.QUEUED,
            fields={"attempts": 1},
            event=ev.dispatched(task.id, executor="fake", job_name="j", attempt=1))
        await self.lifecycle.queue.ack(task.id)
        if status is TaskStatus.DISPATCHING:
            return await self.get(task.id)
        await self.lifecycle.transition(task_id=task.id, to=TaskStatus.RUNNING,
                                        expected=TaskStatus.DISPATCHING)
        if status is TaskStatus.CANCELLING:
            await self.lifecycle.cancel(await self.get(task.id), by="alice")
        return await self.get(task.id)

    async def get(self, task_id: str) -> Task:
        async with self.svc.sessions() as s:
            task = await repo.get_task(session=s, task_id=task_id)
        assert task is not None
        return task

    async def publish(self, event: ev.Event) -> str:
        return await self.lifecycle.publish(event)

    async def redeliver(self, event: ev.Event, event_id: str) -> None:
        """Put an already-published event on the global stream again (at-least-once)."""
        fields: dict[Any, Any] = {**ev.encode(event), "event_id": event_id}
        await self.redis.xadd(keys.EVENTS, fields)

    async def gpus_held(self, task_id: str) -> int:
        return (await self.lifecycle.queue.leases()).get(task_id, 0)

    async def deliveries(self, task_id: str | None = None) -> list[WebhookDelivery]:
        stmt = select(WebhookDelivery).order_by(WebhookDelivery.id)
        if task_id is not None:
            stmt = stmt.where(WebhookDelivery.task_id == task_id)
        async with self.svc.sessions() as s:
            return list((await s.execute(stmt)).scalars())

    async def pending_in_group(self) -> int:
        info: Any = await self.redis.xpending(keys.EVENTS, keys.RELAY_GROUP)
        return int(info["pending"])

    async def stream_drained(self) -> bool:
        """Every entry on the global stream was read by the group and acknowledged."""
        groups: Any = await self.redis.xinfo_groups(keys.EVENTS)
        if not groups:
            return False
        last: Any = await self.redis.xrevrange(keys.EVENTS, count=1)
        if not last:
            return True
        return bool(groups[0]["last-delivered-id"] == last[0][0]
                    and await self.pending_in_group() == 0)


@contextlib.asynccontextmanager
async def services(settings: Settings) -> AsyncIterator[World]:
    svc = Services.open(settings)
    try:
        yield World(svc)
    finally:
        await svc.close()


@contextlib.asynccontextmanager
async def running(*relays: Relay) -> AsyncIterator[list[asyncio.Task[None]]]:
    tasks = [asyncio.create_task(r.run(), name=f"test-relay-{r.consumer_name}") for r in relays]
    try:
        for r in relays:
            await asyncio.wait_for(r.ready.wait(), 10)
        yield tasks
    finally:
        for r in relays:
            r.stop()
        await asyncio.gather(*tasks, return_exceptions=True)


async def eventually(check: Callable[[], Awaitable[bool]], *, timeout_s: float = 10.0,
                     interval_s: float = 0.02) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(interval_s)


# ---------------------------------------------------------------- a real HTTP receiver

@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Receiver:
    """An HTTP server on 127.0.0.1 answering each POST with the next planned status."""

    plan: list[int] = field(default_factory=list)
    default_status: int = 200
    delay_s: float = 0.0
    """How long to think before answering (after the request is recorded)."""
    received: list[Received] = field(default_factory=list)
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks/vidmaas?src=test"

    def answer(self) -> int:
        return self.plan.pop(0) if self.plan else self.default_status


@contextlib.contextmanager
def receiver(plan: list[int] | None = None, *, default_status: int = 200) -> Iterator[Receiver]:
    state = Receiver(plan=list(plan or []), default_status=default_status)
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("content-length", "0"))
            body = self.rfile.read(length)
            with lock:
                state.received.append(Received(self.path, {k.lower(): v for k, v in
                                                           self.headers.items()}, body))
                status = state.answer()
                delay_s = state.delay_s
            time.sleep(delay_s)
            self.send_response(status)
            self.send_header("content-length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, name="webhook-receiver", daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
