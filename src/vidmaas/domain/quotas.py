"""Per-user quotas and the periods usage is counted in.

Guarantees:
- ``Limits`` is what one user may do: tasks waiting at once, GPUs held at once,
  GPU-seconds per UTC day and per UTC month. A user's own value (set by an admin)
  overrides the default of the settings; ``None`` means no limit.
- ``first_exceeded`` is the one judge of a create: it names the first quota the
  request would break (``queued_tasks``, ``gpu_seconds_day``, ``gpu_seconds_month``)
  and when that quota resets, or returns None. GPU-seconds count what finished tasks
  held; a task that is running counts once it ends (its own GPUs are bounded by the
  GPUs-at-once quota meanwhile).
- Periods are UTC: a day starts at 00:00, a month on its 1st.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

QUEUED = "queued_tasks"
GPUS = "gpus_at_once"
DAY = "gpu_seconds_day"
MONTH = "gpu_seconds_month"


@dataclass(frozen=True, slots=True)
class Limits:
    queued_tasks: int | None = 50
    gpus_at_once: int | None = None
    gpu_seconds_day: float | None = None
    gpu_seconds_month: float | None = None

    def merged(self, **overrides: float | int | None) -> Limits:
        """These defaults with a user's own values (None keeps the default)."""
        values = {k: v for k, v in overrides.items() if v is not None}
        return Limits(**{**{f: getattr(self, f) for f in self.__dataclass_fields__}, **values})


@dataclass(frozen=True, slots=True)
class Usage:
    """What a user has now: tasks waiting, GPU-seconds used today and this month."""

    queued_tasks: int = 0
    gpu_seconds_day: float = 0.0
    gpu_seconds_month: float = 0.0


@dataclass(frozen=True, slots=True)
class Exceeded:
    quota: str
    limit: float
    used: float
    resets_at: datetime | None
    """None: it frees up as tasks start (queued tasks), not at a time."""

    def retry_after_s(self, now: datetime) -> int:
        if self.resets_at is None:
            return 30
        return max(1, int((self.resets_at - now).total_seconds()) + 1)


def day_start(now: datetime) -> date:
    return now.astimezone(UTC).date()


def month_start(now: datetime) -> date:
    return day_start(now).replace(day=1)


def next_day(now: datetime) -> datetime:
    d = day_start(now) + timedelta(days=1)
    return datetime(d.year, d.month, d.day, tzinfo=UTC)


def next_month(now: datetime) -> datetime:
    m = month_start(now)
    year, month = (m.year + 1, 1) if m.month == 12 else (m.year, m.month + 1)
    return datetime(year, month, 1, tzinfo=UTC)


def first_exceeded(limits: Limits, usage: Usage, *, now: datetime) -> Exceeded | None:
    """The first quota one more task would break, or None if it may be created."""
    if limits.queued_tasks is not None and usage.queued_tasks >= limits.queued_tasks:
        return Exceeded(QUEUED, limits.queued_tasks, usage.queued_tasks, None)
    if limits.gpu_seconds_day is not None and usage.gpu_seconds_day >= limits.gpu_seconds_day:
        return Exceeded(DAY, limits.gpu_seconds_day, usage.gpu_seconds_day, next_day(now))
    if (limits.gpu_seconds_month is not None
            and usage.gpu_seconds_month >= limits.gpu_seconds_month):
        return Exceeded(MONTH, limits.gpu_seconds_month, usage.gpu_seconds_month,
                        next_month(now))
    return None
