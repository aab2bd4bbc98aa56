"""Shared helpers of the dispatcher-core tests: settings, tasks, a stand-in relay."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import redis.asyncio as aioredis
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from vidmaas.config import DispatcherSettings, Settings
from vidmaas.db import tasks as repo
from vidmaas.db.engine import make_engine, make_sessionmaker
from vidmaas.db.models import Task
from vidmaas.db.users import create_user
from vidmaas.dispatcher.executors.base import Executor
from vidmaas.dispatcher.service import Dispatcher
from vidmaas.domain.ids import new_task_id
from vidmaas.domain.jobs import JobSpec
from vidmaas.domain.models import ModelRegistry
from vidmaas.domain.status import TaskStatus
from vidmaas.lifecycle import Lifecycle
from vidmaas.services import Services
from vidmaas.storage import store_from_settings

PARAMS = {"size": "64*64", "width": 64, "height": 64, "num_frames": 5, "steps": 2, "seed": 7,
          "fps": 8}


def make_settings(*, db_url: str, redis_url: str, capacity: int = 1,
                  **dispatcher: Any) -> Settings:
    base: dict[str, Any] = {"retry_backoff_s": 0.05, "reconcile_interval_s": 30.0}
    base.update(dispatcher)
    return Settings(gpu_capacity=capacity, database={"url": db_url},  # type: ignore[arg-type]
                    redis={"url": redis_url},  # type: ignore[arg-type]
                    dispatcher=DispatcherSettings(**base))


@contextlib.asynccontextmanager
async def database(url: str) -> AsyncIterator[async_sessionmaker[AsyncSession]]:
    engine = make_engine(url)
    try:
        yield make_sessionmaker(engine)
    finally:
        await engine.dispose()


class World:
    """Database, Redis and lifecycle of one test."""

    def __init__(self, *, settings: Settings, sessions: async_sessionmaker[AsyncSession],
                 redis: aioredis.Redis) -> None:
        self.settings = settings
        self.sessions = sessions
        self.redis = redis
        self.lifecycle = Lifecycle(sessions=sessions, redis=redis, settings=settings)
        self.registry = ModelRegistry.load()
        self._users: dict[str, str] = {}

    async def user(self, name: str) -> str:
        if name not in self._users:
            async with self.sessions() as s:
                self._users[name] = (await create_user(session=s, name=name)).id
        return self._users[name]

    async def submit(self, user: str, *, gpus: int = 1, enqueue: bool = True,
                     model: str = "tiny-t2v", prompt: str | None = None,
                     params: dict[str, Any] | None = None) -> Task:
        """A new task (``params`` override the small defaults, ``PARAMS``)."""
        uid = await self.user(user)
        async with self.sessions() as s:
            task, _ = await repo.create_task(session=s, new=repo.NewTask(
                id=new_task_id(), user_id=uid, model=model, prompt=prompt or f"a cat for {user}",
                params={**PARAMS, **(params or {})}, gpus=gpus))
        if enqueue:
            await self.lifecycle.admit_new(task)
        return task

    async def get(self, task_id: str) -> Task:
        async with self.sessions() as s:
            task = await repo.get_task(session=s, task_id=task_id)
        assert task is not None
        return task

    def services(self, *, registry: ModelRegistry | None = None) -> Services:
        """This world's connections as a role sees them (another registry if given)."""
        return Services(settings=self.settings, engine=self.sessions.kw["bind"],
                        sessions=self.sessions, redis=self.redis,
                        store=store_from_settings(self.settings.storage),
                        registry=registry or self.registry, lifecycle=self.lifecycle)

    def dispatcher(self, executor: Executor, *, registry: ModelRegistry | None = None,
                   **kwargs: Any) -> Dispatcher:
        return Dispatcher(self.services(registry=registry), executor, **kwargs)

    async def relay_finish(self, spec: JobSpec, kind: str) -> None:
        """What the relay does with a runtime's terminal event, for the fake executor."""
        if kind not in ("completed", "cancelled"):
            return
        to = TaskStatus.COMPLETED if kind == "completed" else TaskStatus.CANCELLED
        for _ in range(200):
            task = await self.get(spec.task_id)
            if TaskStatus(task.status) in (TaskStatus.RUNNING, TaskStatus.CANCELLING):
                break
            await asyncio.sleep(0.005)
        with contextlib.suppress(Exception):
            await self.lifecycle.finish(task_id=spec.task_id, to=to,
                                        expected=(TaskStatus.RUNNING, TaskStatus.CANCELLING))


@contextlib.asynccontextmanager
async def running(*dispatchers: Dispatcher) -> AsyncIterator[None]:
    """Run dispatchers for the body of the block, then stop them."""
    tasks = [asyncio.create_task(d.run(), name=f"test-dispatcher-{i}")
             for i, d in enumerate(dispatchers)]
    try:
        for d in dispatchers:
            await asyncio.wait_for(d.ready.wait(), 10)
        yield
    finally:
        for d in dispatchers:
            d.stop()
        await asyncio.gather(*tasks)


async def eventually(check: Callable[[], Awaitable[bool]], *, timeout_s: float = 10.0,
                     interval_s: float = 0.01) -> None:
    """Wait until ``check()`` is true; fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(interval_s)


async def statuses(world: World, tasks: list[Task]) -> list[str]:
    return [(await world.get(t.id)).status for t in tasks]
