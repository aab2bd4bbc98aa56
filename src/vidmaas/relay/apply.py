"""Applying events to task rows: each event takes effect once, in as few round trips as
its guarantees allow.

Guarantees:
- Status events (started, completed, failed, cancelled) move a task only through
  ``Lifecycle`` (compare-and-set on the status). One applied before, or one the task
  has moved past (``StaleTransition`` / ``IllegalTransition``), changes nothing. They
  are never skipped by id alone: with several relays, one task's entries can be
  applied out of order. A compare-and-set that fails because another move came
  between the read and the write (the dispatcher marking a pooled task ``running``
  as its worker already reports a ``failed``) reads the row again and applies the
  event to what it finds, a few times at most: a status event is never dropped for a
  move that did not end the task.
- An event of an earlier attempt never moves the task: a late ``failed`` from attempt 1
  cannot fail attempt 2. A task whose row says it is on its first attempt
  (``attempts`` ≤ 1: one job launched at most) has no earlier attempt, so the row
  decides; a retried task asks its stream whether a ``queued`` or ``dispatched`` event
  follows the event (``bus.events.superseded``).
- Progress never goes backwards and a terminal status is final: progress, stage,
  heartbeat and status events for a task that is already terminal change nothing.
- A ``progress`` event of a denoising step (stage ``denoise``, step 1 or later) records
  the time it was applied as ``last_step_at`` (the watchdog's stall rule).
- A run of one task's bookkeeping events (progress, stage, heartbeat; and the
  ``queued``, ``dispatched`` and ``log`` events the api and the dispatcher wrote) is one
  write, guarded in SQL: the task still active, progress not lower, and none of the
  run applied before (the stored ``last_event_id`` older than the run). When that
  guard refuses, the row is read and only the events newer than its ``last_event_id``
  count; a run another relay overtook meanwhile is read again (a few times at most).
- ``last_event_id`` only moves forward (compared in SQL). A status change records it in
  the transition's own UPDATE where the move takes fields; otherwise one guarded UPDATE
  records it.
- Terminal events release the task's GPUs: the move that ends the task releases them
  (``Lifecycle.finish`` / ``fail_or_retry``), and an event that finds its task already
  ended releases them again (idempotent), so a relay that died between the status change
  and the release leaves nothing held.
- Webhooks are recorded (``relay.webhooks``) only for what the row confirms: a ``failed``
  that was retried sends no ``failed`` webhook, a stale ``completed`` on a task that
  already failed sends none, an event of an earlier attempt sends none.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from vidmaas.bus.consumer import Delivery
from vidmaas.bus.events import id_key
from vidmaas.db import bookkeeping
from vidmaas.db import tasks as repo
from vidmaas.db.models import Task, utcnow
from vidmaas.domain.events import Event, EventType, Stage
from vidmaas.domain.status import ACTIVE, TaskStatus
from vidmaas.errors import IllegalTransition, NotFound, StaleTransition
from vidmaas.lifecycle import Lifecycle
from vidmaas.logs import TaskLog
from vidmaas.metrics import Metrics
from vidmaas.relay.webhooks import Subscriber, Webhooks

log = logging.getLogger(__name__)
tlog = TaskLog(log)

MOVING = frozenset({EventType.STARTED, EventType.COMPLETED, EventType.FAILED,
                    EventType.CANCELLED})
"""Events that move a task's status: idempotent by compare-and-set, never skipped by order."""
_BOOKKEEPING_WRITES = frozenset({EventType.PROGRESS, EventType.STAGE, EventType.HEARTBEAT})
"""Bookkeeping events that write the row (the others only advance the stream)."""
_REREADS = 3

Superseded = Callable[[str, str], Awaitable[bool]]
"""``(task_id, event_id)``: does the task's stream hold a later attempt than the event's?"""


@dataclass(frozen=True, slots=True)
class Outcome:
    """What applying one entry did (for logs, metrics and tests)."""

    entry_id: str
    task_id: str | None
    action: str
    """applied, duplicate, stale, superseded, ignored, dead."""


@dataclass(slots=True)
class _Plan:
    """What a bookkeeping run does to a row whose newest applied event is ``last``."""

    actions: list[str] = field(default_factory=list)
    values: dict[str, Any] = field(default_factory=dict)
    first: str | None = None
    """The oldest event of the run not applied before."""
    newest: str | None = None
    latest_progress: Delivery | None = None


def _plan(run: Sequence[Delivery], *, last: str | None, active: bool) -> _Plan:
    plan = _Plan()
    for d in run:
        assert d.event is not None
        if last is not None and id_key(d.event_id) <= id_key(last):
            plan.actions.append("duplicate")
            continue
        plan.first = plan.first or d.event_id
        plan.newest = d.event_id
        t, data = d.event.type, d.event.data
        if t not in _BOOKKEEPING_WRITES:
            plan.actions.append("applied")  # the api or the dispatcher moved it already
            continue
        if not active:
            # Terminal is final; queued means a retry reset the progress.
            plan.actions.append("ignored")
            continue
        values = plan.values
        if t is EventType.HEARTBEAT:
            values["last_heartbeat_at"] = utcnow()
        elif t is EventType.STAGE:
            values["stage"] = str(data["stage"])
        else:
            values["progress"] = max(float(values.get("progress", 0.0)), float(data["percent"]))
            if data.get("stage") is not None:
                values["stage"] = str(data["stage"])
            eta = data.get("eta_s")
            values["eta_s"] = float(eta) if isinstance(eta, int | float) \
                and not isinstance(eta, bool) else None
            if data.get("stage") == Stage.DENOISE.value and _step(data) >= 1:
                values["last_step_at"] = utcnow()
            plan.latest_progress = d
        plan.actions.append("applied")
    return plan


