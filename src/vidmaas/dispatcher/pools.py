"""Warm pools: starting, assigning to, replacing and scaling workers (DESIGN §12).

Guarantees (with any number of dispatcher replicas; the shared state is in Redis,
``bus.pools``, and every change is a compare-and-set there):
- Which models are pooled: those named in ``pools.models`` while ``pools.enabled``
  and the executor can run workers; every other model keeps one job per task.
- ``assign`` hands a task that admission claimed onto an idle worker to that worker,
  fenced by the task's attempt: the task is ``dispatching`` with the worker as its
  job, then ``running`` once the assignment is sent. A worker that died in between
  makes the task retry (``worker_lost``) within the attempt limit.
- ``manage`` (every ``pools.manage_interval_s``): a worker whose lease ran out, or
  whose process ended, or that the executor reports stuck, is retired — its GPUs
  freed, its process killed if it lingers, and the task it was busy with (if that
  attempt is still its) retried; a worker a claim marked busy but that never got the
  assignment goes back to idle; a process with no registration is stopped (deleted)
  once it has ended or stayed so for a whole ``pools.worker_lease_s`` (a live worker
  registers again after Redis lost its data, ``bus.pools``). The pass does nothing
  while Redis has lost its data and its leases are not rebuilt yet
  (``dispatcher.recovery``). Then
  ``domain.pools.plan_pools`` decides what to start (its GPUs reserved before the
  process starts, so capacity is never overcommitted) and which idle workers to drain
  (they exit by themselves).
- A model whose workers end before they are ready (a missing model directory, a
  crash while loading) is not restarted in a tight loop: each such end in a row holds
  its next start back longer (1 s, doubling, at most ``START_BACKOFF_MAX_S``), until
  one of its workers is ready again. The hold is this replica's own. After
  ``pools.max_failed_starts`` such ends in a row the model is *unavailable*: its
  queued tasks fail (``model_unavailable``, not retried), and so do those queued
  when a later start fails too, instead of waiting for ever; a worker that becomes
  ready clears it.
- ``cancel`` of a pooled task relies on the cancel flag the worker checks between
  steps; a worker still on the task ``dispatcher.cancel_grace_s`` later is killed and
  replaced.
- Every scaling decision is logged with its reason and counted in the metrics, with
  the workers per model and state, assignments, and cold starts avoided.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Mapping

from vidmaas.bus import recovery as state
from vidmaas.bus.control import cancel_requested
from vidmaas.bus.pools import PoolRegistry, Worker, WorkerState
from vidmaas.bus.queue import Claim
from vidmaas.db.models import Task
from vidmaas.dispatcher.context import DispatcherContext
from vidmaas.dispatcher.executors.base import JobStatus, PoolExecutor, WorkerSpec
from vidmaas.domain import events as ev
from vidmaas.domain.ids import is_worker_id, new_worker_id
from vidmaas.domain.jobs import JobSpec, job_args
from vidmaas.domain.models import MODEL_UNAVAILABLE
from vidmaas.domain.pools import Need, PoolConfig, PoolPlan, WorkerView, plan_pools
from vidmaas.domain.status import TaskStatus
from vidmaas.domain.workers import WorkerLimits, worker_args
from vidmaas.errors import VidmaasError
from vidmaas.logs import TaskLog

log = logging.getLogger(__name__)
tlog = TaskLog(log)

START_BACKOFF_S = 1.0
START_BACKOFF_MAX_S = 60.0


class Pools:
    """The pools of one dispatcher replica (see the module docstring)."""

    def __init__(self, ctx: DispatcherContext) -> None:
        self.ctx = ctx
        self.registry = PoolRegistry(ctx.redis)
        self.blocked: Need | None = None
        """The task admission last found at the head without enough free GPUs."""
        self._cancel_seen: dict[str, float] = {}
        cfg = ctx.settings.pools
        self.executor: PoolExecutor | None = \
            ctx.executor if isinstance(ctx.executor, PoolExecutor) else None
        self.configs: dict[str, PoolConfig] = {}
        if cfg.enabled and self.executor is not None:
            for model_id, pool in cfg.models.items():
                model = ctx.registry.get(model_id)
                if model is None:
                    log.warning("pools: %s is not in the model registry; no pool", model_id)
                    continue
                self.configs[model_id] = PoolConfig(
                    gpus=model.gpus_per_job, min_workers=pool.min_workers,
                    max_workers=pool.max_workers, idle_s=pool.idle_s)
        self.pooled = frozenset(self.configs)
        self._failed_starts: dict[str, int] = {}
        self._hold_until: dict[str, float] = {}
        """Model → when (monotonic) it may start a worker again after failed starts."""
        self._unregistered_since: dict[str, float] = {}
        """Worker process → when (monotonic) this replica first saw it unregistered."""
        self._orphan_checked: dict[str, float] = {}
        """Unregistered worker process → when (monotonic) its status was last asked."""

    @property
    def limits(self) -> WorkerLimits:
        cfg = self.ctx.settings.pools
        return WorkerLimits(lease_s=cfg.worker_lease_s, max_tasks=cfg.max_tasks_per_worker,
                            max_failures=cfg.max_failures, max_rss_mib=cfg.max_rss_mib)

    # ------------------------------------------------------------------ assigning

    async def assign(self, claim: Claim, task: Task, spec: JobSpec) -> bool:
        """Send a ``dispatching`` task's attempt to the worker its claim chose; then it is
        ``running``. False (and the task retried) if the worker is gone."""
        ctx = self.ctx
        worker_id = claim.worker_id
        assert worker_id is not None
        worker = await self.registry.get(worker_id)
        warm = worker is not None and worker.tasks_done > 0
        if not await self.registry.assign(worker_id=worker_id, task_id=task.id,
                                          attempt=task.attempts, args=job_args(spec)):
            tlog.warning(task.id, "worker %s is gone before its assignment", worker_id)
            await ctx.fail_or_retry(task, code="worker_lost", retryable=True,
                                    message=f"pool worker {worker_id} ended before the task "
                                            "reached it")
            return False
        tlog.info(task.id, "assigned to pool worker %s (attempt %d%s)", worker_id,
                  task.attempts, ", warm" if warm else "")
        if ctx.metrics is not None:
            ctx.metrics.observe_assignment(model=task.model, warm=warm)
        try:
            await ctx.lifecycle.transition(task_id=task.id, to=TaskStatus.RUNNING,
                                           expected=TaskStatus.DISPATCHING)
        except VidmaasError as e:
            tlog.info(task.id, "not moved to running (%s)", e)
        return True

    async def reassign(self, task: Task, spec: JobSpec) -> None:
        """A ``dispatching`` pooled task whose dispatcher died before or after sending
        it: send it again (a no-op if it was sent), or retry it if the worker is gone."""
        worker_id = task.job_name or ""
        claim = Claim(task.id, task.user_id, task.gpus, task.model, worker_id)
        await self.assign(claim, task, spec)

    # ------------------------------------------------------------------ cancels

    async def cancel_pass(self, task: Task) -> None:
        """A ``cancelling`` pooled task: the worker stops at its next step; one still on
        it after the grace is killed (and replaced)."""
        ctx = self.ctx
        first = self._cancel_seen.setdefault(task.id, time.monotonic())
        if time.monotonic() - first < ctx.cfg.cancel_grace_s:
            return
        worker_id = task.job_name or ""
        worker = await self.registry.get(worker_id)
        if worker is not None and worker.task_id == task.id and self.executor is not None:
            tlog.warning(task.id, "pool worker %s did not stop within %.0fs; killing it",
                         worker_id, ctx.cfg.cancel_grace_s)
            await self.executor.stop_worker(worker_id, grace_s=0)
        self._cancel_seen.pop(task.id, None)

    # ------------------------------------------------------------------ managing

    async def on_worker_status(self, status: JobStatus) -> None:
        """The executor reports a worker's process ended, or the worker stuck (its image
        cannot be pulled, its pods cannot be scheduled): retire it at once."""
        if not is_worker_id(status.job_name):
            return
        if status.state.finished:
            await self._retire(status.job_name, why=f"its process ended "
                                                    f"(exit code {status.exit_code})")
        elif status.stuck:
            await self._retire(status.job_name, why=f"it is stuck ({status.reason}: "
                                                    f"{status.message})")

    async def manage(self) -> PoolPlan:
        """One pass: retire the lost, then scale (see the module docstring)."""
        ctx = self.ctx
        if self.executor is None:
            return PoolPlan()
        current, run_id = await state.epoch_and_run_id(ctx.redis)
        if current != run_id:
            return PoolPlan()  # Redis lost its data: admission rebuilds it first
        workers = await self.registry.workers()
        processes = set(await self.executor.list_workers())
        now_ms = int(time.time() * 1000)
        for w in workers:
            if w.alive and w.state in (WorkerState.IDLE, WorkerState.BUSY):
                self._failed_starts.pop(w.model, None)
                self._hold_until.pop(w.model, None)
            if not w.alive:
                await self._retire(w.id, why="its lease ran out")
            elif w.state is not WorkerState.STARTING and w.id not in processes:
                await self._retire(w.id, why="its process is gone")
            elif w.state is WorkerState.BUSY and w.attempt is None and w.task_id:
                await self._unclaim_if_abandoned(w)
        known = {w.id for w in workers}
        seen = time.monotonic()
        for wid in list(self._unregistered_since):
            if wid not in processes or wid in known:
                del self._unregistered_since[wid]
                self._orphan_checked.pop(wid, None)
        lease_s = ctx.settings.pools.worker_lease_s
        for orphan in processes - known:
            # A live worker registers again within a quarter of its lease (Redis lost
            # its data): only one ended, or unregistered for a whole lease, is stopped.
            # Whether it ended is asked once per quarter lease, not on every pass.
            since = self._unregistered_since.setdefault(orphan, seen)
            if seen - since < lease_s:
                if seen - self._orphan_checked.get(orphan, -lease_s) < lease_s / 4:
                    continue
                self._orphan_checked[orphan] = seen
                if not (await self.executor.worker_status(orphan)).state.finished:
                    continue
            del self._unregistered_since[orphan]
            self._orphan_checked.pop(orphan, None)
            log.warning("pools: worker process %s has no registration; stopping it", orphan)
            await self.executor.stop_worker(orphan, grace_s=ctx.settings.pools.stop_grace_s)
        workers = [w for w in await self.registry.workers() if w.alive]
        plan = plan_pools(
            pools=self.configs,
            workers=[WorkerView(w.id, w.model, w.state.value,
                                (now_ms - w.since_ms) / 1000
                                if w.state is WorkerState.IDLE else None, w.alive)
                     for w in workers],
            queued=await ctx.queue.queued_by_model(),
            free_gpus=ctx.settings.gpu_capacity - await ctx.queue.gpus_in_use(),
            blocked=self.blocked)
        for model in plan.start:
            if time.monotonic() < self._hold_until.get(model, 0.0):
                continue  # its last workers ended before they were ready
            await self._start(model, why=plan.reasons.get(model, ""))
        for worker_id in plan.drain:
            if await self.registry.drain(worker_id, only_if_idle=True):
                log.info("pools: draining %s: %s", worker_id, plan.reasons.get(worker_id, ""))
                if ctx.metrics is not None:
                    ctx.metrics.observe_scaling(action="drain")
        if ctx.metrics is not None:
            ctx.metrics.set_pool_workers(self._census(await self.registry.workers()))
        return plan

    async def _start(self, model_id: str, *, why: str) -> None:
        ctx = self.ctx
        assert self.executor is not None
        model = ctx.registry.get_or_raise(model_id)
        worker_id = new_worker_id(model_id)
        if not await self.registry.reserve(
                worker_id=worker_id, model=model_id, gpus=model.gpus_per_job,
                capacity=ctx.settings.gpu_capacity,
                start_lease_s=ctx.settings.pools.start_timeout_s):
            return  # the GPUs went to someone else meanwhile: next pass decides again
        spec = WorkerSpec(worker_id=worker_id, model=model, args=worker_args(model, self.limits),
                          labels={"vidmaas.io/pool": model_id})
        try:
            await self.executor.start_worker(spec)
        except Exception as e:
            log.warning("pools: starting %s for %s failed: %s", worker_id, model_id, e)
            await self.registry.retire(worker_id)
            await self._start_failed(model_id)
            return
        log.info("pools: started %s for %s (%d GPUs): %s", worker_id, model_id,
                 model.gpus_per_job, why)
        if ctx.metrics is not None:
            ctx.metrics.observe_scaling(action="start")

    async def _start_failed(self, model_id: str) -> None:
        n = self._failed_starts.get(model_id, 0) + 1
        self._failed_starts[model_id] = n
        hold_s = min(START_BACKOFF_MAX_S, START_BACKOFF_S * 2 ** (n - 1))
        self._hold_until[model_id] = time.monotonic() + hold_s
        log.warning("pools: %d %s worker(s) in a row ended before they were ready; the next "
                    "start waits %.0fs", n, model_id, hold_s)
        limit = self.ctx.settings.pools.max_failed_starts
        if limit and n >= limit:
            await self._fail_queued(model_id, failed_starts=n)

    def unavailable(self, model_id: str) -> bool:
        """Has ``model_id`` had ``pools.max_failed_starts`` workers in a row end before
        they were ready (on this replica), with none ready since?"""
        limit = self.ctx.settings.pools.max_failed_starts
        return bool(limit) and self._failed_starts.get(model_id, 0) >= limit

    async def _fail_queued(self, model_id: str, *, failed_starts: int) -> None:
        """The model is unavailable: fail its queued tasks (``model_unavailable``, not
        retried) rather than let them wait for a worker that never loads."""
        ctx = self.ctx
        message = (f"model {model_id} is unavailable: its last {failed_starts} pool workers "
                   "ended before they had loaded it (see the dispatcher's log); try again "
                   "later or ask the operator")
        failed = 0
        for task in await ctx.with_status(TaskStatus.QUEUED, model=model_id):
            if await ctx.fail_unavailable(task, message=message):
                tlog.warning(task.id, "failed (%s): %d %s workers in a row never loaded",
                             MODEL_UNAVAILABLE, failed_starts, model_id)
                failed += 1
        log.warning("pools: %s is unavailable after %d failed starts in a row; %d queued "
                    "task(s) failed", model_id, failed_starts, failed)
        if failed:
            await ctx.queue.announce_move()

    async def _retire(self, worker_id: str, *, why: str) -> None:
        ctx = self.ctx
        before = await self.registry.get(worker_id)
        if before is not None and before.state is WorkerState.STARTING:
            await self._start_failed(before.model)
        task_id, attempt = await self.registry.retire(worker_id)
        log.info("pools: retired %s: %s", worker_id, why)
        if ctx.metrics is not None:
            ctx.metrics.observe_scaling(action="retire")
        if self.executor is not None:
            status = await self.executor.worker_status(worker_id)
            if not status.state.finished:
                await self.executor.stop_worker(worker_id, grace_s=0)
        if task_id is None:
            return
        task = await ctx.get(task_id)
        if task is None or not task.status.active or task.job_name != worker_id \
                or (attempt is not None and task.attempts != attempt):
            return
        if task.status is TaskStatus.CANCELLING:
            by = await cancel_requested(ctx.redis, task_id) or "user"
            with contextlib.suppress(VidmaasError):
                await ctx.lifecycle.finish(task_id=task_id, to=TaskStatus.CANCELLED,
                                           expected=TaskStatus.CANCELLING,
                                           event=ev.cancelled(task_id, by=by))
            return
        tlog.warning(task_id, "pool worker %s was lost (%s); retrying", worker_id, why)
        await ctx.fail_or_retry(task, code="worker_lost", retryable=True,
                                message=f"pool worker {worker_id} was lost: {why}")

    async def _unclaim_if_abandoned(self, worker: Worker) -> None:
        """A claim marked this worker busy but no assignment followed: if the task is no
        longer claimed nor dispatched to it, the worker is idle again."""
        tid = worker.task_id
        assert tid is not None
        if await self.ctx.queue.is_claimed(tid):
            return
        task = await self.ctx.get(tid)
        if task is not None and task.status.active and task.job_name == worker.id:
            return
        if await self.registry.unclaim(worker.id, tid):
            log.info("pools: %s was claimed for %s but never assigned; idle again", worker.id,
                     tid)

    @staticmethod
    def _census(workers: list[Worker]) -> Mapping[tuple[str, str], int]:
        out: dict[tuple[str, str], int] = {}
        for w in workers:
            key = (w.model, w.state.value if w.alive else "lost")
            out[key] = out.get(key, 0) + 1
        return out
