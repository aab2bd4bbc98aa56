"""Which quota a create would break, and when it resets."""

from __future__ import annotations

from datetime import UTC, datetime

from vidmaas.domain.quotas import DAY, MONTH, QUEUED, Limits, Usage, first_exceeded

NOW = datetime(2026, 12, 31, 22, 30, tzinfo=UTC)


def test_nothing_is_exceeded_under_every_limit() -> None:
    limits = Limits(queued_tasks=3, gpu_seconds_day=100, gpu_seconds_month=1000)
    assert first_exceeded(limits, Usage(2, 99.0, 999.0), now=NOW) is None


def test_the_queued_quota_frees_up_as_tasks_start_not_at_a_time() -> None:
    hit = first_exceeded(Limits(queued_tasks=3), Usage(queued_tasks=3), now=NOW)
    assert hit is not None and (hit.quota, hit.resets_at) == (QUEUED, None)
    assert hit.retry_after_s(NOW) == 30


def test_daily_and_monthly_gpu_seconds_reset_at_the_next_utc_day_and_month() -> None:
    day = first_exceeded(Limits(gpu_seconds_day=100), Usage(gpu_seconds_day=100.0), now=NOW)
    assert day is not None and day.quota == DAY
    assert day.resets_at == datetime(2027, 1, 1, tzinfo=UTC)
    assert day.retry_after_s(NOW) == 90 * 60 + 1
    month = first_exceeded(Limits(gpu_seconds_month=5), Usage(gpu_seconds_month=7.5), now=NOW)
    assert month is not None and month.quota == MONTH
    assert month.resets_at == datetime(2027, 1, 1, tzinfo=UTC)


def test_a_users_own_quota_overrides_the_default_and_none_keeps_it() -> None:
    base = Limits(queued_tasks=50, gpu_seconds_day=3600)
    mine = base.merged(queued_tasks=5, gpu_seconds_day=None, gpu_seconds_month=10.0)
    assert (mine.queued_tasks, mine.gpu_seconds_day, mine.gpu_seconds_month) == (5, 3600, 10.0)
