"""Usage in GPU-seconds and the quota check's one-statement read, on both databases."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

from vidmaas.db import tasks as repo
from vidmaas.db import usage, users
from vidmaas.db.engine import make_engine, make_sessionmaker
from vidmaas.domain.ids import new_task_id
from vidmaas.domain.status import TaskStatus

PARAMS = {"size": "64*64", "width": 64, "height": 64, "num_frames": 9, "steps": 2, "seed": 1,
          "fps": 8}


async def test_attempts_charge_their_gpu_seconds_to_the_task_and_the_users_day(
        db_url: str) -> None:
    engine = make_engine(db_url)
    sessions = make_sessionmaker(engine)
    now = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
    try:
        async with sessions() as s:
            alice = await users.create_user(session=s, name="alice")
            bob = await users.create_user(session=s, name="bob")
            tasks = []
            for user, model in ((alice, "m1"), (alice, "m1"), (alice, "m2"), (bob, "m1")):
                t, _ = await repo.create_task(session=s, new=repo.NewTask(
                    id=new_task_id(), user_id=user.id, model=model, prompt="p",
                    params=PARAMS, gpus=2))
                tasks.append(t)
            for t in tasks:  # running for 10 s on 2 GPUs
                t.status = TaskStatus.RUNNING
                t.started_at = now - timedelta(seconds=10)
                t.created_at = now - timedelta(seconds=25)
                await usage.note_dispatch(s, task=t, now=now - timedelta(seconds=15))
            # The first attempt of task 0 fails and is retried: charged, not finished.
            assert await usage.charge_attempt(s, task=tasks[0], now=now, finished=False) == 20.0
            for t in tasks:
                await usage.charge_attempt(s, task=t, now=now, finished=True)
            await s.commit()
            assert tasks[0].gpu_seconds == 40.0 and tasks[0].queue_wait_s == 10.0
            rows = await usage.usage_rows(s, user_id=alice.id, since=date(2026, 12, 1),
                                          until=date(2026, 12, 1))
            assert [(r.model, r.tasks, r.gpu_seconds, r.queue_wait_s) for r in rows] == [
                ("m1", 2, 60.0, 20.0), ("m2", 1, 20.0, 10.0)]
            everyone = await usage.usage_rows(s, user_id=None, since=date(2026, 12, 1),
                                              until=date(2026, 12, 31))
            assert {r.user_id for r in everyone} == {alice.id, bob.id}
            now_usage = await usage.usage_now(s, user_id=alice.id, now=now)
            assert (now_usage.gpu_seconds_day, now_usage.gpu_seconds_month) == (80.0, 80.0)
            tomorrow = await usage.usage_now(s, user_id=alice.id, now=now + timedelta(days=1))
            assert (tomorrow.gpu_seconds_day, tomorrow.gpu_seconds_month) == (0.0, 80.0)
            next_month = await usage.usage_now(s, user_id=alice.id, now=now + timedelta(days=31))
            assert next_month.gpu_seconds_month == 0.0
    finally:
        await engine.dispose()


async def test_usage_now_counts_only_the_users_waiting_tasks(db_url: str) -> None:
    engine = make_engine(db_url)
    sessions = make_sessionmaker(engine)
    try:
        async with sessions() as s:
            alice = await users.create_user(session=s, name="alice")
            bob = await users.create_user(session=s, name="bob")
            for user in (alice, alice, bob):
                await repo.create_task(session=s, new=repo.NewTask(
                    id=new_task_id(), user_id=user.id, model="m", prompt="p", params=PARAMS,
                    gpus=1))
            got = await usage.usage_now(s, user_id=alice.id, now=datetime.now(UTC))
            assert (got.queued_tasks, got.gpu_seconds_day) == (2, 0.0)
    finally:
        await engine.dispose()
