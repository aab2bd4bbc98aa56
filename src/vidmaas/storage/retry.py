"""Riding out an object store outage: bounded retries with exponential backoff and jitter,
and checking that an upload really landed.

Guarantees:
- ``retrying`` calls its function again only after a *transient* failure
  (``is_transient``: the store unreachable, a timeout, a 5xx, a throttling answer; never
  a missing object, a refused signature or a full local disk), waits ``full jitter``
  (a uniform draw in ``[0, min(max_delay_s, base_delay_s · 2ⁿ)]``) between attempts, and
  stops after ``attempts`` calls or once the next wait would end past ``total_s`` since
  the first call, raising the last failure. ``total_s`` bounds when a new attempt may
  start; one attempt is bounded by the client's own connect and read timeouts.
- ``upload_verified`` puts a file, then returns only if the store holds the key with
  exactly the file's size and, where the store's ETag is a plain MD5 (a single-part
  upload without KMS encryption), exactly the file's MD5; a mismatch is
  ``UploadMismatch``, which is transient: the upload is made again within the policy.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from vidmaas.errors import NotFound, StorageError, StorageUnavailable
from vidmaas.storage.base import ObjectInfo, ObjectStore

log = logging.getLogger(__name__)

T = TypeVar("T")
_PLAIN_MD5 = re.compile(r"^[0-9a-f]{32}$")
_NOT_MD5_ENCRYPTION = {"aws:kms", "aws:kms:dsse"}


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How long a caller keeps trying a store that is down."""

    attempts: int = 8
    """Calls at most (the first one included); 1 means no retry."""
    total_s: float = 120.0
    """No new attempt starts later than this after the first one."""
    base_delay_s: float = 0.5
    """The first wait's upper bound; it doubles with each attempt."""
    max_delay_s: float = 15.0
    """No wait is longer than this."""

    def delay_s(self, failures: int, *, rng: random.Random | None = None) -> float:
        """The wait after the ``failures``-th failed call (1-based): full jitter."""
        cap = min(self.max_delay_s, self.base_delay_s * 2 ** max(0, failures - 1))
        return (rng or random).uniform(0.0, cap)


class UploadMismatch(StorageUnavailable):
    """The store holds a different object than the file that was uploaded."""


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` is a store outage that a later attempt may not meet."""
    return isinstance(exc, StorageUnavailable)


async def retrying(what: str, call: Callable[[], Awaitable[T]], *, policy: RetryPolicy,
                   context: str = "", sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                   ) -> T:
    """``await call()``, retried after transient failures within ``policy``."""
    started = time.monotonic()
    failures = 0
    while True:
        try:
            return await call()
        except StorageError as e:
            failures += 1
            if not is_transient(e) or failures >= max(1, policy.attempts):
                raise
            wait_s = policy.delay_s(failures)
            if time.monotonic() - started + wait_s > policy.total_s:
                raise
            log.warning("%s%s failed (attempt %d of %d), retrying in %.1f s: %s",
                        f"{context} " if context else "", what, failures, policy.attempts,
                        wait_s, e)
            await sleep(wait_s)


def file_md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as f:
        while chunk := f.read(1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()


def check_object(key: str, info: ObjectInfo, *, size: int, md5: str) -> None:
    """``UploadMismatch`` unless ``info`` describes an object of ``size`` bytes (and of
    ``md5``, when its ETag is one)."""
    if info.size != size:
        raise UploadMismatch(f"{key} holds {info.size} bytes, not the {size} uploaded")
    etag = info.etag.strip('"').lower()
    if _PLAIN_MD5.match(etag) and info.encryption not in _NOT_MD5_ENCRYPTION \
            and etag != md5:
        raise UploadMismatch(f"{key} has ETag {etag}, not the upload's MD5 {md5}")


async def upload_verified(store: ObjectStore, key: str, path: Path, *, content_type: str,
                          policy: RetryPolicy, context: str = "") -> None:
    """Put ``path`` at ``key`` and check it landed whole; both retried within ``policy``."""
    size = (await asyncio.to_thread(path.stat)).st_size
    md5 = await asyncio.to_thread(file_md5, path)

    async def put_and_check() -> None:
        await store.put_file(key, path, content_type=content_type)
        try:
            info = await store.head(key)
        except NotFound as e:
            raise UploadMismatch(f"{key} is not in the store after its upload") from e
        check_object(key, info, size=size, md5=md5)

    await retrying(f"upload of {key}", put_and_check, policy=policy, context=context)
