"""Event streams to clients (SSE, WebSocket, multiplexed) against a real uvicorn server,
real Redis and SQLite/PostgreSQL: snapshots, resume without gap or duplicate, slow
clients, queue positions, authentication, many idle connections."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from tests.api.conftest import api_settings, make_users
from tests.support.services import free_port
from vidmaas.api.app import create_app
from vidmaas.api.streams import StreamHub, open_connection
from vidmaas.bus.queue import TaskQueue
from vidmaas.config import ApiSettings, Settings, StorageSettings
from vidmaas.domain import events as ev
from vidmaas.domain.status import TaskStatus
from vidmaas.services import Services

# ------------------------------------------------------------------ a real server


@dataclass
class Server:
    app: FastAPI
    settings: Settings
    base_url: str
    ws_url: str
    keys: dict[str, str]
    http: httpx.AsyncClient

    @property
    def svc(self) -> Services:
        svc: Services = self.app.state.services
        return svc

    @property
    def hub(self) -> StreamHub:
        hub: StreamHub = self.app.state.stream_hub
        return hub

    def auth(self, user: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[user]}"}


async def serve(settings: Settings, db_url: str) -> AsyncIterator[Server]:
    """The whole app in uvicorn on 127.0.0.1 and a free port, stopped afterwards."""
    keys = await make_users(db_url)
    app = create_app(settings)
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                            lifespan="on", timeout_graceful_shutdown=2, ws_ping_interval=None)
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(), name="test-uvicorn")
    deadline = time.monotonic() + 20
    while not server.started:
        if task.done():
            task.result()
        assert time.monotonic() < deadline, "uvicorn did not start"
        await asyncio.sleep(0.02)
    await app.state.services.store.ensure_ready()
    base = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(base_url=base, timeout=30) as http:
            yield Server(app=app, settings=settings, base_url=base,
                         ws_url=f"ws://127.0.0.1:{port}", keys=keys, http=http)
    finally:
        server.should_exit = True
        await task


def settings_for(db_url: str, redis_url: str, storage: StorageSettings,
                 **api: Any) -> Settings:
    return api_settings(db_url=db_url, redis_url=redis_url, storage=storage,
                        api=ApiSettings(**api))


@pytest.fixture
async def server(db_url: str, redis_url: str, local_storage: StorageSettings,
                 ) -> AsyncIterator[Server]:
    async for s in serve(settings_for(db_url, redis_url, local_storage), db_url):
        yield s


@pytest.fixture
async def server_sqlite(sqlite_url: str, redis_url: str, local_storage: StorageSettings,
                        ) -> AsyncIterator[Server]:
    async for s in serve(settings_for(sqlite_url, redis_url, local_storage,
                                      stream_buffer_events=32), sqlite_url):
        yield s


# ------------------------------------------------------------------ helpers

async def new_task(server: Server, user: str = "alice") -> str:
    r = await server.http.post("/v1/tasks", json={"prompt": "a fox", "model": "tiny-t2v"},
                               headers=server.auth(user))
    assert r.status_code == 202, r.text
    return str(r.json()["id"])


async def start_running(server: Server, task_id: str) -> None:
    lc = server.svc.lifecycle
    await lc.transition(task_id=task_id, to=TaskStatus.DISPATCHING, expected=TaskStatus.QUEUED,
                        event=ev.dispatched(task_id, executor="local", job_name="j", attempt=1))
    await lc.transition(task_id=task_id, to=TaskStatus.RUNNING,
                        expected=TaskStatus.DISPATCHING,
                        event=ev.started(task_id, world_size=1, host="h"))


async def progress(server: Server, task_id: str, step: int, total: int = 100,
                   pad: int = 0) -> str:
    e = ev.progress(task_id, step=step, total=total, percent=100 * step / total, eta_s=1.0)
    if pad:
        e = ev.Event(task_id, ev.EventType.PROGRESS, {**e.data, "pad": "x" * pad})
    return await server.svc.lifecycle.publish(e)


async def complete(server: Server, task_id: str) -> None:
    await server.svc.lifecycle.finish(
        task_id=task_id, to=TaskStatus.COMPLETED, expected=TaskStatus.RUNNING,
        fields={"progress": 100.0},
        event=ev.Event(task_id, ev.EventType.COMPLETED, {
            "video_key": "v", "poster_key": "p", "width": 64, "height": 64, "num_frames": 9,
            "fps": 8, "duration_s": 1.1, "seed": 1, "timings": {}}))


async def ws_open(server: Server, path: str, user: str | None = "alice",
                  **kw: Any) -> ClientConnection:
    headers = server.auth(user) if user else None
    return await connect(server.ws_url + path, additional_headers=headers, **kw)


def is_push(m: dict[str, Any]) -> bool:
    """A queue-position push (with its start estimate): a ``queued`` message without an
    event id, sent whenever a watched queued task's place or estimate moves."""
    return m["type"] == "queued" and "id" not in m


async def ws_messages(ws: ClientConnection, *, until: str | None = None,
                      n: int | None = None, timeout_s: float = 10.0,
                      pushes: bool = False) -> list[dict[str, Any]]:
    """Messages (pings left out, and position pushes unless ``pushes``) until one of type
    ``until``, ``n`` of them, or close."""
    out: list[dict[str, Any]] = []
    async with asyncio.timeout(timeout_s):
        try:
            while True:
                m = json.loads(await ws.recv())
                if m["type"] == "ping" or (is_push(m) and not pushes):
                    continue
                out.append(m)
                if (until is not None and m["type"] == until) or (n is not None
                                                                  and len(out) >= n):
                    return out
        except ConnectionClosed:
            return out


