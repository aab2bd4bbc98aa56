"""The short crash-and-restart soak: every role killed and restarted, Redis restarted and
SIGKILLed, PostgreSQL restarted (``-m fast`` and ``-m immediate``), the object store
stopped during uploads, jobs and warm pool workers killed, while two users submit eight
tasks (half served by warm pool workers, half jobs of their own); nothing is
lost, doubled, applied twice or run over capacity, the outbox drains, and every video
is in the store and decodes.

The long version is ``scripts/soak.py``; the harness is ``tests/support/soak.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.services import private_postgres_unavailable, weed_binary
from tests.support.soak import SoakConfig, run_soak

SHORT_CHAOS = ["dispatcher", "worker", "job", "worker", "redis-hard", "relay", "worker",
               "pg", "api", "s3", "job", "redis-graceful", "dispatcher", "pg", "relay",
               "job", "api"]
"""The worker kills come early, while tasks still arrive, so one finds a worker busy."""


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_tasks_survive_role_and_worker_crashes_redis_kills_database_restarts_and_outages(
        tmp_path: Path, tiny_model_root: Path) -> None:
    reason = private_postgres_unavailable()
    if reason is not None:
        pytest.skip(reason)
    if weed_binary() is None:
        pytest.skip("no SeaweedFS (weed) binary")
    cfg = SoakConfig(tasks=8, users=2, capacity=2, chaos=SHORT_CHAOS,
                     chaos_interval_s=(1.0, 3.0), submit_spread_s=25.0, drain_timeout_s=180.0,
                     max_attempts=4, seed=7, pg_restart=True, s3_outage=True,
                     s3_outage_s=(2.0, 4.0), pools=True, job_every=2,
                     target_wait_s=8.0)
    lines: list[str] = []
    report = run_soak(cfg, work=tmp_path, model_root=tiny_model_root, log=lines.append)
    print("\n".join(lines[-60:]))
    print(report.summary())
    assert report.ok, report.summary()
    assert report.accepted == cfg.tasks
    assert sum(report.statuses.values()) == cfg.tasks
    assert report.statuses["completed"] >= 1
    assert report.videos_decoded == report.statuses["completed"]
    assert report.outbox_left == 0
    assert report.duplicate_events == 0
    assert report.usage_task_ends == cfg.tasks
    assert report.streams_checked == cfg.tasks
    assert report.workers_seen >= 2  # a killed worker was replaced
    for kind in ("api", "dispatcher", "relay", "redis restart", "redis hard kill",
                 "pg restart fast", "pg restart immediate", "s3 outage", "job",
                 "worker"):
        assert report.kills[kind] >= 1, kind
    # Whether a worker kill lands mid-task depends on timing (tasks of a second or so);
    # tests/dispatcher/test_pool_worker.py kills a busy worker deterministically.
