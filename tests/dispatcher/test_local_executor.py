"""The local executor end to end, with a small double of the job runtime."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from tests.dispatcher import job_double
from tests.dispatcher.dispatch_support import (
    World,
    database,
    eventually,
    make_settings,
    running,
)
from vidmaas.bus.events import read_task_events
from vidmaas.config import Settings, StorageSettings
from vidmaas.dispatcher.executors.base import JobState, JobStatus
from vidmaas.dispatcher.executors.local import LocalExecutor
from vidmaas.domain.events import EventType
from vidmaas.domain.ids import job_name, new_task_id
from vidmaas.domain.jobs import JobSpec, job_args
from vidmaas.domain.models import ModelRegistry
from vidmaas.runtime.job import JobEnv

PROGRAM = [sys.executable, job_double.__file__]


def _settings(tmp_path: Path, redis_url: str, db_url: str = "sqlite+aiosqlite:///x") -> Settings:
    settings = make_settings(db_url=db_url, redis_url=redis_url, cancel_grace_s=0.5)
    settings.local.work_root = tmp_path / "jobs"
    settings.model_root = tmp_path / "models"
    return settings


def _executor(settings: Settings, tmp_path: Path) -> LocalExecutor:
    return LocalExecutor(settings=settings, program=PROGRAM,
                         extra_env={"TEST_LAUNCH_LOG": str(tmp_path / "launches.log")})


def _spec(prompt: str, *, attempt: int = 1, task_id: str | None = None) -> JobSpec:
    tid = task_id or new_task_id()
    return JobSpec(task_id=tid, job_name=job_name(tid), user_id="u1",
                   model=ModelRegistry.load()["tiny-t2v"], prompt=prompt,
                   params={"size": "64*64", "num_frames": 5, "steps": 2, "seed": 1},
                   attempt=attempt)


def _launches(tmp_path: Path) -> list[str]:
    path = tmp_path / "launches.log"
    return path.read_text().splitlines() if path.exists() else []


async def _next_update(executor: LocalExecutor, timeout_s: float = 10) -> JobStatus:
    gen = executor.updates()
    try:
        return await asyncio.wait_for(anext(gen), timeout_s)  # type: ignore[arg-type]
    finally:
        await gen.aclose()  # type: ignore[attr-defined]


async def test_a_job_runs_in_a_fresh_work_dir_with_the_contract_environment(
        tmp_path: Path, redis_url: str) -> None:
    settings = _settings(tmp_path, redis_url)
    settings.local.keep_work_dirs = True
    settings.runtime.preview_interval_s = 0.5
    settings.runtime.preview_max = 3
    executor = _executor(settings, tmp_path)
    spec = _spec("ok")
    try:
        assert await executor.launch(spec) == spec.job_name
        update = await _next_update(executor)
    finally:
        await executor.close()
    assert (update.state, update.exit_code) == (JobState.SUCCEEDED, 0)
    work_dir = tmp_path / "jobs" / spec.job_name
    env = json.loads((work_dir / "env.json").read_text())
    assert env["VIDMAAS_TASK_ID"] == spec.task_id
    assert env["VIDMAAS_WORK_DIR"] == str(work_dir)
    assert env["VIDMAAS_MODEL_DIR"] == str(tmp_path / "models" / "tiny-t2v")
    assert env["VIDMAAS_REDIS_URL"] == redis_url
    assert env["VIDMAAS_ATTEMPT"] == "1"
    assert float(env["VIDMAAS_COLLECTIVE_TIMEOUT_S"]) == settings.runtime.collective_timeout_s
    assert (env["VIDMAAS_STORAGE_RETRY_ATTEMPTS"], env["VIDMAAS_STORAGE_RETRY_TOTAL_S"]) == \
        (str(settings.storage.retry_attempts), str(settings.storage.retry_total_s))
    assert (env["WORLD_SIZE"], env["RANK"], env["PET_NNODES"], env["PET_NPROC_PER_NODE"],
            env["PET_NODE_RANK"], env["OMP_NUM_THREADS"]) == ("1", "0", "1", "1", "0", "1")
    assert env["MASTER_ADDR"] and env["MASTER_PORT"]
    job_env = JobEnv.from_environ(env)
    assert (job_env.preview_interval_s, job_env.preview_max) == (0.5, 3)
    assert (await executor.status(spec.job_name)).state is JobState.SUCCEEDED


def test_the_default_command_is_the_runtime_entry_with_exactly_the_job_args(
        tmp_path: Path) -> None:
    settings = _settings(tmp_path, "redis://x")
    spec = _spec("a 'quoted' prompt")
    cmd = LocalExecutor(settings=settings).command(spec)
    assert cmd[:4] == [sys.executable, "-m", "vidmaas.runtime.cli", "run"]
    assert cmd[4:] == job_args(spec)


async def test_launching_the_same_attempt_twice_starts_one_process(
        tmp_path: Path, redis_url: str) -> None:
    settings = _settings(tmp_path, redis_url)
    executor = _executor(settings, tmp_path)
    spec = _spec("sleep")
    try:
        await asyncio.gather(executor.launch(spec), executor.launch(spec))
        await eventually(lambda: _has_launches(tmp_path, 1))
        await executor.launch(spec)
        assert (await executor.status(spec.job_name)).state is JobState.RUNNING
        assert await executor.list_jobs() == [spec.job_name]
        await executor.cancel(spec.job_name, grace_s=5)
        update = await _next_update(executor)
        await executor.launch(spec)  # the same attempt, ended: still not run again
        assert (await _next_update(executor)).exit_code == 5
    finally:
        await executor.close()
    assert update.exit_code == 5 and not update.retryable
    assert len(_launches(tmp_path)) == 1


async def _has_launches(tmp_path: Path, n: int) -> bool:
    return len(_launches(tmp_path)) >= n


async def test_cancel_stops_a_job_that_ignores_sigterm_after_the_grace_period(
        tmp_path: Path, redis_url: str) -> None:
    settings = _settings(tmp_path, redis_url)
    executor = _executor(settings, tmp_path)
    spec = _spec("stubborn")
    try:
        await executor.launch(spec)
        await eventually(lambda: _has_launches(tmp_path, 1))
        await asyncio.sleep(0.1)  # let it install its SIGTERM handler
        began = time.monotonic()
        await executor.cancel(spec.job_name, grace_s=0.5)
        update = await _next_update(executor)
        took = time.monotonic() - began
    finally:
        await executor.close()
    assert update.state is JobState.FAILED
    assert 0.4 < took < 5
    assert await executor.list_jobs() == []


async def test_a_restarted_executor_finds_a_running_job_and_learns_how_it_ended(
        tmp_path: Path, redis_url: str) -> None:
    settings = _settings(tmp_path, redis_url)
    first = _executor(settings, tmp_path)
    spec = _spec("sleep")
    await first.launch(spec)
    await eventually(lambda: _has_launches(tmp_path, 1))
    await first.close()  # the dispatcher went away; the job did not
    second = _executor(settings, tmp_path)
    try:
        assert (await second.status(spec.job_name)).state is JobState.RUNNING
        await second.launch(spec)
        gen = second.updates()
        nxt = asyncio.ensure_future(anext(gen))  # type: ignore[arg-type]
        await asyncio.sleep(0.05)
        await second.cancel(spec.job_name, grace_s=5)
        update = await asyncio.wait_for(nxt, 10)
        await gen.aclose()  # type: ignore[attr-defined]
    finally:
        await second.close()
    assert (update.state, update.exit_code) == (JobState.FAILED, 5)
    assert len(_launches(tmp_path)) == 1
    assert (await second.status(spec.job_name)).exit_code == 5


async def test_a_new_attempt_replaces_the_ended_job_of_the_previous_one(
        tmp_path: Path, redis_url: str) -> None:
    settings = _settings(tmp_path, redis_url)
    executor = _executor(settings, tmp_path)
    tid = new_task_id()
    try:
        await executor.launch(_spec("fail3", task_id=tid))
        assert (await _next_update(executor)).exit_code == 3
        await executor.launch(_spec("ok", task_id=tid, attempt=2))
        assert (await _next_update(executor)).exit_code == 0
    finally:
        await executor.close()
    assert [line.split()[1] for line in _launches(tmp_path)] == ["1", "2"]


@pytest.mark.parametrize("prompt", ["fail3", "ok"])
async def test_a_job_that_exits_without_a_terminal_event_fails_its_task_with_code_and_log(
        prompt: str, tmp_path: Path, db_url: str, redis: aioredis.Redis,
        redis_url: str) -> None:
    settings = _settings(tmp_path, redis_url, db_url)
    async with database(db_url) as sessions:
        world = World(settings=settings, sessions=sessions, redis=redis)
        task = await world.submit("alice")
        async with world.sessions() as s:
            from sqlalchemy import update

            from vidmaas.db.models import Task
            await s.execute(update(Task).where(Task.id == task.id).values(prompt=prompt))
            await s.commit()
        executor = _executor(settings, tmp_path)
        async with running(world.dispatcher(executor)):
            await eventually(lambda: _has_launches(tmp_path, 1))
            await eventually(lambda: _job_ended(executor, task.id))
            await asyncio.sleep(0.2)  # time for the dispatcher to handle the exit
        await executor.close()
        final = await world.get(task.id)
    if prompt == "fail3":
        assert (final.status, final.error_code) == ("failed", "job_failed")
        assert "exited with code 3" in (final.error_message or "")
        assert "boom: the double failed on purpose" in (final.error_message or "")
    else:  # it reported completed: the relay applies that, the dispatcher leaves it be
        assert final.status == "running"


async def _job_ended(executor: LocalExecutor, task_id: str) -> bool:
    state = (await executor.status(job_name(task_id))).state
    return state in (JobState.SUCCEEDED, JobState.FAILED)


@pytest.mark.slow
async def test_the_real_runtime_runs_a_tiny_model_job_to_a_reported_video(
        tmp_path: Path, sqlite_url: str, redis: aioredis.Redis, redis_url: str,
        tiny_model_root: Path, local_storage: StorageSettings) -> None:
    settings = _settings(tmp_path, redis_url, sqlite_url)
    settings.model_root = tiny_model_root
    settings.storage = local_storage
    async with database(sqlite_url) as sessions:
        world = World(settings=settings, sessions=sessions, redis=redis)
        task = await world.submit("alice")
        executor = LocalExecutor(settings=settings)
        async with running(world.dispatcher(executor)):
            await eventually(lambda: _job_ended(executor, task.id), timeout_s=90,
                             interval_s=0.1)
        status = await executor.status(job_name(task.id))
        await executor.close()
    assert (status.state, status.exit_code) == (JobState.SUCCEEDED, 0), status.message
    events = [e for _, e in await read_task_events(redis, task.id)]
    completed = [e for e in events if e.type is EventType.COMPLETED]
    assert [e.type for e in events].count(EventType.STARTED) == 1
    assert len(completed) == 1
    video = Path(local_storage.url.removeprefix("file://")) / completed[0].data["video_key"]
    assert video.stat().st_size > 0


async def test_concurrent_jobs_get_distinct_gpus_and_a_freed_gpu_is_reused(
        tmp_path: Path, redis_url: str) -> None:
    settings = _settings(tmp_path, redis_url)
    settings.gpu_capacity = 2
    executor = _executor(settings, tmp_path)
    specs = [_spec("sleep"), _spec("sleep"), _spec("sleep")]
    work = tmp_path / "jobs"
    try:
        await asyncio.gather(executor.launch(specs[0]), executor.launch(specs[1]))
        await eventually(lambda: _has_launches(tmp_path, 2))
        first = {_devices(work, s) for s in specs[:2]}
        await executor.cancel(specs[0].job_name, grace_s=5)
        await _next_update(executor)
        await executor.launch(specs[2])
        third = _devices(work, specs[2])
        held_by_second = _devices(work, specs[1])
        for s in specs[1:]:
            await executor.cancel(s.job_name, grace_s=0)
    finally:
        await executor.close()
    assert first == {"0", "1"}
    assert third != held_by_second


def _devices(work: Path, spec: JobSpec) -> str:
    marker = json.loads((work / spec.job_name / "job.json").read_text())
    return ",".join(marker["devices"])
