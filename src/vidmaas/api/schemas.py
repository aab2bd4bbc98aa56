"""Request and response bodies of the native API.

Guarantees: these models are the documented shapes in the OpenAPI document; every
response the routes return is built through them, so the document never lies.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from vidmaas.db.models import Task, WebhookDelivery, WebhookEndpoint
from vidmaas.domain.events import shown_error
from vidmaas.domain.status import TaskStatus

WebhookEvent = Literal["started", "progress", "completed", "failed", "cancelled"]
EndpointEvent = Literal["start", "started", "progress", "completed", "failed", "cancelled"]
"""An endpoint's filter takes Replicate's ``start`` for ``started`` too."""


class TaskCreate(BaseModel):
    """JSON body of ``POST /v1/tasks`` (use multipart to attach an image)."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, max_length=10_000)
    model: str | None = Field(default=None, max_length=64,
                              description="Model id from GET /v1/models; default: the first")
    size: str | None = Field(default=None, max_length=16, description="W*H, e.g. 1280*704")
    # Strict: JSON ``true`` or ``"9"`` is not a number of frames (lax mode would take both).
    num_frames: int | None = Field(default=None, ge=1, le=1000, strict=True)
    steps: int | None = Field(default=None, ge=1, le=1000, strict=True)
    seed: int | None = Field(default=None, ge=0, le=2**32 - 1, strict=True)
    negative_prompt: str | None = Field(default=None, max_length=10_000)
    webhook_url: str | None = Field(default=None, max_length=2048)
    webhook_events: list[WebhookEvent] | None = None
    priority: str | None = Field(
        default=None, max_length=16,
        description="low, normal or high, up to your highest class (default normal)")


class TaskRerun(TaskCreate):
    """JSON body of ``POST /v1/tasks/{id}/rerun``: overrides of the source task's fields,
    every one optional; a field sent (``null`` too: the create's default) replaces the
    source's, an unknown one is refused as on create."""

    prompt: str | None = Field(default=None, min_length=1,  # type: ignore[assignment]
                               max_length=10_000)


class ErrorInfo(BaseModel):
    code: str
    message: str
    field: str | None = None


class ErrorBody(BaseModel):
    error: ErrorInfo


class TaskParams(BaseModel):
    size: str
    width: int
    height: int
    num_frames: int
    steps: int
    seed: int
    fps: int


class TaskOut(BaseModel):
    id: str
    object: Literal["task"] = "task"
    status: TaskStatus
    model: str
    prompt: str
    negative_prompt: str | None
    params: TaskParams
    has_image: bool
    progress: float = Field(description="0–100, stage-weighted, never decreasing")
    stage: str | None
    eta_s: float | None
    queue_position: int | None = Field(description="1-based place in the fair order, if queued")
    attempts: int
    error: ErrorInfo | None
    result: dict[str, Any] | None
    video_url: str | None
    poster_url: str | None
    spritesheet_url: str | None = Field(default=None, description=(
        "A JPEG grid of evenly spaced frames of the video; null before completion and for "
        "videos made without one"))
    spritesheet: dict[str, int] | None = Field(default=None, description=(
        "The spritesheet's layout: columns, rows, count (tiles used, row by row), "
        "tile_width, tile_height"))
    created_at: datetime
    dispatched_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    updated_at: datetime
    rerun_of: str | None = Field(default=None, description=(
        "The task this one was made from (POST /v1/tasks/{id}/rerun); null otherwise"))


class TaskList(BaseModel):
    object: Literal["list"] = "list"
    data: list[TaskOut]
    next_cursor: str | None = Field(description="Pass as ?cursor= for the next page")


class ModelText(BaseModel):
    name: str
    description: str


class ModelOut(BaseModel):
    id: str
    display_name: str = Field(description="The English name (display.en.name)")
    description: str = Field(description="The English description")
    display: dict[str, ModelText] = Field(description=(
        "Name and description per language code: en always, zh where the registry has it"))
    pipeline: str
    sizes: list[str]
    default_size: str
    frame_counts: list[int]
    default_frames: int
    default_steps: int
    max_steps: int
    fps: int
    image: str
    gpus_per_job: int
    nnodes: int
    nproc_per_node: int
    tiny: bool
    available: bool = Field(default=True, description=(
        "False when the model needs more GPUs per job than the platform has in all: "
        "creating a task of it is refused (model_unavailable)"))
    unavailable_reason: str | None = Field(default=None, description=(
        "Why the model is unavailable; null when it is available"))


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelOut]
    default: str


