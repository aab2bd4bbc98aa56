"""SQLAlchemy models: users, API keys, tasks, webhook endpoints and deliveries, daily usage,
the event outbox.

Guarantees: the same tables on PostgreSQL and SQLite (Alembic migrations in
``vidmaas.migrations`` create exactly these); timestamps are timezone-aware UTC on
both; a task's ``status`` column is written only by ``db.tasks.transition`` (and by
``create_task`` for the initial ``queued``).
"""

from __future__ import annotations

from datetime import UTC, date, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Date,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

from vidmaas.domain.events import spritesheet_of
from vidmaas.domain.status import TaskStatus


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite stores them naive)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class StatusType(TypeDecorator[TaskStatus]):
    """A task status stored as its string value, read back as the ``TaskStatus`` enum."""

    impl = String(16)
    cache_ok = True

    def process_bind_param(self, value: TaskStatus | str | None, dialect: Dialect) -> str | None:
        return None if value is None else TaskStatus(value).value

    def process_result_value(self, value: str | None, dialect: Dialect) -> TaskStatus | None:
        return None if value is None else TaskStatus(value)


class Base(DeclarativeBase):
    type_annotation_map = {datetime: UTCDateTime, dict[str, Any]: JSON}


class User(Base):
    __tablename__ = "users"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    is_admin: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    disabled_at: Mapped[datetime | None] = mapped_column(default=None)
    """Set when an admin disables the user: their keys stop working, their queued and
    running tasks go on."""
    weight: Mapped[float] = mapped_column(Float, default=1.0, server_default="1.0")
    """Fairness weight (``domain.fairness.Share``)."""
    max_priority: Mapped[str] = mapped_column(String(8), default="normal",
                                              server_default="normal")
    """The highest priority class the user may ask for."""
    quota_queued_tasks: Mapped[int | None] = mapped_column(Integer, default=None)
    quota_gpus_at_once: Mapped[int | None] = mapped_column(Integer, default=None)
    quota_gpu_seconds_day: Mapped[float | None] = mapped_column(Float, default=None)
    quota_gpu_seconds_month: Mapped[float | None] = mapped_column(Float, default=None)
    """The user's own quotas (``domain.quotas.Limits``); None: the settings' default."""


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(default=None)
    name: Mapped[str | None] = mapped_column(String(64), default=None)
    last_used_at: Mapped[datetime | None] = mapped_column(default=None)
    expires_at: Mapped[datetime | None] = mapped_column(default=None)


_QUEUED = text("status = 'queued'")


class Task(Base):
    __tablename__ = "tasks"
    __table_args__ = (
        UniqueConstraint("user_id", "idempotency_key", name="uq_tasks_user_idempotency"),
        Index("ix_tasks_user_id_id", "user_id", "id"),
        Index("ix_tasks_status", "status"),
        # A create counts the user's queued tasks twice (quota, guarded insert): this
        # keeps that proportional to what the user has waiting, not to their history
        # or to everyone's queue.
        Index("ix_tasks_user_queued", "user_id", postgresql_where=_QUEUED,
              sqlite_where=_QUEUED),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    model: Mapped[str] = mapped_column(String(64))
    prompt: Mapped[str] = mapped_column(Text)
    negative_prompt: Mapped[str | None] = mapped_column(Text, default=None)
    params: Mapped[dict[str, Any]] = mapped_column(JSON)
    """size, width, height, num_frames, steps, seed, fps, and what else the model takes."""
    input_key: Mapped[str | None] = mapped_column(String(512), default=None)
    source: Mapped[str] = mapped_column(String(16), default="native")
    """Which API created it: ``native`` or ``openai``."""
    rerun_of: Mapped[str | None] = mapped_column(String(32), default=None)
    """The task this one was made from (``POST /v1/tasks/{id}/rerun`` or an OpenAI remix);
    no foreign key: it records where the parameters came from, nothing depends on it."""

    status: Mapped[TaskStatus] = mapped_column(StatusType())
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    stage: Mapped[str | None] = mapped_column(String(32), default=None)
    eta_s: Mapped[float | None] = mapped_column(Float, default=None)
    gpus: Mapped[int] = mapped_column(Integer, default=1)
    priority: Mapped[str] = mapped_column(String(8), default="normal", server_default="normal")
    """The priority class asked for (``domain.fairness.Priority``)."""
    gpu_seconds: Mapped[float | None] = mapped_column(Float, default=None)
    """GPUs × seconds of running time, summed over attempts (set as each one ends)."""
    queue_wait_s: Mapped[float | None] = mapped_column(Float, default=None)
    """Seconds from creation to the first dispatch."""
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    """Jobs launched so far (the current one included)."""
    job_name: Mapped[str | None] = mapped_column(String(128), default=None)
    executor: Mapped[str | None] = mapped_column(String(16), default=None)

    video_key: Mapped[str | None] = mapped_column(String(512), default=None)
    poster_key: Mapped[str | None] = mapped_column(String(512), default=None)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    error_code: Mapped[str | None] = mapped_column(String(64), default=None)
    error_message: Mapped[str | None] = mapped_column(Text, default=None)

    idempotency_key: Mapped[str | None] = mapped_column(String(128), default=None)
    idempotency_fingerprint: Mapped[str | None] = mapped_column(String(64), default=None)
    """SHA-256 (hex) of the request the key came with; None for tasks stored before
    fingerprints (they match any request with their key)."""
    webhook_url: Mapped[str | None] = mapped_column(String(2048), default=None)
    webhook_events: Mapped[list[str] | None] = mapped_column(JSON, default=None)

    last_event_id: Mapped[str | None] = mapped_column(String(32), default=None)
    """The newest task-stream event the relay applied (idempotency)."""
    last_heartbeat_at: Mapped[datetime | None] = mapped_column(default=None)
    last_step_at: Mapped[datetime | None] = mapped_column(default=None)
    """When the relay applied the newest ``progress`` event of a denoising step (step 1
    or later): the watchdog's stall rule measures from it. It may belong to an earlier
    attempt; the rule only trusts one newer than ``dispatched_at``."""
    event_seq: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    """How many events ``transition`` has written to the outbox for this task: the
    ``seq`` of the newest one (per-task order of the outbox)."""

    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    queued_at: Mapped[datetime | None] = mapped_column(default=None)
    dispatched_at: Mapped[datetime | None] = mapped_column(default=None)
    started_at: Mapped[datetime | None] = mapped_column(default=None)
    cancel_requested_at: Mapped[datetime | None] = mapped_column(default=None)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)

    @property
    def spritesheet(self) -> tuple[str, dict[str, int]] | None:
        """The spritesheet's key and layout while the task's outputs exist (its video is
        there: not yet deleted), or None (none made, or deleted with the video)."""
        return spritesheet_of(self.result) if self.video_key is not None else None


