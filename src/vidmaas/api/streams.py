"""Event streams to clients: one shared Redis reader per process, bounded buffers per connection.

A ``StreamHub`` (one per API process, started and stopped with the app) owns:

- one Redis connection that runs ``XREAD BLOCK`` over the task streams of every task any
  connection watches (and the global stream while a multiplexed connection is open, to
  discover new tasks); when the set of keys grows, the blocked read is woken at once with
  ``CLIENT UNBLOCK`` from another connection. Thousands of idle client connections cost
  one blocked Redis connection, not thousands;
- one Pub/Sub subscription to ``QUEUE_MOVED``: when the queue changes, the positions of
  the watched queued tasks are recomputed and a ``queued`` message is pushed only to the
  connections of tasks whose position changed.

A ``Connection`` is one client (an SSE response or a WebSocket). Guarantees:

- The first message for a task is its snapshot (status, progress, stage, eta, queue
  position, last event id). The snapshot's ``last_event_id`` is read *before* the row, so
  every event after it is delivered, and the row already reflects every status change up
  to it (status changes commit before their event is published).
- After the snapshot, every event after the resume point (``after``, or the snapshot's
  last event id) is delivered in stream order with no gap and no duplicate: the hub
  delivers every entry after its own cursor for the task, a connection that joins a task
  the hub already reads behind its cursor back-fills the difference with ``XRANGE`` while
  holding the hub's deliveries, and each connection drops anything at or before the last
  id it queued.
- A slow client cannot hurt others, and costs a bounded buffer: the hub never waits for a
  connection (delivery only appends to the connection's outbox of ``limit`` messages).
  A client that keeps up gets every event. Once ``limit`` messages wait, droppable ones
  (progress, heartbeat, queue position, log) go first, oldest superseded first, so
  progress coalesces to the latest. A state or terminal event (never dropped) that finds
  no room makes the watch *lag*: it ignores live deliveries and, as the client drains
  its outbox, reads the task's stream itself from its cursor in pages of half the
  buffer, then goes live again without gap (the Redis stream is the buffer).
  ``TooSlow`` (close 4408) remains only as a guard; this engine does not reach it.
- A task's stream ends only when its row is terminal: after a terminal-type event the row
  is checked (with backoff, because a retryable failure may send the task back to
  ``queued``); a row found terminal without its terminal event is given a short grace for
  the event to arrive.
- Keep-alive: ``messages()`` yields an empty batch (a ping) after ``ping_interval_s``
  without traffic.
- Every background task is named and supervised (restarted with backoff after an error),
  and ``stop()`` cancels and awaits them all.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, cast

import redis.asyncio as aioredis
from sqlalchemy import select

from vidmaas.api.creation import position_of
from vidmaas.bus import events as bus_events
from vidmaas.bus import keys
from vidmaas.bus.events import id_key, parse_entries
from vidmaas.bus.queue import TaskQueue
from vidmaas.db import tasks as repo
from vidmaas.db.models import Task
from vidmaas.domain.events import STATUS_OF_EVENT, WIRE_VERSION, Event, EventType
from vidmaas.domain.status import TaskStatus
from vidmaas.logs import TaskLog
from vidmaas.services import Services

log = logging.getLogger(__name__)
tlog = TaskLog(log)

STREAM_ID_RE = re.compile(r"^\d{1,20}(-\d{1,20})?$")
TERMINAL_GRACE_S = 2.0
"""How long a terminal row waits for its terminal event before the stream ends anyway."""
ROW_CHECK_MAX_INTERVAL_S = 5.0
BACKFILL_PAGE = 500
_COALESCED = {EventType.PROGRESS: "progress", EventType.HEARTBEAT: "heartbeat"}
_DROPPABLE = {EventType.PROGRESS, EventType.HEARTBEAT, EventType.LOG}
_STATE = {EventType.QUEUED, EventType.DISPATCHED, EventType.STARTED, EventType.STATUS}

Message = dict[str, Any]


class TooSlow(Exception):
    """The client fell ``limit`` undroppable messages behind; it must reconnect and resume."""


class GoingAway(Exception):
    """The server is shutting down."""


def valid_stream_id(value: str) -> bool:
    return bool(STREAM_ID_RE.match(value))


def _now() -> float:
    return time.monotonic()


# ------------------------------------------------------------------ outbox

@dataclass(slots=True)
class _Item:
    msg: Message
    droppable: bool
    key: tuple[str, str] | None
    alive: bool = True


class Outbox:
    """Messages waiting for one client, bounded as the module docstring says.

    Nothing is dropped while fewer than ``limit`` messages wait (a client that keeps up
    gets every event). Past ``limit``, the oldest droppable message that a newer one of
    the same kind and task supersedes goes first (progress coalesces to the latest), then
    the oldest droppable one; with none left, ``overflowed`` is set.
    """

    def __init__(self, *, limit: int) -> None:
        self.limit = max(8, limit)
        self._items: deque[_Item] = deque()
        self._latest: dict[tuple[str, str], _Item] = {}
        self._live = 0
        self.overflowed = False
        self.high_water = 0
        self.dropped = 0
        self.ready = asyncio.Event()

    def __len__(self) -> int:
        return self._live

    def put(self, msg: Message, *, droppable: bool = False,
            key: tuple[str, str] | None = None, force: bool = False) -> None:
        """Queue a message; ``force`` (snapshots, ``end``: one per watched task) never
        counts as an overflow."""
        item = _Item(msg, droppable, key)
        self._items.append(item)
        self._live += 1
        if key is not None:
            self._latest[key] = item
        if self._live > self.limit and not force and not self._drop_one():
            self.overflowed = True
        self.high_water = max(self.high_water, self._live)
        self.ready.set()

    def make_room(self) -> bool:
        """Whether one more message fits, dropping a droppable one if that makes it fit."""
        return self._live < self.limit or self._drop_one()

    def _drop_one(self) -> bool:
        fallback: _Item | None = None
        for item in self._items:
            if not (item.alive and item.droppable):
                continue
            if item.key is not None and self._latest.get(item.key) is not item:
                fallback = item  # superseded: the best one to drop
                break
            if fallback is None:
                fallback = item
        if fallback is None:
            return False
        fallback.alive = False
        self._live -= 1
        self.dropped += 1
        while self._items and not self._items[0].alive:
            self._items.popleft()
        return True

    def take(self) -> list[Message]:
        out = [item.msg for item in self._items if item.alive]
        self._items.clear()
        self._latest.clear()
        self._live = 0
        self.ready.clear()
        return out


# ------------------------------------------------------------------ connections

@dataclass(slots=True)
class _Watch:
    task_id: str
    user_id: str
    cursor: str
    """The last event id queued for the client; anything at or before it is dropped."""
    holding: list[tuple[str, Event]] | None = None
    lagging: bool = False
    """The client fell behind: live deliveries are ignored and the connection reads the
    task's stream itself from ``cursor`` as its outbox drains (``_catch_up``)."""
    saw_terminal: bool = False
    row_terminal_since: float | None = None
    next_check: float | None = None
    check_interval_s: float = 0.1
    ended: bool = False


