"""The event outbox: a status change and its event commit together, and the event reaches
the streams exactly once, in the task's order, whatever fails in between (real
PostgreSQL and SQLite, a private Redis stopped and started again)."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import subprocess
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from sqlalchemy import event as sa_event

from tests.dispatcher.dispatch_support import World, database, make_settings
from tests.support import services
from vidmaas.bus import keys
from vidmaas.bus.client import connect
from vidmaas.bus.events import StreamLimits, parse_entries
from vidmaas.bus.outbox import Outcome, publish_entry
from vidmaas.config import OutboxSettings
from vidmaas.db import outbox
from vidmaas.db import tasks as repo
from vidmaas.db.models import Task
from vidmaas.domain import events as ev
from vidmaas.domain.status import TaskStatus
from vidmaas.lifecycle import Lifecycle


@dataclass
class Redis:
    """A private Redis that a test stops and starts on the same port."""

    tmp: Path
    port: int
    proc: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()

    def start(self) -> None:
        self.proc = services.start_redis(self.tmp, port=self.port)


@pytest.fixture
def private(tmp_path: Path) -> Iterator[Redis]:
    port = services.free_port()
    r = Redis(tmp_path / "redis", port, services.start_redis(tmp_path / "redis", port=port))
    try:
        yield r
    finally:
        services.stop(r.proc)


@contextlib.asynccontextmanager
async def world_on(db_url: str, redis_url: str, **outbox_cfg: Any) -> AsyncIterator[World]:
    settings = make_settings(db_url=db_url, redis_url=redis_url)
    settings = settings.model_copy(update={"outbox": OutboxSettings(
        sweep_grace_s=0.0, **outbox_cfg)})
    client = connect(redis_url)
    try:
        async with database(db_url) as sessions:
            yield World(settings=settings, sessions=sessions, redis=client)
    finally:
        await client.aclose()


def _sweeper(world: World, client: aioredis.Redis) -> Lifecycle:
    """Another process's lifecycle: its own Redis client, the same database."""
    return Lifecycle(sessions=world.sessions, redis=client, settings=world.settings)


async def _through_three_moves(world: World, task: Task) -> None:
    """queued → dispatching → cancelling → cancelled, each with its event."""
    lc, tid = world.lifecycle, task.id
    await lc.transition(task_id=tid, to=TaskStatus.DISPATCHING, expected=TaskStatus.QUEUED,
                        fields={"attempts": 1},
                        event=lambda t: ev.dispatched(tid, executor="fake", job_name="j",
                                                      attempt=t.attempts))
    await lc.transition(task_id=tid, to=TaskStatus.CANCELLING, expected=TaskStatus.DISPATCHING,
                        event=ev.status_changed(tid, status=TaskStatus.CANCELLING))
    await lc.transition(task_id=tid, to=TaskStatus.CANCELLED, expected=TaskStatus.CANCELLING,
                        event=ev.cancelled(tid, by="alice"))


THREE = ["dispatched", "status", "cancelled"]


async def _stream(client: aioredis.Redis, task_id: str) -> list[str]:
    raw: Any = await client.xrange(keys.task_events(task_id))
    return [e.type.value for _id, e in parse_entries(raw)]


async def _global(client: aioredis.Redis, task_id: str) -> list[str]:
    raw: Any = await client.xrange(keys.EVENTS)
    return [e.type.value for _id, e in parse_entries(raw) if e.task_id == task_id]


async def _rows(world: World, task_id: str) -> list[tuple[int, str]]:
    async with world.sessions() as s:
        return [(e.seq, e.event.type.value) for e in await outbox.of_task(s, task_id=task_id)]


async def test_moves_whose_publish_fails_keep_their_events_and_the_sweep_publishes_them_once(
        db_url: str, private: Redis) -> None:
    async with world_on(db_url, private.url) as world:
        task = await world.submit("alice", enqueue=False)
        private.kill()
        await _through_three_moves(world, task)  # each commits; each publish fails
        assert (await world.get(task.id)).status == TaskStatus.CANCELLED
        assert await _rows(world, task.id) == [(1, "dispatched"), (2, "status"),
                                               (3, "cancelled")]
        assert world.lifecycle.publish_failing
        private.start()
        swept = await world.lifecycle.sweep_outbox()
        again = await world.lifecycle.sweep_outbox()
        assert (swept.published, swept.pending, again.published) == (3, 0, 0)
        assert await _stream(world.redis, task.id) == THREE
        assert await _global(world.redis, task.id) == THREE
        assert await _rows(world, task.id) == []
        assert not world.lifecycle.publish_failing


async def test_sweepers_racing_on_the_same_rows_publish_each_event_once_in_order(
        db_url: str, private: Redis) -> None:
    async with world_on(db_url, private.url) as world:
        tasks = [await world.submit(f"user{i % 2}", enqueue=False) for i in range(4)]
        private.kill()
        for task in tasks:
            await _through_three_moves(world, task)
        private.start()
        others = [connect(private.url) for _ in range(2)]
        try:
            sweeps = await asyncio.gather(world.lifecycle.sweep_outbox(),
                                          *(_sweeper(world, c).sweep_outbox() for c in others))
        finally:
            for c in others:
                await c.aclose()
        assert sum(s.published for s in sweeps) == 12
        for task in tasks:
            assert await _stream(world.redis, task.id) == THREE
            assert await _global(world.redis, task.id) == THREE
        async with world.sessions() as s:
            assert await outbox.count(s) == 0


