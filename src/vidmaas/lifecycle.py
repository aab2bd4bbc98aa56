"""Task lifecycle operations shared by the api, dispatcher and relay.

Each operation here combines the database (the source of truth), the queue and the
event streams in the one order that keeps them consistent:

- ``enqueue`` puts a task in its user's queue by its priority class (``task.priority``)
  and can refresh the user's share (weight, GPU quota) in the same script.
- ``admit_new`` enqueues a freshly inserted task and publishes ``queued``; if Redis
  fails after the insert the task stays ``queued`` in the database and the
  reconciler enqueues it later (nothing accepted is lost).
- ``cancel`` cancels a queued task at once (out of the queue, ``cancelled``), and moves
  a dispatching/running one to ``cancelling`` with the cancel flag set; the dispatcher
  finishes the job.
- ``fail_or_retry`` is the one rule for failures: a retryable failure with attempts
  left goes back to ``queued`` (after a backoff), anything else becomes ``failed``;
  either way the task's GPUs are released.
- ``finish`` moves a task to a terminal status and releases its GPUs.

Every status change goes through ``db.tasks.transition`` (compare-and-set), which stores
its event in the outbox in the same transaction. The outbox (``db.outbox``,
``bus.outbox``):

- Right after the commit, the role that made the change publishes the event
  (``bus.outbox.publish_entry``) and deletes its row. If an older event of the task is
  still waiting (a publish failed before), the task's rows are published oldest first
  instead (``drain``), so one task's outbox events reach the streams in the order of
  its moves.
- A publish that fails (Redis down) leaves the row; ``sweep_outbox`` (run by the
  dispatcher every ``outbox.sweep_interval_s`` and by its reconciler) publishes what
  is older than ``outbox.sweep_grace_s``. The script's per-task mark makes a second
  publish of a row a no-op, so concurrent sweeps and a publisher that died between its
  write and its delete never write an event twice.
- Bound: once a publish has failed, each change first counts the rows waiting, and at
  ``outbox.max_pending`` commits its status without storing its event (logged); the
  count is not taken again once a publish succeeds.

Events that are not status changes (``queued`` positions, retry ``log`` lines, and all
the job runtime writes) are published directly, as before: they are not in the outbox,
and an outbox event republished late may follow them on the stream.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import redis.asyncio as aioredis

from vidmaas.bus import control
from vidmaas.bus.events import StreamLimits, publish
from vidmaas.bus.outbox import Outcome, publish_entry
from vidmaas.bus.queue import TaskQueue
from vidmaas.config import Settings
from vidmaas.db import outbox
from vidmaas.db import tasks as repo
from vidmaas.db.engine import Session, Sessions
from vidmaas.db.models import Task, utcnow
from vidmaas.domain import events as ev
from vidmaas.domain.fairness import Priority, Share
from vidmaas.domain.status import ACTIVE, TaskStatus
from vidmaas.errors import StaleTransition
from vidmaas.logs import TaskLog

log = logging.getLogger(__name__)
tlog = TaskLog(log)



@dataclass(frozen=True, slots=True)
class Sweep:
    """What one outbox sweep did: events written now, rows found already written (and
    deleted), and rows still waiting after it."""

    published: int
    duplicates: int
    pending: int


@dataclass
class Lifecycle:
    sessions: Sessions
    redis: aioredis.Redis
    settings: Settings
    publish_failing: bool = field(default=False)
    """A publish of an outbox event failed since the last one that worked: changes count
    the outbox against its bound until one works again."""

    @property
    def queue(self) -> TaskQueue:
        return TaskQueue(self.redis)

    @property
    def limits(self) -> StreamLimits:
        r = self.settings.redis
        return StreamLimits(task_maxlen=r.task_stream_maxlen, task_ttl_s=r.task_stream_ttl_s,
                            global_maxlen=r.global_stream_maxlen, cluster=r.cluster)

    async def publish(self, event: ev.Event) -> str:
        return await publish(self.redis, event, self.limits)

    async def transition(self, *, task_id: str, to: TaskStatus,
                         expected: TaskStatus | tuple[TaskStatus, ...],
                         fields: dict[str, Any] | None = None,
                         event: ev.Event | repo.EventOf | None = None) -> Task:
        async with self.sessions() as session:
            if event is not None and self.publish_failing and not await self._room(session):
                tlog.warning(task_id, "outbox full (%d events): -> %s commits without its "
                             "event", self.settings.outbox.max_pending, to.value)
                event = None

            async def after_commit(entry: outbox.Entry) -> None:
                await self._publish_stored(session, entry)

            return await repo.transition(session=session, task_id=task_id, to=to,
                                         expected=expected, fields=fields, event=event,
                                         publish=after_commit)

    async def _room(self, session: Session) -> bool:
        return await outbox.count(session) < self.settings.outbox.max_pending

    async def _publish_stored(self, session: Session, entry: outbox.Entry) -> None:
        """Publish a just-committed outbox event and delete its row; the task's older
        rows first when there are any. A failure leaves the rows for the sweep."""
        try:
            res = await publish_entry(self.redis, entry.event, seq=entry.seq,
                                      limits=self.limits)
            if res.outcome is Outcome.GAP:
                await self._drain(session, entry.task_id)
            else:
                await outbox.delete(session, [entry.id])
        except Exception as e:
            self.publish_failing = True
            tlog.warning(entry.task_id, "%s event left in the outbox (%s: %s)",
                         entry.event.type.value, type(e).__name__, e)
            return
        self.publish_failing = False

    async def _drain(self, session: Session, task_id: str) -> int:
        """Publish the task's outbox rows oldest first; the number written now."""
        written, _seen = await self._publish_in_order(
            session, await outbox.of_task(session, task_id=task_id))
        return written

    async def _publish_in_order(self, session: Session, entries: list[outbox.Entry],
                                ) -> tuple[int, int]:
        """Publish (forced, see ``bus.outbox``) rows listed oldest first and delete them;
        (written now, found written before). Stops at the first failure, after deleting
        what went out."""
        done: list[int] = []
        written = 0
        try:
            for entry in entries:
                res = await publish_entry(self.redis, entry.event, seq=entry.seq, force=True,
                                          limits=self.limits)
                written += res.outcome is Outcome.PUBLISHED
                done.append(entry.id)
        finally:
            await outbox.delete(session, done)
        return written, len(done) - written

    async def sweep_outbox(self) -> Sweep:
        """Publish outbox rows older than ``outbox.sweep_grace_s`` (what a crash or an
        outage left), each task's oldest first; safe with any number of sweeps at once."""
        cfg = self.settings.outbox
        async with self.sessions() as session:
            rows = await outbox.oldest(session, before=utcnow() - timedelta(
                seconds=cfg.sweep_grace_s), limit=cfg.sweep_batch)
            by_task: dict[str, list[outbox.Entry]] = {}
            for entry in rows:
                by_task.setdefault(entry.task_id, []).append(entry)
            published = duplicates = 0
            for task_id, entries in by_task.items():
                written, seen = await self._publish_in_order(session, entries)
                published, duplicates = published + written, duplicates + seen
                if written:
                    tlog.info(task_id, "outbox: republished %d event(s)", written)
            pending = await outbox.count(session)
            await session.commit()
        if rows:
            self.publish_failing = False
        return Sweep(published=published, duplicates=duplicates, pending=pending)

    async def outbox_pending(self) -> int:
        """Outbox rows waiting to be published."""
        async with self.sessions() as session:
            return await outbox.count(session)

    async def enqueue(self, task: Task, *, front: bool = False,
                      share: Share | None = None) -> int | None:
        """Put a queued task in the queue, in its priority class, and publish ``queued``
        with its position. ``share`` refreshes its user's weight and GPU quota in the
        queue (None keeps what the queue has)."""
        q = self.queue
        priority = Priority(task.priority) if task.priority in tuple(Priority) \
            else Priority.NORMAL
        return await q.enqueue_announced(
            user_id=task.user_id, task_id=task.id, gpus=task.gpus, front=front,
            model=task.model, priority=priority, share=share, limits=self.limits)

    async def admit_new(self, task: Task, *, share: Share | None = None) -> int | None:
        """Enqueue a task just inserted; a Redis failure leaves it for the reconciler."""
        try:
            return await self.enqueue(task, share=share)
        except Exception:
            tlog.exception(task.id, "enqueue failed; the reconciler will enqueue it")
            return None

    async def cancel(self, task: Task, *, by: str) -> Task:
        """Cancel (queued: at once) or start cancelling (active) a task."""
        status = task.status
        if status is TaskStatus.QUEUED:
            try:
                done = await self.transition(task_id=task.id, to=TaskStatus.CANCELLED,
                                             expected=TaskStatus.QUEUED,
                                             event=ev.cancelled(task.id, by=by))
            except StaleTransition:
                # A dispatcher took it meanwhile: cancel it as an active task.
                async with self.sessions() as session:
                    fresh = await repo.get_task(session=session, task_id=task.id)
                assert fresh is not None
                return await self.cancel(fresh, by=by)
            await self.queue.remove(user_id=task.user_id, task_id=task.id)
            await self.queue.announce_move()
            return done
        if status in (TaskStatus.DISPATCHING, TaskStatus.RUNNING):
            await control.request_cancel(self.redis, task.id, by=by)
            return await self.transition(
                task_id=task.id, to=TaskStatus.CANCELLING, expected=status,
                event=ev.status_changed(task.id, status=TaskStatus.CANCELLING))
        # Already cancelling or terminal: the transition check gives the right error.
        return await self.transition(task_id=task.id, to=TaskStatus.CANCELLING, expected=status)

    async def finish(self, *, task_id: str, to: TaskStatus,
                     expected: TaskStatus | tuple[TaskStatus, ...] = ACTIVE,
                     fields: dict[str, Any] | None = None, event: ev.Event | None = None) -> Task:
        """Move a task to a terminal status and release its GPUs."""
        task = await self.transition(task_id=task_id, to=to, expected=expected, fields=fields,
                                     event=event)
        await self.release(task_id, completed=to is TaskStatus.COMPLETED)
        return task

    async def release(self, task_id: str, *, completed: bool = False) -> None:
        """Free the task's GPUs and settle its fair-share charge (idempotent)."""
        if await self.queue.release(task_id, completed=completed):
            await self.queue.announce_move()

    async def fail_or_retry(self, task: Task, *, code: str, message: str, retryable: bool,
                            publish_failed: bool = True) -> Task:
        """Retry a retryable failure while attempts remain; otherwise fail the task.

        ``publish_failed`` is False when the ``failed`` event already exists (the relay
        applying a runtime's event): the task then moves without a second one.
        """
        status = task.status
        cfg = self.settings.dispatcher
        if (retryable and status in (TaskStatus.DISPATCHING, TaskStatus.RUNNING)
                and task.attempts < cfg.max_attempts):
            delay_s = cfg.retry_backoff_s * (2 ** max(0, task.attempts - 1))
            moved = await self.transition(
                task_id=task.id, to=TaskStatus.QUEUED, expected=status,
                fields={"error_code": code, "error_message": message[:2000], "progress": 0.0,
                        "stage": None, "eta_s": None})
            await self.release(task.id)
            await self.queue.schedule_retry(user_id=task.user_id, task_id=task.id,
                                            gpus=task.gpus, delay_s=delay_s)
            await self.publish(ev.log(task.id, level="warning",
                                      message=f"attempt {task.attempts} failed ({code}); "
                                              f"retrying in {delay_s:.0f}s"))
            tlog.info(task.id, "attempt %d failed (%s); retry in %.1fs", task.attempts, code,
                      delay_s)
            return moved
        event = ev.failed(task.id, code=code, message=message, retryable=False) \
            if publish_failed else None
        return await self.finish(task_id=task.id, to=TaskStatus.FAILED, expected=status,
                                 fields={"error_code": code, "error_message": message[:2000]},
                                 event=event)
