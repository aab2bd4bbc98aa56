"""``/v1/webhook-endpoints``: URLs a user registers once to hear about all their tasks.

Guarantees:
- Every route needs a key (``CallerDep``) and sees only the caller's own endpoints;
  another user's endpoint, admins' included, is the same 404
  ``webhook_endpoint_not_found`` as a missing one.
- The signing secret (``whsec_…``) is in the answer that created the endpoint and in
  no other answer, ever.
- A URL (at create and at change) is checked against the SSRF policy of task webhooks
  (422 on field ``url`` with ``webhook_target_not_allowed``, ``invalid_webhook_url``
  or ``webhook_host_unresolvable``); the relay checks it again before every delivery.
- A user has at most ``webhooks.max_endpoints_per_user`` endpoints (409
  ``webhook_endpoint_limit``).
- ``POST /{id}/test`` records one signed test delivery (sent by the relay like any
  other; 409 ``webhook_endpoint_disabled`` for a disabled endpoint); ``GET
  /{id}/deliveries`` is the endpoint's delivery log, newest first, paged by cursor.
"""

from __future__ import annotations

import secrets
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request

from vidmaas.api.creation import check_webhook_url
from vidmaas.api.deps import CallerDep, SessionDep, services_of
from vidmaas.api.schemas import (
    EndpointCreate,
    EndpointCreated,
    EndpointDeleted,
    EndpointDeliveryList,
    EndpointDeliveryOut,
    EndpointList,
    EndpointOut,
    EndpointUpdate,
    ErrorBody,
    endpoint_delivery_out,
    endpoint_out,
)
from vidmaas.db import endpoints as repo
from vidmaas.db import webhooks as deliveries
from vidmaas.db.models import WebhookEndpoint, utcnow
from vidmaas.domain import webhooks as policy
from vidmaas.domain.ids import is_endpoint_id, new_endpoint_id, new_endpoint_secret
from vidmaas.errors import Conflict, InvalidRequest, NotFound

router = APIRouter(prefix="/v1/webhook-endpoints", tags=["webhook endpoints"])

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody} for code in (401, 404, 409, 422, 503)}
EndpointId = Annotated[str, Path(max_length=64, description="A webhook endpoint id (we_…)")]


def _missing() -> NotFound:
    return NotFound("no such webhook endpoint", code="webhook_endpoint_not_found",
                    field="endpoint_id")


async def _own(session: SessionDep, endpoint_id: str, user_id: str) -> WebhookEndpoint:
    row = None if not is_endpoint_id(endpoint_id) else await repo.get(
        session=session, endpoint_id=endpoint_id, user_id=user_id)
    if row is None:
        raise _missing()
    return row


async def _check_url(request: Request, url: str) -> str:
    if not url.isprintable():
        raise InvalidRequest("the URL holds a control character", field="url",
                             code="invalid_webhook_url")
    await check_webhook_url(url, allow_hosts=services_of(request).settings.webhooks.allow_hosts,
                            field="url")
    return url


@router.post("", status_code=201, response_model=EndpointCreated, responses=_ERRORS,
             summary="Register a webhook endpoint (its secret is shown this once)")
async def create_endpoint(request: Request, body: EndpointCreate, caller: CallerDep,
                          session: SessionDep) -> EndpointCreated:
    if body.description is not None and not body.description.isprintable():
        raise InvalidRequest("the description holds a control character",
                             field="description", code="invalid_text")
    url = await _check_url(request, body.url)
    secret = new_endpoint_secret()
    try:
        row = await repo.create(session=session, new=repo.NewEndpoint(
            id=new_endpoint_id(), user_id=caller.id, url=url,
            events=policy.endpoint_events(body.events), secret=secret, enabled=body.enabled,
            description=body.description),
            limit=services_of(request).settings.webhooks.max_endpoints_per_user)
    except repo.EndpointLimit as e:
        raise Conflict(str(e), code="webhook_endpoint_limit") from e
    return EndpointCreated(**endpoint_out(row).model_dump(), secret=secret)


@router.get("", response_model=EndpointList, responses=_ERRORS,
            summary="List your webhook endpoints")