def snapshot_message(task: Task, *, start: str, last_event_id: str | None,
                     position: int | None) -> Message:
    """The first message for a task (see docs/streams-and-openai.md).

    Its ``id`` is the resume point the events that follow start after, so a client that
    remembers the last ``id`` it saw resumes correctly from a snapshot too.
    """
    error = {"code": task.error_code, "message": task.error_message or ""} \
        if task.error_code and task.status in (TaskStatus.FAILED.value,
                                               TaskStatus.QUEUED.value) else None
    return {"v": WIRE_VERSION, "type": "snapshot", "task_id": task.id, "id": start, "data": {
        "status": task.status, "progress": round(task.progress, 2), "stage": task.stage,
        "eta_s": task.eta_s, "queue_position": position, "last_event_id": last_event_id,
        "attempts": task.attempts, "error": error,
        "result": task.result if task.status is TaskStatus.COMPLETED else None}}


def position_message(task_id: str, position: int) -> Message:
    """A queue position push: a ``queued`` message without an event id."""
    return {"v": WIRE_VERSION, "type": EventType.QUEUED.value, "task_id": task_id,
            "data": {"position": position}}


class Connection:
    """One client connection: the tasks it watches and its outbox.

    ``single`` is the task id of a one-task stream (it ends with that task); None is a
    multiplexed connection over all of ``user_id``'s tasks (it ends when the client goes).
    """

    def __init__(self, hub: StreamHub, *, user_id: str, scope: str | None,
                 single: str | None) -> None:
        self.hub = hub
        self.user_id = user_id
        self.scope = scope
        self.single = single
        self.outbox = Outbox(limit=hub.buffer_events)
        self.watches: dict[str, _Watch] = {}
        self.going_away = False
        self.closed = False

    # -- called by the hub, synchronously: never blocks

    def deliver(self, task_id: str, entries: Iterable[tuple[str, Event]]) -> None:
        w = self.watches.get(task_id)
        if w is None or w.ended:
            return
        if w.holding is not None:  # a read from Redis is in flight: keep these for after it
            w.holding.extend(entries)
            return
        if w.lagging:
            return
        for event_id, event in entries:
            if not self._push(w, event_id, event):
                return

    def offer(self, msg: Message, *, key: tuple[str, str]) -> None:
        """A message that is not a stream event (queue position push)."""
        w = self.watches.get(str(msg["task_id"]))
        if w is not None and not w.ended:
            self.outbox.put(msg, droppable=True, key=key)

    def shutdown(self) -> None:
        self.going_away = True
        self.outbox.ready.set()

    def _push(self, w: _Watch, event_id: str, event: Event) -> bool:
        """Queue one event; False (and the watch lagging) if the outbox has no room for an
        event that may not be dropped."""
        if id_key(event_id) <= id_key(w.cursor):
            return True
        if event.type not in _DROPPABLE and not self.outbox.make_room():
            w.lagging = True
            return False
        w.cursor = event_id
        msg = event.to_json(event_id=event_id)
        kind = _COALESCED.get(event.type)
        self.outbox.put(msg, droppable=event.type in _DROPPABLE,
                        key=None if kind is None else (w.task_id, kind))
        if event.type.terminal:
            w.saw_terminal = True
            w.next_check = _now()
            w.check_interval_s = 0.1
        elif event.type in _STATE:
            w.saw_terminal = False
            w.row_terminal_since = None
            w.next_check = None
        return True

    async def _catch_up(self, w: _Watch) -> None:
        """Read a lagging task's stream from its cursor while the outbox has room; go live
        again once the reads reach the hub's cursor.

        Live deliveries are held from the moment the hub's cursor is noted, so once every
        event up to that cursor is read, the held ones (all after it) close the gap.
        """
        page = max(1, self.outbox.limit // 2)
        while w.lagging and not w.ended and len(self.outbox) < page:
            upto = self.hub.cursor_of(w.task_id) or "+"
            w.holding = []
            try:
                got = await self.hub.read_page(w.task_id, after=w.cursor, upto=upto,
                                               count=page)
            finally:
                held, w.holding = w.holding, None
            w.lagging = False
            for event_id, event in got.events:
                if not self._push(w, event_id, event):
                    break
            if w.lagging:
                return
            if got.last_id is not None and id_key(got.last_id) > id_key(w.cursor):
                w.cursor = got.last_id  # past malformed entries too
            if got.full:
                w.lagging = True  # more to read before the live stream
                continue
            self.deliver(w.task_id, held)

    # -- attaching

    async def attach(self, task_id: str, *, after: str | None = None) -> bool:
        """Snapshot the task and start streaming its events; False if not the caller's."""
        if task_id in self.watches:
            return True
        svc = self.hub.services
        last_id, last_event = await self.hub.last_entry(task_id)  # before the row: no gap
        async with svc.sessions() as s:
            task = await repo.get_task(session=s, task_id=task_id, user_id=self.scope)
        if task is None:
            return False
        position = await position_of(svc, task)
        if self.closed or task_id in self.watches:
            return self.closed is False  # gone meanwhile, or attached by a racing call
        start = after if after is not None else (last_id or "0-0")
        self.outbox.put(snapshot_message(task, start=start, last_event_id=last_id,
                                         position=position), force=True)
        w = _Watch(task_id=task_id, user_id=task.user_id, cursor=start)
        self.watches[task_id] = w
        if task.status.terminal:
            w.row_terminal_since = _now()
            w.next_check = _now()
            if last_event is not None and last_event.type.terminal and last_id is not None \
                    and id_key(last_id) <= id_key(start):
                w.saw_terminal = True  # the client already has the terminal event
        hub_cursor = self.hub.watch(self, task_id, user_id=task.user_id, after=start,
                                    status=task.status, position=position)
        if hub_cursor is not None and id_key(start) < id_key(hub_cursor):
            w.holding = []
            try:
                backlog = await self.hub.read_range(task_id, after=start, upto=hub_cursor)
            finally:
                held, w.holding = w.holding, None
            self.deliver(task_id, backlog)
            self.deliver(task_id, held)
        return True

    def _end(self, w: _Watch, *, announce: bool = True) -> None:
        if announce:
            self.outbox.put({"v": WIRE_VERSION, "type": "end", "task_id": w.task_id,
                             "data": {}}, force=True)
        w.ended = True
        self.watches.pop(w.task_id, None)
        self.hub.unwatch(self, w.task_id)

    def close(self) -> None:
        self.closed = True
        for w in list(self.watches.values()):
            self._end(w, announce=False)
        self.hub.forget(self)

    # -- the sending side

    def done(self) -> bool:
        return self.single is not None and self.single not in self.watches

    async def _check_endings(self) -> bool:
        """Row checks that are due; True if a watch ended."""
        now = _now()
        due = [w for w in self.watches.values()
               if w.next_check is not None and w.next_check <= now and not w.lagging]
        ended = False
        for w in due:
            async with self.hub.services.sessions() as s:
                task = await repo.get_task(session=s, task_id=w.task_id)
            if task is None:
                self._end(w)
                ended = True
                continue
            if task.status.terminal:
                if w.row_terminal_since is None:
                    w.row_terminal_since = now
                if w.saw_terminal or now - w.row_terminal_since >= TERMINAL_GRACE_S:
                    self._end(w)
                    ended = True
                else:
                    w.next_check = w.row_terminal_since + TERMINAL_GRACE_S
            elif w.saw_terminal:
                # A retryable failure: the task may be queued again; look again later.
                w.next_check = now + w.check_interval_s
                w.check_interval_s = min(ROW_CHECK_MAX_INTERVAL_S, w.check_interval_s * 2)
            else:
                w.row_terminal_since = None
                w.next_check = None
        return ended

    async def messages(self) -> AsyncIterator[list[Message]]:
        """Batches to send, in order; an empty batch is a keep-alive ping.

        Returns when a one-task stream is complete; raises ``TooSlow`` or ``GoingAway``.
        """
        ping_s = self.hub.ping_interval_s
        last_sent = _now()
        while True:
            if self.going_away:
                raise GoingAway()
            if self.outbox.overflowed:
                raise TooSlow()
            batch = self.outbox.take()
            if batch:
                yield batch
                last_sent = _now()
            if await self._check_endings() and self.done():
                final = self.outbox.take()  # anything queued before the row check
                if final:
                    yield final
                return
            if self.done():
                return
            for w in [w for w in self.watches.values() if w.lagging]:
                await self._catch_up(w)
            if len(self.outbox):
                continue
            now = _now()
            wake = last_sent + ping_s
            checks = [w.next_check for w in self.watches.values() if w.next_check is not None]
            if checks:
                wake = min(wake, *checks)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, wake - now)):
                    await self.outbox.ready.wait()
            if not len(self.outbox) and _now() - last_sent >= ping_s and not self.going_away:
                yield []
                last_sent = _now()


