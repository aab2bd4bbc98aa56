"""The reconciler: repairs what crashes and lost messages leave behind (DESIGN §2).

Runs at start and every ``dispatcher.reconcile_interval_s`` on every replica; each
step is safe to run more than once and by several replicas at the same time, and one
step failing never skips the others. Guarantees:
- Expired claims (a dispatcher died between its claim and its acknowledgement): the
  claim is first taken over, so that other reconcilers leave it alone, then the move
  is finished from the database status: still ``queued`` → GPUs released, back to the
  front of the queue; ``dispatching`` → launched again (which finds the job if it
  exists: never two jobs of one attempt), then ``running``; ``running`` or
  ``cancelling`` → acknowledged; terminal or gone → GPUs released.
- Queued tasks missing from the queue (the api's enqueue failed after its insert):
  enqueued once they have been ``queued`` for ``dispatcher.requeue_grace_s`` and are
  neither queued, claimed nor waiting for a retry. Nothing the api accepted is lost.
- Queued tasks that need more GPUs than the whole capacity (queued before it shrank)
  fail (``model_unavailable``): also those of a pooled model, which admission passes
  over rather than finds blocking the head of the queue.
- Leaked capacity: GPUs held by a task that is not active, not being dispatched and
  unchanged for ``dispatcher.lease_grace_s`` are released.
- Jobs: a running task whose job ended (or vanished) while nobody watched is handled
  as ``outcomes`` handles any ending; a job that belongs to no active task is
  reported, and deleted when ``dispatcher.delete_unknown_jobs`` is set.
- Redis restarted or lost data (``dispatcher.recovery``): first, leases of active tasks
  are rebuilt when the Redis server is not the one they were last rebuilt on; then the
  steps above re-enqueue queued tasks and settle claims; ``cancelling`` tasks get their
  cancel flag back; and events left in the outbox are published
  (``Lifecycle.sweep_outbox``, also run on its own every ``outbox.sweep_interval_s``).
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime

from vidmaas.dispatcher.admission import Admission
from vidmaas.dispatcher.context import DispatcherContext, age_s
from vidmaas.dispatcher.outcomes import Outcomes
from vidmaas.domain.ids import job_name as job_name_of
from vidmaas.domain.ids import task_id_from_job_name
from vidmaas.domain.models import never_fits
from vidmaas.domain.status import TaskStatus
from vidmaas.logs import TaskLog

log = logging.getLogger(__name__)
tlog = TaskLog(log)


class Reconciler:
    """The repair steps of one replica."""

    def __init__(self, ctx: DispatcherContext, *, admission: Admission,
                 outcomes: Outcomes) -> None:
        self.ctx = ctx
        self.admission = admission
        self.outcomes = outcomes

    async def reconcile(self) -> None:
        """Run every step once (see the module docstring)."""
        for step in (self._rebuilt_leases, self._claims, self._queued, self._leases,
                     self._cancel_flags, self._outbox, self._jobs):
            try:
                await step()
            except Exception:
                log.exception("dispatcher %s: reconcile step %s failed", self.ctx.id,
                              step.__name__.lstrip("_"))

    async def _rebuilt_leases(self) -> None:
        await self.admission.recovery.ensure_leases()

    async def _cancel_flags(self) -> None:
        await self.admission.recovery.restore_cancel_flags()

    async def _outbox(self) -> None:
        swept = await self.ctx.lifecycle.sweep_outbox()
        if self.ctx.metrics is not None:
            self.ctx.metrics.set_outbox_pending(swept.pending)

    async def _claims(self) -> None:
        ctx = self.ctx
        for tid, owner, _user in await ctx.queue.expired_claims():
            # Take the claim over first, so that other reconcilers leave it to us.
            await ctx.queue.renew_claim(tid, lease_s=ctx.cfg.claim_lease_s)
            task = await ctx.get(tid)
            status = None if task is None else task.status
            tlog.warning(tid, "claim of dispatcher %s expired; task is %s", owner, status)
            if task is None or status is None or status.terminal:
                await ctx.lifecycle.release(tid)
                await ctx.queue.ack(tid)
            elif status is TaskStatus.QUEUED:
                await ctx.lifecycle.release(tid)
                await ctx.queue.ack(tid)
                await ctx.lifecycle.enqueue(task, front=True)
            elif status is TaskStatus.DISPATCHING:
                await self.admission.launch(task)
            else:  # running or cancelling: the job exists; the claim is settled
                await ctx.queue.ack(tid)

    async def _queued(self) -> None:
        ctx = self.ctx
        now = datetime.now(UTC)
        for task in await ctx.with_status(TaskStatus.QUEUED):
            if never_fits(task.gpus, gpu_capacity=ctx.settings.gpu_capacity) \
                    and await ctx.queue.is_queued(user_id=task.user_id, task_id=task.id):
                await self.admission.fail_too_large(task, gpus=task.gpus)
                continue
            age = age_s(task.queued_at or task.updated_at, now)
            if age is not None and age < ctx.cfg.requeue_grace_s:
                continue
            if (await ctx.queue.is_queued(user_id=task.user_id, task_id=task.id)
                    or await ctx.queue.is_claimed(task.id)
                    or await ctx.queue.is_delayed(task.id)):
                continue
            fresh = await ctx.get(task.id)
            if fresh is None or fresh.status is not TaskStatus.QUEUED:
                continue
            tlog.warning(task.id, "queued but missing from the queue; enqueuing")
            await ctx.lifecycle.enqueue(fresh)

    async def _leases(self) -> None:
        ctx = self.ctx
        for tid in await ctx.queue.leases():
            task = await ctx.get(tid)
            if task is not None and task.status.active:
                continue
            changed_s = None if task is None else age_s(task.updated_at, datetime.now(UTC))
            if changed_s is not None and changed_s < ctx.cfg.lease_grace_s:
                continue
            if await ctx.queue.is_claimed(tid):
                continue  # being dispatched right now
            task = await ctx.get(tid)
            if task is not None and task.status.active:
                continue
            tlog.warning(tid, "holds GPUs but is %s; releasing",
                         "missing" if task is None else task.status)
            await ctx.lifecycle.release(tid)

    async def _jobs(self) -> None:
        ctx = self.ctx
        for task in await ctx.with_status(TaskStatus.RUNNING):
            if not ctx.owns(task):
                continue
            status = await ctx.executor.status(task.job_name or job_name_of(task.id))
            if status.state.finished:
                await self.outcomes.on_job_status(status, task=task)
        for job in await ctx.executor.list_jobs():
            tid = task_id_from_job_name(job)
            owner = None if tid is None else await ctx.get(tid)
            if owner is not None and owner.status.active:
                continue
            what = "unknown" if owner is None else owner.status
            if ctx.cfg.delete_unknown_jobs:
                tlog.warning(tid, "job %s belongs to no active task (%s); deleting it", job, what)
                await ctx.executor.cancel(job, grace_s=0)
            else:
                tlog.warning(tid, "job %s belongs to no active task (%s)", job, what)
