"""The two small interfaces between the hub and the connections.

The hub (``hub``) delivers to ``Subscriber``\\ s and a connection (``connection``) uses
the hub through ``HubView``, so neither module imports the other; the package's
``__init__`` puts them together.

Guarantees a ``Subscriber`` gives the hub: ``deliver``, ``offer`` and ``shutdown`` are
synchronous and never block or wait for the client (they only append to a bounded
outbox), so one slow client cannot hold up the hub or anyone else.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from vidmaas.bus.events import Page
from vidmaas.domain.events import ClientMessage, Event
from vidmaas.services import Services


class Subscriber(Protocol):
    """One client connection, as the hub sees it."""

    @property
    def user_id(self) -> str:
        """The caller; multiplexed connections follow this user's new tasks."""
        ...

    @property
    def closed(self) -> bool: ...

    @property
    def high_water(self) -> int:
        """The most messages that ever waited in the connection's outbox."""
        ...

    def watching(self, task_id: str) -> bool:
        """Whether the connection already streams this task."""
        ...

    def deliver(self, task_id: str, entries: Iterable[tuple[str, Event]]) -> None:
        """New entries of the task's stream, in order, after the hub's previous cursor."""
        ...

    def offer(self, msg: ClientMessage, *, key: tuple[str, str]) -> None:
        """A message that is not a stream event (a queue position push), droppable and
        superseded by a newer one with the same ``key``."""
        ...

    def shutdown(self) -> None:
        """The server is going away: end the stream (``GoingAway``)."""
        ...

    async def attach(self, task_id: str, *, after: str | None = None) -> bool:
        """Snapshot the task and stream its events; False if it is not the caller's."""
        ...


class HubView(Protocol):
    """What a connection uses of the hub: registration and the reads of task streams."""

    @property
    def services(self) -> Services: ...

    @property
    def buffer_events(self) -> int:
        """The size of each connection's outbox."""
        ...

    @property
    def ping_interval_s(self) -> float: ...

    def register(self, sub: Subscriber) -> None: ...

    def forget(self, sub: Subscriber) -> None: ...

    def watch(self, sub: Subscriber, task_id: str, *, user_id: str, after: str, status: str,
              position: int | None) -> str | None:
        """Add ``sub`` to the task's readers; the hub's cursor if it already reads the
        task (the caller back-fills from ``after`` up to it), else None (the hub starts
        reading at ``after``)."""
        ...

    def unwatch(self, sub: Subscriber, task_id: str) -> None: ...

    def starts_in_s(self, task_id: str) -> float | None:
        """The last start estimate of a watched queued task, if there is one."""
        ...

    def cursor_of(self, task_id: str) -> str | None:
        """The id of the last entry the hub read (and delivered) for the task."""
        ...

    async def last_entry(self, task_id: str) -> tuple[str | None, Event | None]: ...

    async def read_page(self, task_id: str, *, after: str, upto: str, count: int) -> Page: ...

    async def read_range(self, task_id: str, *, after: str, upto: str,
                         ) -> list[tuple[str, Event]]: ...
