"""The relay: consumes the global event stream and has each event applied to its task.

Guarantees:
- Consumes ``keys.EVENTS`` in the consumer group ``keys.RELAY_GROUP``
  (``bus.consumer.EventConsumer``); the group is created (``MKSTREAM``) at id ``0`` the
  first time any relay starts, so events published before the first relay ran are
  applied too. Several relays in the group share the entries; each entry is
  acknowledged only after it took effect (``relay.apply``).
- Within a batch, a task's bookkeeping events with no status event between them are
  handed to the applier as one run (one guarded write); every other entry is applied
  on its own, in stream order.
- A relay that dies mid-batch loses nothing: its unacknowledged entries are claimed by
  a live relay (``XAUTOCLAIM``) once idle for ``claim_idle_ms``; after a restart under
  the same name a relay first finishes its own pending entries.
- A malformed entry (bad JSON, unknown type or version, missing fields, unknown task)
  is logged, copied to ``keys.EVENTS_DEAD`` with the reason, and acknowledged; so is
  an entry whose application failed ``max_apply_failures`` times for a reason other
  than a backing service being down. Neither stops the relay. While the database or
  Redis is down, entries stay pending and are retried with backoff.
- Applying one unit (the change, its webhooks and its acknowledgement) is shielded
  from cancellation, so ``stop()`` or a cancel never leaves half an event applied;
  ``run()`` returns only after that bookkeeping has finished.
- ``run()`` also runs the webhook sender (``relay.webhooks``) unless
  ``send_webhooks`` is off; every loop is supervised and restarted after a crash.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

from vidmaas.aio import supervise
from vidmaas.bus import consumer as bus_consumer
from vidmaas.bus.consumer import Delivery, EventConsumer
from vidmaas.bus.events import superseded
from vidmaas.config import RelaySettings
from vidmaas.db import errors as db_errors
from vidmaas.domain.events import Event
from vidmaas.lifecycle import Lifecycle
from vidmaas.logs import TaskLog
from vidmaas.metrics import Heartbeat, Metrics
from vidmaas.relay.apply import MOVING, Applier, Outcome
from vidmaas.relay.webhooks import Webhooks
from vidmaas.services import Services

__all__ = ["Outcome", "Relay"]

log = logging.getLogger(__name__)
tlog = TaskLog(log)

MAX_LOGGED_CHARS = 200
_TRANSIENT = bus_consumer.TRANSIENT + db_errors.TRANSIENT


@dataclass(slots=True)
class _Unit:
    """Entries applied (and acknowledged) together: one status event, or a run of one
    task's bookkeeping events with no status event between them."""

    task_id: str
    entries: list[Delivery]
    moving: bool


def _trunc(text: object, limit: int = MAX_LOGGED_CHARS) -> str:
    s = str(text)
    return s if len(s) <= limit else s[:limit] + "…"


