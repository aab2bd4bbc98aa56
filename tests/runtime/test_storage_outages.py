"""The object store failing under a running job, against a real S3 server (a private
SeaweedFS that the tests stop and start, and an HTTP proxy in front of it that answers
503 or reports another ETag):

- down during the input fetch or the upload, then back: the job retries with backoff and
  completes, once;
- left down: the job stops within its retry budget with a retryable exit code and one
  retryable ``failed`` event, never ``completed``, and no output object;
- an upload the store does not hold whole (its HEAD disagrees) is made again, and if it
  never lands whole the job fails retryably rather than report it.
"""

from __future__ import annotations

import hashlib
import io
import secrets
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest
from PIL import Image
from pydantic import SecretStr

from tests.runtime.conftest import Job, job_env
from tests.support import services
from tests.support.s3fault import FaultyS3Proxy
from vidmaas.config import StorageSettings
from vidmaas.domain.events import Event, EventType, Stage
from vidmaas.domain.ids import new_task_id
from vidmaas.domain.jobs import (
    ENV_STORAGE_RETRY_ATTEMPTS,
    ENV_STORAGE_RETRY_TOTAL_S,
    ExitCode,
)

PATIENT = {ENV_STORAGE_RETRY_ATTEMPTS: "40", ENV_STORAGE_RETRY_TOTAL_S: "120"}
"""Enough retries to outlast a SeaweedFS restart (a few seconds)."""
IMPATIENT = {ENV_STORAGE_RETRY_ATTEMPTS: "4", ENV_STORAGE_RETRY_TOTAL_S: "3"}
"""A budget a test can wait out."""
GIVE_UP_WITHIN_S = 40.0
"""The impatient budget plus botocore's own retries of each call plus a job's start."""


@pytest.fixture(scope="module")
def weed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[services.PrivateSeaweedFS]:
    with services.private_seaweedfs(tmp_path_factory.mktemp("weed")) as w:
        yield w


@pytest.fixture
def weed_job(weed: services.PrivateSeaweedFS, redis_url: str, tiny_models: dict[str, Path],
             tmp_path: Path) -> Iterator[Job]:
    """A fresh task whose job talks to the private SeaweedFS (running at the start)."""
    if weed.proc is None:
        weed.start()
    server = weed.server
    storage = StorageSettings(
        url=f"s3://{server.bucket}/t-{secrets.token_hex(4)}", s3_endpoint_url=server.endpoint_url,
        s3_access_key_id=SecretStr(server.access_key),
        s3_secret_access_key=SecretStr(server.secret_key))
    task_id = new_task_id()
    work = tmp_path / "work"
    yield Job(task_id=task_id, redis_url=redis_url, storage=storage, work_dir=work,
              env=job_env(task_id=task_id, redis_url=redis_url, storage=storage,
                          model_dir=tiny_models["ti2v"], work_dir=work))
    if weed.proc is None:
        weed.start()


def _start(job: Job, cmd: list[str], log: Path, env: Mapping[str, str],
           ) -> subprocess.Popen[bytes]:
    with log.open("wb") as f:
        return subprocess.Popen(cmd, env={**job.env, **env}, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)


def _retries(log: Path) -> int:
    return log.read_text(errors="replace").count("retrying in")


def _terminal(job: Job) -> list[Event]:
    return [e for e in job.events() if e.type.terminal]


def _png(job: Job) -> tuple[str, bytes]:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 40, 40)).save(buf, "PNG")
    key = f"inputs/{job.task_id}/image.png"
    job.put_object(key, buf.getvalue())
    return key, buf.getvalue()


def _stage_seen(stage: Stage) -> Callable[[list[Event]], bool]:
    return lambda events: any(e.type is EventType.STAGE and e.data["stage"] == stage
                              for e in events)


def _assert_completed_with_whole_objects(job: Job) -> None:
    terminal = _terminal(job)
    assert [e.type for e in terminal] == [EventType.COMPLETED], terminal
    done = terminal[0].data
    assert job.object_keys() == sorted([done["video_key"], done["poster_key"],
                                        done["spritesheet_key"]])
    video = job.get_object(done["video_key"])
    local = (job.work_dir / "output" / "video.mp4").read_bytes()
    assert hashlib.md5(video).hexdigest() == hashlib.md5(local).hexdigest()


def test_an_upload_while_the_store_is_down_is_retried_and_completes_once_it_is_back(
        weed_job: Job, weed: services.PrivateSeaweedFS, tmp_path: Path) -> None:
    job, log = weed_job, tmp_path / "job.log"
    weed.kill()  # without --image the upload is the job's first use of the store
    proc = _start(job, job.command("run", model="tiny-ti2v"), log, PATIENT)
    job.wait_for(_stage_seen(Stage.UPLOAD), timeout_s=90)
    deadline = time.monotonic() + 30
    while _retries(log) < 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _retries(log) >= 1, "the upload never failed: the store was not down"
    weed.start()
    assert proc.wait(120) == 0, log.read_text()[-3000:]
    _assert_completed_with_whole_objects(job)
    assert max(e.data["percent"] for e in job.of_type(EventType.PROGRESS)) == 100


