"""The relay: applies the global event stream to the database, frees capacity, fires webhooks.

Guarantees:
- Consumes ``keys.EVENTS`` in the consumer group ``keys.RELAY_GROUP``; the group is
  created (``MKSTREAM``) at id ``0`` the first time any relay starts, so events
  published before the first relay ran are applied too. Several relays in the group
  share the entries; each entry is acknowledged only after it took effect.
- Each event takes effect on its task row at most once: an event whose id (the task
  stream entry id, ordered per task) is not newer than ``Task.last_event_id`` is
  skipped, and applied events record their id. Status changes go through
  ``Lifecycle`` (compare-and-set), so an event applied elsewhere first
  (``StaleTransition`` / ``IllegalTransition``) is simply acknowledged.
- Progress never goes backwards and a terminal status is final: progress, stage and
  status events for a task that is already terminal change nothing.
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
  from cancellation, so ``stop()`` or a cancel never leaves half an event applied.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, cast

import redis.asyncio as aioredis
import redis.exceptions
import sqlalchemy.exc
from sqlalchemy import select, update

from vidmaas.bus import keys
from vidmaas.db import tasks as repo
from vidmaas.db.models import Task, utcnow
from vidmaas.domain import events as ev
from vidmaas.domain.events import Event, EventType, MalformedEvent
from vidmaas.domain.status import TaskStatus
from vidmaas.errors import IllegalTransition, NotFound, StaleTransition
from vidmaas.lifecycle import Lifecycle
from vidmaas.metrics import Heartbeat, Metrics
from vidmaas.relay.webhooks import Webhooks
from vidmaas.services import Services

log = logging.getLogger(__name__)

MAX_LOGGED_CHARS = 200
DEAD_MAXLEN = 100_000

_ACTIVE = (TaskStatus.DISPATCHING, TaskStatus.RUNNING, TaskStatus.CANCELLING)
# Events that move a task's status: idempotent by compare-and-set, never skipped by order.
_MOVING = frozenset({EventType.STARTED, EventType.COMPLETED, EventType.FAILED,
                     EventType.CANCELLED})
_ATTEMPT_MARKERS = (EventType.QUEUED.value, EventType.DISPATCHED.value)
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


def _sid(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def id_key(entry_id: str) -> tuple[int, int]:
    """A stream entry id as a sortable pair (``"12-3"`` → ``(12, 3)``)."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


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
        self._bookkeeping: set[asyncio.Task[Outcome]] = set()
        self.ready = asyncio.Event()
        """Set once the consumer group exists."""
        self.applied = 0

    def stop(self) -> None:
        self._stopping.set()

    async def _shielded(self, coro: Coroutine[Any, Any, Outcome], *, name: str) -> Outcome:
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
        backoff_s = 0.2
        while not self._stopping.is_set():
            try:
                await fn()
                return
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("relay %s: %s loop failed; restarting in %.1fs",
                              self.consumer_name, name, backoff_s)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), backoff_s)
                backoff_s = min(backoff_s * 2, self.options.retry_backoff_max_s)

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
        return [(_sid(i), f) for i, f in entries]

    async def claim_abandoned(self) -> int:
        """Take over entries idle on other consumers (dead relays); apply them. Count."""
        total = 0
        start = "0-0"
        while not self._stopping.is_set():
            resp = cast(Any, await self.redis.xautoclaim(
                keys.EVENTS, keys.RELAY_GROUP, self.consumer_name,
                min_idle_time=self.options.claim_idle_ms, start_id=start,
                count=self.options.batch_size))
            start = _sid(resp[0])
            entries = [(_sid(i), f) for i, f in resp[1]]
            deleted = [_sid(i) for i in resp[2]] if len(resp) > 2 else []
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
                name = _sid(c["name"])
                if name != self.consumer_name and int(c["pending"]) == 0 \
                        and int(c["idle"]) > self.options.forget_consumers_idle_ms:
                    await self.redis.xgroup_delconsumer(keys.EVENTS, keys.RELAY_GROUP, name)

    # ------------------------------------------------------------------ entries

    async def process(self, entries: list[tuple[str, dict[str, str] | None]]) -> None:
        """Apply entries in order; a transient failure stops the batch (left pending)."""
        for entry_id, fields in entries:
            if self._stopping.is_set():
                return
            try:
                outcome = await self._shielded(self._handle(entry_id, fields),
                                               name=f"relay-{self.consumer_name}-apply")
            except _TRANSIENT:
                raise
            except asyncio.CancelledError:
                raise
            except Exception as e:
                n = self._failures.get(entry_id, 0) + 1
                self._failures[entry_id] = n
                task_id = str((fields or {}).get("task_id", ""))[:64] or None
                log.exception("relay %s: applying %s failed (%d/%d)", self.consumer_name,
                              entry_id, n, self.options.max_apply_failures,
                              extra={"task_id": task_id})
                if n < self.options.max_apply_failures:
                    # Leave it pending; retry it (in order) after a pause.
                    self._own_pending = True
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(
                            self._stopping.wait(),
                            min(0.1 * 2 ** n, self.options.retry_backoff_max_s))
                    return
                self._failures.pop(entry_id, None)
                await self._dead_letter(entry_id, fields or {},
                                        reason=f"apply failed: {type(e).__name__}: {e}")
                outcome = Outcome(entry_id, None, "dead")
            self._failures.pop(entry_id, None)
            if self._on_outcome is not None:
                await self._on_outcome(outcome)

    async def _handle(self, entry_id: str, fields: dict[str, str] | None) -> Outcome:
        if not fields:
            # Trimmed from the stream while pending: nothing left to apply.
            await self.redis.xack(keys.EVENTS, keys.RELAY_GROUP, entry_id)
            return Outcome(entry_id, None, "ignored")
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
            return Outcome(entry_id, raw_task or None, "dead")
        outcome = await self.apply(event, event_id=event_id, entry_id=entry_id)
        if outcome.action == "dead":
            await self._dead_letter(entry_id, fields, reason="unknown task", task_id=event.task_id)
            return outcome
        await self.redis.xack(keys.EVENTS, keys.RELAY_GROUP, entry_id)
        if outcome.action == "applied":
            self.applied += 1
        return outcome

    async def _dead_letter(self, entry_id: str, fields: dict[str, str], *, reason: str,
                           task_id: str | None = None) -> None:
        log.warning("relay %s: dead-lettering %s: %s", self.consumer_name, entry_id,
                    _trunc(reason), extra={"task_id": task_id})
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

    async def _record(self, task_id: str, values: dict[str, Any]) -> None:
        async with self.services.sessions() as session:
            await repo.update_progress(session=session, task_id=task_id, values=values)

    async def _superseded(self, task_id: str, event_id: str) -> bool:
        """True if the task stream holds a later queued/dispatched event (a newer attempt)."""
        raw = cast(Any, await self.redis.xrange(keys.task_events(task_id), min=f"({event_id}",
                                                count=2000))
        return any(_sid(f.get("type", "")) in _ATTEMPT_MARKERS for _, f in raw)

    async def apply(self, event: Event, *, event_id: str, entry_id: str = "") -> Outcome:
        """Apply one event to its task row; does not acknowledge anything."""
        tid = event.task_id
        extra = {"task_id": tid}
        task = await self._get(tid)
        if task is None:
            return Outcome(entry_id, tid, "dead")
        seen = task.last_event_id is not None \
            and id_key(event_id) <= id_key(task.last_event_id)
        if seen and event.type not in _MOVING:
            # Older than what the row already reflects (a redelivery, or an entry another
            # relay overtook): a stale stage or heartbeat must not overwrite a newer one.
            log.debug("task %s: event %s %s already applied", tid, event_id, event.type.value,
                      extra=extra)
            return Outcome(entry_id, tid, "duplicate")
        status = TaskStatus(task.status)
        try:
            action = await self._apply_type(task, status, event, event_id)
        except (StaleTransition, IllegalTransition, NotFound) as e:
            log.debug("task %s: %s %s already applied elsewhere (%s)", tid, event.type.value,
                      event_id, e, extra=extra)
            action = "stale"
        wants_hook = event.type in _MOVING or bool(
            event.type is EventType.PROGRESS and self.webhooks.targets(task, event.type))
        fresh = await self._get(tid) if wants_hook else task
        if fresh is None:
            return Outcome(entry_id, tid, action)
        if event.type.terminal:
            # Idempotent; covers a relay that died between a status change and the release.
            await self._release_if_terminal(fresh)
        if wants_hook and action != "superseded" and self._webhook_due(fresh, event):
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
        if TaskStatus(task.status).terminal:
            await self.lifecycle.release(task.id)

    async def _apply_type(self, task: Task, status: TaskStatus, event: Event, event_id: str,
                          ) -> str:
        tid = task.id
        data = event.data
        t = event.type
        if t in (EventType.QUEUED, EventType.DISPATCHED, EventType.LOG, EventType.STATUS):
            return "applied"  # written by api/dispatcher, which already moved the row
        if t is EventType.HEARTBEAT:
            if status.terminal:
                return "ignored"
            await self._record(tid, {"last_heartbeat_at": utcnow()})
            return "applied"
        if t in (EventType.PROGRESS, EventType.STAGE):
            if status not in _ACTIVE:
                return "ignored"  # terminal is final; queued means a retry reset it
            if t is EventType.STAGE:
                await self._record(tid, {"stage": str(data["stage"])})
                return "applied"
            values: dict[str, Any] = {"progress": float(data["percent"])}
            if data.get("stage") is not None:
                values["stage"] = str(data["stage"])
            eta = data.get("eta_s")
            values["eta_s"] = float(eta) if isinstance(eta, int | float) \
                and not isinstance(eta, bool) else None
            await self._record(tid, values)
            return "applied"
        # Events that move the task: never from an earlier attempt.
        if status.terminal:
            return "stale"
        if await self._superseded(tid, event_id):
            log.info("task %s: %s %s belongs to an earlier attempt; not applied", tid,
                     t.value, event_id, extra={"task_id": tid})
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
            if status not in _ACTIVE:
                return "stale"
            await self.lifecycle.fail_or_retry(
                task, code=str(data["code"])[:64], message=str(data["message"]),
                retryable=bool(data["retryable"]), publish_failed=False)
            return "applied"
        if t is EventType.CANCELLED:
            if status not in _ACTIVE:
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
        status = TaskStatus(task.status)
        t = event.type
        if t is EventType.COMPLETED:
            return status is TaskStatus.COMPLETED
        if t is EventType.FAILED:
            return status is TaskStatus.FAILED
        if t is EventType.CANCELLED:
            return status is TaskStatus.CANCELLED
        if t is EventType.STARTED:
            return status in (TaskStatus.RUNNING, TaskStatus.CANCELLING) or status.terminal
        if t is EventType.PROGRESS:
            return status in _ACTIVE
        return False
