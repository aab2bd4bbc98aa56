"""The per-process reader of task streams and its fan-out to connections.

A ``StreamHub`` (one per API process, started and stopped with the app) owns:

- one Redis connection that runs ``XREAD BLOCK`` over the task streams of every task
  any connection watches (and the global stream while a multiplexed connection is
  open, to discover new tasks); when the set of keys grows, the blocked read is woken
  at once with ``CLIENT UNBLOCK`` from another connection. Thousands of idle client
  connections cost one blocked Redis connection, not thousands;
- one Pub/Sub subscription to ``QUEUE_MOVED``: when the queue changes, the positions
  of all the watched queued tasks are recomputed in one Redis script
  (``TaskQueue.positions``) and a ``queued`` position push is offered only to the
  connections of tasks whose position changed.

Guarantees:

- Per task, the hub delivers every entry after its own cursor, in stream order, to
  every subscriber watching the task, and moves the cursor past it; a subscriber
  that joins behind the cursor back-fills the difference itself (``connection``).
- The hub never waits for a client: delivery calls the subscribers' synchronous,
  non-blocking ``deliver``/``offer`` (``protocols.Subscriber``).
- A multiplexed connection gets each new task of its user: ``queued`` entries on the
  global stream name new tasks (the other entries are not decoded), their owners are
  looked up in batches, and the task is attached to that user's multiplexed
  connections.
- Every background task is named and supervised (``aio.supervise``: restarted with
  backoff after an error), and ``stop()`` sets the hub's stopping event, ends every
  connection (``GoingAway``), and cancels and awaits them all.

Tuning (``ApiSettings``): ``stream_read_block_ms``, ``stream_read_max_events``,
``stream_backfill_page_events``, ``stream_queue_coalesce_s``. Stream reads go through
``bus.events``, task rows through ``db.tasks``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any, cast

import redis.asyncio as aioredis

from vidmaas.aio import supervise
from vidmaas.api.estimates import estimated_starts
from vidmaas.api.streams.outbox import position_key
from vidmaas.api.streams.protocols import Subscriber
from vidmaas.bus import events as bus_events
from vidmaas.bus import keys
from vidmaas.bus.events import parse_entries
from vidmaas.db import tasks as repo
from vidmaas.domain import events as ev
from vidmaas.domain.events import STATUS_OF_EVENT, Event, EventType
from vidmaas.domain.status import TaskStatus
from vidmaas.logs import TaskLog
from vidmaas.services import Services

log = logging.getLogger(__name__)
tlog = TaskLog(log)

_OWNER_CACHE_MAX = 50_000
"""Task owners remembered for discovery; the cache is cleared past this (memory bound)."""
_MUX_ATTACH_MAX = 1000
"""Unfinished tasks a new multiplexed connection attaches at most (newest first)."""


class StreamHub:
    """The per-process reader and fan-out (see the module docstring)."""

    def __init__(self, services: Services) -> None:
        cfg = services.settings.api
        self._services = services
        self.block_ms = max(1, cfg.stream_read_block_ms)
        self._buffer_events = cfg.stream_buffer_events
        # A read never hands one connection more than half its buffer for one task.
        self.count = max(1, min(cfg.stream_read_max_events, self._buffer_events // 2))
        self._ping_interval_s = cfg.stream_ping_interval_s
        self.backfill_page = max(1, cfg.stream_backfill_page_events)
        self.queue_coalesce_s = cfg.stream_queue_coalesce_s
        self.eta_min_interval_s = cfg.stream_eta_min_interval_s
        self.eta_refresh_s = cfg.stream_eta_refresh_s
        self._watchers: dict[str, set[Subscriber]] = {}
        self._cursor: dict[str, str] = {}
        self._owner: dict[str, str] = {}
        self._status: dict[str, str] = {}
        self._position: dict[str, int | None] = {}
        self._starts_in_s: dict[str, float | None] = {}
        self._estimated_at = 0.0
        """When start estimates were last computed (monotonic seconds)."""
        self._eta_stale = False
        """A push went out with an estimate older than its position: refresh it soon."""
        self._mux: dict[str, set[Subscriber]] = {}
        self._connections: set[Subscriber] = set()
        self._global_cursor: str | None = None
        self._owner_cache: dict[str, str] = {}
        self._discover: asyncio.Queue[str] = asyncio.Queue()
        self._changed = asyncio.Event()
        self._kick = asyncio.Event()
        self._stopping = asyncio.Event()
        self._reading = False
        self._reader: aioredis.Redis | None = None
        self._reader_id: int | None = None
        self._refresh_id = False
        self._tasks: list[asyncio.Task[None]] = []
        self.reads = 0

    # -- what connections read (protocols.HubView)

    @property
    def services(self) -> Services:
        return self._services

    @property
    def buffer_events(self) -> int:
        return self._buffer_events

    @property
    def ping_interval_s(self) -> float:
        return self._ping_interval_s

    # -- lifecycle

    async def start(self) -> None:
        self._stopping.clear()
        for name, body in (("vidmaas-streams-reader", self._read_loop),
                           ("vidmaas-streams-unblock", self._unblock_loop),
                           ("vidmaas-streams-queue", self._queue_loop),
                           ("vidmaas-streams-discover", self._discover_loop)):
            self._tasks.append(asyncio.create_task(
                supervise(name, body, stopping=self._stopping, log=log,
                          backoff_initial_s=0.1),
                name=name))

    async def stop(self) -> None:
        self._stopping.set()
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

    def register(self, conn: Subscriber) -> None:
        self._connections.add(conn)

    def forget(self, conn: Subscriber) -> None:
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
        return max((c.high_water for c in self._connections), default=0)

    async def open_mux(self, conn: Subscriber) -> None:
        """Attach every unfinished task of the caller and follow new ones."""
        if self._global_cursor is None:
            last = await bus_events.newest_global_id(self._services.redis)
            if self._global_cursor is None:
                self._global_cursor = last or "0-0"
                self._wake()
        self._mux.setdefault(conn.user_id, set()).add(conn)
        # Listed after registering: a task created before the registration has its row
        # in the database already; one created after is announced on the global stream.
        unfinished = [s for s in TaskStatus if not s.terminal]
        async with self._services.sessions() as s:
            rows = await repo.list_tasks(session=s, user_id=conn.user_id,
                                         limit=_MUX_ATTACH_MAX, statuses=unfinished)
        for task in reversed(rows):
            if conn.closed:
                return
            await conn.attach(task.id)

    def watch(self, sub: Subscriber, task_id: str, *, user_id: str, after: str, status: str,
              position: int | None) -> str | None:
        """Add ``sub`` to the task's readers; the hub's cursor if it already reads the task."""
        self._watchers.setdefault(task_id, set()).add(sub)
        self._owner[task_id] = user_id
        self._status.setdefault(task_id, status)
        if position is not None:
            self._position.setdefault(task_id, position)
        if status == TaskStatus.QUEUED.value and task_id not in self._starts_in_s:
            self._eta_stale = True  # a newly watched queued task: estimate it soon
        if task_id in self._cursor:
            return self._cursor[task_id]
        self._cursor[task_id] = after
        self._wake()
        return None

    def starts_in_s(self, task_id: str) -> float | None:
        return self._starts_in_s.get(task_id)

    def unwatch(self, sub: Subscriber, task_id: str) -> None:
        subs = self._watchers.get(task_id)
        if subs is None:
            return
        subs.discard(sub)
        if not subs:
            for d in (self._watchers, self._cursor, self._owner, self._status, self._position,
                      self._starts_in_s):
                d.pop(task_id, None)

    def _wake(self) -> None:
        self._changed.set()
        if self._reading:
            self._kick.set()

    # -- Redis reads

    async def last_entry(self, task_id: str) -> tuple[str | None, Event | None]:
        return await bus_events.last_entry(self._services.redis, task_id)

    def cursor_of(self, task_id: str) -> str | None:
        return self._cursor.get(task_id)

    async def read_page(self, task_id: str, *, after: str, upto: str, count: int,
                        ) -> bus_events.Page:
        """Up to ``count`` events with ``after`` < id ≤ ``upto`` (see ``bus.events.Page``)."""
        return await bus_events.read_page(self._services.redis, task_id, after=after,
                                          upto=upto, count=count)

    async def read_range(self, task_id: str, *, after: str, upto: str,
                         ) -> list[tuple[str, Event]]:
        """Events with ``after`` < id ≤ ``upto``."""
        return await bus_events.read_range(self._services.redis, task_id, after=after,
                                           upto=upto, page=self.backfill_page)

    async def _read_loop(self) -> None:
        if self._reader is not None:  # restarted after an error: drop the old connection
            with contextlib.suppress(Exception):
                await self._reader.aclose()
        self._reader = self._services.redis.client()
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
        for sub in list(self._watchers.get(task_id, ())):
            sub.deliver(task_id, events)

    def _on_global(self, entries: list[Any], *, read_from: str) -> None:
        if self._global_cursor != read_from:
            return
        self._global_cursor = str(entries[-1][0])
        # Only `queued` entries name new tasks: the rest (every event of every user) are
        # skipped before they are decoded.
        queued = [e for e in entries if e[1].get("type") == EventType.QUEUED.value]
        for _, event in parse_entries(queued):
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
                if await self._services.redis.client_unblock(self._reader_id):
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
                if len(self._owner_cache) > _OWNER_CACHE_MAX:
                    self._owner_cache.clear()
                async with self._services.sessions() as s:
                    self._owner_cache.update(await repo.owners_of(session=s, task_ids=unknown))
            for task_id in dict.fromkeys(batch):
                owner = self._owner_cache.get(task_id)
                for sub in list(self._mux.get(owner or "", ())):
                    if not sub.watching(task_id) and not sub.closed:
                        try:
                            await sub.attach(task_id)
                        except Exception:
                            tlog.exception(task_id, "could not attach a new task to a stream")

    # -- queue positions

    async def _queue_loop(self) -> None:
        pubsub = self._services.redis.pubsub()
        try:
            await pubsub.subscribe(keys.QUEUE_MOVED)
            while True:
                msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                if msg is None:
                    # Estimates drift as running tasks progress: refresh them even when
                    # the queue does not move.
                    since = time.monotonic() - self._estimated_at
                    if since >= self.eta_refresh_s \
                            or (self._eta_stale and since >= self.eta_min_interval_s):
                        self._eta_stale = False
                        await self.recompute_positions()
                    continue
                await asyncio.sleep(self.queue_coalesce_s)  # a burst of moves: one recompute
                while await pubsub.get_message(ignore_subscribe_messages=True, timeout=0):
                    pass
                await self.recompute_positions()
        finally:
            with contextlib.suppress(Exception):
                await cast(Any, pubsub).aclose()

    async def recompute_positions(self) -> None:
        """Recompute the positions of every watched queued task (one Redis script) and,
        at most every ``stream_eta_min_interval_s``, their estimated starts; offer a
        position push to the watchers of each task whose position changed or whose
        estimate moved by more than ``max(5 s, 10 %)``."""
        queued = [(self._owner.get(t, ""), t) for t, s in self._status.items()
                  if s == TaskStatus.QUEUED.value]
        if not queued:
            return
        queue = self._services.lifecycle.queue
        positions = await queue.positions(queued)
        starts: dict[str, float | None] | None = None
        if time.monotonic() - self._estimated_at >= self.eta_min_interval_s:
            self._estimated_at = time.monotonic()
            self._eta_stale = False
            try:
                starts = await estimated_starts(
                    queue=queue, sessions=self._services.sessions,
                    capacity=self._services.settings.gpu_capacity)
            except Exception:
                log.warning("start estimates unavailable", exc_info=True)
        for _, task_id in queued:
            pos = positions.get(task_id)
            if pos is None or task_id not in self._watchers:
                continue
            old_eta = self._starts_in_s.get(task_id)
            if starts is None:  # estimates not due: the last one, refreshed soon
                eta, eta_moved = old_eta, False
            else:
                eta = starts.get(task_id)
                eta_moved = (eta is None) != (old_eta is None) if task_id in self._starts_in_s \
                    else eta is not None
                if eta is not None and old_eta is not None:
                    eta_moved = abs(eta - old_eta) > max(5.0, 0.1 * old_eta)
            moved = pos != self._position.get(task_id)
            if moved and starts is None:
                self._eta_stale = True
            if not (moved or eta_moved):
                continue
            self._position[task_id] = pos
            self._starts_in_s[task_id] = eta
            msg = ev.position_push(task_id, position=pos, starts_in_s=eta)
            for sub in list(self._watchers.get(task_id, ())):
                sub.offer(msg, key=position_key(task_id))


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