async def test_a_publisher_that_died_after_writing_leaves_a_row_the_sweep_only_deletes(
        db_url: str, redis_url: str) -> None:
    async with world_on(db_url, redis_url) as world:
        task = await world.submit("alice", enqueue=False)
        async with world.sessions() as s:
            # The move committed, the process wrote the event and died before its DELETE.
            await repo.transition(session=s, task_id=task.id, to=TaskStatus.CANCELLED,
                                  expected=TaskStatus.QUEUED,
                                  event=ev.cancelled(task.id, by="alice"))
            [row] = await outbox.of_task(s, task_id=task.id)
        first = await publish_entry(world.redis, row.event, seq=row.seq,
                                    limits=StreamLimits())
        swept = await world.lifecycle.sweep_outbox()
        assert (first.outcome, swept.published, swept.duplicates) == (Outcome.PUBLISHED, 0, 1)
        assert await _stream(world.redis, task.id) == ["cancelled"]
        assert await _rows(world, task.id) == []


async def test_a_move_after_one_whose_event_is_still_waiting_publishes_both_in_order(
        db_url: str, redis_url: str) -> None:
    async with world_on(db_url, redis_url) as world:
        task = await world.submit("alice", enqueue=False)
        async with world.sessions() as s:
            # Committed with its event; the process died before publishing it.
            await repo.transition(session=s, task_id=task.id, to=TaskStatus.DISPATCHING,
                                  expected=TaskStatus.QUEUED,
                                  event=ev.dispatched(task.id, executor="fake", job_name="j",
                                                      attempt=1))
        await world.lifecycle.transition(
            task_id=task.id, to=TaskStatus.CANCELLING, expected=TaskStatus.DISPATCHING,
            event=ev.status_changed(task.id, status=TaskStatus.CANCELLING))
        assert await _stream(world.redis, task.id) == ["dispatched", "status"]
        assert await _rows(world, task.id) == []


async def test_the_event_and_the_move_commit_together_or_not_at_all(
        db_url: str, redis_url: str) -> None:
    async with world_on(db_url, redis_url) as world:
        task = await world.submit("alice", enqueue=False)

        def broken(_moved: Task) -> ev.Event:
            raise RuntimeError("the event cannot be built")

        with pytest.raises(RuntimeError):
            await world.lifecycle.transition(task_id=task.id, to=TaskStatus.CANCELLED,
                                             expected=TaskStatus.QUEUED, event=broken)
        after = await world.get(task.id)
        assert (after.status, after.event_seq) == (TaskStatus.QUEUED, 0)
        assert await _rows(world, task.id) == []


async def test_at_its_bound_the_outbox_takes_no_more_events_but_moves_still_commit(
        db_url: str, private: Redis) -> None:
    async with world_on(db_url, private.url, max_pending=2) as world:
        tasks = [await world.submit("alice", enqueue=False) for _ in range(3)]
        private.kill()
        for task in tasks:
            await world.lifecycle.transition(task_id=task.id, to=TaskStatus.CANCELLED,
                                             expected=TaskStatus.QUEUED,
                                             event=ev.cancelled(task.id, by="alice"))
        assert [(await world.get(t.id)).status for t in tasks] == [TaskStatus.CANCELLED] * 3
        assert await world.lifecycle.outbox_pending() == 2
        assert await _rows(world, tasks[2].id) == []  # dropped at the bound
        private.start()
        assert (await world.lifecycle.sweep_outbox()).published == 2
        assert [await _stream(world.redis, t.id) for t in tasks] == [["cancelled"]] * 2 + [[]]


@dataclass
class Cost:
    sql: collections.Counter[str]


@contextlib.asynccontextmanager
async def sql_cost(world: World) -> AsyncIterator[Cost]:
    c = Cost(collections.Counter())
    engine = world.sessions.kw["bind"].sync_engine

    def count(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        c.sql[statement.split(None, 1)[0].upper()] += 1

    sa_event.listen(engine, "before_cursor_execute", count)
    try:
        yield c
    finally:
        sa_event.remove(engine, "before_cursor_execute", count)


async def test_a_move_with_an_event_costs_one_insert_in_its_transaction_and_one_delete_after(
        db_url: str, redis_url: str) -> None:
    async with world_on(db_url, redis_url) as world:
        task = await world.submit("alice", enqueue=False)
        plain = await world.submit("alice", enqueue=False)
        async with sql_cost(world) as without:
            await world.lifecycle.transition(task_id=plain.id, to=TaskStatus.CANCELLED,
                                             expected=TaskStatus.QUEUED)
        async with sql_cost(world) as with_event:
            await world.lifecycle.transition(task_id=task.id, to=TaskStatus.CANCELLED,
                                             expected=TaskStatus.QUEUED,
                                             event=ev.cancelled(task.id, by="alice"))
        assert dict(without.sql) == {"UPDATE": 1, "SELECT": 1}
        assert dict(with_event.sql) == {"UPDATE": 1, "SELECT": 1, "INSERT": 1, "DELETE": 1}
        assert await _stream(world.redis, task.id) == ["cancelled"]