async def list_endpoints(
    caller: CallerDep, session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: Annotated[str | None, Query(max_length=64)] = None,
) -> EndpointList:
    if cursor is not None and not is_endpoint_id(cursor):
        raise InvalidRequest("bad cursor", field="cursor")
    rows = await repo.list_for_user(session=session, user_id=caller.id, limit=limit + 1,
                                    after=cursor)
    page = rows[:limit]
    return EndpointList(data=[endpoint_out(r) for r in page],
                        next_cursor=page[-1].id if len(rows) > limit else None)


@router.get("/{endpoint_id}", response_model=EndpointOut, responses=_ERRORS,
            summary="Show a webhook endpoint")
async def get_endpoint(endpoint_id: EndpointId, caller: CallerDep,
                       session: SessionDep) -> EndpointOut:
    return endpoint_out(await _own(session, endpoint_id, caller.id))


@router.patch("/{endpoint_id}", response_model=EndpointOut, responses=_ERRORS,
              summary="Enable or disable a webhook endpoint, change its URL or events")
async def update_endpoint(request: Request, endpoint_id: EndpointId, body: EndpointUpdate,
                          caller: CallerDep, session: SessionDep) -> EndpointOut:
    await _own(session, endpoint_id, caller.id)
    values: dict[str, Any] = {}
    if body.url is not None:
        values["url"] = await _check_url(request, body.url)
    if body.events is not None:
        values["events"] = policy.endpoint_events(body.events)
    if body.enabled is not None:
        values["enabled"] = body.enabled
    if "description" in body.model_fields_set:
        if body.description is not None and not body.description.isprintable():
            raise InvalidRequest("the description holds a control character",
                                 field="description", code="invalid_text")
        values["description"] = body.description
    row = await repo.change(session=session, endpoint_id=endpoint_id, user_id=caller.id,
                            values=values)
    if row is None:
        raise _missing()
    return endpoint_out(row)


@router.delete("/{endpoint_id}", response_model=EndpointDeleted, responses=_ERRORS,
               summary="Delete a webhook endpoint and its delivery log")
async def delete_endpoint(endpoint_id: EndpointId, caller: CallerDep,
                          session: SessionDep) -> EndpointDeleted:
    if not is_endpoint_id(endpoint_id) or not await repo.delete_endpoint(
            session=session, endpoint_id=endpoint_id, user_id=caller.id):
        raise _missing()
    return EndpointDeleted(id=endpoint_id)


@router.post("/{endpoint_id}/test", status_code=202, response_model=EndpointDeliveryOut,
             responses=_ERRORS, summary="Send a test delivery to a webhook endpoint")
async def test_endpoint(endpoint_id: EndpointId, caller: CallerDep,
                        session: SessionDep) -> EndpointDeliveryOut:
    endpoint = await _own(session, endpoint_id, caller.id)
    if not endpoint.enabled:
        raise Conflict("the webhook endpoint is disabled", code="webhook_endpoint_disabled")
    now = utcnow()
    event_id = "test_" + secrets.token_hex(12)
    delivery_id = policy.endpoint_delivery_id(endpoint_id=endpoint.id, task_id="",
                                              event_id=event_id)
    await deliveries.record(
        session=session, task_id=None, delivery_id=delivery_id, url=endpoint.url,
        event_id=event_id, event_type="test", endpoint_id=endpoint.id, due_at=now,
        payload=policy.test_payload(endpoint_id=endpoint.id, event_id=event_id,
                                    timestamp=now.isoformat()))
    return EndpointDeliveryOut(
        id=delivery_id, url=endpoint.url, event_id=event_id, event_type="test",
        status=deliveries.PENDING, attempts=0, last_status_code=None, last_error=None,
        next_attempt_at=now, created_at=now, delivered_at=None, task_id=None)


@router.get("/{endpoint_id}/deliveries", response_model=EndpointDeliveryList,
            responses=_ERRORS, summary="A webhook endpoint's delivery log, newest first")
async def list_endpoint_deliveries(
    endpoint_id: EndpointId, caller: CallerDep, session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: Annotated[str | None, Query(max_length=20, pattern=r"^[0-9]{1,18}$")] = None,
) -> EndpointDeliveryList:
    endpoint = await _own(session, endpoint_id, caller.id)
    rows = await repo.deliveries_page(session=session, endpoint_id=endpoint.id,
                                      limit=limit + 1,
                                      before=int(cursor) if cursor is not None else None)
    page = rows[:limit]
    return EndpointDeliveryList(data=[endpoint_delivery_out(r) for r in page],
                                next_cursor=str(page[-1].id) if len(rows) > limit else None)
