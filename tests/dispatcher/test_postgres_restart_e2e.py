"""PostgreSQL restarted under load, end to end: ``vidmaas api``, ``vidmaas dispatcher`` and
``vidmaas relay`` as processes on a private PostgreSQL cluster, with the local executor
running the tiny model. While jobs run, the database is stopped (``-m fast``, then ``-m
immediate``, a crash) and started again: during the outage the API answers 503
``database_unavailable`` with ``Retry-After``; afterwards the dispatcher and relay carry
on without a restart, every task completes exactly once (one ``completed`` event in its
stream, one task end in the usage table), no outbox event is published twice and the
outbox drains.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import pytest
import redis

from tests.support.services import private_postgres, private_postgres_unavailable
from tests.support.soak import (
    Cluster,
    SoakConfig,
    SoakReport,
    check_stream,
    make_users,
    outbox_count,
    usage_task_ends,
)

TASKS = 8
"""Enough that jobs are still running at the second outage on a fast machine."""
TASK = {"prompt": "a kite over a hill", "model": "tiny-t2v"}


def _statuses(c: httpx.Client, ids: list[str]) -> dict[str, str]:
    out = {}
    for task_id in ids:
        try:
            r = c.get(f"/v1/tasks/{task_id}")
        except httpx.HTTPError:
            out[task_id] = "?"
            continue
        out[task_id] = r.json()["status"] if r.status_code == 200 else "?"
    return out


def _wait(c: httpx.Client, ids: list[str], done: object, timeout_s: float) -> dict[str, str]:
    deadline = time.monotonic() + timeout_s
    while True:
        now = _statuses(c, ids)
        if done(now) or time.monotonic() > deadline:  # type: ignore[operator]
            return now
        time.sleep(0.5)


def _assert_unavailable(r: httpx.Response) -> None:
    assert r.status_code == 503, r.text
    assert int(r.headers["Retry-After"]) > 0
    assert r.json()["error"]["code"] == "database_unavailable"


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_the_dispatcher_and_relay_carry_on_after_postgresql_restarts_and_apply_nothing_twice(
        tmp_path: Path, tiny_model_root: Path) -> None:
    reason = private_postgres_unavailable()
    if reason is not None:
        pytest.skip(reason)
    from vidmaas.bus import keys
    from vidmaas.bus.events import parse_entries
    from vidmaas.db.migrate import upgrade_sync

    cfg = SoakConfig(tasks=TASKS, users=1, capacity=2, dispatchers=1, relays=1)
    with private_postgres(tmp_path / "pg") as pg:
        url = pg.create_database("e2e")
        upgrade_sync(url)
        [key] = asyncio.run(make_users(url, 1))
        cluster = Cluster(work=tmp_path, pg_url=url, model_root=tiny_model_root, cfg=cfg, pg=pg)
        try:
            cluster.start_all()
            with httpx.Client(base_url=cluster.base_url, timeout=10,
                              headers={"Authorization": f"Bearer {key}"}) as c:
                ids = []
                for i in range(TASKS):
                    r = c.post("/v1/tasks", json={**TASK, "seed": i})
                    assert r.status_code == 202, r.text
                    ids.append(r.json()["id"])
                for mode in ("fast", "immediate"):
                    # Jobs in flight (and events flowing) when the database goes away.
                    now = _wait(c, ids, lambda s: "running" in s.values(), 120)
                    assert "running" in now.values(), now
                    pg.stop(mode=mode)
                    _assert_unavailable(c.post("/v1/tasks", json=TASK))
                    _assert_unavailable(c.get(f"/v1/tasks/{ids[0]}"))
                    _assert_unavailable(c.get("/v1/tasks"))
                    time.sleep(2)  # the roles meet the outage: events wait, writes fail
                    pg.start()
                final = _wait(c, ids, lambda s: all(v == "completed" for v in s.values()), 240)
            assert set(final.values()) == {"completed"}, final
            for name in ("api", "dispatcher-0", "relay-0"):  # carried on, not restarted
                assert cluster.procs[name].poll() is None, f"{name} exited:\n" \
                    + cluster.tail(name)
            deadline = time.monotonic() + 60
            while asyncio.run(outbox_count(url)) and time.monotonic() < deadline:
                time.sleep(1)
        finally:
            cluster.stop_roles()
        try:
            assert asyncio.run(outbox_count(url)) == 0
            assert sum(asyncio.run(usage_task_ends(url)).values()) == TASKS
            report = SoakReport()
            client = redis.Redis.from_url(cluster.redis_url)
            try:
                for task_id in ids:
                    events = parse_entries(client.xrange(keys.task_events(task_id)))
                    check_stream(report, task_id, events)
                    kinds = [e.type.value for _, e in events]
                    assert kinds.count("completed") == 1, (task_id, kinds)
            finally:
                client.close()
            assert report.duplicate_events == 0 and report.ok, report.violations
        finally:
            cluster.stop_redis()
