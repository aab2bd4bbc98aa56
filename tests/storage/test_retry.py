"""Retrying a store that is down: which failures count as an outage, how long the retries
last, and what an upload is checked against (a real S3 server where a store is needed)."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import pytest
from pydantic import SecretStr

from tests.support import services
from vidmaas.config import StorageSettings
from vidmaas.errors import NotFound, StorageError, StorageUnavailable
from vidmaas.storage import store_from_settings
from vidmaas.storage.base import ObjectInfo
from vidmaas.storage.retry import (
    RetryPolicy,
    UploadMismatch,
    check_object,
    retrying,
    upload_verified,
)


class _Calls:
    """A store call that fails ``failures`` times with ``error``, then answers."""

    def __init__(self, error: Exception, failures: int = 10**6) -> None:
        self.error, self.failures, self.calls = error, failures, 0
        self.waits: list[float] = []

    async def __call__(self) -> str:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error
        return "ok"

    async def sleep(self, s: float) -> None:
        self.waits.append(s)


async def test_an_outage_is_retried_until_the_attempts_run_out_with_capped_jittered_waits(
        ) -> None:
    policy = RetryPolicy(attempts=6, total_s=1000, base_delay_s=0.5, max_delay_s=2.0)
    call = _Calls(StorageUnavailable("down"))
    with pytest.raises(StorageUnavailable):
        await retrying("get", call, policy=policy, sleep=call.sleep)
    assert call.calls == 6 and len(call.waits) == 5
    for n, wait in enumerate(call.waits, start=1):
        assert 0 <= wait <= min(2.0, 0.5 * 2 ** (n - 1))


async def test_an_outage_that_ends_is_ridden_out() -> None:
    call = _Calls(StorageUnavailable("down"), failures=3)
    assert await retrying("get", call, policy=RetryPolicy(attempts=5, total_s=1000),
                          sleep=call.sleep) == "ok"
    assert call.calls == 4


async def test_no_attempt_starts_past_the_total_time() -> None:
    call = _Calls(StorageUnavailable("down"))
    with pytest.raises(StorageUnavailable):
        await retrying("get", call, policy=RetryPolicy(attempts=100, total_s=0.0),
                       sleep=call.sleep)
    assert call.calls == 1


@pytest.mark.parametrize("error", [StorageError("403 SignatureDoesNotMatch"), NotFound("gone")])
async def test_a_failure_that_is_no_outage_is_not_retried(error: Exception) -> None:
    call = _Calls(error)
    with pytest.raises(type(error)):
        await retrying("get", call, policy=RetryPolicy(attempts=5, total_s=1000),
                       sleep=call.sleep)
    assert call.calls == 1


def test_full_jitter_spreads_the_waits_over_the_whole_window() -> None:
    rng = random.Random(3)
    waits = [RetryPolicy(base_delay_s=1.0, max_delay_s=8.0).delay_s(4, rng=rng)
             for _ in range(2000)]
    assert max(waits) <= 8.0 and min(waits) >= 0
    assert min(waits) < 1.0 and max(waits) > 7.0  # not a fixed delay: clients spread out


async def test_a_store_that_cannot_be_reached_is_an_outage_and_a_wrong_secret_is_not(
        s3_storage: StorageSettings) -> None:
    closed = f"http://127.0.0.1:{services.free_port()}"
    unreachable = store_from_settings(s3_storage.model_copy(update={"s3_endpoint_url": closed}))
    with pytest.raises(StorageUnavailable):
        await unreachable.get_bytes("outputs/t/x")
    wrong = store_from_settings(s3_storage.model_copy(
        update={"s3_secret_access_key": SecretStr("wrong")}))
    with pytest.raises(StorageError) as refused:
        await wrong.get_bytes("outputs/t/x")
    assert not isinstance(refused.value, StorageUnavailable)


def test_an_object_of_another_size_or_md5_is_a_mismatch() -> None:
    md5 = hashlib.md5(b"video").hexdigest()
    check_object("k", ObjectInfo(size=5, etag=f'"{md5}"'), size=5, md5=md5)
    with pytest.raises(UploadMismatch, match="4 bytes"):
        check_object("k", ObjectInfo(size=4, etag=f'"{md5}"'), size=5, md5=md5)
    with pytest.raises(UploadMismatch, match="MD5"):
        check_object("k", ObjectInfo(size=5, etag='"' + "0" * 32 + '"'), size=5, md5=md5)
    # A multipart ETag and a KMS-encrypted object's ETag are no MD5: the size must do.
    check_object("k", ObjectInfo(size=5, etag='"abc-2"'), size=5, md5=md5)
    check_object("k", ObjectInfo(size=5, etag='"' + "0" * 32 + '"', encryption="aws:kms"),
                 size=5, md5=md5)


async def test_an_upload_is_checked_against_what_the_real_store_holds(
        s3_storage: StorageSettings, tmp_path: Path) -> None:
    store = store_from_settings(s3_storage)
    src = tmp_path / "v.mp4"
    src.write_bytes(b"\x00video" * 1000)
    await upload_verified(store, "outputs/t3/video.mp4", src, content_type="video/mp4",
                          policy=RetryPolicy(attempts=1))
    info = await store.head("outputs/t3/video.mp4")
    # SeaweedFS gives the MD5 as the ETag, so the MD5 check is live against it.
    assert info.etag.strip('"') == hashlib.md5(src.read_bytes()).hexdigest()
    assert info.size == src.stat().st_size