# ------------------------------------------------------------------ the hub

async def _supervised(name: str, body: Callable[[], Awaitable[None]]) -> None:
    """Run ``body`` until cancelled, restarting it with backoff after an error."""
    delay_s = 0.1
    while True:
        started = _now()
        try:
            await body()
            return
        except asyncio.CancelledError:
            raise
        except Exception:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                # A client library turned our cancellation into an error: stop anyway.
                raise asyncio.CancelledError() from None
            log.exception("%s failed; restarting in %.1fs", name, delay_s)
        if _now() - started > 30:
            delay_s = 0.1
        await asyncio.sleep(delay_s)
        delay_s = min(5.0, delay_s * 2)


class StreamHub:
    """The per-process reader and fan-out (see the module docstring)."""

    def __init__(self, services: Services, *, block_ms: int = 2000, count: int = 200,
                 buffer_events: int | None = None, ping_interval_s: float | None = None,
                 ) -> None:
        cfg = services.settings.api
        self.services = services
        self.block_ms = block_ms
        # A read never hands one connection more than half its buffer for one task.
        self.count = max(1, min(count, (buffer_events or cfg.stream_buffer_events) // 2))
        self.buffer_events = buffer_events or cfg.stream_buffer_events
        self.ping_interval_s = ping_interval_s or cfg.stream_ping_interval_s
        self._watchers: dict[str, set[Connection]] = {}
        self._cursor: dict[str, str] = {}
        self._owner: dict[str, str] = {}
        self._status: dict[str, str] = {}
        self._position: dict[str, int | None] = {}
        self._mux: dict[str, set[Connection]] = {}
        self._connections: set[Connection] = set()
        self._global_cursor: str | None = None
        self._owner_cache: dict[str, str] = {}
        self._discover: asyncio.Queue[str] = asyncio.Queue()
        self._changed = asyncio.Event()
        self._kick = asyncio.Event()
        self._reading = False
        self._reader: aioredis.Redis | None = None
        self._reader_id: int | None = None
        self._refresh_id = False
        self._tasks: list[asyncio.Task[None]] = []
        self.reads = 0

    # -- lifecycle

    async def start(self) -> None:
        for name, body in (("vidmaas-streams-reader", self._read_loop),
                           ("vidmaas-streams-unblock", self._unblock_loop),
                           ("vidmaas-streams-queue", self._queue_loop),
                           ("vidmaas-streams-discover", self._discover_loop)):
            self._tasks.append(asyncio.create_task(_supervised(name, body), name=name))

    async def stop(self) -> None:
        for conn in list(self._connections):
            conn.shutdown()
        # Cancel until done: a client library may swallow one cancellation (seen with
        # redis-py while connecting), and a task left running would outlive the app.
        pending = set(self._tasks)
        for _ in range(20):
            for t in pending:
                t.cancel()
            _, pending = await asyncio.wait(pending, timeout=0.5)
            if not pending:
                break
        else:
            log.error("stream hub tasks did not stop: %s", [t.get_name() for t in pending])
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        if self._reader is not None:
            with contextlib.suppress(Exception):
                await self._reader.aclose()
            self._reader = None

    # -- connections

    def connect(self, *, user_id: str, scope: str | None, single: str | None) -> Connection:
        conn = Connection(self, user_id=user_id, scope=scope, single=single)
        self._connections.add(conn)
        return conn

    def forget(self, conn: Connection) -> None:
        self._connections.discard(conn)
        mux = self._mux.get(conn.user_id)
        if mux is not None:
            mux.discard(conn)
            if not mux:
                del self._mux[conn.user_id]
        if not self._mux:
            self._global_cursor = None

    @property
    def connections(self) -> int:
        return len(self._connections)

    def outbox_high_water(self) -> int:
        return max((c.outbox.high_water for c in self._connections), default=0)

    async def open_mux(self, conn: Connection) -> None:
        """Attach every unfinished task of the caller and follow new ones."""
        if self._global_cursor is None:
            last = await bus_events.newest_global_id(self.services.redis)
            if self._global_cursor is None:
                self._global_cursor = last or "0-0"
                self._wake()
        self._mux.setdefault(conn.user_id, set()).add(conn)
        # Listed after registering: a task created before the registration has its row
        # in the database already; one created after is announced on the global stream.
        unfinished = [s for s in TaskStatus if not s.terminal]
        async with self.services.sessions() as s:
            rows = await repo.list_tasks(session=s, user_id=conn.user_id, limit=1000,
                                         statuses=unfinished)
        for task in reversed(rows):
            if conn.closed:
                return
            await conn.attach(task.id)

    def watch(self, conn: Connection, task_id: str, *, user_id: str, after: str, status: str,
              position: int | None) -> str | None:
        """Add ``conn`` to the task's readers; the hub's cursor if it already reads the task."""
        self._watchers.setdefault(task_id, set()).add(conn)
        self._owner[task_id] = user_id
        self._status.setdefault(task_id, status)
        if position is not None:
            self._position.setdefault(task_id, position)
        if task_id in self._cursor:
            return self._cursor[task_id]
        self._cursor[task_id] = after
        self._wake()
        return None

    def unwatch(self, conn: Connection, task_id: str) -> None:
        conns = self._watchers.get(task_id)
        if conns is None:
            return
        conns.discard(conn)
        if not conns:
            for d in (self._watchers, self._cursor, self._owner, self._status, self._position):
                d.pop(task_id, None)

    def _wake(self) -> None:
        self._changed.set()
        if self._reading:
            self._kick.set()

    # -- Redis reads

    async def last_entry(self, task_id: str) -> tuple[str | None, Event | None]:
        return await bus_events.last_entry(self.services.redis, task_id)

    def cursor_of(self, task_id: str) -> str | None:
        return self._cursor.get(task_id)

    async def read_page(self, task_id: str, *, after: str, upto: str, count: int,
                        ) -> bus_events.Page:
        """Up to ``count`` events with ``after`` < id ≤ ``upto`` (see ``bus.events.Page``)."""
        return await bus_events.read_page(self.services.redis, task_id, after=after,
                                          upto=upto, count=count)

    async def read_range(self, task_id: str, *, after: str, upto: str,
                         ) -> list[tuple[str, Event]]:
        """Events with ``after`` < id ≤ ``upto``."""
        return await bus_events.read_range(self.services.redis, task_id, after=after,
                                           upto=upto, page=BACKFILL_PAGE)

    async def _read_loop(self) -> None:
        if self._reader is not None:  # restarted after an error: drop the old connection
            with contextlib.suppress(Exception):
                await self._reader.aclose()
        self._reader = self.services.redis.client()
        self._reader_id = int(await self._reader.client_id())
        self._refresh_id = False
        while True:
            if self._refresh_id:
                # The connection may have been re-made by a retry: its id changed.
                self._reader_id = int(await self._reader.client_id())
                self._refresh_id = False
            if not self._cursor and self._global_cursor is None:
                self._changed.clear()
                await self._changed.wait()
                continue
            streams: dict[Any, Any] = {}
            task_of: dict[str, str] = {}
            for task_id, cursor in self._cursor.items():
                key = keys.task_events(task_id)
                streams[key] = cursor
                task_of[key] = task_id
            global_cursor = self._global_cursor
            if global_cursor is not None:
                streams[keys.EVENTS] = global_cursor
            self._changed.clear()
            self._kick.clear()
            self._reading = True
            try:
                resp = cast(Any, await self._reader.xread(streams, count=self.count,
                                                          block=self.block_ms))
            finally:
                self._reading = False
            self.reads += 1
            for raw_key, entries in resp or []:
                key = str(raw_key)
                if not entries:
                    continue
                if key == keys.EVENTS:
                    self._on_global(entries, read_from=global_cursor or "")
                    continue
                tid = task_of.get(key)
                if tid is None or self._cursor.get(tid) != streams[key]:
                    continue  # unwatched (or re-watched) while the read was in flight
                self._cursor[tid] = str(entries[-1][0])
                self._fan_out(tid, parse_entries(entries))

    def _fan_out(self, task_id: str, events: list[tuple[str, Event]]) -> None:
        for _, event in events:
            if event.type in STATUS_OF_EVENT:
                self._status[task_id] = STATUS_OF_EVENT[event.type].value
            elif event.type is EventType.STATUS:
                self._status[task_id] = str(event.data.get("status"))
            if event.type is EventType.QUEUED:
                self._position[task_id] = int(event.data.get("position") or 0) or None
        for conn in list(self._watchers.get(task_id, ())):
            conn.deliver(task_id, events)

    def _on_global(self, entries: list[Any], *, read_from: str) -> None:
        if self._global_cursor != read_from:
            return
        self._global_cursor = str(entries[-1][0])
        for _, event in parse_entries(entries):
            if event.type is EventType.QUEUED:
                self._discover.put_nowait(event.task_id)

    async def _unblock_loop(self) -> None:
        """Wake the blocked read when the key set grew. An UNBLOCK can arrive before the
        XREAD it is meant for (the read was started but not yet sent): retry briefly; if
        it never takes, the reader's id is stale and the reader fetches it again."""
        while True:
            await self._kick.wait()
            self._kick.clear()
            for _ in range(100):
                if not self._reading or self._reader_id is None:
                    break
                if await self.services.redis.client_unblock(self._reader_id):
                    break
                await asyncio.sleep(0.005)
            else:
                self._refresh_id = True

    # -- new tasks of multiplexed connections

    async def _discover_loop(self) -> None:
        while True:
            batch = [await self._discover.get()]
            while not self._discover.empty():
                batch.append(self._discover.get_nowait())
            if not self._mux:
                continue
            unknown = [t for t in set(batch) if t not in self._owner_cache]
            if unknown:
                if len(self._owner_cache) > 50_000:
                    self._owner_cache.clear()
                async with self.services.sessions() as s:
                    res = await s.execute(select(Task.id, Task.user_id)
                                          .where(Task.id.in_(unknown)))
                    self._owner_cache.update({str(i): str(u) for i, u in res.all()})
            for task_id in dict.fromkeys(batch):
                owner = self._owner_cache.get(task_id)
                for conn in list(self._mux.get(owner or "", ())):
                    if task_id not in conn.watches and not conn.closed:
                        try:
                            await conn.attach(task_id)
                        except Exception:
                            tlog.exception(task_id, "could not attach a new task to a stream")

    # -- queue positions

    async def _queue_loop(self) -> None:
        pubsub = self.services.redis.pubsub()
        try:
            await pubsub.subscribe(keys.QUEUE_MOVED)
            while True:
                msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                if msg is None:
                    continue
                await asyncio.sleep(0.02)  # coalesce a burst of moves into one recompute
                while await pubsub.get_message(ignore_subscribe_messages=True, timeout=0):
                    pass
                await self.recompute_positions()
        finally:
            with contextlib.suppress(Exception):
                await cast(Any, pubsub).aclose()

    async def recompute_positions(self) -> None:
        queue = TaskQueue(self.services.redis)
        queued = [t for t, s in self._status.items() if s == TaskStatus.QUEUED.value]
        for i in range(0, len(queued), 32):
            chunk = queued[i:i + 32]
            positions = await asyncio.gather(*(
                queue.position(user_id=self._owner.get(t, ""), task_id=t) for t in chunk))
            for task_id, pos in zip(chunk, positions, strict=True):
                if pos is None or pos == self._position.get(task_id):
                    continue
                self._position[task_id] = pos
                msg = position_message(task_id, pos)
                for conn in list(self._watchers.get(task_id, ())):
                    conn.offer(msg, key=(task_id, "position"))


def install_hub(app: Any) -> None:
    """Start a hub with the app and stop it with the app (``app.state.stream_hub``)."""
    async def start(app_: Any) -> None:
        hub = StreamHub(app_.state.services)
        app_.state.stream_hub = hub
        await hub.start()

    async def stop(app_: Any) -> None:
        hub: StreamHub | None = getattr(app_.state, "stream_hub", None)
        if hub is not None:
            await hub.stop()
            app_.state.stream_hub = None

    app.state.startup_hooks.append(start)
    app.state.shutdown_hooks.append(stop)

