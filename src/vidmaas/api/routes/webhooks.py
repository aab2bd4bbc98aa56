"""Webhook validation at task creation, and the delivery log of a task.

Guarantees:
- ``install(app)`` sets ``app.state.validate_webhook``: task creation calls it with the
  requested ``webhook_url``, and it raises ``InvalidRequest`` (422) with field
  ``webhook_url`` and code ``webhook_target_not_allowed`` for a private, loopback,
  link-local, multicast, reserved or metadata target not in ``webhooks.allow_hosts``
  (``invalid_webhook_url`` for a URL that is not http(s), and
  ``webhook_host_unresolvable`` for a name that does not resolve). The same policy is
  applied again by the relay before every delivery.
- ``GET /v1/tasks/{id}/webhooks`` lists a task's deliveries to its owner (an admin
  sees all, the operator's global URLs included); someone else's task is 404 like a
  missing one. Payloads are not echoed.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, FastAPI, Request

from vidmaas.api.deps import CallerDep, SessionDep
from vidmaas.api.routes.tasks import load_own
from vidmaas.api.schemas import DeliveryList, ErrorBody, delivery_out
from vidmaas.db import webhooks as deliveries
from vidmaas.domain import webhooks as policy
from vidmaas.errors import InvalidRequest

router = APIRouter(prefix="/v1/tasks", tags=["webhooks"])

_ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": ErrorBody} for code in (401, 404)}


async def _resolve(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def make_validator(allow_hosts: list[str], *, resolve: policy.Resolver = _resolve,
                   ) -> Callable[[str], Awaitable[None]]:
    """The ``validate_webhook`` callable task creation uses."""

    async def validate_webhook(url: str) -> None:
        try:
            await policy.check_target(url, allow_hosts=allow_hosts, resolve=resolve)
        except policy.TargetRefused as e:
            raise InvalidRequest(str(e), field="webhook_url", code=e.code) from e

    return validate_webhook


@router.get("/{task_id}/webhooks", response_model=DeliveryList, responses=_ERRORS,
            summary="List a task's webhook deliveries")
async def list_deliveries(request: Request, task_id: str, caller: CallerDep,
                          session: SessionDep) -> DeliveryList:
    task = await load_own(request, task_id=task_id, scope=caller.scope)
    # The operator's global URLs are not the user's business.
    rows = await deliveries.list_for_task(
        session=session, task_id=task.id,
        url=None if caller.is_admin else (task.webhook_url or ""), limit=500)
    return DeliveryList(data=[delivery_out(r) for r in rows])


def install(app: FastAPI) -> None:
    settings = app.state.settings
    app.state.validate_webhook = make_validator(list(settings.webhooks.allow_hosts))
    app.include_router(router)

