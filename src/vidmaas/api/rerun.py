"""A new task made from an existing one: the native rerun (``POST /v1/tasks/{id}/rerun``)
and the OpenAI remix (``POST /v1/videos/{id}/remix``).

Guarantees:
- ``request_from`` builds the new task's ``creation.CreateRequest`` from the source's
  stored fields: prompt, negative prompt, model, size, frame count, steps, the seed it
  resolved to (the same request makes the same clip), webhook URL and events, priority,
  and input image. Each override replaces one field; an override of ``None`` takes what
  the create takes when the field is omitted (a fresh random seed, the model's default
  size, no negative prompt, …), except the prompt, which cannot be null. The request
  then goes through ``creation.create_task`` like any other (quotas, idempotency,
  priorities, the model's limits, the SSRF policy) and the new task records
  ``rerun_of``.
- The input image is copied, not shared: its bytes are read back and stored again under
  the new task's id, so deleting either task's files never touches the other's. A source
  whose image is gone from the store is 409 ``source_image_missing``.
- ``read_overrides`` reads a JSON object: an empty body is ``{}`` (or, where the route
  needs a body, ``empty_body``, as on create); a form or
  another content type is 415 ``unsupported_content_type``; anything else is decoded
  exactly as a create's JSON body (``api.body``: the same limits and codes).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from starlette.requests import Request

from vidmaas.api.body import JSON_TYPES, content_type, decode_json_object, read_bytes
from vidmaas.api.creation import CreateRequest
from vidmaas.api.schemas import TaskCreate
from vidmaas.db.models import Task
from vidmaas.errors import Conflict, InvalidRequest, NotFound, UnsupportedMedia
from vidmaas.services import Services

OVERRIDABLE = frozenset(TaskCreate.model_fields)
"""A rerun may change any field a create takes."""


async def read_overrides(request: Request, *, limit_bytes: int,
                         required: bool = False) -> dict[str, Any]:
    """The body as a JSON object; ``{}`` when there is none, unless ``required``
    (then ``empty_body``, as on create)."""
    raw = await read_bytes(request, limit_bytes=limit_bytes)
    if content_type(request) not in JSON_TYPES:
        raise UnsupportedMedia("send a JSON object (or no body)",
                               code="unsupported_content_type")
    if not raw.strip() and not required:
        return {}
    return decode_json_object(raw)


async def request_from(svc: Services, source: Task, *, overrides: Mapping[str, Any],
                       origin: str) -> CreateRequest:
    """The create request of a new task like ``source`` with ``overrides`` applied."""
    unknown = set(overrides) - OVERRIDABLE
    if unknown:
        raise ValueError(f"not overridable: {sorted(unknown)}")
    p = source.params
    fields: dict[str, Any] = {
        "prompt": source.prompt, "model": source.model, "size": p["size"],
        "num_frames": p["num_frames"], "steps": p["steps"], "seed": p["seed"],
        "negative_prompt": source.negative_prompt, "webhook_url": source.webhook_url,
        "webhook_events": source.webhook_events, "priority": source.priority,
    }
    fields.update(overrides)
    fields["webhook_events"] = list(fields["webhook_events"] or ()) or None
    if fields["prompt"] is None:
        raise InvalidRequest("prompt may be left out (the source's is kept) but not null",
                             field="prompt")
    image = None
    if source.input_key is not None:
        try:
            image = await svc.store.get_bytes(source.input_key)
        except NotFound as e:
            raise Conflict("the source task's input image is no longer stored",
                           code="source_image_missing") from e
    return CreateRequest(**fields, image=image, source=origin, rerun_of=source.id)