async def sse_events(resp: httpx.Response, *, n: int | None = None,
                     ) -> list[tuple[str | None, str, dict[str, Any]]]:
    """(id, event, data) of an SSE response, until ``n`` of them or the end."""
    out: list[tuple[str | None, str, dict[str, Any]]] = []
    fields: dict[str, str] = {}
    async for line in resp.aiter_lines():
        if line == "":
            if "data" in fields:
                out.append((fields.get("id"), fields.get("event", "message"),
                            json.loads(fields["data"])))
                if n is not None and len(out) >= n:
                    return out
            fields = {}
        elif not line.startswith(":"):
            name, _, value = line.partition(":")
            fields[name] = value[1:] if value.startswith(" ") else value
    return out


def event_ids(msgs: list[dict[str, Any]]) -> list[str]:
    return [m["id"] for m in msgs if m["type"] not in ("snapshot", "end") and "id" in m]


def steps(msgs: list[dict[str, Any]]) -> list[int]:
    return [m["data"]["step"] for m in msgs if m["type"] == "progress"]


class RawWebSocket:
    """A WebSocket client on a plain socket with a tiny receive buffer that reads nothing
    until asked: a truly slow client (client libraries keep reading in the background)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""
        self.close_code: int | None = None

    @classmethod
    async def open(cls, server: Server, path: str, *, user: str) -> RawWebSocket:
        def handshake() -> socket.socket:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(("127.0.0.1", int(server.base_url.rsplit(":", 1)[1])))
            sock.sendall((f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                          "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                          f"Sec-WebSocket-Version: 13\r\nAuthorization: Bearer "
                          f"{server.keys[user]}\r\n\r\n").encode())
            return sock

        raw = cls(await asyncio.to_thread(handshake))
        head = await asyncio.to_thread(raw._read_until, b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101"), head
        return raw

    def _read_until(self, marker: bytes) -> bytes:
        while marker not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed")
            self.buf += chunk
        head, _, self.buf = self.buf.partition(marker)
        return head

    def _read_exactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed")
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def _frame(self) -> tuple[int, bytes]:
        b0, b1 = self._read_exactly(2)
        n = b1 & 0x7F
        if n == 126:
            n = int.from_bytes(self._read_exactly(2), "big")
        elif n == 127:
            n = int.from_bytes(self._read_exactly(8), "big")
        return b0 & 0x0F, self._read_exactly(n)

    def _until_end(self) -> list[dict[str, Any]]:
        self.sock.settimeout(20)
        out: list[dict[str, Any]] = []
        while True:
            opcode, payload = self._frame()
            if opcode == 8:  # close
                self.close_code = int.from_bytes(payload[:2], "big") if payload else None
                return out
            m = json.loads(payload)
            if m["type"] != "ping":
                out.append(m)

    async def next_message(self) -> dict[str, Any]:
        def one() -> dict[str, Any]:
            self.sock.settimeout(10)
            opcode, payload = self._frame()
            assert opcode == 1, opcode
            return dict(json.loads(payload))

        return await asyncio.to_thread(one)

    async def messages_until_end(self) -> list[dict[str, Any]]:
        return await asyncio.to_thread(self._until_end)

    def close(self) -> None:
        self.sock.close()


# ------------------------------------------------------------------ tests

async def test_an_sse_stream_starts_with_a_snapshot_then_every_event_and_ends_after_completion(
        server: Server) -> None:
    task_id = await new_task(server)
    async with server.http.stream("GET", f"/v1/tasks/{task_id}/events",
                                  headers={**server.auth("alice"),
                                           "Accept": "text/event-stream"}) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        reader = asyncio.create_task(sse_events(resp), name="sse-reader")
        await asyncio.sleep(0.2)
        await start_running(server, task_id)
        for i in range(1, 6):
            await progress(server, task_id, i * 20)
        await complete(server, task_id)
        got = await asyncio.wait_for(reader, 10)
    kinds = [e for _, e, _ in got]
    assert kinds[0] == "snapshot"
    snap = got[0][2]["data"]
    assert snap["status"] == "queued" and snap["queue_position"] == 1
    assert snap["last_event_id"] is not None  # the `queued` event of the create
    assert kinds[1:] == ["dispatched", "started"] + ["progress"] * 5 + ["completed", "end"]
    ids = [i for i, e, _ in got[1:-1]]
    assert all(ids) and ids == sorted(ids, key=lambda s: tuple(map(int, s.split("-"))))
    assert got[0][0] == snap["last_event_id"]  # the snapshot's id is the resume point
    assert [d["data"]["step"] for _, e, d in got if e == "progress"] == [20, 40, 60, 80, 100]


async def test_a_fresh_stream_on_a_row_behind_its_stream_delivers_the_progress_the_row_lacks(
        server: Server) -> None:
    # The relay writes progress to the row a moment after the event is streamed: a
    # client attaching in between gets the row's older progress in its snapshot, and so
    # must get the newer progress event after it (a reload mid-run once showed 40 % for
    # good while the task was at 65 %).
    from vidmaas.db import tasks as repo

    task_id = await new_task(server)
    await start_running(server, task_id)
    applied = await progress(server, task_id, 40)
    async with server.svc.sessions() as s:
        await repo.update_progress(session=s, task_id=task_id, values={
            "progress": 40.0, "last_event_id": applied})
    pending = await progress(server, task_id, 65)  # streamed, not yet in the row
    for path in (f"/v1/tasks/{task_id}/events", "/v1/events"):
        ws = await ws_open(server, path)
        got = await ws_messages(ws, n=2)
        await ws.close()
        snap, nxt = got
        assert snap["type"] == "snapshot" and snap["data"]["progress"] == 40.0
        assert snap["id"] == applied and snap["data"]["last_event_id"] == pending
        assert nxt["type"] == "progress" and nxt["id"] == pending
        assert nxt["data"]["step"] == 65


async def test_a_websocket_client_resuming_with_after_mid_run_gets_no_gap_and_no_duplicate(
        server: Server) -> None:
    task_id = await new_task(server)
    await start_running(server, task_id)
    ws = await ws_open(server, f"/v1/tasks/{task_id}/events")
    first = await ws_messages(ws, n=1)
    assert first[0]["type"] == "snapshot" and first[0]["data"]["status"] == "running"
    for i in range(1, 11):
        await progress(server, task_id, i)
    got = await ws_messages(ws, n=10)
    assert steps(got) == list(range(1, 11))
    await ws.close()
    # Events keep coming while the client is away.
    publisher_done = asyncio.Event()

    async def publish_more() -> None:
        for i in range(11, 61):
            await progress(server, task_id, i)
            if i % 10 == 0:
                await asyncio.sleep(0.01)
        await complete(server, task_id)
        publisher_done.set()

    pub = asyncio.create_task(publish_more(), name="publisher")
    await asyncio.sleep(0.02)
    last = got[-1]["id"]
    ws2 = await ws_open(server, f"/v1/tasks/{task_id}/events?after={last}")
    rest = await ws_messages(ws2, until="end")
    await pub
    assert rest[0]["type"] == "snapshot" and rest[0]["id"] == last
    assert steps(got) + steps(rest) == list(range(1, 61))
    assert [m["type"] for m in rest][-2:] == ["completed", "end"]
    ids = event_ids(got) + event_ids(rest)
    assert len(ids) == len(set(ids))
    await asyncio.wait_for(ws2.wait_closed(), 5)
    assert ws2.close_code == 1000


async def test_clients_joining_a_watched_task_behind_the_shared_reader_each_get_every_later_event(
        server: Server) -> None:
    """The back-fill path: another client keeps the task's shared read going while
    joiners resume from older ids, as events keep arriving."""
    import random

    task_id = await new_task(server)
    await start_running(server, task_id)
    steady = await ws_open(server, f"/v1/tasks/{task_id}/events")
    await ws_messages(steady, n=1)
    total = 300
    ids: list[str] = []

    async def publish_all() -> None:
        for i in range(1, total + 1):
            ids.append(await progress(server, task_id, i, total=total))
            if i % 10 == 0:
                await asyncio.sleep(0.005)

    async def join(delay_s: float, sse: bool) -> tuple[int, list[int]]:
        await asyncio.sleep(delay_s)
        k = max(1, len(ids) - random.randint(1, 40))
        after = ids[k - 1]
        got: list[int] = []
        if sse:
            async with server.http.stream(
                    "GET", f"/v1/tasks/{task_id}/events",
                    headers={**server.auth("alice"), "Last-Event-ID": after}) as resp:
                async for _, kind, data in _sse_iter(resp):
                    if kind == "progress":
                        got.append(data["data"]["step"])
                        if got[-1] == total:
                            break
        else:
            ws = await ws_open(server, f"/v1/tasks/{task_id}/events?after={after}")
            while not got or got[-1] != total:
                m = json.loads(await asyncio.wait_for(ws.recv(), 10))
                if m["type"] == "progress":
                    got.append(m["data"]["step"])
            await ws.close()
        return k, got

    pub = asyncio.create_task(publish_all(), name="publisher")
    await asyncio.sleep(0.05)
    joins = [join(0.02 * i, sse=i % 3 == 0) for i in range(12)]
    results = await asyncio.wait_for(asyncio.gather(*joins), 30)
    await pub
    for k, got in results:
        assert got == list(range(k + 1, total + 1)), k
    got = await ws_messages(steady, n=total)
    assert steps(got) == list(range(1, total + 1))
    await steady.close()


async def _sse_iter(resp: httpx.Response) -> AsyncIterator[tuple[str | None, str,
                                                                  dict[str, Any]]]:
    fields: dict[str, str] = {}
    async for line in resp.aiter_lines():
        if line == "":
            if "data" in fields:
                yield fields.get("id"), fields.get("event", "message"), json.loads(
                    fields["data"])
            fields = {}
        elif not line.startswith(":"):
            name, _, value = line.partition(":")
            fields[name] = value[1:] if value.startswith(" ") else value


async def test_an_sse_client_resuming_with_last_event_id_gets_no_gap_and_no_duplicate(
        server_sqlite: Server) -> None:
    server = server_sqlite
    task_id = await new_task(server)
    await start_running(server, task_id)
    for i in range(1, 21):
        await progress(server, task_id, i)
    url = f"/v1/tasks/{task_id}/events?after=0-0"
    async with server.http.stream("GET", url, headers=server.auth("alice")) as resp:
        first = await sse_events(resp, n=8)  # snapshot, queued, dispatched, started, 1..4
    assert [e for _, e, _ in first][:4] == ["snapshot", "queued", "dispatched", "started"]
    last_id = first[-1][0]
    assert last_id is not None
    for i in range(21, 31):
        await progress(server, task_id, i)
    await complete(server, task_id)
    async with server.http.stream("GET", f"/v1/tasks/{task_id}/events",
                                  headers={**server.auth("alice"),
                                           "Last-Event-ID": last_id}) as resp:
        rest = await sse_events(resp)
    got_steps = [d["data"]["step"] for _, e, d in first + rest if e == "progress"]
    assert got_steps == list(range(1, 31))
    assert [e for _, e, _ in rest][-2:] == ["completed", "end"]
    # Reconnecting after the end: 204 tells an EventSource to stop.
    done_id = rest[-2][0]
    assert done_id is not None
    r = await server.http.get(f"/v1/tasks/{task_id}/events",
                              headers={**server.auth("alice"), "Last-Event-ID": done_id})
    assert r.status_code == 204


async def test_a_retryable_failure_does_not_end_the_stream_but_the_final_failure_does(
        server_sqlite: Server) -> None:
    server = server_sqlite
    task_id = await new_task(server)
    await start_running(server, task_id)
    ws = await ws_open(server, f"/v1/tasks/{task_id}/events")
    await ws_messages(ws, n=1)
    lc = server.svc.lifecycle
    # The runtime reports a retryable failure; the relay sends the task back to the queue.
    await lc.publish(ev.failed(task_id, code="node_lost", message="x", retryable=True))
    task = await _row(server, task_id)
    await lc.fail_or_retry(task, code="node_lost", message="x", retryable=True,
                           publish_failed=False)
    await asyncio.sleep(0.5)
    await lc.enqueue(await _row(server, task_id), front=True)
    await start_running(server, task_id)
    await lc.fail_or_retry(await _row(server, task_id), code="oom", message="y",
                           retryable=False)
    got = await ws_messages(ws, until="end")
    kinds = [m["type"] for m in got]
    assert kinds[0] == "failed" and got[0]["data"]["retryable"] is True
    assert "queued" in kinds and kinds.count("started") == 1
    assert kinds[-2:] == ["failed", "end"] and got[-2]["data"]["code"] == "oom"
    await asyncio.wait_for(ws.wait_closed(), 5)
    assert ws.close_code == 1000


async def _row(server: Server, task_id: str) -> Any:
    from vidmaas.db import tasks as repo
    async with server.svc.sessions() as s:
        return await repo.get_task(session=s, task_id=task_id)


async def test_a_slow_websocket_client_gets_coalesced_progress_and_all_state_events_while_a_fast_one_gets_everything(  # noqa: E501
        server_sqlite: Server) -> None:
    server = server_sqlite
    task_id = await new_task(server)
    await start_running(server, task_id)
    path = f"/v1/tasks/{task_id}/events"
    fast = await ws_open(server, path)
    slow = await RawWebSocket.open(server, path, user="alice")
    assert (await slow.next_message())["type"] == "snapshot"
    await ws_messages(fast, n=1)
    received: list[dict[str, Any]] = []
    latencies: list[float] = []

    async def read_fast() -> None:
        while True:
            m = json.loads(await fast.recv())
            if m["type"] == "progress":
                latencies.append(time.monotonic() - m["data"]["sent"])
            if m["type"] != "ping":
                received.append(m)
            if m["type"] == "end":
                return

    reader = asyncio.create_task(read_fast(), name="fast-reader")
    # ~10 MB: more than the kernel and transport buffers hold for a client not reading.
    total = 1000
    for i in range(1, total + 1):
        e = ev.Event(task_id, ev.EventType.PROGRESS,
                     {"step": i, "total": total, "percent": 100 * i / total, "eta_s": None,
                      "pad": "x" * 10_000, "sent": time.monotonic()})
        await server.svc.lifecycle.publish(e)
        if i % 250 == 0:
            await server.svc.lifecycle.publish(ev.stage(task_id, ev.Stage.DECODE))
    await complete(server, task_id)
    await asyncio.wait_for(reader, 20)
    assert steps(received) == list(range(1, total + 1))
    assert sorted(latencies)[len(latencies) // 2] < 0.5
    # The slow one was not read at all meanwhile; its buffer stayed bounded.
    assert server.hub.outbox_high_water() == 32  # reached, never passed
    rest = await slow.messages_until_end()
    kinds = [m["type"] for m in rest]
    assert kinds[-2:] == ["completed", "end"]
    assert kinds.count("stage") == 4
    slow_steps = steps(rest)
    assert slow_steps == sorted(slow_steps) and len(slow_steps) < total
    assert slow_steps[-1] == total  # coalesced to the latest
    ids = event_ids(rest)
    assert len(ids) == len(set(ids))
    await fast.close()
    slow.close()


async def test_a_connection_whose_client_takes_nothing_lags_within_its_buffer_then_gets_every_event(
        server_sqlite: Server) -> None:
    """The engine side: past its buffer a connection stops taking live deliveries and
    later reads the task's stream itself, from where it stopped."""
    server = server_sqlite
    task_id = await new_task(server)
    await start_running(server, task_id)
    conn = open_connection(server.hub, user_id="u", scope=None, single=task_id)
    try:
        assert await conn.attach(task_id)
        ids = [await server.svc.lifecycle.publish(ev.stage(task_id, ev.Stage.DENOISE))
               for _ in range(100)]  # the buffer is 32; stage events are never dropped
        await asyncio.sleep(0.3)
        assert len(conn.outbox) <= 32 and conn.watches[task_id].lagging

        async def publish_more() -> None:  # while the connection catches up
            for i in range(300):
                ids.append(await server.svc.lifecycle.publish(
                    ev.stage(task_id, ev.Stage.DECODE)))
                if i % 20 == 0:
                    await asyncio.sleep(0.002)
            await complete(server, task_id)

        pub = asyncio.create_task(publish_more(), name="publisher")
        got: list[dict[str, Any]] = []
        async with asyncio.timeout(20):
            async for batch in conn.messages():
                got += batch
                await asyncio.sleep(0.001)  # a client a little slower than the publisher
        await pub
        assert conn.outbox.high_water <= 32
    finally:
        conn.close()
    assert got[0]["type"] == "snapshot"
    assert event_ids(got)[:400] == ids
    assert [m["type"] for m in got][-2:] == ["completed", "end"]


