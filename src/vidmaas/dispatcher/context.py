"""What the parts of one dispatcher replica share: services, executor, identity, stop signal.

Guarantees:
- One ``DispatcherContext`` per replica, built from ``Services`` and an executor; the
  parts (admission, outcomes, watchdog, reconciler) receive it and open no clients of
  their own (admission's private connection for its blocking wait aside).
- ``fail_or_retry`` is ``Lifecycle.fail_or_retry``, the one retry rule, re-read and
  tried again while the task only moved between ``dispatching`` and ``running``
  meanwhile (a job that ends while its launch is being recorded); it answers None,
  and changes nothing, once the task has left those states. Taking a pooled task back
  from its worker first clears the attempt's fence, so the worker's next event for it
  is refused (``PoolRegistry.fence_out``).
- ``pause`` sleeps but returns at once on stop; ``until_next_sweep`` also on
  ``reconcile_soon``; ``wait_ready`` returns once the first reconcile pass has run, or
  on stop.
- ``hook`` pauses at a named step only when test hooks are on (the crash tests kill
  the process there); otherwise it costs nothing.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
from datetime import datetime

from vidmaas.aio import pause
from vidmaas.bus import keys
from vidmaas.bus.pools import PoolRegistry
from vidmaas.bus.queue import TaskQueue
from vidmaas.db import tasks as repo
from vidmaas.db.models import Task
from vidmaas.dispatcher.executors.base import Executor
from vidmaas.domain import events as ev
from vidmaas.domain.ids import is_worker_id
from vidmaas.domain.models import MODEL_UNAVAILABLE
from vidmaas.domain.status import TaskStatus
from vidmaas.errors import VidmaasError
from vidmaas.logs import TaskLog
from vidmaas.metrics import Heartbeat, Metrics
from vidmaas.services import Services

log = logging.getLogger(__name__)
tlog = TaskLog(log)


def new_dispatcher_id() -> str:
    """host-pid-random: tells replicas (and restarts of one) apart in claims and logs."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


def age_s(stamp: datetime | None, now: datetime) -> float | None:
    """Seconds from ``stamp`` to ``now``; None without a stamp."""
    return None if stamp is None else (now - stamp).total_seconds()


