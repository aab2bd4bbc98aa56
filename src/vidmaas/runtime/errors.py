"""The runtime's failures and the exit code, event code and retry rule of each.

Guarantees: every way a step can fail on purpose is a ``JobError`` carrying the
process exit code (``domain.jobs.ExitCode``), the ``failed`` event's ``code`` and
whether the control plane should retry it; ``classify`` maps any other exception
(torch's out-of-memory error included) onto one of them, so the command line has a
single place that turns an exception into an event and an exit code.

A full disk (``ENOSPC``, or ``EDQUOT`` under a quota) anywhere in an exception's chain is
``DiskFull``, whatever wrapped it: ``classify`` is what a pool worker calls too, so a task
that filled the disk fails as ``disk_full`` (retryable) and the worker lives on.
"""

from __future__ import annotations

import errno
import re

from vidmaas.domain.jobs import OUT_OF_MEMORY_CODE, ExitCode, exit_code_retryable


class JobError(Exception):
    """A failure of the job, with its exit code and event code."""

    exit_code: ExitCode = ExitCode.INFRA_ERROR
    code: str = "infra_error"

    def __init__(self, message: str, *, code: str | None = None,
                 exit_code: ExitCode | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if exit_code is not None:
            self.exit_code = exit_code

    @property
    def retryable(self) -> bool:
        return exit_code_retryable(self.exit_code)


class BadInput(JobError):
    """The request cannot succeed (unreadable image, impossible parameters)."""

    exit_code = ExitCode.BAD_INPUT
    code = "bad_input"


class ModelError(JobError):
    """The model directory is missing or unloadable, or the job's shape does not fit it."""

    exit_code = ExitCode.MODEL_ERROR
    code = "model_error"


class OutOfMemory(JobError):
    """The accelerator (or host) ran out of memory. ``final`` when the memory-saving plan
    was already in use: the same request would fail the same way (not retried);
    otherwise it is retried once, with the memory-saving plan."""

    exit_code = ExitCode.OUT_OF_MEMORY
    code = OUT_OF_MEMORY_CODE

    def __init__(self, message: str, *, final: bool = False) -> None:
        super().__init__(message, exit_code=ExitCode.OUT_OF_MEMORY_FINAL if final
                         else ExitCode.OUT_OF_MEMORY)


class UploadFailed(JobError):
    """The object store refused or lost the output."""

    exit_code = ExitCode.UPLOAD_FAILED
    code = "upload_failed"


class DiskFull(JobError):
    """The work directory's filesystem is full: retried on a fresh work directory."""

    exit_code = ExitCode.DISK_FULL
    code = "disk_full"


class InfraError(JobError):
    """Anything else that went wrong around the job: retried."""


class CollectiveTimeout(InfraError):
    """A collective waited for its peers past the collective timeout: a rank stopped or
    deadlocked (retried: the next attempt starts every rank afresh)."""

    code = "collective_timeout"

    @classmethod
    def of(cls, cause: BaseException, *, rank: int, world_size: int,
           timeout_s: float) -> CollectiveTimeout:
        return cls(f"rank {rank} of {world_size} waited in a collective for longer than the "
                   f"collective timeout of {timeout_s:.0f}s: another rank stopped or "
                   f"deadlocked ({str(cause)[:300]})")
class Terminated(InfraError):
    """SIGTERM arrived: the executor is stopping the job (or the pool worker)."""

    code = "terminated"


class Cancelled(Exception):
    """The task's cancel flag was seen; the job stops and uploads nothing."""

    def __init__(self, by: str) -> None:
        super().__init__(f"cancelled by {by}")
        self.by = by


def is_out_of_memory(exc: BaseException) -> bool:
    """torch's ``OutOfMemoryError``, Python's ``MemoryError``, or a message that says so
    (CUDA and NCCL errors raised as ``RuntimeError``)."""
    return isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError" or \
        "out of memory" in str(exc).lower()


_COLLECTIVE_TIMEOUT = re.compile(
    r"timed out waiting \d+ ?ms for (send|recv|receive)|collective operation timeout|"
    r"watchdog caught collective", re.IGNORECASE)


def is_collective_timeout(exc: BaseException) -> bool:
    """gloo's "Timed out waiting …ms for recv operation" or NCCL's watchdog timeout."""
    return _COLLECTIVE_TIMEOUT.search(str(exc)) is not None
_DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}


def is_disk_full(exc: BaseException) -> bool:
    """An ``OSError`` with ``ENOSPC``/``EDQUOT``, or one wrapped by what was raised (its
    ``__cause__``/``__context__`` chain; FFmpeg's "No space left on device" included)."""
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            return False
        if isinstance(seen, OSError) and seen.errno in _DISK_FULL_ERRNOS:
            return True
        if "no space left on device" in str(seen).lower():
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def classify(exc: BaseException) -> JobError:
    """The ``JobError`` an exception stands for (unknown ones are infrastructure errors)."""
    if isinstance(exc, DiskFull):
        return exc
    if is_disk_full(exc):
        return DiskFull(f"no space left in the work directory: {str(exc)[:500]}")
    if isinstance(exc, JobError):
        return exc
    if is_out_of_memory(exc):
        return OutOfMemory(f"out of memory: {str(exc)[:500]}")
    return InfraError(f"{type(exc).__name__}: {str(exc)[:1000]}")
