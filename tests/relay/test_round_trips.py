"""What applying one event costs (SQL statements, stream reads), and the guarantees the
cheaper paths keep: out-of-order application, runs partly applied elsewhere, retries."""

from __future__ import annotations

import collections
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import event as sa_event

from tests.relay.support import COMPLETED_DATA, FAST, World
from vidmaas.bus.consumer import Delivery
from vidmaas.domain import events as ev
from vidmaas.domain.status import TaskStatus
from vidmaas.relay.service import Outcome, Relay


@dataclass
class Cost:
    sql: collections.Counter[str] = field(default_factory=collections.Counter)
    """Statements by their first keyword (SELECT, UPDATE, INSERT)."""
    redis: collections.Counter[str] = field(default_factory=collections.Counter)
    """Redis commands by name, from the server's own statistics (scripts' calls included)."""


async def _command_calls(world: World) -> dict[str, int]:
    stats: Any = await world.redis.info("commandstats")
    return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()}


@contextlib.asynccontextmanager
async def cost(world: World) -> AsyncIterator[Cost]:
    """Count what the block makes the database and Redis do."""
    c = Cost()
    engine = world.svc.engine.sync_engine

    def count(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        c.sql[statement.split(None, 1)[0].upper()] += 1

    before = await _command_calls(world)
    sa_event.listen(engine, "before_cursor_execute", count)
    try:
        yield c
    finally:
        sa_event.remove(engine, "before_cursor_execute", count)
        after = await _command_calls(world)
        c.redis.update({k: n - before.get(k, 0) for k, n in after.items()
                        if n - before.get(k, 0) and k != "info"})


class Probe:
    """A relay driven by hand: read what is new, apply chosen entries, record outcomes."""

    def __init__(self, world: World) -> None:
        self.outcomes: list[Outcome] = []
        self.relay = Relay(world.svc, consumer_name="probe", settings=FAST,
                           on_outcome=self._record)

    async def _record(self, outcome: Outcome) -> None:
        self.outcomes.append(outcome)

    async def read(self) -> list[Delivery]:
        await self.relay.ensure_group()
        return await self.relay.consumer.read_new(block_ms=100)

    async def settle(self) -> None:
        """Apply everything published so far (the set-up's own events)."""
        await self.relay.process(await self.read())
        self.outcomes.clear()


async def test_a_run_of_progress_events_costs_one_update_and_one_ack(world: World) -> None:
    task = await world.task()
    probe = Probe(world)
    await probe.settle()
    for pct in (10.0, 20.0, 30.0):
        await world.publish(ev.progress(task.id, step=1, total=3, percent=pct, eta_s=2.0))
    await world.publish(ev.heartbeat(task.id))
    run = await probe.read()
    async with cost(world) as c:
        await probe.relay.process(run)
    assert dict(c.sql) == {"UPDATE": 1}
    assert c.redis["xack"] == 1 and "xrange" not in c.redis
    after = await world.get(task.id)
    assert (after.progress, after.eta_s, after.last_event_id) == (30.0, 2.0, run[-1].event_id)
    assert after.last_heartbeat_at is not None
    assert [o.action for o in probe.outcomes] == ["applied"] * 4


async def test_a_completed_on_a_first_attempt_reads_the_row_once_and_not_the_stream(
        world: World) -> None:
    task = await world.task()
    probe = Probe(world)
    await probe.settle()
    done_id = await world.publish(ev.Event(task.id, ev.EventType.COMPLETED, COMPLETED_DATA))
    [entry] = await probe.read()
    async with cost(world) as c:
        await probe.relay.process([entry])
    # The relay's read, the transition's read of the attempt it ends (for its usage)
    # and its read of the row it wrote; one UPDATE moves the status, records the event
    # id and the task's GPU-seconds; one upsert adds them to the user's day.
    # The outbox adds nothing here: the relay's moves store no event of their own (the
    # runtime's ``completed`` is already on the stream). A move that does store one
    # costs one INSERT in its transaction and one DELETE after publishing
    # (tests/test_outbox.py), and one Redis script call.
    assert dict(c.sql) == {"SELECT": 3, "UPDATE": 1, "INSERT": 1}
    assert "xrange" not in c.redis
    assert c.redis["xack"] == 1
    after = await world.get(task.id)
    assert (after.status, after.last_event_id) == (TaskStatus.COMPLETED, done_id)
    assert await world.gpus_held(task.id) == 0
    assert [o.action for o in probe.outcomes] == ["applied"]


async def _second_attempt(world: World, task_id: str) -> None:
    """Attempt 1 failed and was retried; the dispatcher has dispatched attempt 2."""
    await world.lifecycle.fail_or_retry(await world.get(task_id), code="node_lost",
                                        message="gone", retryable=True, publish_failed=False)
    await world.lifecycle.transition(
        task_id=task_id, to=TaskStatus.DISPATCHING, expected=TaskStatus.QUEUED,
        fields={"attempts": 2},
        event=ev.dispatched(task_id, executor="fake", job_name="j", attempt=2))


async def test_a_late_started_from_an_earlier_attempt_does_not_start_the_next_one(
        world: World) -> None:
    task = await world.task(TaskStatus.DISPATCHING)
    probe = Probe(world)
    await probe.settle()
    await world.publish(ev.started(task.id, world_size=1, host="attempt-1"))
    [late] = await probe.read()
    await _second_attempt(world, task.id)
    async with cost(world) as c:
        await probe.relay.process([late])
    assert c.redis["xrange"] == 1  # a retried task asks its stream
    after = await world.get(task.id)
    assert (after.status, after.attempts) == (TaskStatus.DISPATCHING, 2)
    assert [o.action for o in probe.outcomes] == ["superseded"]
    assert await world.deliveries(task.id) == []


async def test_a_status_event_of_the_current_attempt_still_applies_after_a_retry(
        world: World) -> None:
    task = await world.task(TaskStatus.DISPATCHING)
    probe = Probe(world)
    await _second_attempt(world, task.id)
    await probe.settle()
    await world.publish(ev.started(task.id, world_size=1, host="attempt-2"))
    await probe.relay.process(await probe.read())
    assert (await world.get(task.id)).status == TaskStatus.RUNNING
    assert [o.action for o in probe.outcomes] == ["applied"]


async def test_last_event_id_never_goes_back_when_entries_apply_out_of_order(
        world: World) -> None:
    task = await world.task(TaskStatus.DISPATCHING)
    probe = Probe(world)
    await probe.settle()
    await world.publish(ev.started(task.id, world_size=1, host="h"))
    beat_id = await world.publish(ev.heartbeat(task.id))
    started, beat = await probe.read()
    # Another relay applied the later heartbeat first; then the started arrives here.
    await probe.relay.process([beat])
    await probe.relay.process([started])
    after = await world.get(task.id)
    assert (after.status, after.last_event_id) == (TaskStatus.RUNNING, beat_id)
    assert [o.action for o in probe.outcomes] == ["applied", "applied"]


async def test_a_run_partly_applied_elsewhere_applies_only_its_newer_events(
        world: World) -> None:
    task = await world.task()
    probe = Probe(world)
    await probe.settle()
    await world.publish(ev.progress(task.id, step=1, total=4, percent=40.0, eta_s=6.0))
    await world.publish(ev.stage(task.id, ev.Stage.DECODE))
    newest = await world.publish(ev.progress(task.id, step=2, total=4, percent=50.0,
                                             eta_s=5.0))
    first, stage, last = await probe.read()
    await probe.relay.process([first, stage])  # another relay's share of the run
    probe.outcomes.clear()
    async with cost(world) as c:
        await probe.relay.process([first, stage, last])
    assert [o.action for o in probe.outcomes] == ["duplicate", "duplicate", "applied"]
    assert c.sql["UPDATE"] == 2 and c.sql["SELECT"] == 1  # refused, read, written
    after = await world.get(task.id)
    assert (after.progress, after.stage, after.eta_s, after.last_event_id) == (
        50.0, "decode", 5.0, newest)


async def test_a_redelivered_completed_only_reads_and_releases(world: World) -> None:
    task = await world.task()
    probe = Probe(world)
    await probe.settle()
    await world.publish(ev.Event(task.id, ev.EventType.COMPLETED, COMPLETED_DATA))
    [done] = await probe.read()
    await probe.relay.process([done])
    probe.outcomes.clear()
    async with cost(world) as c:
        await probe.relay.process([done])
    assert dict(c.sql) == {"SELECT": 1}
    assert "xrange" not in c.redis
    assert [o.action for o in probe.outcomes] == ["duplicate"]
    assert await world.gpus_held(task.id) == 0


async def test_a_later_event_with_lower_progress_does_not_lower_it(world: World) -> None:
    task = await world.task()
    probe = Probe(world)
    await probe.settle()
    await world.publish(ev.progress(task.id, step=3, total=5, percent=60.0, eta_s=4.0))
    await probe.relay.process(await probe.read())
    await world.publish(ev.progress(task.id, step=2, total=5, percent=30.0, eta_s=9.0))
    await world.publish(ev.stage(task.id, ev.Stage.DECODE))
    await probe.relay.process(await probe.read())
    after = await world.get(task.id)
    # Newest wins: the run with the lower progress is not written at all.
    assert (after.progress, after.eta_s, after.stage) == (60.0, 4.0, None)
    assert await world.stream_drained()
