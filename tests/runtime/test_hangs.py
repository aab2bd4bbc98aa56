"""A job whose ranks stop agreeing never hangs: a collective waits at most the collective
timeout (``VIDMAAS_COLLECTIVE_TIMEOUT_S``), then the job fails, retryable."""

from __future__ import annotations

import time

import pytest
import redis

from tests.runtime.conftest import Job
from vidmaas.bus import keys
from vidmaas.bus.events import parse_entries
from vidmaas.domain.events import Event, EventType
from vidmaas.domain.jobs import ExitCode
from vidmaas.runtime.job import JobEnv

HANG = "hang_at_step=1,hang_rank=1"
"""Rank 1 stops after the first step and never joins the second step's all_gather."""


def _timed_events(job: Job) -> list[tuple[float, Event]]:
    """(seconds since the epoch, event) from the task stream's ids."""
    client = redis.Redis.from_url(job.redis_url, decode_responses=True)
    try:
        entries = client.xrange(keys.task_events(job.task_id))
    finally:
        client.close()
    return [(int(eid.split("-")[0]) / 1000, e) for eid, e in parse_entries(entries)]


@pytest.mark.slow
def test_a_collective_whose_peer_never_joins_fails_the_job_within_the_collective_timeout(
        job: Job) -> None:
    started = time.monotonic()
    proc = job.run(job.command("run", "--strategy", "cfg_parallel"), timeout_s=90,
                   extra_env={"PET_NPROC_PER_NODE": "2", "VIDMAAS_TEST_FAULT": HANG,
                              "VIDMAAS_COLLECTIVE_TIMEOUT_S": "3"})
    took_s = time.monotonic() - started
    assert proc.returncode == ExitCode.INFRA_ERROR, proc.stderr[-3000:]
    events = _timed_events(job)
    failed = [(t, e) for t, e in events if e.type is EventType.FAILED]
    assert len(failed) == 1, [e.type.value for _, e in events]
    failed_at, event = failed[0]
    assert (event.data["code"], event.data["retryable"]) == ("collective_timeout", True)
    assert "collective timeout of 3s" in event.data["message"]
    last_step_at = max(t for t, e in events if e.type is EventType.PROGRESS
                       and e.data.get("stage") == "denoise")
    # Bounded by the 3 s timeout (plus the failure's own reporting), not the default 600 s.
    assert 2.5 <= failed_at - last_step_at < 20, failed_at - last_step_at
    assert took_s < 80
    assert job.object_keys() == []


def test_the_collective_timeout_comes_from_the_environment_with_a_default() -> None:
    assert JobEnv.from_environ({"VIDMAAS_COLLECTIVE_TIMEOUT_S": "42"}).collective_timeout_s == 42
    assert JobEnv.from_environ({}).collective_timeout_s == 600
    assert JobEnv.from_environ({"VIDMAAS_COLLECTIVE_TIMEOUT_S": "0"}).collective_timeout_s == 600