def _step(data: Mapping[str, Any]) -> int:
    step = data.get("step")
    return step if isinstance(step, int) and not isinstance(step, bool) else 0


@dataclass(frozen=True, slots=True)
class _Moved:
    action: str
    task: Task | None
    """The row after the move; None when it must be read again (someone else moved it)."""
    recorded: bool = False
    """Whether the move's UPDATE recorded the event as ``last_event_id``."""


class Applier:
    """Applies parsed events to task rows; acknowledges nothing (see the module docstring)."""

    def __init__(self, *, lifecycle: Lifecycle, webhooks: Webhooks, superseded: Superseded,
                 metrics: Metrics | None = None) -> None:
        self.lifecycle = lifecycle
        self.sessions = lifecycle.sessions
        self.webhooks = webhooks
        self.superseded = superseded
        self.metrics = metrics

    async def _get(self, task_id: str) -> Task | None:
        async with self.sessions() as session:
            return await repo.get_task(session=session, task_id=task_id)

    async def _write(self, task_id: str, plan: _Plan) -> bookkeeping.Subscription | None:
        assert plan.first is not None and plan.newest is not None
        async with self.sessions() as session:
            return await bookkeeping.write_bookkeeping(session=session, task_id=task_id,
                                                values=plan.values, first_event_id=plan.first,
                                                last_event_id=plan.newest)

    # ------------------------------------------------------------------ bookkeeping

    async def apply_run(self, task_id: str, run: Sequence[Delivery]) -> list[Outcome] | None:
        """Bookkeeping events of one task, in stream order, as one guarded write.

        None when the task does not exist (the caller dead-letters the run)."""
        # Usually none of the run was applied before and the task is active: then the
        # guarded UPDATE alone applies it.
        plan = _plan(run, last=None, active=True)
        subscriber: Subscriber | None = await self._write(task_id, plan) if plan.values \
            else None
        if subscriber is None:
            task = await self._get(task_id)
            if task is None:
                return None
            subscriber = task
            for _ in range(_REREADS):
                plan = _plan(run, last=task.last_event_id, active=task.status in ACTIVE)
                if not plan.values:
                    break
                written = await self._write(task_id, plan)
                if written is not None:
                    subscriber = written
                    break
                fresh = await self._get(task_id)
                if fresh is None:
                    return None
                if (fresh.last_event_id, fresh.status) == (task.last_event_id, task.status):
                    # Refused for its progress: a newer one was written; newest wins.
                    tlog.debug(task_id, "bookkeeping of %d events superseded", len(run))
                    break
                task = subscriber = fresh  # another relay applied some of the run: again
            else:
                tlog.debug(task_id, "bookkeeping of %d events overtaken %d times; newer "
                           "events were written", len(run), _REREADS)
        progress = plan.latest_progress
        has_endpoints = not isinstance(subscriber, bookkeeping.Subscription) \
            or subscriber.has_endpoints
        if progress is not None and await self.webhooks.wants(
                subscriber, EventType.PROGRESS, has_endpoints=has_endpoints):
            # The payload describes the task as it is now.
            task = await self._get(task_id)
            if task is not None and progress.event is not None:
                await self.webhooks.record(task=task, event=progress.event,
                                           event_id=progress.event_id,
                                           has_endpoints=has_endpoints)
        outcomes = [Outcome(d.entry_id, task_id, a) for d, a in zip(run, plan.actions,
                                                                     strict=True)]
        if self.metrics is not None:
            for d, o in zip(run, outcomes, strict=True):
                if o.action == "applied" and d.event is not None:
                    self.metrics.observe_event(d.event.type.value)
        return outcomes

    # ------------------------------------------------------------------ status events

    async def apply_status(self, event: Event, *, event_id: str, entry_id: str = "") -> Outcome:
        """Apply one status event (started/completed/failed/cancelled) to its task row."""
        tid = event.task_id
        async with self.sessions() as session:
            found = await bookkeeping.task_with_endpoints(session=session, task_id=tid)
        if found is None:
            return Outcome(entry_id, tid, "dead")
        task, has_endpoints = found
        seen = task.last_event_id is not None \
            and id_key(event_id) <= id_key(task.last_event_id)
        moved = _Moved("stale", None)
        for attempt in range(_REREADS):
            try:
                moved = await self._move(task, event, event_id)
                break
            except (StaleTransition, IllegalTransition, NotFound) as e:
                # The row moved between the read and the compare-and-set: by this event
                # applied elsewhere, or by another move (the dispatcher marking the task
                # running, a cancel). Read it again: ``_move`` then finds what is stale.
                fresh = await self._get(tid) if attempt + 1 < _REREADS else None
                if fresh is None or fresh.status is task.status:
                    tlog.debug(tid, "%s %s already applied elsewhere (%s)", event.type.value,
                               event_id, e)
                    moved = _Moved("stale", None)
                    break
                task = fresh
        after = moved.task if moved.task is not None else await self._get(tid)
        if after is None:
            return Outcome(entry_id, tid, moved.action)
        if event.type.terminal and after.status.terminal and moved.action != "applied":
            # Idempotent; covers a relay that died between a status change and the release.
            await self.lifecycle.release(tid)
        if moved.action != "superseded" and _webhook_due(after, event):
            await self.webhooks.record(task=after, event=event, event_id=event_id,
                                       has_endpoints=has_endpoints)
        if not seen and not moved.recorded:
            async with self.sessions() as session:
                await bookkeeping.mark_event(session=session, task_id=tid, event_id=event_id)
        if moved.action == "applied":
            tlog.debug(tid, "applied %s %s", event.type.value, event_id)
            self._observe(event, after)
        return Outcome(entry_id, tid, "duplicate" if seen and moved.action == "stale"
                       else moved.action)

    def _observe(self, event: Event, task: Task) -> None:
        if self.metrics is None:
            return
        self.metrics.observe_event(event.type.value)
        if event.type.terminal and task.status == event.type.value:
            self.metrics.observe_outcome(task.status)
            self.metrics.observe_usage(model=task.model, gpu_seconds=task.gpu_seconds,
                                       queue_wait_s=task.queue_wait_s)
            timings = event.data.get("timings")
            if event.type is EventType.COMPLETED and isinstance(timings, dict):
                self.metrics.observe_stage_timings(timings)

    async def _is_superseded(self, task: Task, event_id: str) -> bool:
        # One job launched at most: there is no earlier attempt the event could be from.
        return task.attempts > 1 and await self.superseded(task.id, event_id)

    async def _move(self, task: Task, event: Event, event_id: str) -> _Moved:
        tid, status, t, data = task.id, task.status, event.type, event.data
        if t not in MOVING:
            raise ValueError(f"{t.value} is not a status event")
        if status.terminal:
            return _Moved("stale", task)
        if await self._is_superseded(task, event_id):
            tlog.info(tid, "%s %s belongs to an earlier attempt; not applied", t.value, event_id)
            return _Moved("superseded", task)
        mark = {"last_event_id": bookkeeping.advance_last_event_id(event_id)}
        lc = self.lifecycle
        if t is EventType.STARTED:
            if status is not TaskStatus.DISPATCHING:
                return _Moved("stale", task)
            return _Moved("applied", await lc.transition(
                task_id=tid, to=TaskStatus.RUNNING, expected=TaskStatus.DISPATCHING,
                fields=mark), recorded=True)
        if t is EventType.COMPLETED:
            if status is TaskStatus.DISPATCHING:
                # The dispatcher has not marked it running yet (or ``started`` is late).
                with contextlib.suppress(StaleTransition, IllegalTransition):
                    await lc.transition(task_id=tid, to=TaskStatus.RUNNING,
                                        expected=TaskStatus.DISPATCHING)
            return _Moved("applied", await lc.finish(
                task_id=tid, to=TaskStatus.COMPLETED,
                expected=(TaskStatus.RUNNING, TaskStatus.CANCELLING),
                fields={"video_key": str(data["video_key"]),
                        "poster_key": str(data["poster_key"]),
                        "result": dict(data), "progress": 100.0, "stage": None, "eta_s": 0.0,
                        **mark}), recorded=True)
        if status not in ACTIVE:
            return _Moved("stale", task)
        if t is EventType.FAILED:
            return _Moved("applied", await lc.fail_or_retry(
                task, code=str(data["code"])[:64], message=str(data["message"]),
                retryable=bool(data["retryable"]), publish_failed=False))
        if status is TaskStatus.RUNNING:
            # running → cancelled is not a legal move: through cancelling.
            with contextlib.suppress(StaleTransition, IllegalTransition):
                await lc.transition(task_id=tid, to=TaskStatus.CANCELLING,
                                    expected=TaskStatus.RUNNING)
        return _Moved("applied", await lc.finish(
            task_id=tid, to=TaskStatus.CANCELLED,
            expected=(TaskStatus.DISPATCHING, TaskStatus.CANCELLING), fields=mark),
            recorded=True)


def _webhook_due(task: Task, event: Event) -> bool:
    """Does the row agree with the event? (a retried failure is no ``failed`` webhook)."""
    status, t = task.status, event.type
    if t is EventType.COMPLETED:
        return status is TaskStatus.COMPLETED
    if t is EventType.FAILED:
        return status is TaskStatus.FAILED
    if t is EventType.CANCELLED:
        return status is TaskStatus.CANCELLED
    if t is EventType.STARTED:
        return status in (TaskStatus.RUNNING, TaskStatus.CANCELLING) or status.terminal
    return False
