"""The dispatcher: fair GPU admission, job launch, watchdog, reconciler (DESIGN §2, §3).

Guarantees (with any number of dispatcher replicas over one Redis and one database):
- Capacity: a job is launched only for a task whose GPUs ``TaskQueue.claim_next``
  acquired atomically, so the GPUs held never exceed ``gpu_capacity``.
- Order: tasks are taken in the queue's fair order (round-robin across users, FIFO
  within a user) under the per-user running cap.
- No busy loop: the admission loop takes tasks until the queue says it cannot, then
  sleeps on the queue's wake-up signal (pushed on enqueue and on every capacity
  release), so a freed slot is refilled within milliseconds. It also wakes for the
  next due retry and at least every ``dispatcher.wake_max_s``.
- Crash safety: a task moves ``queued → dispatching`` by compare-and-set before its
  job is launched, the job name derives from the task id and launch is idempotent,
  and the queue entry is acknowledged only once the task is ``running``. A dispatcher
  killed at any point leaves an unacknowledged claim whose lease expires; the
  reconciler of any dispatcher then finishes the move from the database status
  (still queued: back to the front of the queue; dispatching: launch again, which
  finds the job if it exists, then ``running``). So no task is lost and none runs
  two jobs of the same attempt.
- Failures go through ``Lifecycle.fail_or_retry`` (the one retry rule). A job that
  ends without a terminal event of its own fails or retries the task by its exit
  code; when the task's stream already holds a terminal event for this attempt, the
  relay applies it and the dispatcher leaves the task alone.
- Every long-running part is a named asyncio task, restarted with a backoff if it
  fails. ``stop()`` is graceful: a loop finishes the claim or update it is handling
  (bookkeeping is never cut in half by our own shutdown) and then returns; a blocked
  queue wait is ended by closing its private connection, not by cancellation.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

import redis.asyncio as aioredis

from vidmaas.aio import pause, supervise
from vidmaas.bus import keys
from vidmaas.bus.control import cancel_requested
from vidmaas.bus.events import attempt_result
from vidmaas.bus.queue import Claim, TaskQueue
from vidmaas.db import tasks as repo
from vidmaas.db.models import Task
from vidmaas.dispatcher.executors.base import Executor, JobState, JobStatus
from vidmaas.domain import events as ev
from vidmaas.domain.ids import job_name as job_name_of
from vidmaas.domain.ids import task_id_from_job_name
from vidmaas.domain.jobs import JobSpec, exit_code_retryable
from vidmaas.domain.status import TaskStatus
from vidmaas.errors import VidmaasError
from vidmaas.logs import TaskLog
from vidmaas.metrics import Heartbeat, Metrics
from vidmaas.services import Services

log = logging.getLogger(__name__)
tlog = TaskLog(log)


def new_dispatcher_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


def _age_s(stamp: datetime | None, now: datetime) -> float | None:
    return None if stamp is None else (now - stamp).total_seconds()


class Dispatcher:
    """One dispatcher replica. ``await run()`` until ``stop()``."""

    def __init__(self, services: Services, executor: Executor, *,
                 dispatcher_id: str | None = None, test_hooks: bool = False,
                 metrics: Metrics | None = None, heartbeat: Heartbeat | None = None) -> None:
        """``services``: the database, Redis, lifecycle and model registry it works on;
        ``metrics``: where launches, the dispatch gap and queue/capacity snapshots are
        recorded; ``heartbeat``: beaten by the admission and sweep loops (liveness probe);
        ``test_hooks``: honour ``keys.TEST_HOOK`` pauses (crash tests only)."""
        self.settings = services.settings
        self.cfg = services.settings.dispatcher
        self.sessions = services.sessions
        self.redis = services.redis
        self.executor = executor
        self.registry = services.registry
        self.id = dispatcher_id or new_dispatcher_id()
        self.lifecycle = services.lifecycle
        self.queue = TaskQueue(services.redis)
        self._test_hooks = test_hooks
        self._stopping = asyncio.Event()
        self._cancel_sent: set[str] = set()
        self._waiter_pool: aioredis.ConnectionPool | None = None
        self.ready = asyncio.Event()
        """Set once the first reconcile pass has run."""
        self.launched = 0
        self.metrics = metrics
        self.heartbeat = heartbeat
        self._woke_at = time.monotonic()

    # ------------------------------------------------------------------ lifecycle

    def stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        """Reconcile, then run admission, updates, cancel scan and sweeps until ``stop()``.

        Stopping is graceful: each loop finishes the step it is in (a claim being
        dispatched is finished, not abandoned) and returns; only a loop that does not
        return within ``dispatcher.stop_timeout_s`` is cancelled.
        """
        log.info("dispatcher %s starting (executor %s, capacity %d GPUs)", self.id,
                 self.executor.name, self.settings.gpu_capacity)
        parts: dict[str, Callable[[], Awaitable[None]]] = {
            "admission": self._admission_loop,
            "job-updates": self._updates_loop,
            "cancels": self._cancel_loop,
            "sweep": self._sweep_loop,
        }
        tasks = [asyncio.create_task(self._supervise(name, fn), name=f"dispatcher-{name}")
                 for name, fn in parts.items()]
        try:
            await self._stopping.wait()
        finally:
            self._stopping.set()
            if self._waiter_pool is not None:
                # Fails the blocked BLPOP at once; cancelling it instead can wedge the pool.
                await self._waiter_pool.disconnect()
            _done, pending = await asyncio.wait(tasks, timeout=self.cfg.stop_timeout_s)
            for t in pending:
                log.warning("dispatcher %s: %s did not stop in time; cancelling", self.id,
                            t.get_name())
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            with contextlib.suppress(Exception):
                await self.redis.zrem(keys.DISPATCHERS, self.id)
            log.info("dispatcher %s stopped", self.id)

    async def _supervise(self, name: str, fn: Callable[[], Awaitable[None]]) -> None:
        await supervise(f"dispatcher {self.id}: {name}", fn, stopping=self._stopping, log=log)

    async def _pause(self, seconds: float) -> None:
        """Sleep, but wake at once on ``stop()``."""
        await pause(self._stopping, seconds)

    async def _hook(self, step: str) -> None:
        """Crash tests pause here (``keys.TEST_HOOK``), to kill the process at this step."""
        if not self._test_hooks:
            return
        value = await self.redis.hget(keys.TEST_HOOK, step)
        if value:
            log.warning("dispatcher %s: test hook pauses %ss at %s", self.id, value, step)
            await asyncio.sleep(float(value))

    async def _get(self, task_id: str) -> Task | None:
        async with self.sessions() as session:
            return await repo.get_task(session=session, task_id=task_id)

    async def _with_status(self, *statuses: TaskStatus) -> list[Task]:
        async with self.sessions() as session:
            return await repo.tasks_with_status(session=session, statuses=statuses)

    # ------------------------------------------------------------------ admission

    async def _admission_loop(self) -> None:
        await self._wait_ready()
        # The blocking wait gets a connection of its own, which stop() closes to end it.
        shared = self.redis.connection_pool
        pool = type(shared)(connection_class=shared.connection_class, max_connections=1,
                            **shared.connection_kwargs)
        self._waiter_pool = pool
        waiter = TaskQueue(aioredis.Redis(connection_pool=pool))
        try:
            while not self._stopping.is_set():
                self._woke_at = time.monotonic()
                if self.heartbeat is not None:
                    self.heartbeat.beat()
                if await self.admit() and self.metrics is not None:
                    self.metrics.set_capacity(in_use=await self.queue.gpus_in_use(),
                                              capacity=self.settings.gpu_capacity)
                    self.metrics.set_queue_depths(await self.queue.depths())
                timeout_s = min(self.cfg.reconcile_interval_s, self.cfg.wake_max_s)
                due_s = await self.queue.next_due_in_s()
                if due_s is not None:
                    timeout_s = max(0.005, min(timeout_s, due_s + 0.005))
                if self._stopping.is_set():
                    break
                await waiter.wait_signal(timeout_s)
        finally:
            self._waiter_pool = None
            await pool.disconnect()

    async def _wait_ready(self) -> None:
        ready = asyncio.create_task(self.ready.wait(), name="dispatcher-wait-ready")
        stopping = asyncio.create_task(self._stopping.wait(), name="dispatcher-wait-stop")
        await asyncio.wait({ready, stopping}, return_when=asyncio.FIRST_COMPLETED)
        for t in (ready, stopping):
            t.cancel()
        await asyncio.gather(ready, stopping, return_exceptions=True)

    async def promote_due_retries(self) -> int:
        n = 0
        for task_id, _user in await self.queue.promote_due():
            task = await self._get(task_id)
            if task is None or task.status is not TaskStatus.QUEUED:
                continue
            await self.lifecycle.enqueue(task, front=True)
            tlog.info(task_id, "retry due, back at the front of the queue")
            n += 1
        return n

    async def admit(self) -> int:
        """Promote due retries, then launch tasks until the queue yields none."""
        await self.promote_due_retries()
        started = 0
        while not self._stopping.is_set():
            res = await self.queue.claim_next(
                dispatcher_id=self.id, capacity=self.settings.gpu_capacity,
                per_user_cap=self.cfg.per_user_running_cap, lease_s=self.cfg.claim_lease_s)
            if res.claim is None:
                break
            await self._dispatch_claim(res.claim)
            started += 1
        if started:
            await self.queue.announce_move()
        return started

    def _spec(self, task: Task, attempt: int) -> JobSpec:
        model = self.registry.get_or_raise(task.model)
        return JobSpec(task_id=task.id, job_name=job_name_of(task.id), user_id=task.user_id,
                       model=model, prompt=task.prompt, params=dict(task.params),
                       attempt=attempt, input_key=task.input_key,
                       negative_prompt=task.negative_prompt,
                       labels={"vidmaas.io/task-id": task.id, "vidmaas.io/user-id": task.user_id})

    async def _dispatch_claim(self, claim: Claim) -> None:
        tid = claim.task_id
        name = job_name_of(tid)
        await self._hook("after_claim")
        # The compare-and-set is the read: it only succeeds on a task still queued, and
        # returns the row, so the hot path makes no separate read first.
        try:
            task = await self.lifecycle.transition(
                task_id=tid, to=TaskStatus.DISPATCHING, expected=TaskStatus.QUEUED,
                fields={"attempts": Task.attempts + 1, "job_name": name,
                        "executor": self.executor.name})
        except VidmaasError as e:  # cancelled meanwhile, or gone
            current = await self._get(tid)
            tlog.info(tid, "claimed but not dispatchable (%s); dropping the claim", e)
            if current is None or not current.status.active:
                await self.lifecycle.release(tid)
            await self.queue.ack(tid)
            return
        await self.lifecycle.publish(ev.dispatched(tid, executor=self.executor.name,
                                                   job_name=name, attempt=task.attempts))
        await self._hook("after_dispatching")
        await self._launch_task(task)

    async def _launch_task(self, task: Task) -> None:
        """Build the job of a dispatching task and launch it; a task whose model is gone
        fails for good."""
        try:
            spec = self._spec(task, task.attempts)
        except VidmaasError as e:
            await self.fail_or_retry(task, code="unknown_model", message=e.message,
                                     retryable=False)
            await self.queue.ack(task.id)
            return
        await self._launch_and_run(task, spec)

    async def _launch_and_run(self, task: Task, spec: JobSpec) -> None:
        """Launch (idempotently) the job of a ``dispatching`` task, then mark it running."""
        tid = task.id
        try:
            await self.executor.launch(spec)
        except Exception as e:
            tlog.warning(tid, "launch of %s failed: %s", spec.job_name, e)
            await self.fail_or_retry(task, code="launch_failed",
                                     message=f"launch failed: {e}"[:2000], retryable=True)
            await self.queue.ack(tid)
            return
        self.launched += 1
        if self.metrics is not None:
            queued_s = _age_s(task.queued_at, datetime.now(UTC))
            self.metrics.observe_dispatch(executor=self.executor.name,
                                          gap_s=time.monotonic() - self._woke_at,
                                          queue_wait_s=queued_s or 0.0)
        tlog.info(tid, "launched job %s (attempt %d)", spec.job_name, spec.attempt)
        await self._hook("after_launch")
        try:
            await self.lifecycle.transition(task_id=tid, to=TaskStatus.RUNNING,
                                            expected=TaskStatus.DISPATCHING)
        except VidmaasError as e:
            # Cancelled or finished while launching: the cancel scan and the job updates
            # take it from here.
            tlog.info(tid, "not moved to running (%s)", e)
        await self.queue.ack(tid)

    # ------------------------------------------------------------------ job updates

    async def _updates_loop(self) -> None:
        updates = aiter(self.executor.updates())
        stopping = asyncio.create_task(self._stopping.wait(), name="dispatcher-updates-stop")
        try:
            while not self._stopping.is_set():
                nxt: asyncio.Task[JobStatus] = asyncio.create_task(
                    anext(updates), name="dispatcher-next-update")  # type: ignore[arg-type]
                await asyncio.wait({nxt, stopping}, return_when=asyncio.FIRST_COMPLETED)
                if not nxt.done():
                    nxt.cancel()  # waiting on the executor's queue: safe to cancel
                    await asyncio.gather(nxt, return_exceptions=True)
                    break
                status = nxt.result()
                try:
                    await self.on_job_status(status)
                except Exception:
                    log.exception("dispatcher %s: handling %s %s failed", self.id,
                                  status.job_name, status.state.value)
        except StopAsyncIteration:
            return
        finally:
            stopping.cancel()
            await asyncio.gather(stopping, return_exceptions=True)

    async def on_job_status(self, status: JobStatus, *, task: Task | None = None) -> None:
        """Map a job's state to its task (see the module docstring)."""
        if not status.state.finished and not status.stuck:
            return
        tid = task.id if task is not None else task_id_from_job_name(status.job_name)
        if tid is None:
            return
        task = task if task is not None else await self._get(tid)
        if task is None:
            return
        current = task.status
        if not current.active:
            return
        if task.job_name is not None and task.job_name != status.job_name:
            return
        if status.stuck and not status.state.finished:
            tlog.warning(tid, "job %s is stuck (%s); stopping it", status.job_name, status.reason)
            await self.executor.cancel(status.job_name, grace_s=0)
        if await attempt_result(self.redis, tid) is not None:
            tlog.info(tid, "job %s %s after reporting its result; the relay applies it",
                      status.job_name, status.state.value)
            return
        if current is TaskStatus.CANCELLING:
            by = await cancel_requested(self.redis, tid) or "user"
            with contextlib.suppress(VidmaasError):
                await self.lifecycle.finish(task_id=tid, to=TaskStatus.CANCELLED,
                                            expected=TaskStatus.CANCELLING,
                                            event=ev.cancelled(tid, by=by))
                tlog.info(tid, "job %s ended; cancelled", status.job_name)
            self._cancel_sent.discard(tid)
            return
        code, message, retryable = self._failure_of(status)
        tlog.warning(tid, "job %s %s without a result: %s", status.job_name, status.state.value,
                     code)
        await self.fail_or_retry(task, code=code, message=message, retryable=retryable)

    async def fail_or_retry(self, task: Task, *, code: str, message: str,
                            retryable: bool) -> Task | None:
        """``Lifecycle.fail_or_retry``, re-read and tried again while the task only moved
        between dispatching and running meanwhile (a job that ends while its launch is
        being recorded); None when the task left those states."""
        for _ in range(5):
            try:
                return await self.lifecycle.fail_or_retry(task, code=code, message=message,
                                                          retryable=retryable)
            except VidmaasError as e:
                fresh = await self._get(task.id)
                if fresh is None or fresh.status not in (
                        TaskStatus.DISPATCHING, TaskStatus.RUNNING) \
                        or fresh.status == task.status:
                    tlog.info(task.id, "%s not applied (%s)", code, e)
                    return None
                task = fresh
        return None

    @staticmethod
    def _failure_of(status: JobStatus) -> tuple[str, str, bool]:
        detail = f"\n{status.message}" if status.message else ""
        if status.stuck and not status.state.finished:
            return ("job_stuck", f"job {status.job_name} stuck: {status.reason}{detail}",
                    status.retryable)
        if status.state is JobState.MISSING:
            return "job_vanished", f"job {status.job_name} vanished{detail}", True
        retryable = exit_code_retryable(status.exit_code) if status.exit_code is not None \
            else status.retryable
        what = f"exited with code {status.exit_code}" if status.exit_code is not None \
            else f"failed ({status.reason or 'unknown reason'})"
        return ("job_failed",
                f"job {status.job_name} {what} without reporting a result{detail}", retryable)

    # ------------------------------------------------------------------ cancels

    async def _cancel_loop(self) -> None:
        await self._wait_ready()
        while not self._stopping.is_set():
            await self.handle_cancels()
            await self._pause(self.cfg.cancel_scan_interval_s)

    async def handle_cancels(self) -> None:
        """Stop the job of every ``cancelling`` task (once), and finish those whose job ended."""
        for task in await self._with_status(TaskStatus.CANCELLING):
            if task.executor not in (None, self.executor.name):
                continue
            job = task.job_name or job_name_of(task.id)
            if task.id not in self._cancel_sent:
                self._cancel_sent.add(task.id)
                tlog.info(task.id, "cancelling job %s (grace %.0fs)", job, self.cfg.cancel_grace_s)
                await self.executor.cancel(job, grace_s=self.cfg.cancel_grace_s)
            status = await self.executor.status(job)
            if status.state.finished:
                await self.on_job_status(status, task=task)

    # ------------------------------------------------------------------ sweeps

    async def _sweep_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                await self.reconcile()
            finally:
                self.ready.set()
            await self.watchdog()
            await self.redis.zadd(keys.DISPATCHERS, {self.id: int(time.time() * 1000)})
            if self.heartbeat is not None:
                self.heartbeat.beat()
            if self.metrics is not None:
                await self._export_snapshot(self.metrics)
            await self._pause(self.cfg.reconcile_interval_s)

    async def _export_snapshot(self, metrics: Metrics) -> None:
        try:
            metrics.set_capacity(in_use=await self.queue.gpus_in_use(),
                                 capacity=self.settings.gpu_capacity)
            metrics.set_queue_depths(await self.queue.depths())
            async with self.sessions() as session:
                metrics.set_task_counts(await repo.count_by_status(session=session))
        except Exception:
            log.exception("dispatcher %s: metrics snapshot failed", self.id)

    async def watchdog(self) -> None:
        """Fail or retry silent, overdue and stuck-dispatching tasks."""
        now = datetime.now(UTC)
        for task in await self._with_status(TaskStatus.RUNNING, TaskStatus.DISPATCHING):
            if task.executor not in (None, self.executor.name):
                continue
            try:
                await self._watch_task(task, now)
            except Exception:
                tlog.exception(task.id, "watchdog check failed")

    async def _watch_task(self, task: Task, now: datetime) -> None:
        tid = task.id
        job = task.job_name or job_name_of(tid)
        since_dispatch = _age_s(task.dispatched_at, now) or 0.0
        if task.status is TaskStatus.DISPATCHING:
            if since_dispatch <= self.cfg.dispatching_timeout_s or await self.queue.is_claimed(tid):
                return
            status = await self.executor.status(job)
            if status.state in (JobState.PENDING, JobState.RUNNING):
                tlog.info(tid, "dispatching too long but job %s is %s; running", job,
                          status.state.value)
                with contextlib.suppress(VidmaasError):
                    await self.lifecycle.transition(task_id=tid, to=TaskStatus.RUNNING,
                                                    expected=TaskStatus.DISPATCHING)
            elif status.state is JobState.MISSING:
                tlog.warning(tid, "dispatching for %.0fs and no job; retrying", since_dispatch)
                await self.fail_or_retry(
                    task, code="dispatch_timeout", retryable=True,
                    message=f"no job {job} after {since_dispatch:.0f}s dispatching")
            else:
                await self.on_job_status(status, task=task)
            return
        if since_dispatch > self.cfg.task_deadline_s:
            await self._kill_and_fail(task, job, code="deadline_exceeded", retryable=False,
                                      message=f"task ran past its deadline of "
                                              f"{self.cfg.task_deadline_s:.0f}s")
            return
        # The newest sign of life: a retried task's last heartbeat is its previous attempt's.
        last = max((t for t in (task.last_heartbeat_at, task.started_at, task.dispatched_at)
                    if t is not None), default=None)
        silent_s = _age_s(last, now)
        if silent_s is None or silent_s <= self.cfg.heartbeat_timeout_s:
            return
        status = await self.executor.status(job)
        if (task.last_heartbeat_at is None and status.state is JobState.PENDING
                and since_dispatch <= self.cfg.pending_timeout_s):
            return  # not started yet (scheduling, image pull): the pending limit applies
        if status.state.finished:
            await self.on_job_status(status, task=task)
            return
        if await attempt_result(self.redis, tid) is not None:
            return
        await self._kill_and_fail(task, job, code="heartbeat_lost", retryable=True,
                                  message=f"no heartbeat for {silent_s:.0f}s")

    async def _kill_and_fail(self, task: Task, job: str, *, code: str, message: str,
                             retryable: bool) -> None:
        tlog.warning(task.id, "%s; stopping job %s", code, job)
        if await self.fail_or_retry(task, code=code, message=message,
                                    retryable=retryable) is not None:
            await self.executor.cancel(job, grace_s=0)

    async def reconcile(self) -> None:
        """Repair what crashes and lost messages leave behind (see the module docstring)."""
        for step in (self._reconcile_claims, self._reconcile_queued, self._reconcile_leases,
                     self._reconcile_jobs):
            try:
                await step()
            except Exception:
                log.exception("dispatcher %s: reconcile step %s failed", self.id,
                              step.__name__)

    async def _reconcile_claims(self) -> None:
        for tid, owner, _user in await self.queue.expired_claims():
            # Take the claim over first, so that other reconcilers leave it to us.
            await self.queue.renew_claim(tid, lease_s=self.cfg.claim_lease_s)
            task = await self._get(tid)
            status = None if task is None else task.status
            tlog.warning(tid, "claim of dispatcher %s expired; task is %s", owner, status)
            if task is None or status is None or status.terminal:
                await self.lifecycle.release(tid)
                await self.queue.ack(tid)
            elif status is TaskStatus.QUEUED:
                await self.lifecycle.release(tid)
                await self.queue.ack(tid)
                await self.lifecycle.enqueue(task, front=True)
            elif status is TaskStatus.DISPATCHING:
                await self._launch_task(task)
            else:  # running or cancelling: the job exists; the claim is settled
                await self.queue.ack(tid)

    async def _reconcile_queued(self) -> None:
        now = datetime.now(UTC)
        for task in await self._with_status(TaskStatus.QUEUED):
            age = _age_s(task.queued_at or task.updated_at, now)
            if age is not None and age < self.cfg.requeue_grace_s:
                continue
            if (await self.queue.is_queued(user_id=task.user_id, task_id=task.id)
                    or await self.queue.is_claimed(task.id)
                    or await self.queue.is_delayed(task.id)):
                continue
            fresh = await self._get(task.id)
            if fresh is None or fresh.status is not TaskStatus.QUEUED:
                continue
            tlog.warning(task.id, "queued but missing from the queue; enqueuing")
            await self.lifecycle.enqueue(fresh)

    async def _reconcile_leases(self) -> None:
        for tid in await self.queue.leases():
            task = await self._get(tid)
            if task is not None and task.status.active:
                continue
            changed_s = None if task is None else _age_s(task.updated_at, datetime.now(UTC))
            if changed_s is not None and changed_s < self.cfg.lease_grace_s:
                continue
            if await self.queue.is_claimed(tid):
                continue  # being dispatched right now
            task = await self._get(tid)
            if task is not None and task.status.active:
                continue
            tlog.warning(tid, "holds GPUs but is %s; releasing",
                         "missing" if task is None else task.status)
            await self.lifecycle.release(tid)

    async def _reconcile_jobs(self) -> None:
        for task in await self._with_status(TaskStatus.RUNNING):
            if task.executor not in (None, self.executor.name):
                continue
            status = await self.executor.status(task.job_name or job_name_of(task.id))
            if status.state.finished:
                await self.on_job_status(status, task=task)
        for job in await self.executor.list_jobs():
            tid = task_id_from_job_name(job)
            owner = None if tid is None else await self._get(tid)
            if owner is not None and owner.status.active:
                continue
            what = "unknown" if owner is None else owner.status
            if self.cfg.delete_unknown_jobs:
                tlog.warning(tid, "job %s belongs to no active task (%s); deleting it", job, what)
                await self.executor.cancel(job, grace_s=0)
            else:
                tlog.warning(tid, "job %s belongs to no active task (%s)", job, what)
