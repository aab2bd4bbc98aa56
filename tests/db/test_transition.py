"""transition(): compare-and-set on the real databases."""

from __future__ import annotations

import asyncio

import pytest

from vidmaas.db import tasks as repo
from vidmaas.db import users
from vidmaas.db.engine import make_engine, make_sessionmaker
from vidmaas.db.outbox import Entry
from vidmaas.domain import events as ev
from vidmaas.domain.ids import new_task_id
from vidmaas.domain.status import TaskStatus
from vidmaas.errors import IllegalTransition, NotFound, StaleTransition

PARAMS = {"size": "64*64", "width": 64, "height": 64, "num_frames": 9, "steps": 2, "seed": 1,
          "fps": 8}


async def _task(db_url: str) -> tuple[object, str]:
    engine = make_engine(db_url)
    sessions = make_sessionmaker(engine)
    async with sessions() as s:
        user = await users.create_user(session=s, name="u")
        task, _ = await repo.create_task(session=s, new=repo.NewTask(
            id=new_task_id(), user_id=user.id, model="tiny-t2v", prompt="p", params=PARAMS,
            gpus=1))
    return engine, task.id


async def test_of_many_concurrent_moves_from_queued_exactly_one_wins(db_url: str) -> None:
    engine, task_id = await _task(db_url)
    sessions = make_sessionmaker(engine)  # type: ignore[arg-type]
    published: list[Entry] = []

    async def publish(entry: Entry) -> None:
        published.append(entry)

    async def attempt(i: int) -> bool:
        async with sessions() as s:
            try:
                await repo.transition(session=s, task_id=task_id, to=TaskStatus.DISPATCHING,
                                      expected=TaskStatus.QUEUED, fields={"attempts": i},
                                      event=ev.dispatched(task_id, executor="x", job_name="j",
                                                          attempt=i), publish=publish)
            except StaleTransition:
                return False
            return True

    results = await asyncio.gather(*(attempt(i) for i in range(8)))
    assert sum(results) == 1
    assert [(p.seq, p.event.type) for p in published] == [(1, ev.EventType.DISPATCHED)]
    async with sessions() as s:
        task = await repo.get_task(session=s, task_id=task_id)
        assert task is not None and task.status == "dispatching" and task.dispatched_at
    await engine.dispose()  # type: ignore[attr-defined]


async def test_illegal_and_unknown_moves_raise_and_change_nothing(db_url: str) -> None:
    engine, task_id = await _task(db_url)
    sessions = make_sessionmaker(engine)  # type: ignore[arg-type]
    async with sessions() as s:
        with pytest.raises(IllegalTransition):
            await repo.transition(session=s, task_id=task_id, to=TaskStatus.COMPLETED,
                                  expected=TaskStatus.QUEUED)
        with pytest.raises(NotFound):
            await repo.transition(session=s, task_id=new_task_id(), to=TaskStatus.CANCELLED,
                                  expected=TaskStatus.QUEUED)
        with pytest.raises(ValueError, match="status"):
            await repo.transition(session=s, task_id=task_id, to=TaskStatus.CANCELLED,
                                  expected=TaskStatus.QUEUED, fields={"status": "completed"})
        await repo.transition(session=s, task_id=task_id, to=TaskStatus.CANCELLED,
                              expected=TaskStatus.QUEUED)
        with pytest.raises(StaleTransition):  # a legal move, but the task is not running
            await repo.transition(session=s, task_id=task_id, to=TaskStatus.QUEUED,
                                  expected=(TaskStatus.RUNNING, TaskStatus.DISPATCHING))
        task = await repo.get_task(session=s, task_id=task_id)
        assert task is not None and task.status == "cancelled" and task.finished_at
    await engine.dispose()  # type: ignore[attr-defined]


async def test_progress_never_goes_backwards(db_url: str) -> None:
    engine, task_id = await _task(db_url)
    sessions = make_sessionmaker(engine)  # type: ignore[arg-type]
    async with sessions() as s:
        assert await repo.update_progress(session=s, task_id=task_id, values={"progress": 40.0})
        assert not await repo.update_progress(session=s, task_id=task_id,
                                              values={"progress": 10.0})
        task = await repo.get_task(session=s, task_id=task_id)
        assert task is not None and task.progress == 40.0
    await engine.dispose()  # type: ignore[attr-defined]