async def test_a_websocket_client_that_stops_reading_costs_a_bounded_buffer_and_later_gets_every_event(  # noqa: E501
        server_sqlite: Server) -> None:
    server = server_sqlite
    task_id = await new_task(server)
    await start_running(server, task_id)
    slow = await RawWebSocket.open(server, f"/v1/tasks/{task_id}/events", user="alice")
    assert (await slow.next_message())["type"] == "snapshot"
    total = 800  # ~8 MB of never-dropped events: more than every buffer on the way
    for i in range(total):
        await server.svc.lifecycle.publish(ev.Event(task_id, ev.EventType.STAGE, {
            "stage": "denoise", "n": i, "pad": "x" * 10_000}))
    await asyncio.sleep(0.2)
    assert server.hub.outbox_high_water() == 32  # reached, never passed
    await complete(server, task_id)
    got = await slow.messages_until_end()
    assert [m["data"]["n"] for m in got if m["type"] == "stage"] == list(range(total))
    assert [m["type"] for m in got][-2:] == ["completed", "end"]
    assert slow.close_code == 1000
    slow.close()


async def test_the_multiplexed_stream_follows_the_callers_existing_and_new_tasks_only(
        server: Server) -> None:
    old = await new_task(server)
    theirs = await new_task(server, "bob")
    ws = await ws_open(server, "/v1/events")
    first = await ws_messages(ws, n=1)
    assert first[0]["type"] == "snapshot" and first[0]["task_id"] == old
    new = await new_task(server)
    await new_task(server, "bob")
    got = await ws_messages(ws, n=1)
    assert got[0]["type"] == "snapshot" and got[0]["task_id"] == new
    await start_running(server, theirs)
    await start_running(server, new)
    await progress(server, new, 50)
    await complete(server, new)
    got = await ws_messages(ws, until="end")
    assert {m["task_id"] for m in got} == {new}
    assert [m["type"] for m in got if m["type"] != "queued"] == [
        "dispatched", "started", "progress", "completed", "end"]
    # The stream stays open for the other task.
    await start_running(server, old)
    got = await ws_messages(ws, n=2)
    assert [(m["task_id"], m["type"]) for m in got] == [(old, "dispatched"), (old, "started")]
    await ws.close()