class DispatcherContext:
    """The state and the reads every part of one dispatcher replica uses."""

    def __init__(self, services: Services, executor: Executor, *,
                 dispatcher_id: str | None = None, test_hooks: bool = False,
                 metrics: Metrics | None = None, heartbeat: Heartbeat | None = None) -> None:
        self.services = services
        self.settings = services.settings
        self.cfg = services.settings.dispatcher
        self.lifecycle = services.lifecycle
        self.redis = services.redis
        self.registry = services.registry
        self.queue = TaskQueue(services.redis)
        self.executor = executor
        self.id = dispatcher_id or new_dispatcher_id()
        self.metrics = metrics
        """Where launches, the dispatch gap and queue/capacity snapshots are recorded."""
        self.heartbeat = heartbeat
        """Beaten by the admission and sweep loops (the liveness probe reads it)."""
        self.test_hooks = test_hooks
        self.stopping = asyncio.Event()
        """Set by ``Dispatcher.stop()``: every loop finishes its step and returns."""
        self.ready = asyncio.Event()
        """Set once the first reconcile pass has run."""
        self.reconcile_soon = asyncio.Event()
        """Set when admission rebuilt leases on a Redis server that restarted or lost its
        data: the sweep runs its next reconcile pass at once (re-enqueueing what Redis
        lost) instead of after ``dispatcher.reconcile_interval_s``."""

    # ------------------------------------------------------------------ task reads

    async def get(self, task_id: str) -> Task | None:
        async with self.services.sessions() as session:
            return await repo.get_task(session=session, task_id=task_id)

    async def with_status(self, *statuses: TaskStatus, model: str | None = None) -> list[Task]:
        async with self.services.sessions() as session:
            return await repo.tasks_with_status(session=session, statuses=statuses,
                                                model=model)

    def owns(self, task: Task) -> bool:
        """The task's job (if it has one yet) runs on this replica's kind of executor."""
        return task.executor in (None, self.executor.name)

    # ------------------------------------------------------------------ failures

    async def fail_or_retry(self, task: Task, *, code: str, message: str,
                            retryable: bool) -> Task | None:
        """``Lifecycle.fail_or_retry``, re-read and tried again while the task only moved
        between dispatching and running meanwhile; None when the task left those states.
        A pooled task's worker is fenced out of the attempt once the move is made (not
        before: a task that was cancelling or ended meanwhile keeps its worker's last
        events, its ``cancelled`` included)."""
        for _ in range(5):
            try:
                moved = await self.lifecycle.fail_or_retry(task, code=code, message=message,
                                                           retryable=retryable)
            except VidmaasError as e:
                fresh = await self.get(task.id)
                if fresh is None or fresh.status not in (
                        TaskStatus.DISPATCHING, TaskStatus.RUNNING) \
                        or fresh.status == task.status:
                    tlog.info(task.id, "%s not applied (%s)", code, e)
                    return None
                task = fresh
                continue
            if task.job_name is not None and is_worker_id(task.job_name):
                await PoolRegistry(self.redis).fence_out(
                    task_id=task.id, worker_id=task.job_name, attempt=task.attempts)
            return moved
        return None

    async def fail_unavailable(self, task: Task, *, message: str) -> bool:
        """Take a queued task out of the queue and fail it ``model_unavailable`` (not
        retried); False if it was cancelled or claimed meanwhile."""
        await self.queue.remove(user_id=task.user_id, task_id=task.id)
        try:
            await self.lifecycle.finish(
                task_id=task.id, to=TaskStatus.FAILED, expected=TaskStatus.QUEUED,
                fields={"error_code": MODEL_UNAVAILABLE, "error_message": message},
                event=ev.failed(task.id, code=MODEL_UNAVAILABLE, message=message,
                                retryable=False))
        except VidmaasError as e:
            tlog.info(task.id, "%s not applied (%s)", MODEL_UNAVAILABLE, e)
            return False
        return True

    # ------------------------------------------------------------------ waiting

    async def pause(self, seconds: float) -> None:
        """Sleep, but wake at once on stop."""
        await pause(self.stopping, seconds)

    async def until_next_sweep(self, seconds: float) -> None:
        """Sleep ``seconds``, but wake at once on stop or ``reconcile_soon`` (cleared)."""
        waits = [asyncio.create_task(self.stopping.wait(), name="dispatcher-sweep-stop"),
                 asyncio.create_task(self.reconcile_soon.wait(), name="dispatcher-sweep-soon")]
        await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        for t in waits:
            t.cancel()
        await asyncio.gather(*waits, return_exceptions=True)
        self.reconcile_soon.clear()

    async def wait_ready(self) -> None:
        """Until the first reconcile pass has run, or stop."""
        ready = asyncio.create_task(self.ready.wait(), name="dispatcher-wait-ready")
        stopping = asyncio.create_task(self.stopping.wait(), name="dispatcher-wait-stop")
        await asyncio.wait({ready, stopping}, return_when=asyncio.FIRST_COMPLETED)
        for t in (ready, stopping):
            t.cancel()
        await asyncio.gather(ready, stopping, return_exceptions=True)

    def beat(self) -> None:
        if self.heartbeat is not None:
            self.heartbeat.beat()

    async def hook(self, step: str) -> None:
        """Crash tests pause here (``keys.TEST_HOOK``), to kill the process at this step."""
        if not self.test_hooks:
            return
        value = await self.redis.hget(keys.TEST_HOOK, step)
        if value:
            log.warning("dispatcher %s: test hook pauses %ss at %s", self.id, value, step)
            await asyncio.sleep(float(value))
