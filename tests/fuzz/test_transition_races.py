"""Random concurrent status moves on a real database never reach an illegal state.

Hypothesis draws rounds of moves (an expected status set and a target, legal or not);
each round's moves run at the same time, each in its own session, through
``db.tasks.transition`` — the one writer of ``status`` — on SQLite and PostgreSQL.
After every round: the moves that succeeded can be ordered into a legal path from the
status before the round to the status the database now holds, a move the state
machine forbids never succeeds, nothing leaves a terminal status, and exactly one
event is published per successful move.
"""

from __future__ import annotations

import asyncio
import itertools

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vidmaas.db import tasks as repo
from vidmaas.db.engine import make_engine, make_sessionmaker
from vidmaas.db.outbox import Entry
from vidmaas.domain import events as ev
from vidmaas.domain.ids import new_task_id
from vidmaas.domain.status import TaskStatus, can_transition
from vidmaas.errors import IllegalTransition, StaleTransition

STATUSES = list(TaskStatus)
Move = tuple[frozenset[TaskStatus], TaskStatus]

moves = st.tuples(st.frozensets(st.sampled_from(STATUSES), min_size=1, max_size=3),
                  st.sampled_from(STATUSES))
rounds = st.lists(st.lists(moves, min_size=1, max_size=4), min_size=1, max_size=6)


def _orderable(start: TaskStatus, done: list[Move], end: TaskStatus) -> bool:
    """Some order of the successful moves is a legal path from ``start`` to ``end``."""
    for order in itertools.permutations(done):
        cur = start
        for expected, to in order:
            if cur not in expected or not can_transition(cur, to):
                break
            cur = to
        else:
            if cur == end:
                return True
    return False


async def _play(db_url: str, user_id: str, plan: list[list[Move]]) -> None:
    engine = make_engine(db_url)
    sessions = make_sessionmaker(engine)
    published: list[Entry] = []

    async def publish(entry: Entry) -> None:
        published.append(entry)

    try:
        task_id = new_task_id()
        async with sessions() as s:
            await repo.create_task(session=s, new=repo.NewTask(
                id=task_id, user_id=user_id, model="tiny-t2v", prompt="race",
                params={"size": "64*64"}, gpus=1))
        status = TaskStatus.QUEUED

        async def attempt(expected: frozenset[TaskStatus], to: TaskStatus) -> bool:
            async with sessions() as s:
                try:
                    await repo.transition(session=s, task_id=task_id, to=to,
                                          expected=sorted(expected),
                                          event=ev.log(task_id, level="info",
                                                       message=f"-> {to.value}"),
                                          publish=publish)
                except (IllegalTransition, StaleTransition):
                    return False
            return True

        for batch in plan:
            before = len(published)
            results = await asyncio.gather(*(attempt(e, t) for e, t in batch))
            done = [m for m, ok in zip(batch, results, strict=True) if ok]
            for expected, to in done:
                assert all(can_transition(e, to) for e in expected), "an illegal move won"
            async with sessions() as s:
                row = await repo.get_task(session=s, task_id=task_id)
            assert row is not None
            now = TaskStatus(row.status)
            if status.terminal:
                assert not done and now == status, "a terminal task moved"
            assert _orderable(status, done, now), (status, done, now)
            assert len(published) - before == len(done)
            status = now
        # Every move that won stored its event as the task's next seq: no gap, no repeat.
        assert sorted(p.seq for p in published) == list(range(1, len(published) + 1))
    finally:
        await engine.dispose()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_concurrent_moves_never_reach_an_illegal_state(
        backend: str, request: pytest.FixtureRequest) -> None:
    db_url = str(request.getfixturevalue("sqlite_url" if backend == "sqlite" else "pg_url"))

    async def make_user() -> str:
        from vidmaas.db import users

        engine = make_engine(db_url)
        try:
            async with make_sessionmaker(engine)() as s:
                return (await users.create_user(session=s, name="racer")).id
        finally:
            await engine.dispose()

    user_id = asyncio.run(make_user())

    @given(plan=rounds)
    @settings(max_examples=30, deadline=None, database=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture,
                                     HealthCheck.too_slow])
    def run(plan: list[list[Move]]) -> None:
        asyncio.run(_play(db_url, user_id, plan))

    run()