def test_an_upload_with_the_store_left_down_fails_retryably_and_reports_nothing(
        weed_job: Job, weed: services.PrivateSeaweedFS, tmp_path: Path) -> None:
    job, log = weed_job, tmp_path / "job.log"
    weed.kill()
    proc = _start(job, job.command("run", model="tiny-ti2v"), log, IMPATIENT)
    job.wait_for(_stage_seen(Stage.UPLOAD), timeout_s=90)
    t0 = time.monotonic()
    code = proc.wait(120)
    took = time.monotonic() - t0
    assert code == ExitCode.UPLOAD_FAILED, log.read_text()[-3000:]
    assert took < GIVE_UP_WITHIN_S, took
    assert _retries(log) >= 1
    terminal = _terminal(job)
    assert [e.type for e in terminal] == [EventType.FAILED]
    assert (terminal[0].data["code"], terminal[0].data["retryable"]) == ("upload_failed", True)
    assert max(e.data["percent"] for e in job.of_type(EventType.PROGRESS)) < 100
    weed.start()
    assert job.object_keys() == []


def test_a_fetch_while_the_store_is_down_is_retried_and_succeeds_once_it_is_back(
        weed_job: Job, weed: services.PrivateSeaweedFS, tmp_path: Path) -> None:
    job, log = weed_job, tmp_path / "job.log"
    key, data = _png(job)
    weed.kill()
    proc = _start(job, job.command("fetch-input", "--image", key, model="tiny-ti2v"), log,
                  PATIENT)
    deadline = time.monotonic() + 60
    while _retries(log) < 1 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.1)
    assert _retries(log) >= 1, log.read_text()[-3000:]
    weed.start()
    assert proc.wait(120) == 0, log.read_text()[-3000:]
    assert (job.work_dir / "input" / "image.png").read_bytes() == data
    assert _terminal(job) == []


def test_a_fetch_with_the_store_left_down_exits_with_the_retryable_infra_code(
        weed_job: Job, weed: services.PrivateSeaweedFS, tmp_path: Path) -> None:
    job, log = weed_job, tmp_path / "job.log"
    key, _ = _png(job)
    weed.kill()
    t0 = time.monotonic()
    proc = _start(job, job.command("run", "--image", key, model="tiny-ti2v"), log, IMPATIENT)
    code = proc.wait(120)
    assert code == ExitCode.INFRA_ERROR, log.read_text()[-3000:]
    assert time.monotonic() - t0 < GIVE_UP_WITHIN_S
    assert _retries(log) >= 1
    terminal = _terminal(job)
    assert [e.type for e in terminal] == [EventType.FAILED]
    failed = terminal[0].data
    assert (failed["code"], failed["retryable"]) == ("storage_unavailable", True)
    assert "stayed unavailable" in failed["message"]
    assert not _stage_seen(Stage.LOAD_MODEL)(job.events())  # it never began to generate
    assert not (job.work_dir / "input" / "image.png").exists()
    weed.start()
    assert job.object_keys() == []


def _through(job: Job, proxy: FaultyS3Proxy) -> dict[str, str]:
    return {**PATIENT, "VIDMAAS_STORAGE_S3_ENDPOINT_URL": proxy.endpoint_url}


def test_a_store_answering_503_to_fetch_and_upload_is_ridden_out(
        weed_job: Job, weed: services.PrivateSeaweedFS, tmp_path: Path) -> None:
    job, log = weed_job, tmp_path / "job.log"
    key, _ = _png(job)
    # botocore tries each call 3 times itself: 5 answers of 503 outlast one of our attempts.
    with FaultyS3Proxy(weed.server.endpoint_url, fail_first=5) as proxy:
        proc = _start(job, job.command("run", "--image", key, model="tiny-ti2v"), log,
                      _through(job, proxy))
        job.wait_for(_stage_seen(Stage.LOAD_MODEL), timeout_s=60)
        assert proxy.failed == 5 and _retries(log) >= 1  # the fetch met them all
        proxy.fail_first = proxy.failed + 5  # and the upload meets five more
        assert proc.wait(120) == 0, log.read_text()[-3000:]
    assert proxy.failed == 10
    assert _retries(log) >= 2
    _assert_completed_with_whole_objects(job)


def test_an_upload_the_store_does_not_hold_whole_is_made_again(
        weed_job: Job, weed: services.PrivateSeaweedFS, tmp_path: Path) -> None:
    job, log = weed_job, tmp_path / "job.log"
    with FaultyS3Proxy(weed.server.endpoint_url, mangle_etag_heads=1) as proxy:
        proc = _start(job, job.command("run", model="tiny-ti2v"), log, _through(job, proxy))
        assert proc.wait(120) == 0, log.read_text()[-3000:]
    assert proxy.mangled == 1
    assert "not the upload's MD5" in log.read_text()
    _assert_completed_with_whole_objects(job)


def test_an_upload_that_never_lands_whole_is_never_reported_completed(
        weed_job: Job, weed: services.PrivateSeaweedFS, tmp_path: Path) -> None:
    job, log = weed_job, tmp_path / "job.log"
    with FaultyS3Proxy(weed.server.endpoint_url, mangle_etag_heads=10**6) as proxy:
        proc = _start(job, job.command("run", model="tiny-ti2v"), log,
                      {**IMPATIENT, "VIDMAAS_STORAGE_S3_ENDPOINT_URL": proxy.endpoint_url})
        assert proc.wait(120) == ExitCode.UPLOAD_FAILED, log.read_text()[-3000:]
    terminal = _terminal(job)
    assert [e.type for e in terminal] == [EventType.FAILED]
    assert (terminal[0].data["code"], terminal[0].data["retryable"]) == ("upload_failed", True)
    assert "not the upload's MD5" in terminal[0].data["message"]
    assert proxy.mangled >= 2  # checked after each attempt, never taken on trust
