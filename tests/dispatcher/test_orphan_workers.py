"""Worker processes with no registration (Redis lost its data), against real Redis and a
database: the dispatcher gives each a lease to register again, and asks whether it
ended only once per quarter of that lease, not on every pass."""

from __future__ import annotations

import redis.asyncio as aioredis

from tests.dispatcher.dispatch_support import World, database, make_settings
from vidmaas.bus import recovery
from vidmaas.config import PoolModelSettings, PoolSettings
from vidmaas.dispatcher.executors.base import JobState, JobStatus, WorkerSpec
from vidmaas.dispatcher.executors.fake import FakeExecutor

ORPHAN = "wan22-pool-tiny-t2v-orphan1"


class OrphanExecutor(FakeExecutor):
    """A pool executor that knows one worker process no registry entry names."""

    def __init__(self) -> None:
        super().__init__()
        self.asked: list[str] = []
        self.stopped: list[str] = []
        self.ended = False

    async def start_worker(self, spec: WorkerSpec) -> None:
        raise AssertionError("no worker is started here")

    async def stop_worker(self, worker_id: str, *, grace_s: float) -> None:
        self.stopped.append(worker_id)

    async def worker_status(self, worker_id: str) -> JobStatus:
        self.asked.append(worker_id)
        return JobStatus(worker_id, JobState.SUCCEEDED if self.ended else JobState.RUNNING)

    async def list_workers(self) -> list[str]:
        return [] if ORPHAN in self.stopped else [ORPHAN]


async def test_an_unregistered_worker_is_asked_about_once_per_quarter_lease_and_stopped_once_ended(
        db_url: str, redis: aioredis.Redis, redis_url: str) -> None:
    settings = make_settings(db_url=db_url, redis_url=redis_url, capacity=2)
    settings.pools = PoolSettings(enabled=True, worker_lease_s=40.0,
                                  models={"tiny-t2v": PoolModelSettings(max_workers=0)})
    async with database(db_url) as sessions:
        world = World(settings=settings, sessions=sessions, redis=redis)
        executor = OrphanExecutor()
        dispatcher = world.dispatcher(executor)
        await recovery.set_epoch(redis, await recovery.server_run_id(redis))
        for _ in range(20):  # back-to-back passes, well within a quarter lease
            await dispatcher.pools.manage()
        assert executor.asked == [ORPHAN]  # the first pass asks; the others wait
        assert executor.stopped == []
        # Once the process has ended, the next ask (a quarter lease on) stops it.
        executor.ended = True
        dispatcher.pools._orphan_checked[ORPHAN] -= 10.0
        await dispatcher.pools.manage()
        assert executor.asked == [ORPHAN, ORPHAN]
        assert executor.stopped == [ORPHAN]
