"""Who the caller is and what they used: ``GET /v1/me`` and ``GET /v1/usage``.

Guarantees:
- ``/v1/me`` answers the caller's identity, their weight, highest priority class and
  the quotas in force (their own over the settings' defaults), and their usage this
  UTC day and month (tasks ended, GPU-seconds) with their tasks waiting now.
- ``/v1/usage`` lists usage by UTC day and model between ``since`` and ``until``
  (inclusive; default: this month so far), at most ``MAX_DAYS`` days. Anyone sees
  their own; only an admin may name another ``user_id`` or ask for ``all=true``
  (403 ``admin_required`` otherwise), and never sees more than was asked for.
"""

from __future__ import annotations

import re
from datetime import date
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request

from vidmaas.api import admin_schemas as out
from vidmaas.api.deps import CallerDep, SessionDep, services_of
from vidmaas.api.schemas import ErrorBody
from vidmaas.db import usage, users
from vidmaas.db.models import utcnow
from vidmaas.domain.quotas import day_start, month_start
from vidmaas.errors import Forbidden, InvalidRequest, Unauthenticated

router = APIRouter(tags=["usage"])
MAX_DAYS = 400
_ID = re.compile(r"^[A-Za-z0-9]{1,32}$")

_ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": ErrorBody} for code in (401, 403,
                                                                                    422)}


@router.get("/v1/me", response_model=out.Me, tags=["auth"],
            responses={401: {"model": ErrorBody}},
            summary="Who the key belongs to: weight, priority, quotas and usage")
async def me(request: Request, caller: CallerDep, s: SessionDep) -> out.Me:
    now = utcnow()
    user = await users.get_user(session=s, user_id=caller.id)
    if user is None:
        raise Unauthenticated("unknown, revoked or expired API key")
    current = await usage.usage_now(s, user_id=user.id, now=now)
    tasks_today, _ = await usage.totals(s, user_id=user.id, since=day_start(now))
    tasks_month, _ = await usage.totals(s, user_id=user.id, since=month_start(now))
    return out.Me(id=user.id, name=user.name, is_admin=user.is_admin,
                  weight=float(user.weight), max_priority=user.max_priority,
                  limits=out.limits_out(user, services_of(request).settings),
                  usage=out.MeUsage(queued_tasks=current.queued_tasks, tasks_today=tasks_today,
                                    tasks_month=tasks_month,
                                    gpu_seconds_today=current.gpu_seconds_day,
                                    gpu_seconds_month=current.gpu_seconds_month))


@router.get("/v1/usage", response_model=out.UsageList, responses=_ERRORS,
            summary="GPU-seconds, tasks and queue wait by day and model")
async def usage_list(
    caller: CallerDep, s: SessionDep,
    since: Annotated[date | None, Query(description="First day (UTC); default: the 1st of "
                                                    "this month")] = None,
    until: Annotated[date | None, Query(description="Last day (UTC); default: today")] = None,
    user_id: Annotated[str | None, Query(max_length=64,
                                         description="Another user's (admins only)")] = None,
    all_users: Annotated[bool, Query(alias="all", description="Every user's (admins "
                                                              "only)")] = False,
) -> out.UsageList:
    now = utcnow()
    first = since or month_start(now)
    last = until or day_start(now)
    if user_id is not None and not _ID.fullmatch(user_id):
        raise InvalidRequest("not a user id", field="user_id")
    if first > last:
        raise InvalidRequest("since is after until", field="since")
    if (last - first).days >= MAX_DAYS:
        raise InvalidRequest(f"at most {MAX_DAYS} days at once", field="since")
    if (all_users or (user_id is not None and user_id != caller.id)) and not caller.is_admin:
        raise Forbidden("only an admin sees other users' usage", code="admin_required")
    who = None if all_users else (user_id or caller.id)
    rows = await usage.usage_rows(s, user_id=who, since=first, until=last)
    names = await users.names_of(session=s, user_ids=sorted({r.user_id for r in rows}))
    data = [out.UsageRowOut(day=r.day, model=r.model, user_id=r.user_id,
                            user_name=names.get(r.user_id), tasks=r.tasks,
                            gpu_seconds=r.gpu_seconds, queue_wait_s=r.queue_wait_s)
            for r in rows]
    return out.UsageList(since=first, until=last, data=data, totals=out.UsageTotals(
        tasks=sum(r.tasks for r in rows), gpu_seconds=sum(r.gpu_seconds for r in rows),
        queue_wait_s=sum(r.queue_wait_s for r in rows)))
