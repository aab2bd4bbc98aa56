"""The relay against real Redis and both databases: each event takes effect once."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from sqlalchemy import text

from tests.relay.support import COMPLETED_DATA, FAST, World, eventually, running
from vidmaas.bus import keys
from vidmaas.config import RelaySettings, Settings
from vidmaas.domain import events as ev
from vidmaas.domain.status import TaskStatus
from vidmaas.metrics import Metrics, render
from vidmaas.relay.service import Outcome, Relay


def relay(world: World, name: str = "r1", *, send_webhooks: bool = True,
          settings: RelaySettings = FAST, **kwargs: Any) -> Relay:
    return Relay(world.svc, consumer_name=name,
                 settings=settings.model_copy(update={"send_webhooks": send_webhooks}),
                 **kwargs)


async def test_each_runtime_event_takes_effect_on_the_task_row(world: World) -> None:
    task = await world.task(TaskStatus.DISPATCHING)
    assert await world.gpus_held(task.id) == 1
    await world.publish(ev.started(task.id, world_size=2, host="node-1"))
    await world.publish(ev.stage(task.id, ev.Stage.DENOISE))
    await world.publish(ev.progress(task.id, step=3, total=10, percent=42.5, eta_s=12.0))
    await world.publish(ev.heartbeat(task.id))
    await world.publish(ev.log(task.id, level="info", message="halfway"))
    metrics = Metrics(role="relay")
    async with running(relay(world, metrics=metrics)):
        await eventually(world.stream_drained)
        mid = await world.get(task.id)
        assert (mid.status, mid.progress, mid.stage, mid.eta_s) == ("running", 42.5, "denoise",
                                                                    12.0)
        assert mid.last_heartbeat_at is not None
        last = await world.publish(ev.Event(task.id, ev.EventType.COMPLETED, COMPLETED_DATA))
        await eventually(world.stream_drained)
    done = await world.get(task.id)
    assert done.status == "completed"
    assert done.progress == 100.0
    assert (done.video_key, done.poster_key) == (COMPLETED_DATA["video_key"],
                                                 COMPLETED_DATA["poster_key"])
    assert done.result is not None and done.result["num_frames"] == 5
    assert done.last_event_id == last
    assert await world.gpus_held(task.id) == 0
    text = render(metrics).decode()
    assert 'vidmaas_events_relayed_total{type="completed"} 1.0' in text
    assert 'vidmaas_task_outcomes_total{status="completed"} 1.0' in text
    # What the attempt used, as recorded on the row by the move that ended it.
    assert done.gpu_seconds is not None and done.gpu_seconds > 0
    assert f'vidmaas_gpu_seconds_total{{model="{done.model}"}} {done.gpu_seconds!r}' in text
    assert done.queue_wait_s is not None
    assert f'vidmaas_model_queue_wait_seconds_total{{model="{done.model}"}}' in text


async def test_a_preview_event_is_accepted_and_changes_nothing_on_the_row(
        world: World) -> None:
    task = await world.task(TaskStatus.RUNNING)
    await world.publish(ev.progress(task.id, step=2, total=6, percent=40.0, eta_s=9.0,
                                    stage_=ev.Stage.DENOISE))
    metrics = Metrics(role="relay")
    async with running(relay(world, metrics=metrics)):
        await eventually(world.stream_drained)
        before = await world.get(task.id)
        await world.publish(ev.preview(task.id, key=f"outputs/{task.id}/preview.jpg", step=3,
                                       total=6, width=256, height=144))
        await eventually(world.stream_drained)
    after = await world.get(task.id)
    shown = ("status", "progress", "stage", "eta_s", "last_heartbeat_at", "error_code")
    assert {k: getattr(after, k) for k in shown} == {k: getattr(before, k) for k in shown}
    assert await world.redis.xlen(keys.EVENTS_DEAD) == 0
    assert 'vidmaas_events_relayed_total{type="preview"} 1.0' in render(metrics).decode()


async def test_a_redelivered_event_takes_effect_once(world: World) -> None:
    task = await world.task(TaskStatus.RUNNING, webhook_url="http://127.0.0.1:9/h")
    p1 = ev.progress(task.id, step=5, total=10, percent=50.0, eta_s=5.0)
    p1_id = await world.publish(p1)
    done = ev.Event(task.id, ev.EventType.COMPLETED, COMPLETED_DATA)
    done_id = await world.publish(done)
    r = relay(world, send_webhooks=False)
    async with running(r):
        await eventually(world.stream_drained)
        await world.redeliver(p1, p1_id)
        await world.redeliver(done, done_id)
        await eventually(world.stream_drained)
    after = await world.get(task.id)
    assert (after.status, after.progress, after.last_event_id) == ("completed", 100.0, done_id)
    assert [d.event_type for d in await world.deliveries(task.id)] == ["completed"]


async def test_progress_never_goes_backwards(world: World) -> None:
    task = await world.task()
    for pct in (10.0, 60.0, 30.0):
        await world.publish(ev.progress(task.id, step=1, total=2, percent=pct, eta_s=None))
    async with running(relay(world)):
        await eventually(world.stream_drained)
    assert (await world.get(task.id)).progress == 60.0


async def test_only_a_denoising_step_records_the_time_of_the_last_step(world: World) -> None:
    task = await world.task()
    await world.publish(ev.progress(task.id, step=1, total=1, percent=12.0, eta_s=None,
                                    stage_=ev.Stage.LOAD_MODEL))
    await world.publish(ev.progress(task.id, step=0, total=1, percent=15.0, eta_s=None,
                                    stage_=ev.Stage.DENOISE))  # the stage's start
    await world.publish(ev.heartbeat(task.id))
    async with running(relay(world)):
        await eventually(world.stream_drained)
        before = await world.get(task.id)
        await world.publish(ev.progress(task.id, step=1, total=4, percent=32.5, eta_s=9.0,
                                        stage_=ev.Stage.DENOISE))
        await eventually(world.stream_drained)
    after = await world.get(task.id)
    assert (before.stage, before.last_step_at) == ("denoise", None)
    assert before.last_heartbeat_at is not None
    assert after.last_step_at is not None and after.last_step_at >= before.last_heartbeat_at


async def test_a_terminal_state_is_final(world: World) -> None:
    task = await world.task()
    await world.publish(ev.Event(task.id, ev.EventType.COMPLETED, COMPLETED_DATA))
    await world.publish(ev.progress(task.id, step=1, total=2, percent=20.0, eta_s=3.0))
    await world.publish(ev.stage(task.id, ev.Stage.DECODE))
    await world.publish(ev.failed(task.id, code="oom", message="late", retryable=False))
    await world.publish(ev.cancelled(task.id, by="alice"))
    await world.publish(ev.heartbeat(task.id))
    async with running(relay(world)):
        await eventually(world.stream_drained)
    after = await world.get(task.id)
    assert (after.status, after.progress, after.stage, after.error_code) == (
        "completed", 100.0, None, None)
    assert after.last_heartbeat_at is None


async def test_a_retryable_failure_requeues_and_cannot_fail_the_next_attempt(
        world: World) -> None:
    task = await world.task()
    failure = ev.failed(task.id, code="node_lost", message="the node went away", retryable=True)
    failure_id = await world.publish(failure)
    async with running(relay(world)):
        await eventually(world.stream_drained)
        retried = await world.get(task.id)
        assert (retried.status, retried.error_code) == ("queued", "node_lost")
        assert await world.gpus_held(task.id) == 0
        # The dispatcher runs attempt 2; then attempt 1's failure is delivered again.
        await world.lifecycle.transition(
            task_id=task.id, to=TaskStatus.DISPATCHING, expected=TaskStatus.QUEUED,
            fields={"attempts": 2},
            event=ev.dispatched(task.id, executor="fake", job_name="j", attempt=2))
        await world.lifecycle.transition(task_id=task.id, to=TaskStatus.RUNNING,
                                         expected=TaskStatus.DISPATCHING)
        await world.redeliver(failure, failure_id)
        await eventually(world.stream_drained)
    assert (await world.get(task.id)).status == "running"


async def test_a_final_failure_fails_the_task_and_frees_its_gpus(world: World) -> None:
    task = await world.task()
    await world.publish(ev.failed(task.id, code="bad_input", message="no", retryable=False))
    async with running(relay(world)):
        await eventually(world.stream_drained)
    after = await world.get(task.id)
    assert (after.status, after.error_code, after.error_message) == ("failed", "bad_input", "no")
    assert await world.gpus_held(task.id) == 0


async def test_cancelled_finishes_a_cancelling_or_running_task(world: World) -> None:
    cancelling = await world.task(TaskStatus.CANCELLING)
    running_task = await world.task(TaskStatus.RUNNING)
    for t in (cancelling, running_task):
        await world.publish(ev.cancelled(t.id, by="runtime"))
    async with running(relay(world)):
        await eventually(world.stream_drained)
    for t in (cancelling, running_task):
        assert (await world.get(t.id)).status == "cancelled"
        assert await world.gpus_held(t.id) == 0


async def test_a_relay_that_dies_before_acknowledging_loses_nothing(world: World) -> None:
    tasks = [await world.task() for _ in range(3)]
    for t in tasks:
        await world.publish(ev.progress(t.id, step=1, total=2, percent=50.0, eta_s=1.0))
        await world.publish(ev.Event(t.id, ev.EventType.COMPLETED, COMPLETED_DATA))
    r0 = relay(world, "r0")
    await r0.ensure_group()
    # A consumer reads the whole batch and dies without acknowledging any of it.
    read: Any = await world.redis.xreadgroup(keys.RELAY_GROUP, "dead", {keys.EVENTS: ">"},
                                             count=100)
    assert len(read[0][1]) == 3 * 4  # queued, dispatched, progress, completed
    assert await world.pending_in_group() == 12
    async with running(relay(world, "r2")):
        await eventually(world.stream_drained)
    for t in tasks:
        assert (await world.get(t.id)).status == "completed"
        assert await world.gpus_held(t.id) == 0


async def test_a_relay_killed_mid_batch_is_taken_over_and_each_event_applies_once(
        world: World) -> None:
    tasks = [await world.task(webhook_url="http://127.0.0.1:9/h") for _ in range(4)]
    for t in tasks:
        await world.publish(ev.started(t.id, world_size=1, host="h"))
        await world.publish(ev.Event(t.id, ev.EventType.COMPLETED, COMPLETED_DATA))
    applied: list[Outcome] = []
    killed = asyncio.Event()

    async def kill_after_three(outcome: Outcome) -> None:
        applied.append(outcome)
        if len(applied) == 3:
            killed.set()
            await asyncio.Event().wait()  # hangs here until the relay is cancelled

    victim = relay(world, "victim", send_webhooks=False, on_outcome=kill_after_three,
                   settings=RelaySettings(batch_entries=100, block_ms=50, claim_interval_s=60))
    victim_task = asyncio.create_task(victim.run(), name="test-relay-victim")
    await asyncio.wait_for(killed.wait(), 10)
    victim_task.cancel()
    await asyncio.gather(victim_task, return_exceptions=True)
    assert await world.pending_in_group() > 0
    survivor = relay(world, "survivor", send_webhooks=False)
    async with running(survivor):
        await eventually(world.stream_drained)
    for t in tasks:
        assert (await world.get(t.id)).status == "completed"
        hooks = sorted(d.event_type for d in await world.deliveries(t.id))
        assert hooks == ["completed", "started"]


async def test_malformed_entries_are_dead_lettered_and_the_relay_keeps_going(
        world: World) -> None:
    task = await world.task()
    unknown = ev.encode(ev.heartbeat("t" + "0" * 25))
    good = ev.encode(ev.progress(task.id, step=1, total=2, percent=10.0, eta_s=1.0))
    bad_entries: list[dict[str, str]] = [
        {**good, "data": "{not json", "event_id": "1-1"},
        {**good, "type": "exploded", "event_id": "1-2"},
        {**good, "v": "2", "event_id": "1-3"},
        {**unknown, "event_id": "1-4"},
        {**good},  # no event_id
        {"junk": "yes"},
    ]
    await relay(world).ensure_group()
    for fields in bad_entries:
        await world.redis.xadd(keys.EVENTS, fields)  # type: ignore[arg-type]
    await world.publish(ev.progress(task.id, step=2, total=2, percent=77.0, eta_s=0.0))
    async with running(relay(world)):
        await eventually(world.stream_drained)
    assert (await world.get(task.id)).progress == 77.0
    dead: Any = await world.redis.xrange(keys.EVENTS_DEAD)
    reasons = [f["dead_reason"] for _, f in dead]
    assert len(reasons) == len(bad_entries)
    assert any("bad field" in r for r in reasons)
    assert any("unsupported event version" in r for r in reasons)
    assert "unknown task" in reasons
    assert any("event_id" in r for r in reasons)
    assert all(f["dead_entry_id"] and f["dead_by"] == "r1" for _, f in dead)


async def test_two_relays_share_the_stream_and_apply_each_event_once(world: World) -> None:
    tasks = [await world.task(webhook_url="http://127.0.0.1:9/h") for _ in range(12)]
    a = relay(world, "a", send_webhooks=False,
              settings=RelaySettings(batch_entries=5, block_ms=50, claim_idle_ms=200,
                                   claim_interval_s=0.1))
    b = relay(world, "b", send_webhooks=False,
              settings=RelaySettings(batch_entries=5, block_ms=50, claim_idle_ms=200,
                                   claim_interval_s=0.1))
    async with running(a, b):
        for t in tasks:
            await world.publish(ev.started(t.id, world_size=1, host="h"))
            for pct in (25.0, 50.0, 75.0):
                await world.publish(ev.progress(t.id, step=1, total=4, percent=pct, eta_s=1.0))
            await world.publish(ev.Event(t.id, ev.EventType.COMPLETED, COMPLETED_DATA))
        await eventually(world.stream_drained)
    assert a.applied > 0 and b.applied > 0
    for t in tasks:
        after = await world.get(t.id)
        assert (after.status, after.progress) == ("completed", 100.0)
        assert sorted(d.event_type for d in await world.deliveries(t.id)) == [
            "completed", "started"]
        assert await world.gpus_held(t.id) == 0


async def test_completed_finishes_a_task_the_dispatcher_has_not_marked_running(
        world: World) -> None:
    task = await world.task(TaskStatus.DISPATCHING)
    await world.publish(ev.Event(task.id, ev.EventType.COMPLETED, COMPLETED_DATA))
    async with running(relay(world)):
        await eventually(world.stream_drained)
    after = await world.get(task.id)
    assert (after.status, after.progress) == ("completed", 100.0)
    assert await world.gpus_held(task.id) == 0


async def test_an_event_that_keeps_failing_to_apply_is_dead_lettered_after_a_few_tries(
        world: World) -> None:
    broken = await world.task()
    healthy = await world.task()
    async with world.svc.sessions() as s:  # a row no code path can make sense of
        await s.execute(text("UPDATE tasks SET status = 'weird' WHERE id = :id"),
                        {"id": broken.id})
        await s.commit()
    await world.publish(ev.progress(broken.id, step=1, total=2, percent=50.0, eta_s=1.0))
    await world.publish(ev.progress(healthy.id, step=1, total=2, percent=50.0, eta_s=1.0))
    async with running(relay(world)):
        await eventually(world.stream_drained)
    assert (await world.get(healthy.id)).progress == 50.0
    dead: Any = await world.redis.xrange(keys.EVENTS_DEAD)
    # The broken task's entries of that batch (queued, dispatched, progress) go together.
    assert {f["task_id"] for _, f in dead} == {broken.id}
    assert "progress" in {f["type"] for _, f in dead}
    assert all(f["dead_reason"].startswith("apply failed: ValueError") for _, f in dead)


async def test_a_relay_takes_its_tuning_from_the_relay_settings(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VIDMAAS_RELAY_BATCH_ENTRIES", "7")
    monkeypatch.setenv("VIDMAAS_RELAY_CLAIM_IDLE_MS", "1234")
    monkeypatch.setenv("VIDMAAS_RELAY_SEND_WEBHOOKS", "false")
    settings = Settings().relay
    assert (settings.batch_entries, settings.claim_idle_ms, settings.send_webhooks) == (
        7, 1234, False)
    tuned = Relay(world.svc, consumer_name="tuned", settings=settings)
    assert tuned.consumer.batch_entries == 7
    default = Relay(world.svc, consumer_name="default")
    assert default.settings == world.svc.settings.relay
    assert default.consumer.batch_entries == 100


async def test_a_relay_whose_redis_lost_everything_makes_its_group_again_and_goes_on(
        world: World) -> None:
    task = await world.task(TaskStatus.DISPATCHING)
    await world.publish(ev.started(task.id, world_size=1, host="node-1"))
    async with running(relay(world)):
        await eventually(lambda: _status_is(world, task.id, TaskStatus.RUNNING))
        await world.svc.redis.flushdb()  # the group and the streams are gone
        await world.publish(ev.Event(task.id, ev.EventType.COMPLETED, COMPLETED_DATA))
        await eventually(lambda: _status_is(world, task.id, TaskStatus.COMPLETED))


async def _status_is(world: World, task_id: str, status: TaskStatus) -> bool:
    return (await world.get(task_id)).status == status


@pytest.mark.parametrize("event", ["failed", "cancelled"])
async def test_a_status_event_racing_another_move_of_its_task_still_takes_effect(
        world: World, event: str) -> None:
    """A pooled task's worker can fail it before the dispatcher has marked it running:
    the relay reads ``dispatching``, the dispatcher's move to ``running`` lands before
    the relay's compare-and-set, and the event must still end the task."""
    task = await world.task(TaskStatus.DISPATCHING)
    lifecycle = world.lifecycle
    original = lifecycle.transition
    raced: list[str] = []

    async def transition(**kw: Any) -> Any:
        if kw.get("to") in (TaskStatus.FAILED, TaskStatus.CANCELLED) and not raced:
            raced.append(kw["task_id"])  # the dispatcher gets there first
            await original(task_id=kw["task_id"], to=TaskStatus.RUNNING,
                           expected=TaskStatus.DISPATCHING)
        return await original(**kw)

    lifecycle.transition = transition  # type: ignore[method-assign]
    if event == "failed":
        await world.publish(ev.failed(task.id, code="bad_input", message="odd", retryable=False))
    else:
        await world.publish(ev.cancelled(task.id, by="runtime"))
    async with running(relay(world)):
        await eventually(world.stream_drained)
    after = await world.get(task.id)
    assert raced == [task.id]
    assert after.status == event
    assert await world.gpus_held(task.id) == 0
