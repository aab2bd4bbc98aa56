"""The bounded buffer of messages waiting for one client.

Guarantees:
- Nothing is dropped while fewer than ``limit`` messages wait: a client that keeps up
  gets every event.
- Past ``limit``, droppable messages go first (``progress``, ``heartbeat``, ``log``,
  ``preview`` and queue-position pushes): the oldest one that a newer message of the same kind
  and task supersedes first (so progress coalesces to the latest), else the oldest
  droppable one. Other messages (snapshots, state and terminal events, ``end``) are
  never dropped; with no droppable one left, ``overflowed`` is set.
- ``make_room`` lets a caller learn, before queueing a message that may not be
  dropped, whether it fits; the connection uses it to start lagging instead of
  overflowing (see ``connection``).
- Appending never blocks and never waits for the client; ``ready`` is set while
  messages wait.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass

from vidmaas.domain.events import ClientMessage, Event, EventType

DROPPABLE: frozenset[EventType] = frozenset(
    {EventType.PROGRESS, EventType.HEARTBEAT, EventType.LOG, EventType.PREVIEW})
"""Events a full outbox may drop; every other event reaches the client."""

_COALESCED: dict[EventType, str] = {EventType.PROGRESS: "progress",
                                    EventType.HEARTBEAT: "heartbeat",
                                    EventType.PREVIEW: "preview"}
"""Events of which only the newest per task matters once the buffer is full."""

Key = tuple[str, str]
"""(task id, kind): a newer message with the same key supersedes an older one."""


def position_key(task_id: str) -> Key:
    """The key of a task's queue-position pushes (a newer one supersedes the older)."""
    return task_id, "position"


@dataclass(slots=True)
class _Item:
    msg: ClientMessage
    droppable: bool
    key: Key | None
    alive: bool = True


class Outbox:
    """Messages waiting for one client, bounded as the module docstring says."""

    def __init__(self, *, limit: int) -> None:
        self.limit = max(8, limit)
        self._items: deque[_Item] = deque()
        self._latest: dict[Key, _Item] = {}
        self._live = 0
        self.overflowed = False
        self.high_water = 0
        self.dropped = 0
        self.ready = asyncio.Event()

    def __len__(self) -> int:
        return self._live

    def put(self, msg: ClientMessage, *, droppable: bool = False, key: Key | None = None,
            force: bool = False) -> None:
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

    def put_event(self, *, task_id: str, event_id: str, event: Event) -> None:
        """Queue one stream event of ``task_id``, droppable and coalesced by its type."""
        kind = _COALESCED.get(event.type)
        self.put(event.to_json(event_id=event_id), droppable=event.type in DROPPABLE,
                 key=None if kind is None else (task_id, kind))

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

    def take(self) -> list[ClientMessage]:
        """Every waiting message, in order; the outbox is empty afterwards."""
        out = [item.msg for item in self._items if item.alive]
        self._items.clear()
        self._latest.clear()
        self._live = 0
        self.ready.clear()
        return out
