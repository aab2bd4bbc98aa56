"""Admission: queued tasks into launched jobs, fairly, within capacity (DESIGN §2).

Guarantees (with any number of dispatcher replicas over one Redis and one database):
- Capacity: a job is launched only for a task whose GPUs ``TaskQueue.claim_next``
  acquired atomically, so the GPUs held never exceed ``gpu_capacity``. Claims are
  epoch-guarded: on a Redis server whose leases were not rebuilt from the database
  since it started (``dispatcher.recovery``), admission rebuilds them before it claims.
- Order: tasks are taken in the queue's fair order (round-robin across users, FIFO
  within a user) under the per-user running cap; a retry that is due goes back to
  the front of its user's list first.
- No busy loop: ``run`` takes tasks until the queue says it cannot, then sleeps on the
  queue's wake-up signal (pushed on enqueue and on every capacity release), so a
  freed slot is refilled within milliseconds. It also wakes for the next due retry
  and at least every ``dispatcher.wake_max_s``. The blocking wait has a connection of
  its own, which ``interrupt()`` closes to end it at once on stop.
- Crash safety: a task moves ``queued → dispatching`` by compare-and-set (counting the
  attempt) before its job is launched, the job name derives from the task id and
  launch is idempotent, and the queue entry is acknowledged only once the task is
  ``running`` (or has failed). A claim whose task was cancelled or is gone is
  dropped and its GPUs released; no job starts for it.
- ``launch`` (launch-or-fail, shared with the reconciler) either records the job's
  launch and moves the task to ``running``, or sends the task through the retry rule:
  a task whose model is gone fails for good, a launch error is retried.
- A head task that needs more GPUs than the whole capacity (queued before the capacity
  shrank) can never fit: it is taken out of the queue and fails (``model_unavailable``,
  not retried), so it holds up no one.
- A pooled model's task is claimed only onto an idle worker of its model
  (``dispatcher.pools``); it is then sent to that worker instead of launched. A head
  task that does not fit the free GPUs is left for ``Pools`` to free idle workers'
  GPUs for.
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime

import redis.asyncio as aioredis

from vidmaas.bus import keys
from vidmaas.bus.queue import Claim, TaskQueue
from vidmaas.db.models import Task
from vidmaas.dispatcher.context import DispatcherContext, age_s
from vidmaas.dispatcher.pools import Pools
from vidmaas.dispatcher.recovery import Recovery
from vidmaas.domain import events as ev
from vidmaas.domain.ids import is_worker_id
from vidmaas.domain.ids import job_name as job_name_of
from vidmaas.domain.jobs import JobSpec, memory_saving_after
from vidmaas.domain.models import MODEL_UNAVAILABLE, never_fits, unavailable_message
from vidmaas.domain.pools import Need
from vidmaas.domain.status import TaskStatus
from vidmaas.errors import VidmaasError
from vidmaas.logs import TaskLog

log = logging.getLogger(__name__)
tlog = TaskLog(log)


class Admission:
    """The claim loop of one replica, and the launch step the reconciler shares."""

    def __init__(self, ctx: DispatcherContext, pools: Pools) -> None:
        self.ctx = ctx
        self.pools = pools
        self.recovery = Recovery(ctx)
        """Lease rebuilding, shared with the reconciler."""
        self.launched = 0
        """Jobs this replica launched."""
        self._waiter_pool: aioredis.ConnectionPool | None = None
        self._woke_at = time.monotonic()

    async def run(self) -> None:
        """Admit until stop, sleeping on the queue's wake-up signal in between."""
        ctx = self.ctx
        await ctx.wait_ready()
        # The blocking wait gets a connection of its own, which interrupt() closes.
        shared = ctx.redis.connection_pool
        pool = type(shared)(connection_class=shared.connection_class, max_connections=1,
                            **shared.connection_kwargs)
        self._waiter_pool = pool
        waiter = TaskQueue(aioredis.Redis(connection_pool=pool))
        try:
            while not ctx.stopping.is_set():
                self._woke_at = time.monotonic()
                ctx.beat()
                if await self.admit() and ctx.metrics is not None:
                    ctx.metrics.set_capacity(in_use=await ctx.queue.gpus_in_use(),
                                             capacity=ctx.settings.gpu_capacity)
                    ctx.metrics.set_queue_depths(await ctx.queue.depths())
                timeout_s = min(ctx.cfg.reconcile_interval_s, ctx.cfg.wake_max_s)
                due_s = await ctx.queue.next_due_in_s()
                if due_s is not None:
                    timeout_s = max(0.005, min(timeout_s, due_s + 0.005))
                if ctx.stopping.is_set():
                    break
                await waiter.wait_signal(timeout_s)
        finally:
            self._waiter_pool = None
            await pool.disconnect()

    async def interrupt(self) -> None:
        """End a blocked wait at once (on stop)."""
        if self._waiter_pool is not None:
            # Fails the blocked BLPOP at once; cancelling it instead can wedge the pool.
            await self._waiter_pool.disconnect()

    async def promote_due_retries(self) -> int:
        """Move retries whose backoff is over to the front of their user's list."""
        n = 0
        for task_id, _user in await self.ctx.queue.promote_due():
            task = await self.ctx.get(task_id)
            if task is None or task.status is not TaskStatus.QUEUED:
                continue
            await self.ctx.lifecycle.enqueue(task, front=True)
            tlog.info(task_id, "retry due, back at the front of the queue")
            n += 1
        return n

    async def admit(self) -> int:
        """Promote due retries, then launch tasks until the queue yields none."""
        ctx = self.ctx
        await self.promote_due_retries()
        started = 0
        rebuilt = False
        while not ctx.stopping.is_set():
            res = await ctx.queue.claim_next(
                dispatcher_id=ctx.id, capacity=ctx.settings.gpu_capacity,
                per_user_cap=ctx.cfg.per_user_running_cap, lease_s=ctx.cfg.claim_lease_s,
                pooled=self.pools.pooled, epoch_guard=True)
            if res.outcome == "recovering" and not rebuilt:
                # Redis restarted or lost its data: leases first, from the database;
                # then a reconcile pass at once (the queue, flags, outbox).
                if await self.recovery.ensure_leases() is not None:
                    ctx.reconcile_soon.set()
                rebuilt = True
                continue
            if res.claim is None:
                if res.outcome == "full" and await self._fail_impossible(res.blocked_task_id):
                    continue  # it no longer holds up the queue: claim the next one
                self.pools.blocked = await self._need_of(res.blocked_task_id)
                break
            await self._dispatch_claim(res.claim)
            started += 1
        if started:
            await ctx.queue.announce_move()
        return started

    async def _fail_impossible(self, task_id: str | None) -> bool:
        """Fail the queued head task ``task_id`` if it needs more GPUs than the whole
        capacity: it would wait at the head of the queue forever and every user behind it
        with it. True if it was taken out."""
        if task_id is None:
            return False
        gpus = int(await self.ctx.redis.hget(keys.QUEUE_GPUS, task_id) or 1)
        if not never_fits(gpus, gpu_capacity=self.ctx.settings.gpu_capacity):
            return False
        task = await self.ctx.get(task_id)
        if task is None or task.status is not TaskStatus.QUEUED:
            return False
        await self.fail_too_large(task, gpus=gpus)
        return True

    async def fail_too_large(self, task: Task, *, gpus: int) -> None:
        """Take a queued task that needs ``gpus`` GPUs, more than the whole capacity
        (queued before the capacity shrank), out of the queue and fail it
        (``model_unavailable``, not retried)."""
        ctx = self.ctx
        capacity = ctx.settings.gpu_capacity
        message = unavailable_message(task.model, gpus=gpus, gpu_capacity=capacity)
        if await ctx.fail_unavailable(task, message=message):
            tlog.warning(task.id, "needs %d GPUs of %d in all; failed (%s)", gpus, capacity,
                         MODEL_UNAVAILABLE)
        await ctx.queue.announce_move()

    async def _need_of(self, task_id: str | None) -> Need | None:
        if task_id is None or not self.pools.pooled:
            return None
        model = await self.ctx.redis.hget(keys.QUEUE_MODEL, task_id)
        gpus = await self.ctx.redis.hget(keys.QUEUE_GPUS, task_id)
        return Need(str(model or ""), int(gpus or 1))

    def job_spec(self, task: Task, attempt: int) -> JobSpec:
        """The job of ``task``'s attempt; ``VidmaasError`` when its model is unknown. The
        attempt after an out-of-memory failure runs the memory-saving plan."""
        model = self.ctx.registry.get_or_raise(task.model)
        return JobSpec(task_id=task.id, job_name=job_name_of(task.id), user_id=task.user_id,
                       model=model, prompt=task.prompt, params=dict(task.params),
                       attempt=attempt, input_key=task.input_key,
                       negative_prompt=task.negative_prompt,
                       memory_saving=memory_saving_after(task.error_code),
                       labels={"vidmaas.io/task-id": task.id, "vidmaas.io/user-id": task.user_id})

    async def _dispatch_claim(self, claim: Claim) -> None:
        ctx = self.ctx
        tid = claim.task_id
        name = claim.worker_id or job_name_of(tid)
        await ctx.hook("after_claim")
        # The compare-and-set is the read: it only succeeds on a task still queued, and
        # returns the row, so the hot path makes no separate read first. ``dispatched``
        # commits with the move (the outbox) and carries the attempt the move counted.
        executor = ctx.executor.name

        def dispatched(moved: Task) -> ev.Event:
            return ev.dispatched(tid, executor=executor, job_name=name,
                                 attempt=moved.attempts)

        try:
            task = await ctx.lifecycle.transition(
                task_id=tid, to=TaskStatus.DISPATCHING, expected=TaskStatus.QUEUED,
                fields={"attempts": Task.attempts + 1, "job_name": name,
                        "executor": executor}, event=dispatched)
        except VidmaasError as e:  # cancelled meanwhile, or gone
            current = await ctx.get(tid)
            tlog.info(tid, "claimed but not dispatchable (%s); dropping the claim", e)
            if current is None or not current.status.active:
                await ctx.lifecycle.release(tid)
            if claim.worker_id is not None:
                await self.pools.registry.unclaim(claim.worker_id, tid)
            await ctx.queue.ack(tid)
            return
        await ctx.hook("after_dispatching")
        await self.launch(task, claim=claim)

    async def launch(self, task: Task, *, claim: Claim | None = None) -> None:
        """Build the job of a dispatching task and launch it (or send it to its pool
        worker); a task whose model is gone fails for good."""
        try:
            spec = self.job_spec(task, task.attempts)
        except VidmaasError as e:
            await self.ctx.fail_or_retry(task, code="unknown_model", message=e.message,
                                         retryable=False)
            await self.ctx.queue.ack(task.id)
            return
        if claim is not None and claim.worker_id is not None:
            await self.pools.assign(claim, task, spec)
            await self.ctx.queue.ack(task.id)
        elif claim is None and task.job_name is not None and is_worker_id(task.job_name):
            await self.pools.reassign(task, spec)
            await self.ctx.queue.ack(task.id)
        else:
            await self._launch_and_run(task, spec)

    async def _launch_and_run(self, task: Task, spec: JobSpec) -> None:
        """Launch (idempotently) the job of a ``dispatching`` task, then mark it running."""
        ctx = self.ctx
        tid = task.id
        try:
            await ctx.executor.launch(spec)
        except Exception as e:
            tlog.warning(tid, "launch of %s failed: %s", spec.job_name, e)
            await ctx.fail_or_retry(task, code="launch_failed",
                                    message=f"launch failed: {e}"[:2000], retryable=True)
            await ctx.queue.ack(tid)
            return
        self.launched += 1
        if ctx.metrics is not None:
            queued_s = age_s(task.queued_at, datetime.now(UTC))
            ctx.metrics.observe_dispatch(executor=ctx.executor.name,
                                         gap_s=time.monotonic() - self._woke_at,
                                         queue_wait_s=queued_s or 0.0)
        tlog.info(tid, "launched job %s (attempt %d)", spec.job_name, spec.attempt)
        await ctx.hook("after_launch")
        try:
            await ctx.lifecycle.transition(task_id=tid, to=TaskStatus.RUNNING,
                                           expected=TaskStatus.DISPATCHING)
        except VidmaasError as e:
            # Cancelled or finished while launching: the cancel scan and the job updates
            # take it from here.
            tlog.info(tid, "not moved to running (%s)", e)
        await ctx.queue.ack(tid)
