"""The admin API: users, their keys, weights, priorities and quotas; the queue as it is.

Guarantees:
- Every route needs an admin's key (``deps.AdminDep``): no key or a bad one is 401,
  anyone else's is 403 ``admin_required``.
- A new key's secret is in the answer that created it (``KeyCreated.secret``) and
  nowhere else, ever: lists and reads show its prefix, name and dates only.
- A change is validated by ``db.users.check_changes`` (422 with ``invalid_name``,
  ``invalid_weight``, ``invalid_priority``, ``invalid_quota``, or ``invalid_expiry``
  for a key); a taken name is 409 ``user_exists``; unknown ids are 404
  ``user_not_found`` / ``key_not_found``.
- A change of weight or GPUs-at-once quota takes effect in the queue at once
  (``TaskQueue.set_share``: the user's next start stays where fairness put it, only
  later service is weighed anew); other quotas apply to the next create. Tasks
  already accepted are never dropped by a change, nor by disabling their user.
- Disabling a user, revoking a key or changing a user forgets the user's cached keys
  in this process at once; other API processes follow within ``api.key_cache_ttl_s``.
- ``GET /v1/admin/queue`` is a read of the queue and what runs: waiting tasks in the
  order admission takes them (with estimated starts, ``api.estimates``), counts by
  model and by user, the active tasks and the pool workers.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request

from vidmaas.api import admin_schemas as out
from vidmaas.api.deps import AdminDep, SessionDep, key_cache, services_of
from vidmaas.api.estimates import estimated_starts
from vidmaas.api.schemas import ErrorBody
from vidmaas.bus.client import REDIS_ERRORS
from vidmaas.bus.pools import PoolRegistry
from vidmaas.bus.queue import TaskQueue
from vidmaas.db import tasks as repo
from vidmaas.db import users
from vidmaas.db.models import User, utcnow
from vidmaas.errors import InvalidRequest, NotFound, QueueError

router = APIRouter(prefix="/v1/admin", tags=["admin"])

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody} for code in (401, 403, 404, 409, 422, 503)}
_ID = re.compile(r"^[A-Za-z0-9]{1,32}$")
MAX_KEY_LIFETIME_S = 10 * 366 * 24 * 3600.0
SHARE_FIELDS = frozenset({"weight", "quota_gpus_at_once"})

UserId = Annotated[str, Path(max_length=64, description="A user id (u…)")]
KeyId = Annotated[int, Path(ge=1, le=2**31 - 1, description="A key id (from the key list)")]


def _check_id(user_id: str) -> str:
    if not _ID.fullmatch(user_id):
        raise NotFound("no such user", code="user_not_found")
    return user_id


async def _user(s: SessionDep, user_id: str) -> User:
    user = await users.get_user(session=s, user_id=_check_id(user_id))
    if user is None:
        raise NotFound("no such user", code="user_not_found")
    return user


async def _apply_share(request: Request, user: User) -> None:
    """Weight and GPU quota into the queue now (the Lua keeps the next start in place)."""
    svc = services_of(request)
    try:
        await TaskQueue(svc.redis).set_share(user.id, users.share_of(user, svc.settings.quotas))
    except REDIS_ERRORS as e:
        raise QueueError("saved, but the queue did not take the new share yet; send the "
                         "change again") from e


def _key_name(name: str | None) -> str | None:
    if name is not None and (not name.strip() or not name.isprintable()):
        raise InvalidRequest("a key name is printable text", code="invalid_name",
                             field="key_name")
    return name


def _expiry(body: out.KeyCreate) -> datetime | None:
    if body.expires_in_s is not None and body.expires_at is not None:
        raise InvalidRequest("give expires_in_s or expires_at, not both", code="invalid_expiry",
                             field="expires_at")
    now = utcnow()
    if body.expires_in_s is not None:
        if not 0 < body.expires_in_s <= MAX_KEY_LIFETIME_S:
            raise InvalidRequest("expires_in_s must be positive and at most ten years",
                                 code="invalid_expiry", field="expires_in_s")
        return now + timedelta(seconds=body.expires_in_s)
    if body.expires_at is not None:
        at = body.expires_at if body.expires_at.tzinfo else body.expires_at.replace(tzinfo=UTC)
        if not now < at <= now + timedelta(seconds=MAX_KEY_LIFETIME_S):
            raise InvalidRequest("expires_at must be in the future, at most ten years ahead",
                                 code="invalid_expiry", field="expires_at")
        return at
    return None


# ---------------------------------------------------------------- users

@router.post("/users", status_code=201, response_model=out.UserCreated, responses=_ERRORS,
             summary="Create a user (and, unless key is false, a first API key)")
async def create_user(request: Request, body: out.UserCreate, caller: AdminDep,
                      s: SessionDep) -> out.UserCreated:
    settings = services_of(request).settings
    fields = users.check_changes(body.model_dump(exclude_unset=True,
                                                 exclude={"key", "key_name"}))
    name = _key_name(body.key_name) if body.key else None
    quotas = {k: v for k, v in fields.items() if k.startswith("quota_")}
    weight, top = fields.get("weight"), fields.get("max_priority")
    user = await users.create_user(
        session=s, name=fields["name"], is_admin=bool(fields.get("is_admin")),
        weight=settings.quotas.weight if weight is None else weight,
        max_priority=settings.quotas.max_priority if top is None else top, quotas=quotas)
    key = None
    if body.key:
        row, secret = await users.create_api_key(session=s, user_id=user.id, name=name)
        key = out.key_created(row, secret)
    if fields.keys() & SHARE_FIELDS:
        await _apply_share(request, user)
    return out.UserCreated(user=out.user_out(user, settings), key=key)


@router.get("/users", response_model=out.UserList, responses=_ERRORS,
            summary="List users, oldest first")
async def list_users(
    request: Request, caller: AdminDep, s: SessionDep,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: Annotated[str | None, Query(max_length=64)] = None,
    name: Annotated[str | None, Query(max_length=users.NAME_MAX,
                                      description="Only the user of this name")] = None,
) -> out.UserList:
    if cursor is not None and not _ID.fullmatch(cursor):
        raise InvalidRequest("not a cursor from this list", field="cursor")
    if name is not None and not name.isprintable():
        return out.UserList(data=[], next_cursor=None)
    page = await users.list_users_page(session=s, limit=limit + 1, after=cursor, name=name)
    settings = services_of(request).settings
    more = len(page) > limit
    page = page[:limit]
    return out.UserList(data=[out.user_out(u, settings) for u in page],
                        next_cursor=page[-1].id if more else None)


@router.get("/users/{user_id}", response_model=out.UserOut, responses=_ERRORS,
            summary="One user")
async def get_user(request: Request, user_id: UserId, caller: AdminDep,
                   s: SessionDep) -> out.UserOut:
    return out.user_out(await _user(s, user_id), services_of(request).settings)


@router.patch("/users/{user_id}", response_model=out.UserOut, responses=_ERRORS,
              summary="Change a user's name, admin role, weight, highest priority or quotas")
async def update_user(request: Request, user_id: UserId, body: out.UserUpdate,
                      caller: AdminDep, s: SessionDep) -> out.UserOut:
    settings = services_of(request).settings
    changes = users.check_changes(body.model_dump(exclude_unset=True))
    user = await users.update_user(session=s, user_id=_check_id(user_id), changes=changes,
                                   defaults=settings.quotas)
    key_cache(request).forget_user(user.id)
    if changes.keys() & SHARE_FIELDS:
        await _apply_share(request, user)
    return out.user_out(user, settings)


async def _set_disabled(request: Request, s: SessionDep, user_id: str, *,
                        disabled: bool) -> out.UserOut:
    user = await users.set_disabled(session=s, user_id=_check_id(user_id), disabled=disabled)
    key_cache(request).forget_user(user.id)
    return out.user_out(user, services_of(request).settings)


@router.post("/users/{user_id}/disable", response_model=out.UserOut, responses=_ERRORS,
             summary="Disable a user: their keys stop working; their tasks go on")
async def disable_user(request: Request, user_id: UserId, caller: AdminDep,
                       s: SessionDep) -> out.UserOut:
    return await _set_disabled(request, s, user_id, disabled=True)


@router.post("/users/{user_id}/enable", response_model=out.UserOut, responses=_ERRORS,
             summary="Enable a disabled user again")
async def enable_user(request: Request, user_id: UserId, caller: AdminDep,
                      s: SessionDep) -> out.UserOut:
    return await _set_disabled(request, s, user_id, disabled=False)


# ---------------------------------------------------------------- keys

@router.post("/users/{user_id}/keys", status_code=201, response_model=out.KeyCreated,
             responses=_ERRORS, summary="A new API key for a user (its secret is shown once)")
async def create_key(user_id: UserId, body: out.KeyCreate, caller: AdminDep,
                     s: SessionDep) -> out.KeyCreated:
    user = await _user(s, user_id)
    name, expires_at = _key_name(body.name), _expiry(body)
    row, secret = await users.create_api_key(session=s, user_id=user.id, name=name,
                                             expires_at=expires_at)
    return out.key_created(row, secret)


@router.get("/users/{user_id}/keys", response_model=out.KeyList, responses=_ERRORS,
            summary="A user's keys: prefix, name, created, last used, expiry, revoked")
async def list_keys(user_id: UserId, caller: AdminDep, s: SessionDep) -> out.KeyList:
    user = await _user(s, user_id)
    now = utcnow()
    return out.KeyList(data=[out.key_out(k, now=now)
                             for k in await users.list_keys(session=s, user_id=user.id)])


@router.delete("/keys/{key_id}", response_model=out.KeyOut, responses=_ERRORS,
               summary="Revoke a key (it stops working within the key cache's TTL)")
async def revoke_key(request: Request, key_id: KeyId, caller: AdminDep,
                     s: SessionDep) -> out.KeyOut:
    row = await users.revoke_key(session=s, key_id=key_id)
    key_cache(request).forget_user(row.user_id)
    return out.key_out(row)


# ---------------------------------------------------------------- the queue

@router.get("/queue", response_model=out.QueueView, responses=_ERRORS,
            summary="The queue by model and user, what runs now, and pool workers")
async def queue_view(request: Request, caller: AdminDep, s: SessionDep,
                     limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> out.QueueView:
    svc = services_of(request)
    queue = svc.lifecycle.queue
    order = await queue.order(limit=limit)
    starts = await estimated_starts(queue=queue, sessions=svc.sessions, order=order,
                                    capacity=svc.settings.gpu_capacity)
    depths, running_by_user = await queue.depths(), await queue.user_running()
    workers = await PoolRegistry(svc.redis).workers()
    active = await repo.active_tasks(session=s, limit=500)
    busy = {w.task_id: w.id for w in workers if w.task_id}
    ids = {c.user_id for c in order} | {t.user_id for t in active} | set(depths) \
        | set(running_by_user)
    names = await users.names_of(session=s, user_ids=sorted(ids))
    return out.QueueView(
        capacity=svc.settings.gpu_capacity, gpus_in_use=await queue.gpus_in_use(),
        queued_by_model=await queue.queued_by_model(), queued_by_user=depths,
        running_by_user={u: n for u, n in running_by_user.items() if n > 0},
        user_names=names, model_run_s=await queue.model_run_s(),
        queued=[out.QueuedOut(task_id=c.task_id, user_id=c.user_id,
                              user_name=names.get(c.user_id), model=c.model, gpus=c.gpus,
                              position=i + 1, starts_in_s=starts.get(c.task_id))
                for i, c in enumerate(order)],
        running=[out.RunningOut(task_id=t.id, user_id=t.user_id, user_name=names.get(t.user_id),
                                model=t.model, gpus=t.gpus, status=t.status.value,
                                progress=round(t.progress, 2), stage=t.stage,
                                dispatched_at=t.dispatched_at, started_at=t.started_at,
                                worker_id=busy.get(t.id))
                 for t in active],
        workers=[out.WorkerOut(id=w.id, model=w.model, gpus=w.gpus, state=w.state.value,
                               task_id=w.task_id, tasks_done=w.tasks_done, alive=w.alive)
                 for w in workers])
