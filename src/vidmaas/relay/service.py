"""The relay: applies the global event stream to the database, frees capacity, fires webhooks.

Guarantees:
- Consumes ``keys.EVENTS`` in the consumer group ``keys.RELAY_GROUP``; the group is
  created (``MKSTREAM``) at id ``0`` the first time any relay starts, so events
  published before the first relay ran are applied too. Several relays in the group
  share the entries; each entry is acknowledged only after it took effect.
- Each event takes effect on its task row once, however often it is delivered.
  Bookkeeping events (progress, stage, heartbeat) not newer than ``Task.last_event_id``
  (task-stream ids are ordered per task) are skipped, and applied ones record their
  id. Status events (started, completed, failed, cancelled) go through ``Lifecycle``
  (compare-and-set): one applied before (``StaleTransition`` / ``IllegalTransition``)
  changes nothing and is acknowledged. They are never skipped by id alone, because
  with several relays one task's entries can be applied out of order.
- Within a batch, a task's bookkeeping events with no status event between them are
  applied as one write, guarded in SQL (the task still active, progress not lower).
- Progress never goes backwards and a terminal status is final: progress, stage,
  heartbeat and status events for a task that is already terminal change nothing.
- An event of an earlier attempt (the task stream holds a later ``queued`` or
  ``dispatched`` event) never moves the task: a late ``failed`` from attempt 1 cannot
  fail attempt 2.
- Terminal events release the task's GPUs (``Lifecycle.finish`` and, on redelivery,
  an idempotent ``release``), so a relay that died between the status change and the
  release leaves nothing held.
- A relay that dies mid-batch loses nothing: its unacknowledged entries are claimed by
  a live relay (``XAUTOCLAIM``) once idle for ``claim_idle_ms``.
- A malformed entry (bad JSON, unknown type or version, missing fields, unknown task)
  is logged, copied to ``keys.EVENTS_DEAD`` with the reason, and acknowledged; so is
  an entry whose application failed ``max_apply_failures`` times for a reason other
  than a backing service being down. Neither stops the relay. While the database or
  Redis is down, entries stay pending and are retried with backoff.
- Applying one entry (the change, its webhooks and its acknowledgement) is shielded
  from cancellation, so ``stop()`` or a cancel never leaves half an event applied;
  ``run()`` returns only after that bookkeeping has finished.
- Webhooks are recorded (``relay.webhooks``) only for what the row confirms: a
  ``failed`` that was retried sends no ``failed`` webhook, a stale ``completed`` on a
  task that already failed sends none.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, cast

import redis.asyncio as aioredis
import redis.exceptions
import sqlalchemy.exc
from sqlalchemy import select, update

from vidmaas.aio import supervise
from vidmaas.bus import keys
from vidmaas.bus.events import id_key, superseded, text
from vidmaas.db import tasks as repo
from vidmaas.db.models import Task, utcnow
from vidmaas.domain import events as ev
from vidmaas.domain.events import Event, EventType, MalformedEvent
from vidmaas.domain.status import ACTIVE, TaskStatus
from vidmaas.errors import IllegalTransition, NotFound, StaleTransition
from vidmaas.lifecycle import Lifecycle
from vidmaas.logs import TaskLog
from vidmaas.metrics import Heartbeat, Metrics
from vidmaas.relay.webhooks import Webhooks
from vidmaas.services import Services

log = logging.getLogger(__name__)
tlog = TaskLog(log)

MAX_LOGGED_CHARS = 200
DEAD_MAXLEN = 100_000

# Events that move a task's status: idempotent by compare-and-set, never skipped by order.
_MOVING = frozenset({EventType.STARTED, EventType.COMPLETED, EventType.FAILED,
                     EventType.CANCELLED})
# Bookkeeping events that write the row (the rest only advance nothing but the stream).
_BOOKKEEPING_WRITES = frozenset({EventType.PROGRESS, EventType.STAGE, EventType.HEARTBEAT})
_TRANSIENT: tuple[type[BaseException], ...] = (
    redis.exceptions.ConnectionError, redis.exceptions.TimeoutError,
    sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError,
    sqlalchemy.exc.TimeoutError, ConnectionError, TimeoutError)


@dataclass(frozen=True, slots=True)
class RelayOptions:
    """Tuning of one relay; the defaults suit production."""

    batch_size: int = 100
    """Entries read per XREADGROUP / XAUTOCLAIM."""
    block_ms: int = 1000
    """How long a read waits for new entries."""
    claim_idle_ms: int = 30_000
    """Entries pending this long on another consumer are taken over (a dead relay's)."""
    claim_interval_s: float = 5.0
    """How often to look for such entries."""
    max_apply_failures: int = 5
    """Non-transient failures of one entry before it is dead-lettered."""
    retry_backoff_max_s: float = 10.0
    """Cap on the backoff while a backing service is down."""
    forget_consumers_idle_ms: int = 24 * 3600 * 1000
    """Consumers idle this long with nothing pending are removed from the group."""
    send_webhooks: bool = True
    """Run the webhook sender inside ``run()`` (one sender per relay process)."""


@dataclass(frozen=True, slots=True)
class Outcome:
    """What applying one entry did (for logs, metrics and tests)."""

    entry_id: str
    task_id: str | None
    action: str
    """applied, duplicate, stale, ignored, dead."""


@dataclass(frozen=True, slots=True)
class _Entry:
    entry_id: str
    fields: dict[str, str]
    event: Event
    event_id: str


@dataclass(slots=True)
class _Unit:
    """Entries applied (and acknowledged) together: one status event, or a run of one
    task's bookkeeping events with no status event between them."""

    task_id: str
    entries: list[_Entry]
    moving: bool


def default_consumer_name() -> str:
    """A consumer name unique to this process: host name and process id."""
    return f"{socket.gethostname()}-{os.getpid()}"


def _trunc(text: object, limit: int = MAX_LOGGED_CHARS) -> str:
    s = str(text)
    return s if len(s) <= limit else s[:limit] + "…"


class Relay:
    """One relay consumer. ``run()`` until ``stop()``; see the module docstring."""

    def __init__(self, services: Services, *, consumer_name: str,
                 options: RelayOptions | None = None, webhooks: Webhooks | None = None,
                 metrics: Metrics | None = None, heartbeat: Heartbeat | None = None,
                 on_outcome: Callable[[Outcome], Awaitable[None]] | None = None) -> None:
        self.services = services
        self.consumer_name = consumer_name
        self.options = options or RelayOptions()
        self.redis: aioredis.Redis = services.redis
        self.lifecycle: Lifecycle = services.lifecycle
        self.metrics = metrics
        self.heartbeat = heartbeat
        self.webhooks = webhooks or Webhooks(sessions=services.sessions,
                                             settings=services.settings.webhooks,
                                             metrics=metrics)
        self._on_outcome = on_outcome
        self._stopping = asyncio.Event()
        self._failures: dict[str, int] = {}
        self._own_pending = True  # start by finishing what this consumer name left
        self._bookkeeping: set[asyncio.Task[list[Outcome]]] = set()
        self.ready = asyncio.Event()
        """Set once the consumer group exists."""
        self.applied = 0

    def stop(self) -> None:
        self._stopping.set()

    async def _shielded(self, coro: Coroutine[Any, Any, list[Outcome]], *, name: str,
                        ) -> list[Outcome]:
        """Run ``coro`` to its end even if the caller is cancelled; ``run()`` awaits it."""
        task = asyncio.create_task(coro, name=name)
        self._bookkeeping.add(task)
        task.add_done_callback(self._bookkeeping.discard)
        return await asyncio.shield(task)

    # ------------------------------------------------------------------ loops

    async def run(self) -> None:
        log.info("relay %s starting", self.consumer_name)
        parts: dict[str, Callable[[], Awaitable[None]]] = {"consume": self._consume_loop}
        if self.options.send_webhooks:
            parts["webhooks"] = self.webhooks.sender.run
        tasks = [asyncio.create_task(self._supervise(name, fn),
                                     name=f"relay-{self.consumer_name}-{name}")
                 for name, fn in parts.items()]
        try:
            await self._stopping.wait()
        finally:
            self.webhooks.sender.stop()
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            # An entry being applied when the cancel came finishes (and is acknowledged).
            await asyncio.gather(*list(self._bookkeeping), return_exceptions=True)
            log.info("relay %s stopped", self.consumer_name)

    async def _supervise(self, name: str, fn: Callable[[], Awaitable[None]]) -> None:
        await supervise(f"relay {self.consumer_name}: {name} loop", fn,
                        stopping=self._stopping, log=log,
                        backoff_max_s=self.options.retry_backoff_max_s)

    async def ensure_group(self) -> None:
        try:
            await self.redis.xgroup_create(keys.EVENTS, keys.RELAY_GROUP, id="0", mkstream=True)
            log.info("relay %s: created consumer group %s", self.consumer_name, keys.RELAY_GROUP)
        except redis.exceptions.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    async def _consume_loop(self) -> None:
        await self.ensure_group()
        self.ready.set()
        next_claim = 0.0
        backoff_s = 0.1
        while not self._stopping.is_set():
            if self.heartbeat is not None:
                self.heartbeat.beat()
            try:
                if time.monotonic() >= next_claim:
                    next_claim = time.monotonic() + self.options.claim_interval_s
                    await self.claim_abandoned()
                if self._own_pending:
                    entries = await self._read("0", block_ms=None)
                    if not entries:
                        self._own_pending = False
                        continue
                else:
                    entries = await self._read(">", block_ms=self.options.block_ms)
                await self.process(entries)
                backoff_s = 0.1
            except asyncio.CancelledError:
                raise
            except _TRANSIENT as e:
                log.warning("relay %s: backing service unavailable (%s); retrying in %.1fs",
                            self.consumer_name, _trunc(e), backoff_s)
                self._own_pending = True
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), backoff_s)
                backoff_s = min(backoff_s * 2, self.options.retry_backoff_max_s)

    async def _read(self, start: str, *, block_ms: int | None,
                    ) -> list[tuple[str, dict[str, str] | None]]:
        resp = cast(Any, await self.redis.xreadgroup(
            keys.RELAY_GROUP, self.consumer_name, {keys.EVENTS: start},
            count=self.options.batch_size, block=block_ms))
        if not resp:
            return []
        _, entries = resp[0]
        return [(text(i), f) for i, f in entries]

    async def claim_abandoned(self) -> int:
        """Take over entries idle on other consumers (dead relays); apply them. Count."""
        total = 0
        start = "0-0"
        while not self._stopping.is_set():
            resp = cast(Any, await self.redis.xautoclaim(
                keys.EVENTS, keys.RELAY_GROUP, self.consumer_name,
                min_idle_time=self.options.claim_idle_ms, start_id=start,
                count=self.options.batch_size))
            start = text(resp[0])
            entries = [(text(i), f) for i, f in resp[1]]
            deleted = [text(i) for i in resp[2]] if len(resp) > 2 else []
            if deleted:
                log.warning("relay %s: %d pending entries were trimmed from the stream "
                            "before they were applied", self.consumer_name, len(deleted))
            if entries:
                log.info("relay %s: claimed %d abandoned entries", self.consumer_name,
                         len(entries))
                total += len(entries)
                await self.process(entries)
            if start == "0-0":
                break
        await self._forget_idle_consumers()
        return total

    async def _forget_idle_consumers(self) -> None:
        with contextlib.suppress(redis.exceptions.ResponseError):
            consumers = cast(Any, await self.redis.xinfo_consumers(keys.EVENTS,
                                                                   keys.RELAY_GROUP))
            for c in consumers:
                name = text(c["name"])
                if name != self.consumer_name and int(c["pending"]) == 0 \
                        and int(c["idle"]) > self.options.forget_consumers_idle_ms:
                    await self.redis.xgroup_delconsumer(keys.EVENTS, keys.RELAY_GROUP, name)

    # ------------------------------------------------------------------ entries

    async def process(self, entries: list[tuple[str, dict[str, str] | None]]) -> None:
        """Apply entries in order; a transient failure stops the batch (left pending).

        Bookkeeping events of one task with no status event between them (progress,
        stage, heartbeat, log, queued, dispatched) are applied together: one read and
        at most one write per task and batch, which is what lets one relay keep up with
        many tasks reporting progress several times a second.
        """
        units: list[_Unit] = []
        runs: dict[str, _Unit] = {}
        for entry_id, fields in entries:
            if not fields:
                # Trimmed from the stream while pending: nothing left to apply.
                await self.redis.xack(keys.EVENTS, keys.RELAY_GROUP, entry_id)
                continue
            entry = await self._parse(entry_id, fields)
            if entry is None:
                continue
            tid = entry.event.task_id
            if entry.event.type in _MOVING:
                runs.pop(tid, None)
                units.append(_Unit(tid, [entry], moving=True))
                continue
            run = runs.get(tid)
            if run is None:
                run = runs[tid] = _Unit(tid, [], moving=False)
                units.append(run)
            run.entries.append(entry)
        for unit in units:
            if self._stopping.is_set():
                return
            first = unit.entries[0].entry_id
            try:
                outcomes = await self._shielded(self._apply_unit(unit),
                                                name=f"relay-{self.consumer_name}-apply")
            except _TRANSIENT:
                raise
            except asyncio.CancelledError:
                raise
            except Exception as e:
                n = self._failures.get(first, 0) + 1
                self._failures[first] = n
                tlog.exception(unit.task_id, "relay %s: applying %s failed (%d/%d)",
                               self.consumer_name, first, n, self.options.max_apply_failures)
                if n < self.options.max_apply_failures:
                    # Leave it pending; retry it (in order) after a pause.
                    self._own_pending = True
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(
                            self._stopping.wait(),
                            min(0.1 * 2 ** n, self.options.retry_backoff_max_s))
                    return
                self._failures.pop(first, None)
                for entry in unit.entries:
                    await self._dead_letter(entry.entry_id, entry.fields,
                                            reason=f"apply failed: {type(e).__name__}: {e}",
                                            task_id=unit.task_id)
                outcomes = [Outcome(x.entry_id, unit.task_id, "dead") for x in unit.entries]
            self._failures.pop(first, None)
            if self._on_outcome is not None:
                for outcome in outcomes:
                    await self._on_outcome(outcome)

    async def _parse(self, entry_id: str, fields: dict[str, str]) -> _Entry | None:
        """The entry's event, or None after dead-lettering a malformed one."""
        raw_task = str(fields.get("task_id", ""))[:64]
        try:
            event = ev.decode({k: v for k, v in fields.items() if k != "event_id"})
            event_id = str(fields.get("event_id") or "")
            if not event_id:
                raise MalformedEvent("missing field 'event_id'")
            try:
                id_key(event_id)
            except ValueError as e:
                raise MalformedEvent(f"bad event_id {event_id[:40]!r}") from e
        except MalformedEvent as e:
            await self._dead_letter(entry_id, fields, reason=str(e), task_id=raw_task or None)
            return None
        return _Entry(entry_id, fields, event, event_id)

    async def _apply_unit(self, unit: _Unit) -> list[Outcome]:
        if unit.moving:
            [entry] = unit.entries
            outcomes = [await self.apply(entry.event, event_id=entry.event_id,
                                         entry_id=entry.entry_id)]
        else:
            outcomes = await self._apply_run(unit)
        if outcomes and outcomes[0].action == "dead":
            for entry in unit.entries:
                await self._dead_letter(entry.entry_id, entry.fields, reason="unknown task",
                                        task_id=unit.task_id)
            return outcomes
        await self.redis.xack(keys.EVENTS, keys.RELAY_GROUP,
                              *[e.entry_id for e in unit.entries])
        self.applied += sum(o.action == "applied" for o in outcomes)
        return outcomes

    async def _apply_run(self, unit: _Unit) -> list[Outcome]:
        """Bookkeeping events of one task, in order, as one guarded write."""
        tid = unit.task_id
        task = await self._get(tid)
        if task is None:
            return [Outcome(e.entry_id, tid, "dead") for e in unit.entries]
        last = task.last_event_id
        status = task.status
        active = status in ACTIVE
        values: dict[str, Any] = {}
        outcomes: list[Outcome] = []
        newest: _Entry | None = None
        latest_progress: _Entry | None = None
        for e in unit.entries:
            if last is not None and id_key(e.event_id) <= id_key(last):
                outcomes.append(Outcome(e.entry_id, tid, "duplicate"))
                continue
            newest = e
            t, data = e.event.type, e.event.data
            if t not in _BOOKKEEPING_WRITES:
                outcomes.append(Outcome(e.entry_id, tid, "applied"))  # api/dispatcher moved it
                continue
            if not active:
                # Terminal is final; queued means a retry reset the progress.
                outcomes.append(Outcome(e.entry_id, tid, "ignored"))
                continue
            if t is EventType.HEARTBEAT:
                values["last_heartbeat_at"] = utcnow()
            elif t is EventType.STAGE:
                values["stage"] = str(data["stage"])
            else:
                values["progress"] = max(float(values.get("progress", 0.0)),
                                         float(data["percent"]))
                if data.get("stage") is not None:
                    values["stage"] = str(data["stage"])
                eta = data.get("eta_s")
                values["eta_s"] = float(eta) if isinstance(eta, int | float) \
                    and not isinstance(eta, bool) else None
                latest_progress = e
            outcomes.append(Outcome(e.entry_id, tid, "applied"))
        if values and newest is not None:
            values["last_event_id"] = newest.event_id
            if not await self._write_bookkeeping(tid, values):
                tlog.debug(tid, "bookkeeping of %d events superseded", len(unit.entries))
            else:
                for key, value in values.items():
                    setattr(task, key, value)
        if latest_progress is not None and self.webhooks.targets(task, EventType.PROGRESS):
            await self.webhooks.record(task=task, event=latest_progress.event,
                                       event_id=latest_progress.event_id)
        if self.metrics is not None:
            for e, o in zip(unit.entries, outcomes, strict=True):
                if o.action == "applied":
                    self.metrics.observe_event(e.event.type.value)
        return outcomes

    async def _write_bookkeeping(self, task_id: str, values: dict[str, Any]) -> bool:
        """Write progress/stage/heartbeat of an active task; False if it changed meanwhile.

        Guarded in SQL, not only by the read before it: the task must still be active
        (a terminal state is final even against a relay racing the one that finished
        it) and progress must not go down.
        """
        stmt = (update(Task)
                .where(Task.id == task_id, Task.status.in_(ACTIVE))
                .values(updated_at=utcnow(), **values)
                .execution_options(synchronize_session=False))
        if "progress" in values:
            stmt = stmt.where(Task.progress <= values["progress"])
        async with self.services.sessions() as session:
            res = await session.execute(stmt)
            await session.commit()
        return bool(res.rowcount)  # type: ignore[attr-defined]

    async def _dead_letter(self, entry_id: str, fields: dict[str, str], *, reason: str,
                           task_id: str | None = None) -> None:
        tlog.warning(task_id, "relay %s: dead-lettering %s: %s", self.consumer_name, entry_id,
                     _trunc(reason))
        dead = {str(k)[:64]: str(v)[:10_000] for k, v in fields.items()}
        dead.update({"dead_reason": reason[:2000], "dead_entry_id": entry_id,
                     "dead_by": self.consumer_name})
        await self.redis.xadd(keys.EVENTS_DEAD, dead,  # type: ignore[arg-type]
                              maxlen=DEAD_MAXLEN, approximate=True)
        await self.redis.xack(keys.EVENTS, keys.RELAY_GROUP, entry_id)

    # ------------------------------------------------------------------ applying

    async def _get(self, task_id: str) -> Task | None:
        async with self.services.sessions() as session:
            return await repo.get_task(session=session, task_id=task_id)

    async def apply(self, event: Event, *, event_id: str, entry_id: str = "") -> Outcome:
        """Apply one status event (started/completed/failed/cancelled) to its task row.

        Acknowledges nothing; bookkeeping events go through ``process``."""
        tid = event.task_id
        extra = {"task_id": tid}
        task = await self._get(tid)
        if task is None:
            return Outcome(entry_id, tid, "dead")
        # Status events are idempotent by compare-and-set and never skipped by id: with
        # several relays, one task's entries can be applied out of order.
        seen = task.last_event_id is not None \
            and id_key(event_id) <= id_key(task.last_event_id)
        status = task.status
        try:
            action = await self._apply_type(task, status, event, event_id)
        except (StaleTransition, IllegalTransition, NotFound) as e:
            log.debug("task %s: %s %s already applied elsewhere (%s)", tid, event.type.value,
                      event_id, e, extra=extra)
            action = "stale"
        fresh = await self._get(tid)
        if fresh is None:
            return Outcome(entry_id, tid, action)
        if event.type.terminal:
            # Idempotent; covers a relay that died between a status change and the release.
            await self._release_if_terminal(fresh)
        if action != "superseded" and self._webhook_due(fresh, event):
            await self.webhooks.record(task=fresh, event=event, event_id=event_id)
        await self._mark(tid, event_id)
        if action == "applied":
            log.debug("task %s: applied %s %s", tid, event.type.value, event_id, extra=extra)
            self._observe(event, fresh)
        return Outcome(entry_id, tid, "duplicate" if seen and action == "stale" else action)

    def _observe(self, event: Event, task: Task) -> None:
        if self.metrics is None:
            return
        self.metrics.observe_event(event.type.value)
        if event.type.terminal and task.status == event.type.value:
            self.metrics.observe_outcome(task.status)
            timings = event.data.get("timings")
            if event.type is EventType.COMPLETED and isinstance(timings, dict):
                self.metrics.observe_stage_timings(timings)

    async def _mark(self, task_id: str, event_id: str) -> None:
        """Record ``last_event_id`` if newer (compare-and-set against concurrent relays)."""
        for _ in range(5):
            async with self.services.sessions() as session:
                current = await session.scalar(select(Task.last_event_id)
                                               .where(Task.id == task_id))
                if current is not None and id_key(event_id) <= id_key(current):
                    return
                guard = Task.last_event_id.is_(None) if current is None \
                    else Task.last_event_id == current
                res = await session.execute(
                    update(Task).where(Task.id == task_id, guard)
                    .values(last_event_id=event_id)
                    .execution_options(synchronize_session=False))
                await session.commit()
                if res.rowcount == 1:  # type: ignore[attr-defined]
                    return

    async def _release_if_terminal(self, task: Task) -> None:
        if task.status.terminal:
            await self.lifecycle.release(task.id)

    async def _apply_type(self, task: Task, status: TaskStatus, event: Event, event_id: str,
                          ) -> str:
        tid = task.id
        data = event.data
        t = event.type
        if t not in _MOVING:
            raise ValueError(f"{t.value} is not a status event")
        # Events that move the task: never from an earlier attempt.
        if status.terminal:
            return "stale"
        if await superseded(self.redis, tid, event_id):
            tlog.info(tid, "%s %s belongs to an earlier attempt; not applied", t.value, event_id)
            return "superseded"
        if t is EventType.STARTED:
            if status is TaskStatus.DISPATCHING:
                await self.lifecycle.transition(task_id=tid, to=TaskStatus.RUNNING,
                                                expected=TaskStatus.DISPATCHING)
                return "applied"
            return "stale"
        if t is EventType.COMPLETED:
            if status is TaskStatus.DISPATCHING:
                # The dispatcher has not marked it running yet (or ``started`` is late).
                with contextlib.suppress(StaleTransition, IllegalTransition):
                    await self.lifecycle.transition(task_id=tid, to=TaskStatus.RUNNING,
                                                    expected=TaskStatus.DISPATCHING)
            await self.lifecycle.finish(
                task_id=tid, to=TaskStatus.COMPLETED,
                expected=(TaskStatus.RUNNING, TaskStatus.CANCELLING),
                fields={"video_key": str(data["video_key"]),
                        "poster_key": str(data["poster_key"]),
                        "result": dict(data), "progress": 100.0, "stage": None, "eta_s": 0.0},
                event=None)
            return "applied"
        if t is EventType.FAILED:
            if status not in ACTIVE:
                return "stale"
            await self.lifecycle.fail_or_retry(
                task, code=str(data["code"])[:64], message=str(data["message"]),
                retryable=bool(data["retryable"]), publish_failed=False)
            return "applied"
        if t is EventType.CANCELLED:
            if status not in ACTIVE:
                return "stale"
            if status is TaskStatus.RUNNING:
                # running → cancelled is not a legal move: through cancelling.
                with contextlib.suppress(StaleTransition, IllegalTransition):
                    await self.lifecycle.transition(task_id=tid, to=TaskStatus.CANCELLING,
                                                    expected=TaskStatus.RUNNING)
            await self.lifecycle.finish(task_id=tid, to=TaskStatus.CANCELLED,
                                        expected=(TaskStatus.DISPATCHING, TaskStatus.CANCELLING))
            return "applied"
        return "ignored"

    @staticmethod
    def _webhook_due(task: Task, event: Event) -> bool:
        """Does the row agree with the event? (a retried failure is no ``failed`` webhook)."""
        status = task.status
        t = event.type
        if t is EventType.COMPLETED:
            return status is TaskStatus.COMPLETED
        if t is EventType.FAILED:
            return status is TaskStatus.FAILED
        if t is EventType.CANCELLED:
            return status is TaskStatus.CANCELLED
        if t is EventType.STARTED:
            return status in (TaskStatus.RUNNING, TaskStatus.CANCELLING) or status.terminal
        return False