class Relay:
    """One relay consumer. ``run()`` until ``stop()``; see the module docstring."""

    def __init__(self, services: Services, *, consumer_name: str,
                 settings: RelaySettings | None = None, webhooks: Webhooks | None = None,
                 metrics: Metrics | None = None, heartbeat: Heartbeat | None = None,
                 on_outcome: Callable[[Outcome], Awaitable[None]] | None = None) -> None:
        self.services = services
        self.consumer_name = consumer_name
        self.settings = settings or services.settings.relay
        self.lifecycle: Lifecycle = services.lifecycle
        self.metrics = metrics
        self.heartbeat = heartbeat
        self.webhooks = webhooks or Webhooks(sessions=services.sessions,
                                             settings=services.settings.webhooks,
                                             metrics=metrics)
        self.consumer = EventConsumer(services.redis, consumer=consumer_name,
                                      batch_entries=self.settings.batch_entries)
        self.applier = Applier(lifecycle=self.lifecycle, webhooks=self.webhooks,
                               superseded=partial(superseded, services.redis),
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

    async def _pause(self, delay_s: float) -> None:
        """Sleep ``delay_s``, or less if the relay is stopped meanwhile."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), delay_s)

    # ------------------------------------------------------------------ loops

    async def run(self) -> None:
        log.info("relay %s starting", self.consumer_name)
        parts: dict[str, Callable[[], Awaitable[None]]] = {"consume": self._consume_loop}
        if self.settings.send_webhooks:
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
                        backoff_max_s=self.settings.retry_backoff_max_s)

    async def ensure_group(self) -> None:
        if await self.consumer.ensure_group():
            log.info("relay %s: created consumer group %s", self.consumer_name,
                     self.consumer.group)

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
                    next_claim = time.monotonic() + self.settings.claim_interval_s
                    await self.claim_abandoned()
                if self._own_pending:
                    entries = await self.consumer.read_pending()
                    if not entries:
                        self._own_pending = False
                        continue
                else:
                    entries = await self.consumer.read_new(block_ms=self.settings.block_ms)
                await self.process(entries)
                backoff_s = 0.1
            except asyncio.CancelledError:
                raise
            except _TRANSIENT as e:
                log.warning("relay %s: backing service unavailable (%s); retrying in %.1fs",
                            self.consumer_name, _trunc(e), backoff_s)
                self._own_pending = True
                await self._pause(backoff_s)
                backoff_s = min(backoff_s * 2, self.settings.retry_backoff_max_s)

    async def claim_abandoned(self) -> int:
        """Take over entries idle on other consumers (dead relays); apply them. Count."""
        total = 0
        start = "0-0"
        while not self._stopping.is_set():
            page = await self.consumer.claim(min_idle_ms=self.settings.claim_idle_ms,
                                             start=start)
            start = page.next_start
            if page.trimmed:
                log.warning("relay %s: %d pending entries were trimmed from the stream "
                            "before they were applied", self.consumer_name, page.trimmed)
            if page.deliveries:
                log.info("relay %s: claimed %d abandoned entries", self.consumer_name,
                         len(page.deliveries))
                total += len(page.deliveries)
                await self.process(page.deliveries)
            if start == "0-0":
                break
        await self.consumer.forget_idle_consumers(
            idle_ms=self.settings.forget_consumers_idle_ms)
        return total

    # ------------------------------------------------------------------ entries

    async def process(self, entries: Sequence[Delivery]) -> None:
        """Apply entries in order; a transient failure stops the batch (left pending).

        Bookkeeping events of one task with no status event between them (progress,
        stage, heartbeat, log, queued, dispatched) are applied together: at most one
        write per task and batch, which is what lets one relay keep up with many tasks
        reporting progress several times a second.
        """
        units: list[_Unit] = []
        runs: dict[str, _Unit] = {}
        for d in entries:
            if d.gone:
                # Trimmed from the stream while pending: nothing left to apply.
                await self.consumer.ack(d.entry_id)
                continue
            if d.event is None:
                await self._dead_letter(d, reason=d.malformed or "malformed")
                continue
            tid = d.event.task_id
            if d.event.type in MOVING:
                runs.pop(tid, None)
                units.append(_Unit(tid, [d], moving=True))
                continue
            run = runs.get(tid)
            if run is None:
                run = runs[tid] = _Unit(tid, [], moving=False)
                units.append(run)
            run.entries.append(d)
        for unit in units:
            if self._stopping.is_set():
                return
            if not await self._process_unit(unit):
                return

    async def _process_unit(self, unit: _Unit) -> bool:
        """Apply one unit; False when it is left pending for a retry (stop the batch)."""
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
                           self.consumer_name, first, n, self.settings.max_apply_failures)
            if n < self.settings.max_apply_failures:
                # Leave it pending; retry it (in order) after a pause.
                self._own_pending = True
                await self._pause(min(0.1 * 2 ** n, self.settings.retry_backoff_max_s))
                return False
            self._failures.pop(first, None)
            for d in unit.entries:
                await self._dead_letter(d, reason=f"apply failed: {type(e).__name__}: {e}")
            outcomes = [Outcome(d.entry_id, unit.task_id, "dead") for d in unit.entries]
        self._failures.pop(first, None)
        if self._on_outcome is not None:
            for outcome in outcomes:
                await self._on_outcome(outcome)
        return True

    async def _apply_unit(self, unit: _Unit) -> list[Outcome]:
        if unit.moving:
            [d] = unit.entries
            assert d.event is not None
            outcome = await self.apply(d.event, event_id=d.event_id, entry_id=d.entry_id)
            outcomes: list[Outcome] | None = None if outcome.action == "dead" else [outcome]
        else:
            outcomes = await self.applier.apply_run(unit.task_id, unit.entries)
        if outcomes is None:
            for d in unit.entries:
                await self._dead_letter(d, reason="unknown task")
            return [Outcome(d.entry_id, unit.task_id, "dead") for d in unit.entries]
        await self.consumer.ack(*[d.entry_id for d in unit.entries])
        self.applied += sum(o.action == "applied" for o in outcomes)
        return outcomes

    async def apply(self, event: Event, *, event_id: str, entry_id: str = "") -> Outcome:
        """Apply one status event to its task row (``Applier.apply_status``); acknowledges
        nothing. Bookkeeping events go through ``process``."""
        return await self.applier.apply_status(event, event_id=event_id, entry_id=entry_id)

    async def _dead_letter(self, d: Delivery, *, reason: str) -> None:
        tlog.warning(d.task_id, "relay %s: dead-lettering %s: %s", self.consumer_name,
                     d.entry_id, _trunc(reason))
        await self.consumer.dead_letter(d, reason=reason)
