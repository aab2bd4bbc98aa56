"""The reporter against the real Redis: ordering, once-only outcomes, blips, heartbeats."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import redis as sync_redis

from tests.runtime.conftest import FlakyProxy
from vidmaas.bus import keys
from vidmaas.bus.events import parse_entries
from vidmaas.domain.events import Event, EventType, Stage
from vidmaas.domain.ids import new_task_id
from vidmaas.runtime.job import WorkDir
from vidmaas.runtime.reporter import STAGE_WEIGHTS, Reporter, overall_percent


def _events(redis_url: str, task_id: str) -> list[Event]:
    client = sync_redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        return [e for _, e in parse_entries(client.xrange(keys.task_events(task_id)))]
    finally:
        client.close()


def _reporter(redis_url: str, work: Path, task_id: str, **kw: object) -> Reporter:
    return Reporter(task_id=task_id, redis_url=redis_url, work_dir=WorkDir(work), **kw)  # type: ignore[arg-type]


def test_stage_weights_add_up_to_a_whole_and_follow_the_stage_order() -> None:
    assert sum(STAGE_WEIGHTS.values()) == 100
    assert list(STAGE_WEIGHTS) == list(Stage)
    assert overall_percent(Stage.FETCH_INPUT, 0) == 0
    assert overall_percent(Stage.UPLOAD, 1) == 100
    assert overall_percent(Stage.DENOISE, 0.5) == 2 + 10 + 3 + 35


async def test_progress_never_decreases_even_across_steps_and_carries_an_eta(
        redis_url: str, tmp_path: Path) -> None:
    task_id = new_task_id()
    first = _reporter(redis_url, tmp_path, task_id, progress_interval_s=0)
    first.progress(Stage.DENOISE, 5, 10)
    first.progress(Stage.LOAD_MODEL, 1, 2)  # a late report of an earlier stage
    first.close()
    later = _reporter(redis_url, tmp_path, task_id, progress_interval_s=0)  # postprocess
    later.progress(Stage.DENOISE, 1, 10)
    later.progress(Stage.UPLOAD, 1, 1)
    later.close()
    progress = [e.data for e in _events(redis_url, task_id) if e.type is EventType.PROGRESS]
    percents = [p["percent"] for p in progress]
    assert percents == [50, 50, 50, 100]
    assert all(p["eta_s"] is not None and p["eta_s"] >= 0 for p in progress)
    assert progress[-1]["eta_s"] == 0


async def test_progress_is_throttled_but_a_stage_end_always_reports(
        redis_url: str, tmp_path: Path) -> None:
    task_id = new_task_id()
    r = _reporter(redis_url, tmp_path, task_id, progress_interval_s=60)
    for step in range(1, 11):
        r.progress(Stage.DENOISE, step, 10)
    r.close()
    steps = [e.data["step"] for e in _events(redis_url, task_id) if e.type is EventType.PROGRESS]
    assert steps == [1, 10]


async def test_only_one_terminal_event_per_job_whatever_the_steps_report(
        redis_url: str, tmp_path: Path) -> None:
    task_id = new_task_id()
    a = _reporter(redis_url, tmp_path, task_id)
    b = _reporter(redis_url, tmp_path, task_id)
    assert a.failed(code="out_of_memory", message="boom", retryable=True)
    assert not b.failed(code="infra_error", message="child died", retryable=True)
    assert not b.cancelled(by="user")
    a.started(world_size=1, host="h")
    b.started(world_size=1, host="h")
    a.close()
    b.close()
    types = [e.type for e in _events(redis_url, task_id)]
    assert types == [EventType.FAILED, EventType.STARTED]


async def test_a_rank_off_node_zero_writes_nothing(redis_url: str, tmp_path: Path) -> None:
    task_id = new_task_id()
    r = _reporter(redis_url, tmp_path, task_id, reports=False, reports_outcome=False)
    r.stage(Stage.DENOISE)
    r.progress(Stage.DENOISE, 1, 1)
    r.failed(code="x", message="y", retryable=True)
    assert _events(redis_url, task_id) == []


async def test_heartbeats_arrive_every_interval_while_the_block_runs(
        redis_url: str, tmp_path: Path) -> None:
    task_id = new_task_id()
    r = _reporter(redis_url, tmp_path, task_id, heartbeat_interval_s=0.1)
    with r.heartbeats():
        time.sleep(0.55)
    count = len(_events(redis_url, task_id))
    time.sleep(0.3)
    r.close()
    beats = [e for e in _events(redis_url, task_id) if e.type is EventType.HEARTBEAT]
    assert 3 <= len(beats) <= 6
    assert len(beats) == count  # none after the block


async def test_a_terminal_event_sent_during_a_redis_outage_is_delivered_when_it_ends(
        flaky_redis_url: tuple[str, FlakyProxy], redis_url: str, tmp_path: Path) -> None:
    url, proxy = flaky_redis_url
    task_id = new_task_id()
    r = _reporter(url, tmp_path, task_id, critical_retry_s=30)
    r.progress(Stage.DENOISE, 1, 2, force=True)
    proxy.cut()
    r.progress(Stage.DENOISE, 2, 2)  # best-effort: dropped, and the job goes on
    assert r.cancel_requested() is None  # unknown during the outage: keep going
    threading.Timer(1.5, proxy.restore).start()
    started = time.monotonic()
    assert r.completed({"video_key": "k", "poster_key": "p", "width": 64, "height": 64,
                        "num_frames": 9, "fps": 8, "duration_s": 1.1, "seed": 1,
                        "timings": {}})
    assert time.monotonic() - started >= 1.0
    r.close()
    types = [e.type for e in _events(redis_url, task_id)]
    assert types == [EventType.PROGRESS, EventType.COMPLETED]


async def test_without_a_redis_url_the_reporter_is_silent(tmp_path: Path) -> None:
    r = Reporter(task_id=new_task_id(), redis_url=None, work_dir=WorkDir(tmp_path))
    r.stage(Stage.DENOISE)
    assert not r.failed(code="x", message="y", retryable=False)
    assert r.cancel_requested() is None


async def test_another_rank_on_node_zero_may_tell_why_the_job_failed_but_only_once(
        redis_url: str, tmp_path: Path) -> None:
    task_id = new_task_id()
    rank1 = _reporter(redis_url, tmp_path, task_id, reports=False, reports_outcome=True)
    rank0 = _reporter(redis_url, tmp_path, task_id)
    rank1.progress(Stage.DENOISE, 1, 1)
    assert rank1.failed(code="unsupported_world_size", message="3 ranks", retryable=False)
    assert not rank0.failed(code="terminated", message="SIGTERM", retryable=True)
    rank0.close()
    rank1.close()
    events = _events(redis_url, task_id)
    assert [(e.type, e.data.get("code")) for e in events] == \
        [(EventType.FAILED, "unsupported_world_size")]
