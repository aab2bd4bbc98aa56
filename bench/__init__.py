"""Reproducible benchmarks; each script prints its figures and the machine it ran on.

``python -m bench all [--short]`` runs every script here; ``python -m bench NAME`` one.
This module holds what the scripts share: the machine description, percentiles, and
the real backing services (a private Redis, a fresh PostgreSQL database) they run on.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform
import statistics
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]


def _ensure_repo_on_path() -> None:
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))


def machine() -> str:
    """One line: CPU count, CPU model, Python version, OS."""
    model = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return (f"machine: {os.cpu_count()} CPUs, {model}, Python {platform.python_version()}, "
            f"{platform.system()} {platform.release()}")


def pct(values: list[float], p: float) -> float:
    """The p-th percentile (0–100) of ``values``, nearest-rank; 0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(p / 100 * len(ordered) + 0.5) - 1))
    return ordered[k]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms"


def mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else 0.0


def vidmaas_bin() -> str:
    """The ``vidmaas`` console script of the running interpreter's environment."""
    candidate = Path(sys.executable).parent / "vidmaas"
    return str(candidate) if candidate.exists() else "vidmaas"


@contextlib.contextmanager
def backing_services() -> Iterator[tuple[str, str, Path]]:
    """(PostgreSQL URL migrated to the newest revision, Redis URL, a scratch directory);
    all removed at the end. Needs PostgreSQL on 127.0.0.1:5432 and ``redis-server``."""
    _ensure_repo_on_path()
    from tests.support.services import fresh_postgres, postgres_reachable, private_redis

    from vidmaas.db.migrate import upgrade_sync

    if not postgres_reachable():
        raise SystemExit("PostgreSQL is not reachable on 127.0.0.1:5432 "
                         "(set VIDMAAS_TEST_PG_URL)")
    with tempfile.TemporaryDirectory(prefix="vidmaas-bench-") as tmp, \
            private_redis(Path(tmp) / "redis") as (redis_url, _proc), \
            fresh_postgres() as pg_url:
        upgrade_sync(pg_url)
        yield pg_url, redis_url, Path(tmp)


async def make_user(db_url: str, name: str, *, admin: bool = False) -> tuple[str, str]:
    """(user id, API key) of a new user."""
    from vidmaas.db import users
    from vidmaas.db.engine import make_engine, make_sessionmaker

    engine = make_engine(db_url)
    try:
        async with make_sessionmaker(engine)() as s:
            u = await users.create_user(session=s, name=name, is_admin=admin)
            return u.id, await users.create_key(session=s, user_id=u.id)
    finally:
        await engine.dispose()


async def queued_backlog(lifecycle: Any, sessions: Any, users: list[str], n: int, *,
                         model: str = "tiny-t2v") -> list[str]:
    """``n`` tiny tasks of ``users`` in turn, inserted, then admitted (enqueued with their
    ``queued`` event) once they all exist: a dispatcher started next drains one backlog."""
    from vidmaas.db import tasks as repo
    from vidmaas.domain.ids import new_task_id

    ids = []
    for i in range(n):
        async with sessions() as s:
            task, _ = await repo.create_task(session=s, new=repo.NewTask(
                id=new_task_id(), user_id=users[i % len(users)], model=model, prompt="bench",
                params={"size": "64*64", "num_frames": 5, "steps": 2, "seed": 1, "fps": 8},
                gpus=1))
        ids.append(task.id)
    for tid in ids:
        async with sessions() as s:
            task = await repo.get_task(session=s, task_id=tid)
        assert task is not None
        await lifecycle.admit_new(task)
    return ids


async def complete_when_running(lifecycle: Any, task_id: str, *, tries: int = 1000) -> None:
    """Complete a task whose job just ended, as the relay would: it may still be
    ``dispatching`` (the dispatcher's move to ``running`` follows), so a stale move is
    tried again every millisecond; any other error, or ``tries`` stale moves, raises."""
    from vidmaas.domain.status import TaskStatus
    from vidmaas.errors import StaleTransition

    for _ in range(tries):
        try:
            await lifecycle.finish(task_id=task_id, to=TaskStatus.COMPLETED,
                                   expected=TaskStatus.RUNNING)
            return
        except StaleTransition:
            await asyncio.sleep(0.001)
    raise RuntimeError(f"task {task_id} never reached running")
