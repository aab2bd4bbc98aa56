"""One consumer of the global event stream in a consumer group: the relay's Redis side.

Guarantees:
- ``ensure_group`` creates the group (``MKSTREAM``) at id ``0`` the first time, so
  entries published before any consumer ran are delivered too; later calls change
  nothing.
- ``read_pending`` returns this consumer's own delivered-but-unacknowledged entries
  (after a restart under the same name), ``read_new`` entries never delivered to the
  group, waiting up to ``block_ms``; both at most ``batch_entries``, oldest first.
- ``claim`` takes over entries idle longer than ``min_idle_ms`` on other consumers
  (``XAUTOCLAIM``), one page per call, and reports entries that were trimmed from the
  stream before anyone acknowledged them.
- Every entry comes back as a ``Delivery``: its stream id, its fields as text, and
  either the decoded event with the task-stream ``event_id`` it carries, or why it is
  malformed (bad JSON, unknown type or version, missing fields, a missing or bad
  ``event_id``), or that it is gone (trimmed from the stream while pending). Parsing
  never raises.
- ``ack`` acknowledges; ``dead_letter`` copies an entry with ``dead_reason``,
  ``dead_entry_id`` and ``dead_by`` to ``keys.EVENTS_DEAD`` (capped at about
  ``DEAD_MAXLEN`` entries, values truncated) and then acknowledges it.
- ``forget_idle_consumers`` removes other consumers idle longer than ``idle_ms`` that
  hold nothing pending; it never removes this one.
- ``TRANSIENT`` lists the Redis errors that mean "Redis is out of reach for now".
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, cast

import redis.asyncio as aioredis
import redis.exceptions

from vidmaas.bus import keys
from vidmaas.bus.events import id_key, text
from vidmaas.domain import events as ev
from vidmaas.domain.events import Event, MalformedEvent

log = logging.getLogger(__name__)

DEAD_MAXLEN = 100_000
MAX_DEAD_VALUE_CHARS = 10_000

TRANSIENT: tuple[type[BaseException], ...] = (redis.exceptions.ConnectionError,
                                              redis.exceptions.TimeoutError)


@dataclass(frozen=True, slots=True)
class Delivery:
    """One entry of the stream as this consumer got it."""

    entry_id: str
    """Its id on the global stream (what is acknowledged)."""
    fields: dict[str, str]
    event: Event | None
    """The decoded event; None when the entry is malformed."""
    event_id: str
    """The task-stream id of the event (the ``event_id`` field); empty when malformed."""
    malformed: str | None = None
    """Why the entry cannot be applied, when it cannot."""
    gone: bool = False
    """The entry was trimmed from the stream while pending: nothing is left to apply."""

    @property
    def task_id(self) -> str | None:
        """The task the entry names (an event's, or the raw field of a malformed one)."""
        if self.event is not None:
            return self.event.task_id
        return str(self.fields.get("task_id", ""))[:64] or None


def parse(entry_id: str, fields: dict[Any, Any] | None) -> Delivery:
    """A stream entry as a ``Delivery``; never raises."""
    if fields is None:
        return Delivery(entry_id, {}, None, "", gone=True)
    raw = {text(k): text(v) for k, v in fields.items()}
    try:
        event = ev.decode({k: v for k, v in raw.items() if k != "event_id"})
        event_id = raw.get("event_id") or ""
        if not event_id:
            raise MalformedEvent("missing field 'event_id'")
        try:
            id_key(event_id)
        except ValueError as e:
            raise MalformedEvent(f"bad event_id {event_id[:40]!r}") from e
    except MalformedEvent as e:
        return Delivery(entry_id, raw, None, "", str(e))
    return Delivery(entry_id, raw, event, event_id)


@dataclass(frozen=True, slots=True)
class ClaimPage:
    """One page of ``XAUTOCLAIM``."""

    deliveries: list[Delivery]
    next_start: str
    """Where the next page starts; ``0-0`` once the whole pending list was scanned."""
    trimmed: int
    """Pending entries that no longer exist on the stream (trimmed before acknowledged)."""


class EventConsumer:
    """The consumer ``consumer`` of ``group`` on ``stream``; see the module docstring."""

    def __init__(self, client: aioredis.Redis, *, consumer: str, group: str = keys.RELAY_GROUP,
                 stream: str = keys.EVENTS, batch_entries: int = 100) -> None:
        self.client = client
        self.consumer = consumer
        self.group = group
        self.stream = stream
        self.batch_entries = batch_entries

    async def ensure_group(self) -> bool:
        """Create the group at id 0 if it does not exist; True if this call created it."""
        try:
            await self.client.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except redis.exceptions.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise
            return False
        return True

    async def _read(self, start: str, *, block_ms: int | None) -> list[Delivery]:
        resp = cast(Any, await self.client.xreadgroup(
            self.group, self.consumer, {self.stream: start}, count=self.batch_entries,
            block=block_ms))
        if not resp:
            return []
        _, entries = resp[0]
        return [parse(text(i), f) for i, f in entries]

    async def read_pending(self) -> list[Delivery]:
        """This consumer's entries delivered before and not acknowledged yet."""
        return await self._read("0", block_ms=None)

    async def read_new(self, *, block_ms: int) -> list[Delivery]:
        """Entries not yet delivered to the group; waits up to ``block_ms`` for some."""
        return await self._read(">", block_ms=block_ms)

    async def claim(self, *, min_idle_ms: int, start: str = "0-0") -> ClaimPage:
        """Take over entries idle for ``min_idle_ms`` on any consumer, from ``start``."""
        resp = cast(Any, await self.client.xautoclaim(
            self.stream, self.group, self.consumer, min_idle_time=min_idle_ms,
            start_id=start, count=self.batch_entries))
        trimmed = len(resp[2]) if len(resp) > 2 else 0
        return ClaimPage([parse(text(i), f) for i, f in resp[1]], text(resp[0]), trimmed)

    async def ack(self, *entry_ids: str) -> None:
        if entry_ids:
            await self.client.xack(self.stream, self.group, *entry_ids)

    async def dead_letter(self, delivery: Delivery, *, reason: str) -> None:
        """Copy the entry to the dead-letter stream with ``reason``; acknowledge it."""
        dead: dict[Any, Any] = {k[:64]: v[:MAX_DEAD_VALUE_CHARS]
                                for k, v in delivery.fields.items()}
        dead.update({"dead_reason": reason[:2000], "dead_entry_id": delivery.entry_id,
                     "dead_by": self.consumer})
        await self.client.xadd(keys.EVENTS_DEAD, dead, maxlen=DEAD_MAXLEN, approximate=True)
        await self.ack(delivery.entry_id)

    async def forget_idle_consumers(self, *, idle_ms: int) -> list[str]:
        """Remove other consumers idle over ``idle_ms`` with nothing pending; their names."""
        gone: list[str] = []
        try:  # a group or stream that vanished meanwhile has no consumers to forget
            consumers = cast(Any, await self.client.xinfo_consumers(self.stream, self.group))
            for c in consumers:
                name = text(c["name"])
                if name != self.consumer and int(c["pending"]) == 0 \
                        and int(c["idle"]) > idle_ms:
                    await self.client.xgroup_delconsumer(self.stream, self.group, name)
                    gone.append(name)
        except redis.exceptions.ResponseError:
            pass
        return gone
