"""A fast in-process executor double, for tests and the dispatch benchmark.

It keeps the promises of ``executors.base.Executor``:
- ``launch`` is idempotent by (job name, attempt): launching the same attempt again
  answers with the existing job; a new attempt replaces the job of an earlier one
  (which then reports nothing more).
- ``status`` answers ``MISSING`` for a job it never saw.
- ``cancel`` ends a job at once, with ``ExitCode.CANCELLED`` (``grace_s`` is not
  waited: nothing here needs time to stop).
- ``updates`` yields a ``JobStatus`` each time a job ends.

A job "runs" as a named asyncio task that sleeps ``duration_s`` and ends with the
outcome ``outcome(spec)`` chooses. ``on_event(spec, kind)`` is awaited at ``started``
and at the end (``completed``, ``failed``, ``cancelled``), before the end is reported
through ``updates``, so a test can publish runtime-like events or play the relay
there. Every launch is recorded in ``launches`` with its monotonic start time.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from vidmaas.dispatcher.executors.base import JobState, JobStatus
from vidmaas.domain.jobs import ExitCode, JobSpec, exit_code_retryable


@dataclass(frozen=True, slots=True)
class FakeOutcome:
    """How a fake job ends."""

    exit_code: int = 0
    duration_s: float | None = None
    """Overrides the executor's default duration; None uses it."""
    hang: bool = False
    """Never end by itself (only ``cancel`` ends it): a lost or deadlocked job."""
    report: bool = True
    """Call ``on_event`` at the end (a runtime that reports its result)."""
    stuck: bool = False
    """Report the job as stuck (image pull, crash loop) right after launch."""


@dataclass(slots=True)
class _FakeJob:
    spec: JobSpec
    outcome: FakeOutcome
    state: JobState = JobState.RUNNING
    exit_code: int | None = None
    runner: asyncio.Task[None] | None = None
    launched_at: float = field(default_factory=time.monotonic)
    ended_at: float | None = None


EventHook = Callable[[JobSpec, str], Awaitable[None]]


class FakeExecutor:
    """Jobs as asyncio tasks in this process (see the module docstring)."""

    def __init__(self, *, name: str = "fake", duration_s: float = 0.05,
                 outcome: Callable[[JobSpec], FakeOutcome] | None = None,
                 on_event: EventHook | None = None,
                 launch_delay_s: float = 0.0,
                 fail_launch: Callable[[JobSpec], bool] | None = None) -> None:
        self.name = name
        """Dispatchers judge only tasks whose jobs their executor's name launched: give
        each in-process double of a multi-dispatcher test its own name."""
        self.duration_s = duration_s
        self._outcome = outcome or (lambda _spec: FakeOutcome())
        self._on_event = on_event
        self._launch_delay_s = launch_delay_s
        self._fail_launch = fail_launch
        self.jobs: dict[str, _FakeJob] = {}
        self.launches: list[tuple[str, int, float]] = []
        """(job name, attempt, monotonic launch time) of every job started."""
        self.cancels: list[str] = []
        self._updates: asyncio.Queue[JobStatus] = asyncio.Queue()
        self._closed = False

    async def launch(self, spec: JobSpec) -> str:
        if self._launch_delay_s:
            await asyncio.sleep(self._launch_delay_s)
        if self._fail_launch is not None and self._fail_launch(spec):
            raise RuntimeError(f"fake launch of {spec.job_name} refused")
        existing = self.jobs.get(spec.job_name)
        if existing is not None:
            if existing.spec.attempt == spec.attempt:
                return spec.job_name
            if existing.state is JobState.RUNNING:
                self.vanish(spec.job_name)  # a leftover of an earlier attempt
        job = _FakeJob(spec=spec, outcome=self._outcome(spec))
        self.jobs[spec.job_name] = job
        self.launches.append((spec.job_name, spec.attempt, job.launched_at))
        job.runner = asyncio.create_task(self._run(job), name=f"fake-job-{spec.job_name}")
        return spec.job_name

    async def _run(self, job: _FakeJob) -> None:
        if self._on_event is not None:
            await self._on_event(job.spec, "started")
        if job.outcome.stuck:
            await self._updates.put(JobStatus(job.spec.job_name, JobState.PENDING,
                                              reason="ImagePullBackOff", stuck=True,
                                              retryable=True, message="fake: stuck"))
        if job.outcome.hang or job.outcome.stuck:
            await asyncio.Event().wait()
        duration = job.outcome.duration_s if job.outcome.duration_s is not None \
            else self.duration_s
        await asyncio.sleep(duration)
        await self._end(job, job.outcome.exit_code, report=job.outcome.report)

    async def _end(self, job: _FakeJob, exit_code: int, *, report: bool) -> None:
        job.exit_code = exit_code
        job.ended_at = time.monotonic()
        job.state = JobState.SUCCEEDED if exit_code == 0 else JobState.FAILED
        if report and self._on_event is not None:
            kind = "completed" if exit_code == 0 else (
                "cancelled" if exit_code == ExitCode.CANCELLED else "failed")
            await self._on_event(job.spec, kind)
        await self._updates.put(self._status(job))

    def _status(self, job: _FakeJob) -> JobStatus:
        return JobStatus(job.spec.job_name, job.state, exit_code=job.exit_code,
                         retryable=exit_code_retryable(job.exit_code),
                         message=None if job.exit_code is None
                         else f"fake job exited with code {job.exit_code}")

    async def status(self, job_name: str) -> JobStatus:
        job = self.jobs.get(job_name)
        if job is None:
            return JobStatus(job_name, JobState.MISSING, message="no such fake job")
        return self._status(job)

    async def cancel(self, job_name: str, *, grace_s: float) -> None:
        job = self.jobs.get(job_name)
        self.cancels.append(job_name)
        if job is None or job.state is not JobState.RUNNING or job.runner is None:
            return
        job.runner.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await job.runner
        await self._end(job, int(ExitCode.CANCELLED), report=job.outcome.report)

    def vanish(self, job_name: str) -> None:
        """Forget a job without a trace, as a deleted pod or a reboot would."""
        job = self.jobs.pop(job_name, None)
        if job is not None and job.runner is not None:
            job.runner.cancel()

    async def list_jobs(self) -> list[str]:
        return [name for name, job in self.jobs.items() if job.state is JobState.RUNNING]

    async def updates(self) -> AsyncIterator[JobStatus]:
        while not self._closed:
            yield await self._updates.get()

    def running(self) -> int:
        return sum(1 for job in self.jobs.values() if job.state is JobState.RUNNING)

    async def close(self) -> None:
        self._closed = True
        runners = [j.runner for j in self.jobs.values() if j.runner is not None]
        for r in runners:
            r.cancel()
        await asyncio.gather(*runners, return_exceptions=True)
