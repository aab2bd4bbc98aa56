"""Identifiers.

Guarantees: a task id is 26 characters of lowercase Crockford base32, starts with
a letter, sorts by creation time (newest last), and is DNS-1123 safe, so
``job_name(task_id)`` is a valid Kubernetes object name derived only from the id. A pool
worker's id (``new_worker_id``) is DNS-1123 safe too, never a job name, and unique per
incarnation. A webhook endpoint id is ``we_`` + 24 random base32 characters; its
signing secret is ``whsec_`` + the base64 of 32 random bytes (Standard Webhooks form).
"""

from __future__ import annotations

import base64
import re
import secrets
import time

_ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"
TASK_ID_RE = re.compile(r"^[a-z][0-9a-hjkmnp-tv-z]{25}$")
JOB_NAME_PREFIX = "wan22-job-"
WORKER_ID_PREFIX = "wan22-pool-"
WORKER_ID_RE = re.compile(r"^wan22-pool-[a-z0-9](?:[a-z0-9-]{0,38}[a-z0-9])?-[0-9a-z]{8}$")


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


def model_slug(model_id: str) -> str:
    """A model id as a DNS-1123 label fragment (``wan2.2-ti2v-5b`` → ``wan2-2-ti2v-5b``)."""
    slug = re.sub(r"[^a-z0-9-]+", "-", model_id.lower()).strip("-")
    return slug[:40].rstrip("-") or "model"


def new_worker_id(model_id: str) -> str:
    """A pool worker's id: its model and a fresh incarnation (never reused, so a stale
    process can never be taken for its replacement)."""
    return f"{WORKER_ID_PREFIX}{model_slug(model_id)}-{_b32(secrets.randbits(40), 8)}"


def is_worker_id(value: str) -> bool:
    return bool(WORKER_ID_RE.match(value))


def worker_model_slug(worker_id: str) -> str:
    """The ``model_slug`` a worker id was made from (``""`` if it is not a worker id)."""
    if not is_worker_id(worker_id):
        return ""
    return worker_id[len(WORKER_ID_PREFIX):].rsplit("-", 1)[0]


def new_user_id() -> str:
    return "u" + _b32(int(time.time() * 1000), 10) + _b32(secrets.randbits(50), 10)


ENDPOINT_ID_RE = re.compile(r"^we_[0-9a-hjkmnp-tv-z]{24}$")


def new_endpoint_id() -> str:
    return "we_" + _b32(secrets.randbits(120), 24)


def is_endpoint_id(value: str) -> bool:
    return bool(ENDPOINT_ID_RE.match(value))


def new_endpoint_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
