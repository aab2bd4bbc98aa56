"""One client connection (an SSE response or a WebSocket): the tasks it watches, its
outbox, and the order of what it sends.

Guarantees:

- The first message for a task is its snapshot (status, progress, stage, eta, queue
  position, last event id, resume point). The stream's last id is read *before* the row,
  so the row already reflects every status change up to it (status changes commit
  before their event is published). Without ``after`` the resume point of an unfinished
  task is the older of that id and the row's own ``last_event_id`` (where the relay has
  recorded one): progress the relay has not written to the row yet is delivered after
  the snapshot, never skipped.
- After the snapshot, every event after the resume point (``after``, or the snapshot's
  resume point) is delivered in stream order with no gap and no duplicate: the hub
  delivers every entry after its own cursor for the task; a connection that joins a task
  the hub already reads behind its cursor back-fills the difference with ``XRANGE``
  while holding the hub's deliveries; and each connection drops anything at or before
  the last id it queued.
- A slow client costs a bounded buffer (``outbox``) and never slows the hub: the hub's
  calls (``deliver``, ``offer``, ``shutdown``) only append. A state or terminal event
  (never dropped) that finds no room makes the watch *lag*: it ignores live deliveries
  and, as the client drains its outbox, reads the task's stream itself from its cursor
  in pages of half the buffer, then goes live again without gap (the Redis stream is the
  buffer). ``TooSlow`` (close 4408) remains only as a guard; this engine does not reach
  it.
- A task's stream ends only when its row is terminal: after a terminal-type event the
  row is checked (with backoff up to ``api.stream_row_check_max_interval_s``, because a
  retryable failure may send the task back to ``queued``); a row found terminal without
  its terminal event is given ``api.stream_terminal_grace_s`` for the event to arrive.
  Then ``end`` is sent; a one-task stream is complete after it.
- Keep-alive: ``messages()`` yields an empty batch (a ping) after ``ping_interval_s``
  without traffic.
- Resume of a multiplexed connection (``resume``): each task the client lists is attached
  from the client's own resume point, so it gets a snapshot and then every event after
  that point, terminal tasks included (their last events, then ``end``); a listed task
  that is missing or belongs to someone else gets one ``not_found`` message, the same
  for both, and nothing else.

This module knows the hub only through ``protocols.HubView``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass

from vidmaas.api.creation import position_of
from vidmaas.api.streams.messages import GoingAway, Message, TooSlow, snapshot_of
from vidmaas.api.streams.outbox import DROPPABLE, Outbox
from vidmaas.api.streams.protocols import HubView
from vidmaas.bus.events import id_key
from vidmaas.db import tasks as repo
from vidmaas.db.models import Task
from vidmaas.domain import events as ev
from vidmaas.domain.events import Event, EventType

_STATE = {EventType.QUEUED, EventType.DISPATCHED, EventType.STARTED, EventType.STATUS}
"""Events that show the task moving on (not terminal): a pending row check is void."""
_ROW_CHECK_FIRST_INTERVAL_S = 0.1


def _now() -> float:
    return time.monotonic()


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
    check_interval_s: float = _ROW_CHECK_FIRST_INTERVAL_S
    ended: bool = False


def _fresh_start(task: Task, last_id: str | None) -> str:
    """Where a fresh attach (no resume point) starts: the stream's last id, unless the row
    of an unfinished task has not caught up with it yet.

    Status changes commit before their event is published, but progress, stage and eta
    reach the row only when the relay applies their events, a moment after they are
    streamed. Starting at the stream's last id would pair a row of an older progress
    with a cursor past the newer one, and the client would never see it. So an
    unfinished task starts at the row's own ``last_event_id`` (the last event applied
    to it) when that is older: the events it has not applied yet follow the snapshot.
    A row the relay has applied nothing to yet has no progress to lag behind, and a
    terminal row is final: both start at the stream's end.
    """
    if last_id is None:
        return "0-0"
    row_id = task.last_event_id
    if task.status.terminal or row_id is None:
        return last_id
    return row_id if id_key(row_id) < id_key(last_id) else last_id


def open_connection(hub: HubView, *, user_id: str, scope: str | None,
            single: str | None) -> Connection:
    """A new connection registered with ``hub`` (``close()`` unregisters it)."""
    conn = Connection(hub, user_id=user_id, scope=scope, single=single)
    hub.register(conn)
    return conn


class Connection:
    """One client connection: the tasks it watches and its outbox.

    ``single`` is the task id of a one-task stream (it ends with that task); None is a
    multiplexed connection over all of ``user_id``'s tasks (it ends when the client goes).
    ``scope`` limits which tasks it may attach (a user id; None for an admin).
    """

    def __init__(self, hub: HubView, *, user_id: str, scope: str | None,
                 single: str | None) -> None:
        cfg = hub.services.settings.api
        self.hub = hub
        self.user_id = user_id
        self.scope = scope
        self.single = single
        self.outbox = Outbox(limit=hub.buffer_events)
        self.watches: dict[str, _Watch] = {}
        self.going_away = False
        self.closed = False
        self._terminal_grace_s = cfg.stream_terminal_grace_s
        self._row_check_max_interval_s = cfg.stream_row_check_max_interval_s

    @property
    def high_water(self) -> int:
        return self.outbox.high_water

    def watching(self, task_id: str) -> bool:
        return task_id in self.watches

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
        if event.type not in DROPPABLE and not self.outbox.make_room():
            w.lagging = True
            return False
        w.cursor = event_id
        self.outbox.put_event(task_id=w.task_id, event_id=event_id, event=event)
        if event.type.terminal:
            w.saw_terminal = True
            w.next_check = _now()
            w.check_interval_s = _ROW_CHECK_FIRST_INTERVAL_S
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
        start = after if after is not None else _fresh_start(task, last_id)
        self.outbox.put(snapshot_of(task, resume_id=start, last_event_id=last_id,
                                    position=position,
                                    starts_in_s=self.hub.starts_in_s(task_id)), force=True)
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

    async def resume(self, points: Mapping[str, str]) -> None:
        """Attach every task of ``points`` (task id → the last event id the client has)
        from its resume point; ``not_found`` for each one that is not the caller's."""
        for task_id, after in points.items():
            if self.closed:
                return
            if not await self.attach(task_id, after=after):
                self.outbox.put(ev.not_found(task_id), force=True)

    def _end(self, w: _Watch, *, announce: bool = True) -> None:
        if announce:
            self.outbox.put(ev.end(w.task_id), force=True)
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
                if w.saw_terminal or now - w.row_terminal_since >= self._terminal_grace_s:
                    self._end(w)
                    ended = True
                else:
                    w.next_check = w.row_terminal_since + self._terminal_grace_s
            elif w.saw_terminal:
                # A retryable failure: the task may be queued again; look again later.
                w.next_check = now + w.check_interval_s
                w.check_interval_s = min(self._row_check_max_interval_s,
                                         w.check_interval_s * 2)
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
