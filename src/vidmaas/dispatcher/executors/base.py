"""The executor interface.

Guarantees every executor keeps:
- ``launch`` is idempotent: the job name derives from the task id, and launching a
  job that already exists answers with the existing job, not a second one.
- ``status`` reports what the executor knows now, ``MISSING`` for a job it has never
  seen or that is gone.
- ``cancel`` asks the job to stop, and stops it hard after ``grace_s``.
- ``updates`` yields job state changes as they happen (no polling interval in the
  normal path), for the dispatcher to map to task transitions.

An executor that can also run warm-pool workers (DESIGN §12) is a ``PoolExecutor``:
``start_worker`` is idempotent by worker id, ``stop_worker`` asks the worker to exit and
kills it after ``grace_s``, ``worker_status``/``list_workers`` answer like their job
counterparts, and a worker's end is reported through the same ``updates`` (its
``job_name`` is the worker id, which is never a job name).
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from vidmaas.domain.jobs import JobSpec
from vidmaas.domain.models import ModelSpec


class JobState(enum.StrEnum):
    PENDING = "pending"
    """Created, not running yet (scheduling, pulling images, suspended by Kueue)."""
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    MISSING = "missing"

    @property
    def finished(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.MISSING)


@dataclass(frozen=True, slots=True)
class JobStatus:
    job_name: str
    state: JobState
    reason: str | None = None
    """Why, in a word: ``ImagePullBackOff``, ``CrashLoopBackOff``, ``Unschedulable``…"""
    message: str | None = None
    exit_code: int | None = None
    retryable: bool = True
    stuck: bool = False
    """The executor judges the job unable to make progress (image pull, crash loop)."""


class Executor(Protocol):
    name: str

    async def launch(self, spec: JobSpec) -> str:
        """Start the job; return its name (an existing job of that name is success)."""
        ...

    async def status(self, job_name: str) -> JobStatus: ...

    async def cancel(self, job_name: str, *, grace_s: float) -> None: ...

    async def list_jobs(self) -> list[str]:
        """Names of every job this executor owns and still knows."""
        ...

    def updates(self) -> AsyncIterator[JobStatus]: ...

    async def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    """One pool worker to start: its id, its model and the runtime's ``serve`` arguments
    (``domain.jobs.worker_args``)."""

    worker_id: str
    model: ModelSpec
    args: list[str]
    labels: dict[str, str]

    @property
    def gpus(self) -> int:
        return self.model.gpus_per_job


@runtime_checkable
class PoolExecutor(Executor, Protocol):
    async def start_worker(self, spec: WorkerSpec) -> None: ...

    async def stop_worker(self, worker_id: str, *, grace_s: float) -> None: ...

    async def worker_status(self, worker_id: str) -> JobStatus: ...

    async def list_workers(self) -> list[str]:
        """Ids of every live worker this executor started and still knows."""
        ...