def task_out(task: Task, *, position: int | None, base_path: str = "/v1/tasks") -> TaskOut:
    completed = task.status is TaskStatus.COMPLETED
    shown = shown_error(status=task.status, code=task.error_code, message=task.error_message)
    error = ErrorInfo(**shown) if shown is not None else None
    p = task.params
    sprite = task.spritesheet if completed else None
    return TaskOut(
        id=task.id, status=task.status, model=task.model, prompt=task.prompt,
        negative_prompt=task.negative_prompt,
        params=TaskParams(size=p["size"], width=p["width"], height=p["height"],
                          num_frames=p["num_frames"], steps=p["steps"], seed=p["seed"],
                          fps=p["fps"]),
        has_image=task.input_key is not None, progress=round(task.progress, 2), stage=task.stage,
        eta_s=task.eta_s, queue_position=position, attempts=task.attempts, error=error,
        result=task.result if completed else None,
        video_url=f"{base_path}/{task.id}/video" if completed and task.video_key else None,
        poster_url=f"{base_path}/{task.id}/poster" if completed and task.poster_key else None,
        spritesheet_url=f"{base_path}/{task.id}/spritesheet" if sprite else None,
        spritesheet=sprite[1] if sprite else None,
        created_at=task.created_at, dispatched_at=task.dispatched_at,
        started_at=task.started_at, finished_at=task.finished_at, updated_at=task.updated_at,
        rerun_of=task.rerun_of)


# ---------------------------------------------------------------- webhooks


class DeliveryOut(BaseModel):
    """One webhook delivery: one event to one target URL."""

    id: str
    """The ``webhook-id`` header the receiver saw (stable across retries)."""
    url: str
    event_id: str
    event_type: str
    status: str
    """pending, delivered, failed (gave up), refused (target not allowed) or skipped (its
    endpoint was disabled before it was sent)."""
    attempts: int
    last_status_code: int | None
    last_error: str | None
    next_attempt_at: datetime | None
    created_at: datetime
    delivered_at: datetime | None


class DeliveryList(BaseModel):
    object: Literal["list"] = "list"
    data: list[DeliveryOut]


class EndpointDeliveryOut(DeliveryOut):
    task_id: str | None = Field(description="The task the event is about; null for a test")


class EndpointDeliveryList(BaseModel):
    object: Literal["list"] = "list"
    data: list[EndpointDeliveryOut]
    next_cursor: str | None = Field(description="Pass as ?cursor= for older deliveries")


def _default_endpoint_events() -> list[EndpointEvent]:
    return ["started", "completed", "failed", "cancelled"]


class EndpointCreate(BaseModel):
    """Body of ``POST /v1/webhook-endpoints``."""

    model_config = ConfigDict(extra="forbid")

    url: str = Field(min_length=1, max_length=2048)
    events: list[EndpointEvent] = Field(
        default_factory=_default_endpoint_events,
        min_length=1, max_length=12,
        description="Event types to receive (default: all but progress)")
    description: str | None = Field(default=None, max_length=256)
    enabled: bool = Field(default=True, strict=True)


class EndpointUpdate(BaseModel):
    """Body of ``PATCH /v1/webhook-endpoints/{id}``: only the fields given change."""

    model_config = ConfigDict(extra="forbid")

    url: str | None = Field(default=None, min_length=1, max_length=2048)
    events: list[EndpointEvent] | None = Field(default=None, min_length=1, max_length=12)
    description: str | None = Field(default=None, max_length=256)
    enabled: bool | None = Field(default=None, strict=True)


class EndpointOut(BaseModel):
    id: str
    object: Literal["webhook_endpoint"] = "webhook_endpoint"
    url: str
    events: list[WebhookEvent]
    enabled: bool
    description: str | None
    created_at: datetime
    updated_at: datetime


class EndpointCreated(EndpointOut):
    secret: str = Field(description="The whsec_… signing secret: shown this once, never again")


class EndpointList(BaseModel):
    object: Literal["list"] = "list"
    data: list[EndpointOut]
    next_cursor: str | None = Field(description="Pass as ?cursor= for the next page")


class EndpointDeleted(BaseModel):
    id: str
    object: Literal["webhook_endpoint"] = "webhook_endpoint"
    deleted: Literal[True] = True


def delivery_out(row: WebhookDelivery) -> DeliveryOut:
    return DeliveryOut(
        id=row.delivery_id, url=row.url, event_id=row.event_id, event_type=row.event_type,
        status=row.status, attempts=row.attempts, last_status_code=row.last_status_code,
        last_error=row.last_error, next_attempt_at=row.next_attempt_at,
        created_at=row.created_at, delivered_at=row.delivered_at)


def endpoint_delivery_out(row: WebhookDelivery) -> EndpointDeliveryOut:
    return EndpointDeliveryOut(**delivery_out(row).model_dump(), task_id=row.task_id)


def endpoint_out(row: WebhookEndpoint) -> EndpointOut:
    return EndpointOut(id=row.id, url=row.url, events=row.events,  # type: ignore[arg-type]
                       enabled=row.enabled, description=row.description,
                       created_at=row.created_at, updated_at=row.updated_at)
