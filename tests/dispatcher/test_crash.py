"""Crash safety: a real dispatcher process killed with SIGKILL at each step, restarted.

The dispatcher runs the local executor with the job double; every job start is
appended to a file, so "started twice" is visible even across processes.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from tests.dispatcher import job_double
from tests.dispatcher.dispatch_support import World, database, eventually, make_settings
from vidmaas.bus import keys
from vidmaas.bus.queue import TaskQueue
from vidmaas.dispatcher.executors import workdir
from vidmaas.dispatcher.executors.local import LocalExecutor
from vidmaas.domain.ids import job_name

_DISPATCHER = """
import asyncio, logging, os, sys
from vidmaas.config import Settings
from vidmaas.dispatcher.executors.local import LocalExecutor
from vidmaas.roles import run_dispatcher
logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(message)s")
settings = Settings()
executor = LocalExecutor(settings=settings, program=[sys.executable, os.environ["TEST_JOB_DOUBLE"]])
asyncio.run(run_dispatcher(settings, executor=executor, probes=False, test_hooks=True))
"""


def _start(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen([sys.executable, "-c", _DISPATCHER], env=env, stdout=out,
                                stderr=subprocess.STDOUT)


def _launches(path: Path) -> Counter[str]:
    lines = path.read_text().splitlines() if path.exists() else []
    return Counter(line.split()[0] for line in lines)


# Every step on SQLite; the step that hinges on the compare-and-set on PostgreSQL too
# (each case starts two Python processes, so the full matrix would be slow).
@pytest.fixture
def crash_db_url(request: pytest.FixtureRequest) -> str:
    return str(request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_url"))


@pytest.mark.parametrize(("step", "crash_db_url"), [
    ("after_claim", "sqlite"), ("after_dispatching", "sqlite"), ("after_launch", "sqlite"),
    ("after_dispatching", "postgresql")], indirect=["crash_db_url"])
async def test_a_dispatcher_killed_at_any_step_loses_no_task_and_starts_none_twice(
        step: str, crash_db_url: str, redis: aioredis.Redis, redis_url: str,
        tmp_path: Path) -> None:
    db_url = crash_db_url
    settings = make_settings(db_url=db_url, redis_url=redis_url, capacity=2,
                             claim_lease_s=1.0, reconcile_interval_s=0.3)
    settings.local.work_root = tmp_path / "jobs"
    launches = tmp_path / "launches.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("VIDMAAS_")}
    env.update({
        "VIDMAAS_DATABASE_URL": db_url, "VIDMAAS_REDIS_URL": redis_url,
        "VIDMAAS_GPU_CAPACITY": "2", "VIDMAAS_LOCAL_WORK_ROOT": str(tmp_path / "jobs"),
        "VIDMAAS_DISPATCHER_CLAIM_LEASE_S": "1.0",
        "VIDMAAS_DISPATCHER_RECONCILE_INTERVAL_S": "0.3",
        "TEST_JOB_DOUBLE": job_double.__file__, "TEST_LAUNCH_LOG": str(launches),
    })
    log = tmp_path / "dispatcher.log"
    q = TaskQueue(redis)
    cleanup = LocalExecutor(settings=settings)
    async with database(db_url) as sessions:
        world = World(settings=settings, sessions=sessions, redis=redis)
        first = await world.submit("alice")
        second = await world.submit("bob")
        paused_at: dict[str, Callable[[], Awaitable[bool]]] = {
            "after_claim": lambda: q.is_claimed(first.id),
            "after_dispatching": lambda: _status_is(world, first.id, "dispatching"),
            "after_launch": lambda: _has_pid(tmp_path / "jobs" / job_name(first.id)),
        }
        await redis.hset(keys.TEST_HOOK, step, "60")  # type: ignore[misc]
        proc = _start(env, log)
        try:
            await eventually(paused_at[step], timeout_s=30)
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            await redis.delete(keys.TEST_HOOK)
            proc = _start(env, log)
            await eventually(lambda: _all_running(world, [first.id, second.id]), timeout_s=30)
            await eventually(lambda: _launched(launches, first.id, second.id), timeout_s=30)
            await asyncio.sleep(0.5)  # room for a wrong second launch to show up
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            finally:
                proc.kill()
                for t in (first, second):
                    await cleanup.cancel(job_name(t.id), grace_s=0)
        assert proc.returncode == 0, log.read_text()[-3000:]
        assert _launches(launches) == {first.id: 1, second.id: 1}, log.read_text()[-3000:]
        for t in (first, second):
            assert (await world.get(t.id)).attempts == 1
    assert await q.claims() == []
    assert await q.leases() == {first.id: 1, second.id: 1}
    await cleanup.close()


async def _status_is(world: World, task_id: str, status: str) -> bool:
    return (await world.get(task_id)).status == status


async def _all_running(world: World, task_ids: list[str]) -> bool:
    return all([await _status_is(world, t, "running") for t in task_ids])


async def _has_pid(work_dir: Path) -> bool:
    marker = workdir.read_marker(work_dir)
    return marker is not None and marker.get("pid") is not None


async def _launched(path: Path, *task_ids: str) -> bool:
    seen = _launches(path)
    return all(seen[t] >= 1 for t in task_ids)
