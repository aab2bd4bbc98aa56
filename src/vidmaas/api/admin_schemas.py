"""Bodies of the admin API (``/v1/admin/…``), ``/v1/usage`` and ``/v1/me``.

Guarantees: these models are the documented shapes in the OpenAPI document and every
answer of those routes is built through them (``user_out``, ``key_out``); a key's
secret appears only in ``KeyCreated``, the answer of the request that made it. Value
ranges are documented in the schema (weight, priorities, non-negative quotas) but
checked by ``db.users.check_changes``, so a value out of range gets its own
machine-readable code rather than a generic one.
"""

from __future__ import annotations

from datetime import date, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from vidmaas.config import Settings
from vidmaas.db.models import ApiKey, User, utcnow
from vidmaas.db.users import KEY_NAME_MAX, NAME_MAX, limits_of
from vidmaas.domain.fairness import MAX_WEIGHT, MIN_WEIGHT

PRIORITIES = ["low", "normal", "high"]
_WEIGHT: dict[str, Any] = {"minimum": MIN_WEIGHT, "maximum": MAX_WEIGHT}
_PRIORITY: dict[str, Any] = {"enum": PRIORITIES}
_COUNT: dict[str, Any] = {"minimum": 0}


class Quotas(BaseModel):
    """Tasks waiting at once, GPUs held at once, GPU-seconds per UTC day and month."""

    queued_tasks: int | None
    gpus_at_once: int | None
    gpu_seconds_day: float | None
    gpu_seconds_month: float | None


class UserOut(BaseModel):
    id: str
    object: Literal["user"] = "user"
    name: str
    is_admin: bool
    disabled: bool
    disabled_at: datetime | None
    created_at: datetime
    weight: float = Field(description="Fairness weight (relative; 1 is the default)")
    max_priority: str = Field(description="Highest priority class the user may ask for")
    quotas: Quotas = Field(description="The user's own quotas; null follows the default")
    limits: Quotas = Field(description="The quotas in force: own values over the defaults "
                                       "(null: no limit)")


class UserList(BaseModel):
    object: Literal["list"] = "list"
    data: list[UserOut]
    next_cursor: str | None = Field(description="Pass as ?cursor= for the next page")


class KeyOut(BaseModel):
    id: int
    object: Literal["api_key"] = "api_key"
    user_id: str
    name: str | None
    prefix: str = Field(description="The first characters of the key, to recognise it")
    created_at: datetime
    last_used_at: datetime | None = Field(description="To about a minute")
    expires_at: datetime | None
    revoked_at: datetime | None
    active: bool = Field(description="Neither revoked nor expired")


class KeyCreated(KeyOut):
    secret: str = Field(description="The API key itself: shown in this answer only")


class KeyList(BaseModel):
    object: Literal["list"] = "list"
    data: list[KeyOut]


class _UserFields(BaseModel):
    model_config = ConfigDict(extra="forbid")

    is_admin: bool | None = None
    weight: float | None = Field(default=None, json_schema_extra=_WEIGHT)
    max_priority: str | None = Field(default=None, json_schema_extra=_PRIORITY)
    quota_queued_tasks: int | None = Field(default=None, json_schema_extra=_COUNT)
    quota_gpus_at_once: int | None = Field(default=None, json_schema_extra=_COUNT)
    quota_gpu_seconds_day: float | None = Field(default=None, json_schema_extra=_COUNT)
    quota_gpu_seconds_month: float | None = Field(default=None, json_schema_extra=_COUNT)


class UserCreate(_UserFields):
    """A new user; weight and highest priority default to the settings'."""

    name: str = Field(max_length=NAME_MAX)
    key: bool = Field(default=True, description="Also make a first API key")
    key_name: str | None = Field(default=None, max_length=KEY_NAME_MAX)


class UserUpdate(_UserFields):
    """Only the fields sent change; null resets weight and highest priority to the
    settings' defaults and makes a quota follow the default."""

    name: str | None = Field(default=None, max_length=NAME_MAX)


class UserCreated(BaseModel):
    user: UserOut
    key: KeyCreated | None


class KeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(default=None, max_length=KEY_NAME_MAX)
    expires_in_s: float | None = Field(default=None, description="Valid for this long",
                                       json_schema_extra={"exclusiveMinimum": 0})
    expires_at: datetime | None = Field(default=None, description="Valid until then "
                                                                  "(instead of expires_in_s)")


class UsageRowOut(BaseModel):
    day: date
    model: str
    user_id: str
    user_name: str | None
    tasks: int = Field(description="Tasks that ended that day after being dispatched")
    gpu_seconds: float
    queue_wait_s: float = Field(description="Summed waits of the day's first dispatches")


class UsageTotals(BaseModel):
    tasks: int
    gpu_seconds: float
    queue_wait_s: float


class UsageList(BaseModel):
    object: Literal["list"] = "list"
    since: date
    until: date
    data: list[UsageRowOut]
    totals: UsageTotals


class MeUsage(BaseModel):
    queued_tasks: int
    tasks_today: int
    tasks_month: int
    gpu_seconds_today: float
    gpu_seconds_month: float


class Me(BaseModel):
    id: str
    name: str
    is_admin: bool
    weight: float
    max_priority: str
    limits: Quotas = Field(description="The quotas in force (null: no limit)")
    usage: MeUsage = Field(description="This UTC day's and month's usage")


class QueuedOut(BaseModel):
    task_id: str
    user_id: str
    user_name: str | None
    model: str
    gpus: int
    position: int
    starts_in_s: float | None = Field(description="Estimated seconds until it starts; null "
                                                  "if it can never fit the capacity")


class RunningOut(BaseModel):
    task_id: str
    user_id: str
    user_name: str | None
    model: str
    gpus: int
    status: str
    progress: float
    stage: str | None
    dispatched_at: datetime | None
    started_at: datetime | None
    worker_id: str | None = None


class WorkerOut(BaseModel):
    id: str
    model: str
    gpus: int
    state: str
    task_id: str | None
    tasks_done: int
    alive: bool


class QueueView(BaseModel):
    capacity: int
    gpus_in_use: int
    queued_by_model: dict[str, int]
    queued_by_user: dict[str, int] = Field(description="user id → tasks waiting")
    running_by_user: dict[str, int] = Field(description="user id → jobs running")
    user_names: dict[str, str]
    model_run_s: dict[str, float] = Field(description="Typical seconds a model's task "
                                                      "holds its GPUs")
    queued: list[QueuedOut] = Field(description="The first waiting tasks, in the order "
                                                "admission takes them")
    running: list[RunningOut]
    workers: list[WorkerOut]


# ---------------------------------------------------------------- builders

def quotas_of(user: User) -> Quotas:
    return Quotas(queued_tasks=user.quota_queued_tasks, gpus_at_once=user.quota_gpus_at_once,
                  gpu_seconds_day=user.quota_gpu_seconds_day,
                  gpu_seconds_month=user.quota_gpu_seconds_month)


def limits_out(user: User, settings: Settings) -> Quotas:
    lim = limits_of(user, settings)
    return Quotas(queued_tasks=lim.queued_tasks, gpus_at_once=lim.gpus_at_once,
                  gpu_seconds_day=lim.gpu_seconds_day, gpu_seconds_month=lim.gpu_seconds_month)


def user_out(user: User, settings: Settings) -> UserOut:
    return UserOut(id=user.id, name=user.name, is_admin=user.is_admin,
                   disabled=user.disabled_at is not None, disabled_at=user.disabled_at,
                   created_at=user.created_at, weight=float(user.weight),
                   max_priority=user.max_priority, quotas=quotas_of(user),
                   limits=limits_out(user, settings))


def key_out(key: ApiKey, *, now: datetime | None = None) -> KeyOut:
    now = now or utcnow()
    active = key.revoked_at is None and (key.expires_at is None or key.expires_at > now)
    return KeyOut(id=key.id, user_id=key.user_id, name=key.name, prefix=key.prefix,
                  created_at=key.created_at, last_used_at=key.last_used_at,
                  expires_at=key.expires_at, revoked_at=key.revoked_at, active=active)


def key_created(key: ApiKey, secret: str) -> KeyCreated:
    return KeyCreated(**key_out(key).model_dump(), secret=secret)