async def mux_until(ws: ClientConnection, done: Any, *, timeout_s: float = 10.0,
                    ) -> dict[str, list[dict[str, Any]]]:
    """Messages of a multiplexed stream per task, until ``done(per_task)`` holds."""
    per_task: dict[str, list[dict[str, Any]]] = {}
    async with asyncio.timeout(timeout_s):
        while not done(per_task):
            m = json.loads(await ws.recv())
            if m["type"] != "ping":
                per_task.setdefault(m["task_id"], []).append(m)
    return per_task


def ended(*task_ids: str) -> Any:
    return lambda got: all(got.get(t) and got[t][-1]["type"] == "end" for t in task_ids)


def reached(want: dict[str, int]) -> Any:
    """Every task's progress reached the step ``want`` names."""
    return lambda got: all(steps(got.get(t, []))[-1:] == [n] for t, n in want.items())


async def test_the_multiplexed_stream_resumes_every_task_from_its_own_point_without_gap_or_duplicate(  # noqa: E501
        server: Server) -> None:
    tasks = [await new_task(server) for _ in range(3)]
    for t in tasks:
        await start_running(server, t)
    ws = await ws_open(server, "/v1/events")
    snapshots = await mux_until(ws, lambda g: len(g) == 3)
    for i in range(1, 4):
        for k, t in enumerate(tasks):
            await progress(server, t, 10 * k + i)
    before = await mux_until(ws, reached({t: 10 * k + 3 for k, t in enumerate(tasks)}))
    assert all(snapshots[t][0]["type"] == "snapshot" for t in tasks)
    await ws.close()
    # Away: each task moves on by a different amount, and a new task is created.
    for k, t in enumerate(tasks):
        for i in range(4, 4 + 5 * (k + 1)):
            await progress(server, t, 10 * k + i)
    created = await new_task(server)
    points = {t: before[t][-1]["id"] for t in tasks}
    after = ",".join(f"{t}:{i}" for t, i in points.items())
    ws = await ws_open(server, f"/v1/events?after={after}")
    want = {t: 10 * k + 3 + 5 * (k + 1) for k, t in enumerate(tasks)}
    got = await mux_until(ws, lambda g: reached(want)(g) and created in g)
    for k, t in enumerate(tasks):
        snap, *events = got[t]
        assert snap["type"] == "snapshot" and snap["id"] == points[t]
        assert steps(before[t]) + steps(events) == list(range(10 * k + 1, want[t] + 1))
        ids = event_ids(before[t]) + event_ids(events)
        assert ids == sorted(ids, key=lambda s: tuple(map(int, s.split("-")))) \
            and len(ids) == len(set(ids))
    # The task the client did not know arrives with a fresh snapshot.
    assert got[created][0]["type"] == "snapshot"
    assert got[created][0]["data"]["status"] == "queued"
    await ws.close()


