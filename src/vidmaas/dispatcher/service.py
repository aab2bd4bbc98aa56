"""The dispatcher: one replica's parts, composed and run as supervised loops (DESIGN §2, §3).

The parts, each with its own guarantees: ``admission`` (claims within capacity, in
fair order, and launches), ``outcomes`` (job states → task transitions, the cancel
scan), ``watchdog`` (silent, overdue and stuck-dispatching tasks), ``reconciler``
(repairs after crashes and lost messages), ``pools`` (warm workers: assignment,
replacement, scaling), all over one ``context``.

Guarantees of ``Dispatcher`` (with any number of replicas over one Redis and one
database; correctness comes from compare-and-set, not from being alone):
- No task is lost and none runs two jobs of the same attempt, whenever a replica is
  killed: admission's compare-and-set and idempotent launch, and the reconciler's
  takeover of expired claims, together make every interrupted move finish once.
- ``run()`` reconciles before it admits: admission and the cancel scan start once the
  first reconcile pass has run (``ready``). Then admission, job updates, the cancel
  scan and the sweep (reconciler, watchdog, registration in ``keys.DISPATCHERS``,
  metrics snapshot, liveness heartbeat; every ``dispatcher.reconcile_interval_s``) and
  the outbox sweep (every ``outbox.sweep_interval_s``) run as named asyncio tasks,
  each restarted with a backoff if it fails.
- ``stop()`` is graceful: each loop finishes the claim or update it is handling
  (bookkeeping is never cut in half by our own shutdown) and returns; a blocked
  queue wait is ended by closing its private connection, not by cancellation; only a
  loop still busy after ``dispatcher.stop_timeout_s`` is cancelled. The replica then
  leaves ``keys.DISPATCHERS``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

from vidmaas.aio import supervise
from vidmaas.bus import keys
from vidmaas.db import tasks as repo
from vidmaas.db.models import Task
from vidmaas.dispatcher.admission import Admission
from vidmaas.dispatcher.context import DispatcherContext
from vidmaas.dispatcher.executors.base import Executor
from vidmaas.dispatcher.outcomes import Outcomes
from vidmaas.dispatcher.pools import Pools
from vidmaas.dispatcher.reconciler import Reconciler
from vidmaas.dispatcher.watchdog import Watchdog
from vidmaas.domain.jobs import JobSpec
from vidmaas.domain.models import ModelRegistry
from vidmaas.metrics import Heartbeat, Metrics
from vidmaas.services import Services

log = logging.getLogger(__name__)


class Dispatcher:
    """One dispatcher replica. ``await run()`` until ``stop()``; ``admit()``,
    ``watchdog()`` and ``reconcile()`` run one pass of a part (tests drive them)."""

    def __init__(self, services: Services, executor: Executor, *,
                 dispatcher_id: str | None = None, test_hooks: bool = False,
                 metrics: Metrics | None = None, heartbeat: Heartbeat | None = None) -> None:
        """``services``: the database, Redis, lifecycle and model registry it works on;
        ``metrics``: where launches, the dispatch gap and queue/capacity snapshots are
        recorded; ``heartbeat``: beaten by the admission and sweep loops (liveness probe);
        ``test_hooks``: honour ``keys.TEST_HOOK`` pauses (crash tests only)."""
        self.ctx = DispatcherContext(services, executor, dispatcher_id=dispatcher_id,
                                     test_hooks=test_hooks, metrics=metrics,
                                     heartbeat=heartbeat)
        self.pools = Pools(self.ctx)
        self._admission = Admission(self.ctx, self.pools)
        self._outcomes = Outcomes(self.ctx, self.pools)
        self._watchdog = Watchdog(self.ctx, self._outcomes)
        self._reconciler = Reconciler(self.ctx, admission=self._admission,
                                      outcomes=self._outcomes)

    @property
    def id(self) -> str:
        return self.ctx.id

    @property
    def registry(self) -> ModelRegistry:
        return self.ctx.registry

    @property
    def ready(self) -> asyncio.Event:
        """Set once the first reconcile pass has run."""
        return self.ctx.ready

    @property
    def launched(self) -> int:
        """Jobs this replica launched."""
        return self._admission.launched

    # ------------------------------------------------------------------ running

    def stop(self) -> None:
        self.ctx.stopping.set()

    async def run(self) -> None:
        """Reconcile, then run admission, updates, cancel scan and sweeps until ``stop()``."""
        ctx = self.ctx
        log.info("dispatcher %s starting (executor %s, capacity %d GPUs)", ctx.id,
                 ctx.executor.name, ctx.settings.gpu_capacity)
        parts: dict[str, Callable[[], Awaitable[None]]] = {
            "admission": self._admission.run,
            "job-updates": self._outcomes.run_updates,
            "cancels": self._outcomes.run_cancels,
            "sweep": self._sweep_loop,
            "outbox": self._outbox_loop,
        }
        if self.pools.pooled:
            parts["pools"] = self._pools_loop
        tasks = [asyncio.create_task(self._supervise(name, fn), name=f"dispatcher-{name}")
                 for name, fn in parts.items()]
        try:
            await ctx.stopping.wait()
        finally:
            ctx.stopping.set()
            await self._admission.interrupt()
            _done, pending = await asyncio.wait(tasks, timeout=ctx.cfg.stop_timeout_s)
            for t in pending:
                log.warning("dispatcher %s: %s did not stop in time; cancelling", ctx.id,
                            t.get_name())
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            with contextlib.suppress(Exception):
                await ctx.redis.zrem(keys.DISPATCHERS, ctx.id)
            log.info("dispatcher %s stopped", ctx.id)

    async def _supervise(self, name: str, fn: Callable[[], Awaitable[None]]) -> None:
        await supervise(f"dispatcher {self.ctx.id}: {name}", fn, stopping=self.ctx.stopping,
                        log=log)

    async def _sweep_loop(self) -> None:
        ctx = self.ctx
        while not ctx.stopping.is_set():
            try:
                await self.reconcile()
            finally:
                ctx.ready.set()
            await self.watchdog()
            await ctx.redis.zadd(keys.DISPATCHERS, {ctx.id: int(time.time() * 1000)})
            ctx.beat()
            if ctx.metrics is not None:
                await self._export_snapshot(ctx.metrics)
            await ctx.until_next_sweep(ctx.cfg.reconcile_interval_s)

    async def _outbox_loop(self) -> None:
        """Publish what the outbox holds (a crash, a Redis outage) every
        ``outbox.sweep_interval_s``; the reconciler's pass does the same."""
        ctx = self.ctx
        await ctx.wait_ready()
        while not ctx.stopping.is_set():
            swept = await ctx.lifecycle.sweep_outbox()
            if ctx.metrics is not None:
                ctx.metrics.set_outbox_pending(swept.pending)
            await ctx.pause(ctx.settings.outbox.sweep_interval_s)

    async def _pools_loop(self) -> None:
        ctx = self.ctx
        await ctx.wait_ready()
        while not ctx.stopping.is_set():
            await self.pools.manage()
            await ctx.pause(ctx.settings.pools.manage_interval_s)

    async def _export_snapshot(self, metrics: Metrics) -> None:
        ctx = self.ctx
        try:
            metrics.set_capacity(in_use=await ctx.queue.gpus_in_use(),
                                 capacity=ctx.settings.gpu_capacity)
            metrics.set_queue_depths(await ctx.queue.depths())
            async with ctx.services.sessions() as session:
                metrics.set_task_counts(await repo.count_by_status(session=session))
        except Exception:
            log.exception("dispatcher %s: metrics snapshot failed", ctx.id)

    # ------------------------------------------------------------------ one pass of a part

    async def admit(self) -> int:
        """Promote due retries, then launch tasks until the queue yields none."""
        return await self._admission.admit()

    def job_spec(self, task: Task, attempt: int) -> JobSpec:
        """The job admission would launch for ``task``'s attempt."""
        return self._admission.job_spec(task, attempt)

    async def watchdog(self) -> None:
        """One watchdog pass."""
        await self._watchdog.check()

    async def reconcile(self) -> None:
        """One reconcile pass."""
        await self._reconciler.reconcile()
