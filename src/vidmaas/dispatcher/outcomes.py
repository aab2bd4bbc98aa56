"""Job outcomes: what a job's state means for its task, and the stopping of cancelled jobs.

Guarantees:
- ``on_job_status`` acts only on a job that ended or is stuck, of a task that is still
  active and whose job it is (same job name). A stuck job is stopped at once.
- When the task's stream already holds a terminal event of this attempt (the runtime
  reported its result), the relay applies that event and the task is left alone.
- Otherwise a ``cancelling`` task becomes ``cancelled`` (by whoever set the cancel
  flag), and any other task fails or retries through ``Lifecycle.fail_or_retry``
  (the one retry rule), as ``failure_of`` classifies the job: ``job_stuck`` (the
  executor's call whether to retry), ``job_vanished`` (retried), ``out_of_memory``
  (exit 4: retried, and the retry runs the memory-saving plan; exit 7: final), or
  ``job_failed`` (retried by the exit code's meaning, ``exit_code_retryable``), the
  message naming the exit code or reason and the log tail.
- ``run_updates`` feeds every state change the executor yields to ``on_job_status``;
  a failure to handle one is logged and the loop goes on. On stop it returns without
  cutting a handling in half.
- ``handle_cancels`` (every ``dispatcher.cancel_scan_interval_s``) asks the executor
  once per task to stop the job of each ``cancelling`` task, with
  ``dispatcher.cancel_grace_s``, and finishes those whose job has ended. A pooled
  task's worker is not signalled: it stops at its next step (the cancel flag), and is
  killed only if it is still on the task after the grace (``Pools.cancel_pass``).
- A pool worker's process ending is handed to ``Pools`` (its task retried, it
  replaced).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from vidmaas.bus.control import cancel_requested
from vidmaas.bus.events import attempt_result
from vidmaas.db.models import Task
from vidmaas.dispatcher.context import DispatcherContext
from vidmaas.dispatcher.executors.base import JobState, JobStatus
from vidmaas.dispatcher.pools import Pools
from vidmaas.domain import events as ev
from vidmaas.domain.ids import is_worker_id, task_id_from_job_name
from vidmaas.domain.ids import job_name as job_name_of
from vidmaas.domain.jobs import OUT_OF_MEMORY_CODE, exit_code_retryable, out_of_memory_exit
from vidmaas.domain.status import TaskStatus
from vidmaas.errors import VidmaasError
from vidmaas.logs import TaskLog

log = logging.getLogger(__name__)
tlog = TaskLog(log)


def failure_of(status: JobStatus) -> tuple[str, str, bool]:
    """(code, message, retryable) of a job that ended (or is stuck) without a result."""
    detail = f"\n{status.message}" if status.message else ""
    if status.stuck and not status.state.finished:
        return ("job_stuck", f"job {status.job_name} stuck: {status.reason}{detail}",
                status.retryable)
    if status.state is JobState.MISSING:
        return "job_vanished", f"job {status.job_name} vanished{detail}", True
    final = out_of_memory_exit(status.exit_code)
    if final is not None:
        what = (f"ran out of memory under the memory-saving plan (exit code {status.exit_code}):"
                " the same request fails the same way, so it is not retried") if final else \
            (f"ran out of memory (exit code {status.exit_code}); the retry runs the "
             "memory-saving plan")
        return OUT_OF_MEMORY_CODE, f"job {status.job_name} {what}{detail}", not final
    retryable = exit_code_retryable(status.exit_code) if status.exit_code is not None \
        else status.retryable
    what = f"exited with code {status.exit_code}" if status.exit_code is not None \
        else f"failed ({status.reason or 'unknown reason'})"
    return ("job_failed",
            f"job {status.job_name} {what} without reporting a result{detail}", retryable)


class Outcomes:
    """Job status → task transitions for one replica, and its cancel scan."""

    def __init__(self, ctx: DispatcherContext, pools: Pools) -> None:
        self.ctx = ctx
        self.pools = pools
        self._cancel_sent: set[str] = set()
        self._result_noted: dict[str, str] = {}
        """Task → the ended job whose reported result was left to the relay (logged once)."""

    async def run_updates(self) -> None:
        """Handle the executor's job updates until stop."""
        ctx = self.ctx
        updates = aiter(ctx.executor.updates())
        stopping = asyncio.create_task(ctx.stopping.wait(), name="dispatcher-updates-stop")
        try:
            while not ctx.stopping.is_set():
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
                    log.exception("dispatcher %s: handling %s %s failed", ctx.id,
                                  status.job_name, status.state.value)
        except StopAsyncIteration:
            return
        finally:
            stopping.cancel()
            await asyncio.gather(stopping, return_exceptions=True)

    async def on_job_status(self, status: JobStatus, *, task: Task | None = None) -> None:
        """Map a job's state to its task (see the module docstring)."""
        ctx = self.ctx
        if not status.state.finished and not status.stuck:
            return
        if task is None and is_worker_id(status.job_name):
            await self.pools.on_worker_status(status)
            return
        tid = task.id if task is not None else task_id_from_job_name(status.job_name)
        if tid is None:
            return
        task = task if task is not None else await ctx.get(tid)
        if task is None:
            return
        current = task.status
        if not current.active:
            return
        if task.job_name is not None and task.job_name != status.job_name:
            return
        if status.stuck and not status.state.finished:
            tlog.warning(tid, "job %s is stuck (%s); stopping it", status.job_name, status.reason)
            await ctx.executor.cancel(status.job_name, grace_s=0)
        if await attempt_result(ctx.redis, tid) is not None:
            if self._result_noted.get(tid) != status.job_name:
                if len(self._result_noted) > 10_000:
                    self._result_noted.clear()
                self._result_noted[tid] = status.job_name
                tlog.info(tid, "job %s %s after reporting its result; the relay applies it",
                          status.job_name, status.state.value)
            return
        if current is TaskStatus.CANCELLING:
            by = await cancel_requested(ctx.redis, tid) or "user"
            with contextlib.suppress(VidmaasError):
                await ctx.lifecycle.finish(task_id=tid, to=TaskStatus.CANCELLED,
                                           expected=TaskStatus.CANCELLING,
                                           event=ev.cancelled(tid, by=by))
                tlog.info(tid, "job %s ended; cancelled", status.job_name)
            self._cancel_sent.discard(tid)
            return
        code, message, retryable = failure_of(status)
        tlog.warning(tid, "job %s %s without a result: %s", status.job_name, status.state.value,
                     code)
        await ctx.fail_or_retry(task, code=code, message=message, retryable=retryable)

    async def run_cancels(self) -> None:
        """The cancel scan, every ``dispatcher.cancel_scan_interval_s`` until stop."""
        ctx = self.ctx
        await ctx.wait_ready()
        while not ctx.stopping.is_set():
            await self.handle_cancels()
            await ctx.pause(ctx.cfg.cancel_scan_interval_s)

    async def handle_cancels(self) -> None:
        """Stop the job of every ``cancelling`` task (once), and finish those whose job ended."""
        ctx = self.ctx
        for task in await ctx.with_status(TaskStatus.CANCELLING):
            if not ctx.owns(task):
                continue
            job = task.job_name or job_name_of(task.id)
            if is_worker_id(job):
                await self.pools.cancel_pass(task)  # the worker stops at its next step
                continue
            if task.id not in self._cancel_sent:
                self._cancel_sent.add(task.id)
                tlog.info(task.id, "cancelling job %s (grace %.0fs)", job, ctx.cfg.cancel_grace_s)
                await ctx.executor.cancel(job, grace_s=ctx.cfg.cancel_grace_s)
            status = await ctx.executor.status(job)
            if status.state.finished:
                await self.on_job_status(status, task=task)
