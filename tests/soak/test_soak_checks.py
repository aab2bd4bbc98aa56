"""The soak's own checks of warm pools (``tests/support/soak.py``): a live worker's GPUs
count against capacity, a worker without its lease counts once past its grace, and a
task busy on two workers at once is a violation."""

from __future__ import annotations

from typing import Any

from tests.support.soak import WORKER_UNLEASED_GRACE_S, Sampler, SoakReport


def _sampler(capacity: int = 2) -> Sampler:
    cluster: Any = None  # the checks below never touch processes or Redis
    return Sampler(cluster, SoakReport(), capacity)


def test_live_workers_and_jobs_holding_leases_within_capacity_are_no_violation() -> None:
    s = _sampler()
    s._check_capacity({"pool:w1": 1, "t1": 1}, {("t1", 10)}, {("w1", 20)}, {"t1": {10}}, 0.0)
    assert s.report.ok, s.report.violations


def test_a_worker_alive_without_its_lease_past_the_grace_exceeds_capacity() -> None:
    s = _sampler()
    leased = {"pool:w1": 1, "t1": 1}
    live = {("w1", 20), ("w2", 21)}
    s._check_capacity(leased, {("t1", 10)}, live, {"t1": {10}}, 0.0)
    assert s.report.ok, "within the grace a worker being stopped is not counted"
    s._check_capacity(leased, {("t1", 10)}, live, {"t1": {10}}, WORKER_UNLEASED_GRACE_S + 1)
    assert not s.report.ok
    assert any("capacity 2" in v for v in s.report.violations)
    assert s.report.max_worker_unleased_s > WORKER_UNLEASED_GRACE_S


def test_a_task_busy_on_two_workers_at_once_is_a_violation() -> None:
    s = _sampler()
    s._check_registry({"w1": "tiny-t2v|1|busy|0|t1|1|0", "w2": "tiny-t2v|1|idle|0|||3"},
                      {"pool:w1": 1, "pool:w2": 1}, {})
    assert s.report.ok, s.report.violations
    s._check_registry({"w1": "tiny-t2v|1|busy|0|t1|1|0", "w2": "tiny-t2v|1|busy|0|t1|2|0"},
                      {"pool:w1": 1, "pool:w2": 1}, {})
    assert not s.report.ok
    assert "busy on 2 workers" in s.report.violations[0]
    assert s.report.max_busy_workers == 2