async def test_a_task_that_ended_while_the_client_was_away_resumes_to_its_last_events_and_end(
        server: Server) -> None:
    gone, seen_all = await new_task(server), await new_task(server)
    for t in (gone, seen_all):
        await start_running(server, t)
    ws = await ws_open(server, "/v1/events")
    first = await mux_until(ws, lambda g: gone in g and seen_all in g)
    for i in range(1, 4):
        await progress(server, gone, i)
    await complete(server, seen_all)
    more = await mux_until(ws, lambda g: reached({gone: 3})(g) and ended(seen_all)(g))
    for t in (gone, seen_all):
        first[t] += more[t]
    await ws.close()
    for i in range(4, 7):
        await progress(server, gone, i)
    await complete(server, gone)
    assert first[seen_all][-2]["type"] == "completed"  # the client has it all
    ws = await ws_open(server, "/v1/events?resume=message")
    await ws.send(json.dumps(ev.resume_request({gone: first[gone][-1]["id"],
                                                seen_all: first[seen_all][-2]["id"]})))
    got = await mux_until(ws, ended(gone, seen_all))
    snap, *events = got[gone]
    assert snap["type"] == "snapshot" and snap["data"]["status"] == "completed"
    assert steps(events) == [4, 5, 6]
    assert [m["type"] for m in events][-2:] == ["completed", "end"]
    # A task whose terminal event the client already has: its state, and the end.
    assert [m["type"] for m in got[seen_all]] == ["snapshot", "end"]
    assert got[seen_all][0]["data"]["status"] == "completed"
    await ws.close()


