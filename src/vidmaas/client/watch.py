"""The one watch policy: what following a task means, as a state machine without I/O.

``Client.watch`` and ``AsyncClient.watch`` are thin drivers of ``WatchPolicy``: they
do what its ``Step`` says (open the event stream, read the next message, read the
task, sleep, stop), feed back what happened, and yield the messages it hands them.
So the blocking and the asyncio client cannot behave differently.

Guarantees of a watch:
- It yields the server's messages in order (the first is a ``snapshot``), except
  keep-alive ``ping`` messages, and stops after the first message that says the task
  ended (``wire.is_terminal``).
- A retryable ``failed`` does not end it: the task is read (every
  ``settle_interval_s``, up to ``settle_wait_s``); if the task has ended (a final
  failure: no attempt left), a snapshot of it is yielded and the watch stops; if it is
  queued again (a retry), or it is still undecided at the deadline, the stream goes on.
- A stream that closes without a terminal message makes it read the task: ended, its
  snapshot ends the watch; otherwise the stream is reopened from the last event id seen,
  so no event is lost or repeated.
- A dropped connection or a 502/503/504 reopens the stream after a backoff
  (0.4 s doubling, at most 5 s); more than ``max_reconnects`` drops in a row raise
  ``ClientError`` ``stream_lost``. Any message received resets the count.
- A server without an event stream makes it poll the task every ``poll_interval_s``,
  yielding a snapshot whenever status, progress, stage or queue position change, until
  the task ends. Any other error is raised as it is.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass

from vidmaas.client.wire import (
    TERMINAL_STATUSES,
    TRANSIENT_STATUSES,
    ClientError,
    Message,
    Task,
    is_terminal,
    snapshot_of,
    stream_missing,
)

BACKOFF_INITIAL_S = 0.2
BACKOFF_MAX_S = 5.0


class Do(enum.Enum):
    """What a driver does next."""

    OPEN = "open"
    """Close any open stream, open the event stream after ``last_event_id``, and read."""
    READ = "read"
    """Read the next message of the open stream."""
    FETCH = "fetch"
    """Read the task (``GET /v1/tasks/{id}``)."""
    STOP = "stop"
    """The watch is over."""


@dataclass(frozen=True, slots=True)
class Step:
    """Yield ``emit`` in order, then wait ``delay_s``, then do ``do``."""

    do: Do
    delay_s: float = 0.0
    emit: tuple[Message, ...] = ()


class _Mode(enum.Enum):
    STREAM = "stream"
    SETTLE = "settle"  # a retryable failure: has the task ended, or does it retry?
    CHECK = "check"  # the stream closed without an end: has the task ended?
    POLL = "poll"  # the server has no stream


class WatchPolicy:
    """The watch of one task (see the module doc). Feed it; it answers with a ``Step``."""

    def __init__(self, task_id: str, *, after: str | None = None, poll_interval_s: float = 2.0,
                 max_reconnects: int = 30, settle_wait_s: float = 5.0,
                 settle_interval_s: float = 0.25,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.task_id = task_id
        self.last_event_id = after
        """Where the next (re)opened stream resumes."""
        self.poll_interval_s = poll_interval_s
        self.max_reconnects = max_reconnects
        self.settle_wait_s = settle_wait_s
        self.settle_interval_s = settle_interval_s
        self._clock = clock
        self._mode = _Mode.STREAM
        self._drops = 0
        self._settle_deadline = 0.0
        self._polled: tuple[object, ...] | None = None

    def start(self) -> Step:
        return Step(Do.OPEN)

    def message(self, msg: Message) -> Step:
        """The open stream delivered ``msg``."""
        self._drops = 0
        if msg.get("id"):
            self.last_event_id = str(msg["id"])
        if msg.get("type") == "ping":
            return Step(Do.READ)
        if is_terminal(msg):
            return Step(Do.STOP, emit=(msg,))
        if msg.get("type") == "failed":
            self._mode = _Mode.SETTLE
            self._settle_deadline = self._clock() + self.settle_wait_s
            return Step(Do.FETCH, emit=(msg,))
        return Step(Do.READ, emit=(msg,))

    def ended(self) -> Step:
        """The stream closed (or answered 204) without a terminal message."""
        self._mode = _Mode.CHECK
        return Step(Do.FETCH)

    def failed(self, error: ClientError) -> Step:
        """Opening or reading the stream, or reading the task, failed with ``error``.

        Raises ``error`` when it is not one a watch gets over.
        """
        if self._mode is _Mode.POLL:
            raise error
        if stream_missing(error):
            self._mode = _Mode.POLL
            return Step(Do.FETCH)
        if error.status not in TRANSIENT_STATUSES:
            raise error
        return self._reconnect()

    def task(self, task: Task) -> Step:
        """The task as ``GET /v1/tasks/{id}`` answered it (after a ``FETCH``)."""
        done = task.get("status") in TERMINAL_STATUSES
        if self._mode is _Mode.POLL:
            state = (task.get("status"), task.get("progress"), task.get("stage"),
                     task.get("queue_position"))
            emit = () if state == self._polled else (snapshot_of(task),)
            self._polled = state
            if done:
                return Step(Do.STOP, emit=emit)
            return Step(Do.FETCH, delay_s=self.poll_interval_s, emit=emit)
        if done:
            return Step(Do.STOP, emit=(snapshot_of(task),))
        if self._mode is _Mode.SETTLE:
            if task.get("status") == "queued" or self._clock() > self._settle_deadline:
                self._mode = _Mode.STREAM
                return Step(Do.READ)
            return Step(Do.FETCH, delay_s=self.settle_interval_s)
        return self._reconnect()

    def _reconnect(self) -> Step:
        self._mode = _Mode.STREAM
        self._drops += 1
        if self._drops > self.max_reconnects:
            raise ClientError(0, "stream_lost", "the event stream keeps dropping")
        return Step(Do.OPEN, delay_s=min(BACKOFF_INITIAL_S * 2 ** self._drops, BACKOFF_MAX_S))


class Deadline:
    """``wait``'s rule: the task once its row says it ended, ``timeout`` past the time."""

    def __init__(self, task_id: str, *, timeout_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.task_id = task_id
        self._clock = clock
        self._deadline = clock() + timeout_s

    def done(self, task: Task) -> bool:
        """True if ``task`` has ended; ``ClientError`` ``timeout`` if it is too late."""
        if task["status"] in TERMINAL_STATUSES:
            return True
        if self._clock() > self._deadline:
            raise ClientError(0, "timeout", f"task {self.task_id} is still {task['status']}")
        return False
