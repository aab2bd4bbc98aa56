"""The quota and priority check of a create, for ``api.creation`` to call.

Guarantees:
- ``admit`` reads the caller's quota terms and usage in one statement (``db.usage.standing``,
  which replaces the old queued-task count, so a create makes no extra round trip)
  and locks the row until the create's transaction ends; it then judges the asked
  priority (``db.users.priority_for``: 422 ``invalid_priority`` /
  ``priority_not_allowed`` on field ``priority``) and the quotas in force
  (``domain.quotas.first_exceeded``): 429 ``too_many_queued`` or ``quota_exceeded``,
  ``field`` naming the quota (``queued_tasks``, ``gpu_seconds_day``,
  ``gpu_seconds_month``), ``Retry-After`` until it resets (the next UTC day or month)
  or 30 s for queued tasks, which free up as tasks start.
- The ``Admission`` it returns carries what the insert and the enqueue need: the
  priority class, the user's ``Share`` and the queued-tasks limit, which the insert
  re-checks in its own statement (``create_task(queued_limit=…)``), so concurrent
  creates never exceed it.
- GPUs at once is not a create quota: the queue holds it at admission.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from vidmaas.config import Settings
from vidmaas.db import usage, users
from vidmaas.db.engine import Session
from vidmaas.db.models import utcnow
from vidmaas.domain.fairness import Priority, Share
from vidmaas.domain.quotas import QUEUED, Exceeded, first_exceeded
from vidmaas.errors import RateLimited, Unauthenticated


@dataclass(frozen=True, slots=True)
class Admission:
    priority: Priority
    share: Share
    queued_limit: int | None


def quota_error(exceeded: Exceeded, *, now: datetime) -> RateLimited:
    """The 429 of a create that would break ``exceeded``."""
    if exceeded.quota == QUEUED:
        return RateLimited(f"you have {int(exceeded.used)} tasks waiting (your limit is "
                           f"{int(exceeded.limit)}); wait for some to start",
                           retry_after_s=exceeded.retry_after_s(now), code="too_many_queued",
                           field=exceeded.quota)
    period = "today" if exceeded.quota == "gpu_seconds_day" else "this month"
    resets = exceeded.resets_at.isoformat() if exceeded.resets_at else "later"
    return RateLimited(f"you used {exceeded.used:.0f} of your {exceeded.limit:.0f} "
                       f"GPU-seconds {period}; the quota resets at {resets}",
                       retry_after_s=exceeded.retry_after_s(now), code="quota_exceeded",
                       field=exceeded.quota)


async def admit(s: Session, *, settings: Settings, user_id: str, priority: str | None,
                now: datetime | None = None) -> Admission:
    """Judge a create of ``user_id`` asking for ``priority`` (see the module docstring)."""
    now = now or utcnow()
    user = await usage.standing(s, user_id=user_id, now=now)
    if user is None:
        raise Unauthenticated("unknown, revoked or expired API key")
    current = user.usage
    cls = users.priority_for(priority, maximum=user.max_priority)
    limits = users.limits_of(user, settings)
    exceeded = first_exceeded(limits, current, now=now)
    if exceeded is not None:
        raise quota_error(exceeded, now=now)
    return Admission(priority=cls, share=users.share_of(user, settings.quotas),
                     queued_limit=limits.queued_tasks)