async def test_another_users_task_in_a_resume_list_looks_exactly_like_a_missing_one(
        server: Server) -> None:
    mine, theirs = await new_task(server), await new_task(server, "bob")
    missing = "t" + "0" * 25
    await start_running(server, theirs)
    bobs_ids = [await progress(server, theirs, 1)]
    ws = await ws_open(server, "/v1/events?resume=message")
    await ws.send(json.dumps(ev.resume_request({theirs: "0-0", missing: "0-0"})))
    got = await mux_until(ws, lambda g: mine in g and theirs in g and missing in g)
    assert got[theirs] == [ev.not_found(theirs)]
    assert got[missing] == [ev.not_found(missing)]
    assert {k: v for k, v in got[theirs][0].items() if k != "task_id"} \
        == {k: v for k, v in got[missing][0].items() if k != "task_id"}
    # Nothing of bob's task reaches alice afterwards; her own task still flows.
    bobs_ids.append(await progress(server, theirs, 2))
    await start_running(server, mine)
    more = await mux_until(ws, lambda g: [m["type"] for m in g.get(mine, [])]
                           == ["dispatched", "started"])
    assert set(more) == {mine}
    await ws.close()


async def test_bad_resume_input_on_the_multiplexed_stream_is_refused_with_4400_and_a_reason(
        sqlite_url: str, redis_url: str, local_storage: StorageSettings) -> None:
    settings = settings_for(sqlite_url, redis_url, local_storage, stream_resume_max_tasks=3,
                            stream_resume_wait_s=0.3)
    t, e = "t" + "1" * 25, "1700000000000-0"
    cases: list[tuple[str, str | bytes | None, str]] = [
        (f"?after={t}", None, "<task_id>:<event_id>"),
        (f"?after=nope:{e}", None, "not a task id"),
        (f"?after={t}:soon", None, "not an event id"),
        (f"?after={t}:{e},{t}:{e}", None, "listed twice"),
        ("?after=" + ",".join(f"t{c * 25}:{e}" for c in "2345"), None, "at most 3"),
        (f"?after={t}:{e}&after={t}:{e}", None, "once"),
        ("?resume=later", None, "resume must be"),
        (f"?resume=message&after={t}:{e}", None, "not both"),
        ("?resume=message", "{not json", "not JSON"),
        ("?resume=message", json.dumps({"type": "hello"}), "must be"),
        ("?resume=message", json.dumps({"type": "resume", "after": [t]}), "object"),
        ("?resume=message", json.dumps(ev.resume_request({f"t{c * 25}": e for c in "2345"})),
         "at most 3"),
        ("?resume=message", json.dumps(ev.resume_request({t: "x"})), "not an event id"),
        ("?resume=message", b"\x00binary", "text frame"),
        ("?resume=message", None, "no resume message within 0.3 s"),
    ]
    async for server in serve(settings, sqlite_url):
        for query, message, reason in cases:
            ws = await ws_open(server, "/v1/events" + query)
            if message is not None:
                await ws.send(message)
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 5)
            assert (ws.close_code, reason in (ws.close_reason or "")) == (4400, True), \
                (query, message, ws.close_reason)
        # Within the bounds it is accepted.
        three = [f"t{c * 25}" for c in "234"]
        ws = await ws_open(server, "/v1/events?after=" + ",".join(f"{x}:{e}" for x in three))
        assert await ws_messages(ws, n=3) == [ev.not_found(x) for x in three]
        await ws.close()
        ws = await ws_open(server, "/v1/events?resume=message")
        await ws.send(json.dumps(ev.resume_request({t: e})))
        assert await ws_messages(ws, n=1) == [ev.not_found(t)]
        await ws.send("{not json")  # later client messages are ignored
        with pytest.raises(TimeoutError):
            await ws_messages(ws, n=1, timeout_s=0.5)
        assert ws.close_code is None
        await ws.close()


