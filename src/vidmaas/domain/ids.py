"""Identifiers.

Guarantees: a task id is 26 characters of lowercase Crockford base32, starts with
a letter, sorts by creation time (newest last), and is DNS-1123 safe, so
``job_name(task_id)`` is a valid Kubernetes object name derived only from the id.
"""

from __future__ import annotations

import re
import secrets
import time

_ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"
TASK_ID_RE = re.compile(r"^[a-z][0-9a-hjkmnp-tv-z]{25}$")
JOB_NAME_PREFIX = "wan22-job-"


def _b32(value: int, length: int) -> str:
    out = []
    for _ in range(length):
        out.append(_ALPHABET[value & 31])
        value >>= 5
    return "".join(reversed(out))


def new_task_id(*, now_ms: int | None = None) -> str:
    """A time-sortable id: 't' + 10 chars of milliseconds + 15 random chars."""
    ms = int(time.time() * 1000) if now_ms is None else now_ms
    return "t" + _b32(ms, 10) + _b32(secrets.randbits(75), 15)


def is_task_id(value: str) -> bool:
    return bool(TASK_ID_RE.match(value))


def job_name(task_id: str) -> str:
    """The one job name of a task: launching twice finds the first job."""
    return JOB_NAME_PREFIX + task_id


def task_id_from_job_name(name: str) -> str | None:
    if not name.startswith(JOB_NAME_PREFIX):
        return None
    candidate = name[len(JOB_NAME_PREFIX) :]
    return candidate if is_task_id(candidate) else None


def new_user_id() -> str:
    return "u" + _b32(int(time.time() * 1000), 10) + _b32(secrets.randbits(50), 10)