class WebhookEndpoint(Base):
    """A URL a user registered once to hear about all their tasks (``/v1/webhook-endpoints``)."""

    __tablename__ = "webhook_endpoints"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    url: Mapped[str] = mapped_column(String(2048))
    events: Mapped[list[str]] = mapped_column(JSON)
    """The event types it gets (``domain.webhooks.SUBSCRIBABLE``)."""
    secret: Mapped[str] = mapped_column(String(128))
    """The ``whsec_…`` signing secret; shown to the user once, when the endpoint is made."""
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    description: Mapped[str | None] = mapped_column(String(256), default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class WebhookDelivery(Base):
    __tablename__ = "webhook_deliveries"
    __table_args__ = (Index("ix_webhook_deliveries_due", "status", "next_attempt_at"),
                      Index("ix_webhook_deliveries_endpoint", "endpoint_id", "id"))

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"),
                                    primary_key=True, autoincrement=True)
    task_id: Mapped[str | None] = mapped_column(ForeignKey("tasks.id", ondelete="CASCADE"),
                                                index=True)
    """None only for an endpoint's test delivery."""
    endpoint_id: Mapped[str | None] = mapped_column(
        ForeignKey("webhook_endpoints.id", ondelete="CASCADE"), default=None)
    """The registered endpoint it is for; None for a task's own URL or a global URL."""
    delivery_id: Mapped[str] = mapped_column(String(64), unique=True)
    url: Mapped[str] = mapped_column(String(2048))
    event_id: Mapped[str] = mapped_column(String(32))
    event_type: Mapped[str] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    status: Mapped[str] = mapped_column(String(16), default="pending")
    """pending, delivered, failed (gave up), refused (target not allowed), skipped (its
    endpoint was disabled before it was sent)."""
    last_status_code: Mapped[int | None] = mapped_column(Integer, default=None)
    last_error: Mapped[str | None] = mapped_column(Text, default=None)
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    next_attempt_at: Mapped[datetime | None] = mapped_column(default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    delivered_at: Mapped[datetime | None] = mapped_column(default=None)


class UsageDaily(Base):
    """GPU-seconds and queue wait per user, UTC day and model (what quotas and
    ``GET /v1/usage`` read; one row updated as each task's attempt ends)."""

    __tablename__ = "usage_daily"

    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"),
                                         primary_key=True)
    day: Mapped[date] = mapped_column(Date, primary_key=True)
    model: Mapped[str] = mapped_column(String(64), primary_key=True)
    tasks: Mapped[int] = mapped_column(Integer, default=0)
    """Tasks that ended (any terminal status) on that day."""
    gpu_seconds: Mapped[float] = mapped_column(Float, default=0.0)
    queue_wait_s: Mapped[float] = mapped_column(Float, default=0.0)
    """Summed seconds the day's dispatched tasks waited for their first dispatch."""


class OutboxEvent(Base):
    """An event written by ``db.tasks.transition`` in the transaction of its status
    change, waiting to be published to the Redis streams (``db.outbox``). A row exists
    only until its event is on the streams; ``(task_id, seq)`` orders one task's."""

    __tablename__ = "outbox"
    __table_args__ = (UniqueConstraint("task_id", "seq", name="uq_outbox_task_seq"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"),
                                    primary_key=True, autoincrement=True)
    task_id: Mapped[str] = mapped_column(String(32))
    """No foreign key: an event outlives nothing, but must never block deleting a task."""
    seq: Mapped[int] = mapped_column(Integer)
    """The task's ``event_seq`` the event got: 1, 2, 3… per task, without gaps."""
    type: Mapped[str] = mapped_column(String(16))
    data: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