async def _push_until(ws: ClientConnection, position: int, *, timeout_s: float = 10.0,
                      ) -> list[dict[str, Any]]:
    """Position pushes until one for ``position`` (the start estimate may come first)."""
    got: list[dict[str, Any]] = []
    async with asyncio.timeout(timeout_s):
        while not got or got[-1]["data"]["position"] != position:
            got += await ws_messages(ws, n=1, pushes=True)
    return got


async def test_queue_positions_are_pushed_to_watchers_when_they_change(
        server_sqlite: Server) -> None:
    server = server_sqlite
    typical = server.svc.lifecycle.queue.default_run_s
    ids = [await new_task(server) for _ in range(3)]
    ws = await ws_open(server, f"/v1/tasks/{ids[2]}/events")
    snap = (await ws_messages(ws, n=1, pushes=True))[0]
    assert snap["type"] == "snapshot" and snap["data"]["queue_position"] == 3
    # The start estimate follows: with one GPU and nothing running, two typical run
    # times (the queue's default before the model has run) ahead of it.
    first = await ws_messages(ws, n=1, pushes=True)
    assert first[0]["data"] == {"position": 3, "starts_in_s": 2 * typical}
    r = await server.http.post(f"/v1/tasks/{ids[0]}/cancel", headers=server.auth("alice"))
    assert r.status_code == 200
    got = await _push_until(ws, 2)
    assert {(m["type"], m["task_id"]) for m in got} == {("queued", ids[2])}
    if got[-1]["data"]["starts_in_s"] != typical:  # pushed with the last estimate at first
        got = await ws_messages(ws, n=1, pushes=True)
    assert got[-1]["data"] == {"position": 2, "starts_in_s": typical}
    # A move that changes neither its position nor its estimate pushes nothing to it.
    await new_task(server)  # behind it
    await TaskQueue(server.svc.redis).announce_move()
    with pytest.raises(TimeoutError):
        await ws_messages(ws, n=1, timeout_s=0.5, pushes=True)
    # Fair order: another user's task goes ahead of alice's second one.
    await new_task(server, "bob")
    assert (await _push_until(ws, 3))[-1]["data"]["position"] == 3
    await server.http.post(f"/v1/tasks/{ids[1]}/cancel", headers=server.auth("alice"))
    got = await _push_until(ws, 1)
    if got[-1]["data"]["starts_in_s"] != 0.0:
        got = await ws_messages(ws, n=1, pushes=True, timeout_s=5)
    assert got[-1]["data"] == {"position": 1, "starts_in_s": 0.0}
    await ws.close()


async def test_a_queue_move_pushes_exact_positions_to_the_watched_tasks_that_moved_from_one_script(
        server_sqlite: Server) -> None:
    server = server_sqlite
    alice = [await new_task(server) for _ in range(3)]
    bob = [await new_task(server, "bob") for _ in range(3)]  # fair order: a0 b0 a1 b1 a2 b2
    queue = server.svc.lifecycle.queue
    # Positions alone here (start estimates, which move for every task behind a cancel,
    # have their own test).
    server.hub.eta_min_interval_s = server.hub.eta_refresh_s = float("inf")
    conn = open_connection(server.hub, user_id="u", scope=None, single=None)
    try:
        for task_id in alice + bob:
            assert await conn.attach(task_id)
        assert [m["data"]["queue_position"] for m in conn.outbox.take()] == [1, 3, 5, 2, 4, 6]
        r = await server.http.post(f"/v1/tasks/{alice[0]}/cancel", headers=server.auth("alice"))
        assert r.status_code == 200
        pushed: dict[str, int] = {}
        async with asyncio.timeout(5):
            while len(pushed) < 3:
                await conn.outbox.ready.wait()
                pushed |= {m["task_id"]: m["data"]["position"] for m in conn.outbox.take()
                           if m["type"] == "queued"}
        await asyncio.sleep(0.3)
        pushed |= {m["task_id"]: m["data"]["position"] for m in conn.outbox.take()
                   if m["type"] == "queued"}
        exact = {}
        for task_id in alice[1:] + bob:
            row = await _row(server, task_id)
            exact[task_id] = await queue.position(user_id=row.user_id, task_id=task_id)
        # Now a1 b0 a2 b1 b2: b0 and b1 kept their places and got nothing.
        assert pushed == {t: exact[t] for t in (alice[1], alice[2], bob[2])} \
            == {alice[1]: 1, alice[2]: 3, bob[2]: 5}
        # One script for all five watched queued tasks, however many there are; with the
        # start estimates due, one more (the fair order they replay).
        server.hub.eta_min_interval_s = float("inf")
        await server.svc.redis.config_resetstat()
        await server.hub.recompute_positions()
        stats = await server.svc.redis.info("commandstats")
        assert _scripts_run(stats) == 1
        assert len(conn.outbox) == 0  # nothing moved: nothing pushed
        server.hub.eta_min_interval_s = 0.0
        await server.hub.recompute_positions()  # the first estimates: each task hears its own
        assert sorted(m["task_id"] for m in conn.outbox.take()) == sorted(alice[1:] + bob)
        await server.svc.redis.config_resetstat()
        await server.hub.recompute_positions()
        stats = await server.svc.redis.info("commandstats")
        assert _scripts_run(stats) == 2
        assert len(conn.outbox) == 0  # estimates unchanged: nothing pushed
    finally:
        conn.close()


