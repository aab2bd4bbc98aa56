"""A local job's state on disk, in its work directory, so that it outlives the dispatcher.

Guarantees:
- A job's work directory holds ``job.json`` (the marker: job name, attempt, pid,
  process start time, task id, GPU devices), written atomically (a temporary file
  renamed over it), ``job.log`` (its stdout and stderr) and, once the job has ended,
  ``exit_code``, written by ``WRAPPER``, the small ``sh`` group leader that runs the
  job, also atomically.
- ``alive`` trusts a pid only together with the kernel's start time of that process,
  so a reused pid never passes for the job; a zombie is not alive.
- ``status_from_disk`` answers for any job of the work root, also one started by an
  earlier dispatcher process: running, ended with its exit code and log tail, or
  missing.
- ``kill_tree`` kills a job's process group and every process it started, also those
  in sessions of their own (torchrun's ranks).
- ``prune`` empties a directory down to the marker, the exit code and the log.
- ``lock_file`` takes an exclusive ``flock`` that serialises launches across
  processes of one machine; closing the descriptor releases it.

Every function here blocks (file I/O): call it from a thread.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
from pathlib import Path
from typing import Any, Final

from vidmaas.dispatcher.executors.base import JobState, JobStatus
from vidmaas.domain.ids import is_worker_id, task_id_from_job_name
from vidmaas.domain.jobs import exit_code_retryable

MARKER: Final = "job.json"
EXIT_FILE: Final = "exit_code"
LOG_FILE: Final = "job.log"
KEEP: Final = frozenset({MARKER, EXIT_FILE, LOG_FILE})
"""What ``prune`` leaves in an ended job's directory."""

# The group leader: runs the job, then records its exit status for whoever asks later.
# ``trap : TERM INT`` (a handler, not "ignore", which children would inherit) keeps the
# shell alive until the job itself has ended.
WRAPPER: Final = ('trap : TERM INT; "$@"; code=$?; echo $code > exit_code.tmp; '
                  'mv exit_code.tmp exit_code; exit $code')


def proc_start_time(pid: int) -> str | None:
    """The kernel's start time of a live, non-zombie process (guards against pid reuse)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    if fields[0] in ("Z", "X"):
        return None
    return fields[19]


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid``, children first."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    out: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(0), []):
            out.append(child)
            todo.append(child)
    return out


def kill_tree(pid: int) -> None:
    """SIGKILL the job's process group (led by ``pid``) and every descendant of ``pid``:
    torchrun starts each rank in a session of its own, outside the group, and a killed
    torchrun cannot pass the signal on, so the ranks would live on (in a collective,
    until its timeout)."""
    tree = descendants(pid)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
    for child in tree:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(child, signal.SIGKILL)


def alive(marker: dict[str, Any]) -> bool:
    """The marker's process still runs (same pid, same start time)."""
    pid = marker.get("pid")
    if not isinstance(pid, int):
        return False
    start = proc_start_time(pid)
    return start is not None and start == marker.get("start_time")


def read_marker(work_dir: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((work_dir / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_marker(work_dir: Path, data: dict[str, Any]) -> None:
    tmp = work_dir / (MARKER + ".tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(work_dir / MARKER)


def exit_code(work_dir: Path) -> int | None:
    try:
        return int((work_dir / EXIT_FILE).read_text().strip())
    except (OSError, ValueError):
        return None


def log_tail(work_dir: Path, *, max_bytes: int) -> str:
    """The last ``max_bytes`` of the job's log, decoded leniently; empty if none."""
    path = work_dir / LOG_FILE
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            return f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


def ended(job_name: str, work_dir: Path, code: int | None, *, log_tail_bytes: int) -> JobStatus:
    """The status of a job that ended with ``code`` (None: it vanished without one)."""
    tail = log_tail(work_dir, max_bytes=log_tail_bytes)
    if code == 0:
        return JobStatus(job_name, JobState.SUCCEEDED, exit_code=0, retryable=False,
                         message=tail or None)
    reason = "process vanished" if code is None else f"exit code {code}"
    return JobStatus(job_name, JobState.FAILED, reason=reason, exit_code=code,
                     retryable=exit_code_retryable(code), message=tail or None)


def status_from_disk(job_name: str, work_dir: Path, *, log_tail_bytes: int) -> JobStatus:
    marker = read_marker(work_dir)
    if marker is None:
        return JobStatus(job_name, JobState.MISSING, message="no such local job")
    if alive(marker):
        return JobStatus(job_name, JobState.RUNNING)
    return ended(job_name, work_dir, exit_code(work_dir), log_tail_bytes=log_tail_bytes)


def fresh_dir(work_dir: Path) -> None:
    if work_dir.exists():
        shutil.rmtree(work_dir)
    work_dir.mkdir(parents=True)


def prune(work_dir: Path) -> None:
    with contextlib.suppress(OSError):
        for entry in work_dir.iterdir():
            if entry.name in KEEP:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)


def scan(root: Path) -> list[tuple[str, dict[str, Any]]]:
    """(name, marker) of every job and pool-worker directory under ``root``."""
    out: list[tuple[str, dict[str, Any]]] = []
    if not root.is_dir():
        return out
    for entry in sorted(root.iterdir()):
        if entry.is_dir() and (task_id_from_job_name(entry.name) is not None
                               or is_worker_id(entry.name)):
            marker = read_marker(entry)
            if marker is not None:
                out.append((entry.name, marker))
    return out


def lock_file(root: Path, name: str) -> int:
    """An exclusive lock on ``root/.{name}.lock``; ``os.close`` the result to release it."""
    root.mkdir(parents=True, exist_ok=True)
    fd = os.open(root / f".{name}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd
