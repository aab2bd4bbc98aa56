"""The watchdog: tasks whose jobs went silent, overran, or never got going (DESIGN §7).

Guarantees, for every ``running`` or ``dispatching`` task of this replica's executor
kind, at each sweep (``check``):
- ``dispatching`` longer than ``dispatcher.dispatching_timeout_s`` with no claim in
  progress: the executor decides. A job pending or running moves the task to
  ``running``; no job retries it (``dispatch_timeout``); a job that ended is handled
  as ``outcomes`` handles any ending.
- Running past ``dispatcher.task_deadline_s`` since dispatch: the task fails without
  retry (``deadline_exceeded``) and its job is stopped.
- Silent for longer than ``dispatcher.heartbeat_timeout_s`` (the newest of its last
  heartbeat, start and dispatch time): unless its job has never sent a heartbeat and
  is still pending within ``dispatcher.pending_timeout_s`` (scheduling, image pull),
  or has already ended (then ``outcomes`` decides), or the task's stream already
  holds this attempt's result (the relay applies it), the task fails or retries
  (``heartbeat_lost``) and its job is stopped.
- Stalled (``domain.stall``): ``running`` in the ``denoise`` stage, its attempt has
  reported a step, and no next step for longer than ``dispatcher.stall_factor`` times
  the expected step time (the registry's ``step_s``, else the model's moving-average run
  time over the task's steps), at least ``dispatcher.stall_floor_s``: unless its job
  has ended (``outcomes`` decides) or its result is in the stream, the task fails or
  retries (``stalled``) and its job is stopped. Heartbeats come from the job's parent
  process, so they go on while a rank is deadlocked in a collective; steps do not.
- A job is stopped only after the failure was recorded, so a task the watchdog lost
  the race for keeps its job. One task's check failing never stops the others'.
"""

from __future__ import annotations

import contextlib
import logging
from datetime import UTC, datetime

from vidmaas.bus.events import attempt_result
from vidmaas.db.models import Task
from vidmaas.dispatcher.context import DispatcherContext, age_s
from vidmaas.dispatcher.executors.base import JobState
from vidmaas.dispatcher.outcomes import Outcomes
from vidmaas.domain.events import Stage
from vidmaas.domain.ids import job_name as job_name_of
from vidmaas.domain.stall import STALLED_CODE, expected_step_s, stall_limit_s
from vidmaas.domain.status import TaskStatus
from vidmaas.errors import VidmaasError
from vidmaas.logs import TaskLog

log = logging.getLogger(__name__)
tlog = TaskLog(log)