async def test_streams_need_credentials_and_another_users_task_looks_missing(
        server: Server) -> None:
    task_id = await new_task(server)
    path = f"/v1/tasks/{task_id}/events"
    assert (await server.http.get(path)).status_code == 401
    r = await server.http.get(path, headers=server.auth("bob"))
    assert r.status_code == 404 and r.json()["error"]["code"] == "task_not_found"
    r = await server.http.get(path + "?after=nonsense", headers=server.auth("alice"))
    assert r.status_code == 422
    for user, p, code in ((None, path, 4401), ("bob", path, 4404),
                          ("alice", "/v1/tasks/t0000000000000000000000000/events", 4404),
                          ("alice", path + "?after=x", 4400), (None, "/v1/events", 4401)):
        ws = await ws_open(server, p, user)
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 5)
        assert ws.close_code == code, (user, p)
    # A stream token works where headers cannot be set (browsers).
    r = await server.http.post("/v1/auth/stream-token", headers=server.auth("alice"))
    token = r.json()["token"]
    ws = await ws_open(server, f"{path}?token={token}", None)
    assert (await ws_messages(ws, n=1))[0]["type"] == "snapshot"
    await ws.close()
    async with server.http.stream("GET", f"{path}?token={token}") as resp:
        assert resp.status_code == 200
        assert (await sse_events(resp, n=1))[0][1] == "snapshot"


async def test_idle_clients_get_keep_alive_pings(sqlite_url: str, redis_url: str,
                                                 local_storage: StorageSettings) -> None:
    settings = settings_for(sqlite_url, redis_url, local_storage, stream_ping_interval_s=0.2)
    async for server in serve(settings, sqlite_url):
        task_id = await new_task(server)
        ws = await ws_open(server, f"/v1/tasks/{task_id}/events")
        msgs = [json.loads(await asyncio.wait_for(ws.recv(), 5)) for _ in range(3)]
        assert [m["type"] for m in msgs] == ["snapshot", "ping", "ping"]
        await ws.close()
        async with server.http.stream("GET", f"/v1/tasks/{task_id}/events",
                                      headers=server.auth("alice")) as resp:
            lines = []
            async for line in resp.aiter_lines():
                lines.append(line)
                if line == ": ping":
                    break
        assert lines[0] == "retry: 1000"


async def test_streams_keep_flowing_after_the_shared_readers_redis_connection_is_killed(
        server_sqlite: Server) -> None:
    server = server_sqlite
    first = await new_task(server)
    ws = await ws_open(server, f"/v1/tasks/{first}/events")
    await ws_messages(ws, n=1)
    await start_running(server, first)
    assert [m["type"] for m in await ws_messages(ws, n=2)] == ["dispatched", "started"]
    reader_id = server.hub._reader_id
    assert reader_id is not None
    await server.svc.redis.execute_command("CLIENT", "KILL", "ID", str(reader_id))
    await progress(server, first, 1)
    assert steps(await ws_messages(ws, n=1)) == [1]
    # A new key is still picked up at once (the blocked read is woken on the new connection).
    second = await new_task(server)
    ws2 = await ws_open(server, f"/v1/tasks/{second}/events")
    await ws_messages(ws2, n=1)
    t0 = time.monotonic()
    await start_running(server, second)
    assert [m["type"] for m in await ws_messages(ws2, n=2)] == ["dispatched", "started"]
    assert time.monotonic() - t0 < 2.0
    await ws.close()
    await ws2.close()


async def test_five_hundred_idle_websocket_connections_share_one_reader_and_all_get_events(
        server_sqlite: Server) -> None:
    server = server_sqlite
    ids = [await new_task(server) for _ in range(5)]
    conns: list[ClientConnection] = []
    n = 500
    sem = asyncio.Semaphore(50)

    async def one(i: int) -> ClientConnection:
        async with sem:
            ws = await ws_open(server, f"/v1/tasks/{ids[i % 5]}/events")
            await ws_messages(ws, n=1)
            return ws

    conns = list(await asyncio.gather(*(one(i) for i in range(n))))
    assert server.hub.connections == n
    reads_before = server.hub.reads
    await asyncio.sleep(1.0)
    assert server.hub.reads - reads_before <= 2  # idle: one blocked read, not 500 polls
    for task_id in ids:
        await start_running(server, task_id)
    got = await asyncio.gather(*(ws_messages(ws, n=2) for ws in conns))
    assert all([m["type"] for m in g] == ["dispatched", "started"] for g in got)
    await asyncio.gather(*(ws.close() for ws in conns))
    deadline = time.monotonic() + 5
    while server.hub.connections and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert server.hub.connections == 0


def _scripts_run(commandstats: dict[str, dict[str, int]]) -> int:
    """Lua scripts Redis ran, whether sent by source or by digest."""
    return sum(commandstats.get(k, {}).get("calls", 0)
               for k in ("cmdstat_eval", "cmdstat_evalsha"))
