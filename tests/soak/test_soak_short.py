"""The short crash-and-restart soak: every role killed and restarted, Redis restarted, jobs
killed, while two users submit a dozen tasks; nothing is lost, doubled or over capacity.

The long version is ``scripts/soak.py``; the harness is ``tests/support/soak.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.services import fresh_postgres, postgres_reachable
from tests.support.soak import SoakConfig, run_soak

SHORT_CHAOS = ["dispatcher", "relay", "job", "api", "dispatcher", "redis", "relay", "job",
               "api", "dispatcher", "relay", "job"]


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_tasks_survive_role_crashes_redis_restarts_and_killed_jobs(
        tmp_path: Path, tiny_model_root: Path) -> None:
    if not postgres_reachable():
        pytest.skip("no PostgreSQL server on 127.0.0.1:5432")
    cfg = SoakConfig(tasks=12, users=2, capacity=2, chaos=SHORT_CHAOS,
                     chaos_interval_s=(2.0, 5.0), submit_spread_s=20.0, drain_timeout_s=180.0,
                     max_attempts=4, seed=7)
    lines: list[str] = []
    with fresh_postgres() as pg_url:
        report = run_soak(cfg, work=tmp_path, pg_url=pg_url, model_root=tiny_model_root,
                          log=lines.append)
    print("\n".join(lines[-40:]))
    print(report.summary())
    assert report.ok, report.summary()
    assert report.accepted == cfg.tasks
    assert sum(report.statuses.values()) == cfg.tasks
    assert report.statuses["completed"] >= 1
    assert report.videos_decoded == report.statuses["completed"]
    for role in ("api", "dispatcher", "relay", "redis restart"):
        assert report.kills[role] >= 1, role