class Watchdog:
    """Deadline, heartbeat and dispatching checks of one replica."""

    def __init__(self, ctx: DispatcherContext, outcomes: Outcomes) -> None:
        self.ctx = ctx
        self.outcomes = outcomes

    async def check(self) -> None:
        """Fail or retry silent, stalled, overdue and stuck-dispatching tasks."""
        now = datetime.now(UTC)
        tasks = await self.ctx.with_status(TaskStatus.RUNNING, TaskStatus.DISPATCHING)
        run_s = await self.ctx.queue.model_run_s() if tasks else {}
        for task in tasks:
            if not self.ctx.owns(task):
                continue
            try:
                await self._check_task(task, now, run_s)
            except Exception:
                tlog.exception(task.id, "watchdog check failed")

    async def _check_task(self, task: Task, now: datetime, run_s: dict[str, float]) -> None:
        ctx, cfg = self.ctx, self.ctx.cfg
        tid = task.id
        job = task.job_name or job_name_of(tid)
        since_dispatch = age_s(task.dispatched_at, now) or 0.0
        if task.status is TaskStatus.DISPATCHING:
            if since_dispatch <= cfg.dispatching_timeout_s or await ctx.queue.is_claimed(tid):
                return
            status = await ctx.executor.status(job)
            if status.state in (JobState.PENDING, JobState.RUNNING):
                tlog.info(tid, "dispatching too long but job %s is %s; running", job,
                          status.state.value)
                with contextlib.suppress(VidmaasError):
                    await ctx.lifecycle.transition(task_id=tid, to=TaskStatus.RUNNING,
                                                   expected=TaskStatus.DISPATCHING)
            elif status.state is JobState.MISSING:
                tlog.warning(tid, "dispatching for %.0fs and no job; retrying", since_dispatch)
                await ctx.fail_or_retry(
                    task, code="dispatch_timeout", retryable=True,
                    message=f"no job {job} after {since_dispatch:.0f}s dispatching")
            else:
                await self.outcomes.on_job_status(status, task=task)
            return
        if since_dispatch > cfg.task_deadline_s:
            await self._kill_and_fail(task, job, code="deadline_exceeded", retryable=False,
                                      message=f"task ran past its deadline of "
                                              f"{cfg.task_deadline_s:.0f}s")
            return
        # The newest sign of life: a retried task's last heartbeat is its previous attempt's.
        last = max((t for t in (task.last_heartbeat_at, task.started_at, task.dispatched_at)
                    if t is not None), default=None)
        silent_s = age_s(last, now)
        if silent_s is None or silent_s <= cfg.heartbeat_timeout_s:
            await self._check_steps(task, job, now, run_s)
            return
        status = await ctx.executor.status(job)
        if (task.last_heartbeat_at is None and status.state is JobState.PENDING
                and since_dispatch <= cfg.pending_timeout_s):
            return  # not started yet (scheduling, image pull): the pending limit applies
        if status.state.finished:
            await self.outcomes.on_job_status(status, task=task)
            return
        if await attempt_result(ctx.redis, tid) is not None:
            return
        await self._kill_and_fail(task, job, code="heartbeat_lost", retryable=True,
                                  message=f"no heartbeat for {silent_s:.0f}s")

    async def _check_steps(self, task: Task, job: str, now: datetime,
                           run_s: dict[str, float]) -> None:
        """The stall rule (``domain.stall``): a task denoising, whose attempt reported a
        step, and no next one within the limit, is stopped and retried (``stalled``)."""
        ctx, cfg = self.ctx, self.ctx.cfg
        if task.status is not TaskStatus.RUNNING or task.stage != Stage.DENOISE.value:
            return
        last = task.last_step_at
        if last is None or task.dispatched_at is None or last < task.dispatched_at:
            return  # no step of this attempt yet: loading and the first step are not timed
        model = ctx.registry.get(task.model)
        steps = int(task.params.get("steps") or 0)
        step_s = expected_step_s(declared_s=model.step_s if model is not None else None,
                                 run_s=run_s.get(task.model), steps=steps)
        limit_s = stall_limit_s(step_s=step_s, factor=cfg.stall_factor,
                                floor_s=cfg.stall_floor_s)
        idle_s = age_s(last, now)
        if limit_s is None or idle_s is None or idle_s <= limit_s:
            return
        status = await ctx.executor.status(job)
        if status.state.finished:
            await self.outcomes.on_job_status(status, task=task)
            return
        if await attempt_result(ctx.redis, task.id) is not None:
            return
        expected = "unknown" if step_s is None else f"{step_s:.1f}s"
        await self._kill_and_fail(
            task, job, code=STALLED_CODE, retryable=True,
            message=f"no denoising step for {idle_s:.0f}s while its heartbeats went on (limit "
                    f"{limit_s:.0f}s: {cfg.stall_factor:g}x the expected step time of "
                    f"{expected}, at least {cfg.stall_floor_s:.0f}s): a rank is stuck, e.g. "
                    "in a collective")

    async def _kill_and_fail(self, task: Task, job: str, *, code: str, message: str,
                             retryable: bool) -> None:
        tlog.warning(task.id, "%s; stopping job %s", code, job)
        if await self.ctx.fail_or_retry(task, code=code, message=message,
                                        retryable=retryable) is not None:
            await self.ctx.executor.cancel(job, grace_s=0)
