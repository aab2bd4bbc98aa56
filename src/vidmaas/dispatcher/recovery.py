"""Rebuilding Redis from the database after Redis restarted or lost its data (DESIGN §8).

The database is the source of truth; Redis holds the queue, claims, capacity leases,
cancel flags and the event streams. Guarantees (each step safe to run at any time, by
any number of replicas at once):
- ``ensure_leases``: when ``QUEUE_EPOCH`` does not name the Redis server now running
  (it restarted, with its append-only file or empty, or failed over), every active task
  (dispatching, running, cancelling) that holds no lease gets its lease back, and then
  the epoch is set. Admission claims with the epoch guard, so no task is admitted
  against leases Redis forgot: capacity is never exceeded. A task that ends while its
  lease is being restored leaves a lease the reconciler's leak check frees later
  (capacity under-used for ``dispatcher.lease_grace_s``, never over-committed).
- ``restore_cancel_flags``: every ``cancelling`` task has its cancel flag, so a job
  still running after Redis lost the flag is told to stop.
- Queued tasks missing from the queue and events left in the outbox are the
  reconciler's ``queued`` step and ``Lifecycle.sweep_outbox``.

Pool workers' GPUs are leased by the workers themselves (``bus.pools``); a pooled task
gets no lease of its own here. Instead, before the epoch is set, every live worker
process of a pooled model (as the executor lists them) gets its GPU lease back, so
admission never hands its GPUs to anyone else, and it registers itself again at its
next heartbeat; an active pooled task on such a worker gets its attempt's fence back
(from the database's worker and attempt), so the worker's events for it still count.
"""

from __future__ import annotations

import logging

from vidmaas.bus import control
from vidmaas.bus import recovery as state
from vidmaas.bus.pools import PoolRegistry
from vidmaas.dispatcher.context import DispatcherContext
from vidmaas.dispatcher.executors.base import PoolExecutor
from vidmaas.domain.ids import is_worker_id, model_slug, worker_model_slug
from vidmaas.domain.status import ACTIVE, TaskStatus
from vidmaas.logs import TaskLog

log = logging.getLogger(__name__)
tlog = TaskLog(log)


class Recovery:
    """The rebuild steps of one dispatcher replica."""

    def __init__(self, ctx: DispatcherContext) -> None:
        self.ctx = ctx
        self.registry = PoolRegistry(ctx.redis)

    async def ensure_leases(self) -> int | None:
        """Rebuild leases if this Redis server has not had them rebuilt yet; the number
        restored, or None when the epoch was current (nothing to do)."""
        ctx = self.ctx
        current, run_id = await state.epoch_and_run_id(ctx.redis)
        if current == run_id:
            return None
        restored = 0
        workers = await self._restore_workers()
        for task in await ctx.with_status(*ACTIVE):
            if task.job_name is not None and is_worker_id(task.job_name):
                if task.job_name in workers and await self.registry.restore_fence(
                        task_id=task.id, worker_id=task.job_name, attempt=task.attempts):
                    tlog.warning(task.id, "fence of attempt %d on %s restored", task.attempts,
                                 task.job_name)
                continue
            start = task.dispatched_at or task.updated_at
            if await state.restore_lease(ctx.redis, task_id=task.id, user_id=task.user_id,
                                         gpus=task.gpus, start_ms=int(start.timestamp() * 1000),
                                         model=task.model):
                restored += 1
                tlog.warning(task.id, "%s without a capacity lease; lease of %d GPU(s) "
                             "restored", task.status.value, task.gpus)
        await state.set_epoch(ctx.redis, run_id)
        log.warning("dispatcher %s: Redis server %s had no rebuilt leases; %d restored",
                    ctx.id, run_id, restored)
        return restored

    async def _restore_workers(self) -> set[str]:
        """Give every live pool worker process of a pooled model its GPU lease back (it
        registers itself again at its next heartbeat); their ids."""
        ctx = self.ctx
        executor = ctx.executor
        if not isinstance(executor, PoolExecutor) or not ctx.settings.pools.enabled:
            return set()
        slugs = {model_slug(m): m for m in ctx.settings.pools.models}
        live: set[str] = set()
        for worker_id in await executor.list_workers():
            model = ctx.registry.get(slugs.get(worker_model_slug(worker_id), ""))
            if model is None:
                continue
            live.add(worker_id)
            if await self.registry.restore_worker(worker_id=worker_id, gpus=model.gpus_per_job):
                log.warning("pools: %s is alive without a GPU lease; lease of %d GPU(s) "
                            "restored", worker_id, model.gpus_per_job)
        return live

    async def restore_cancel_flags(self) -> int:
        """Set the cancel flag of every ``cancelling`` task that lost it; how many."""
        ctx = self.ctx
        n = 0
        for task in await ctx.with_status(TaskStatus.CANCELLING):
            if await control.cancel_requested(ctx.redis, task.id) is None:
                await control.request_cancel(ctx.redis, task.id, by="recovery")
                tlog.warning(task.id, "cancelling without a cancel flag; flag set again")
                n += 1
        return n
