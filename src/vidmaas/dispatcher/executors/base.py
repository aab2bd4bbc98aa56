"""The executor interface.

Guarantees every executor keeps:
- ``launch`` is idempotent: the job name derives from the task id, and launching a
  job that already exists answers with the existing job, not a second one.
- ``status`` reports what the executor knows now, ``MISSING`` for a job it has never
  seen or that is gone.
- ``cancel`` asks the job to stop, and stops it hard after ``grace_s``.
- ``updates`` yields job state changes as they happen (no polling interval in the
  normal path), for the dispatcher to map to task transitions.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

from vidmaas.domain.jobs import JobSpec


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
