"""Liveness, readiness, and the stream-token endpoint browsers use.

Guarantees: ``/healthz`` answers 200 while the process serves requests; ``/readyz``
answers 200 only when the database, Redis and the object store all answer and the
event outbox is below ``outbox.max_pending`` (at the bound, status changes commit
without their events), and 503 naming what is not. (``/v1/me`` lives in
``routes.usage``.)
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from vidmaas.api.deps import CallerDep, services_of
from vidmaas.api.schemas import ErrorBody
from vidmaas.bus.control import issue_stream_token
from vidmaas.db.engine import ping

router = APIRouter(tags=["health"])
CHECK_TIMEOUT_S = 3.0
_UNAUTHENTICATED: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody},
    503: {"model": ErrorBody, "description": "the database or Redis is not reachable "
                                             "(Retry-After)"}}


class OutboxFull(Exception):
    """The outbox reached ``outbox.max_pending`` (readiness only; never leaves here)."""


@router.get("/healthz", summary="Liveness")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", summary="Readiness: database, Redis and object store reachable, "
                               "event outbox below its bound",
            responses={503: {"description": "a backing service does not answer; the body "
                                            "names which"}})
async def readyz(request: Request) -> JSONResponse:
    svc = services_of(request)

    async def db() -> None:
        await ping(svc.engine)

    async def redis() -> None:
        await svc.redis.ping()

    async def store() -> None:
        await svc.store.ensure_ready()

    async def events() -> None:
        pending = await svc.lifecycle.outbox_pending()
        if pending >= svc.settings.outbox.max_pending:
            raise OutboxFull(f"{pending} events waiting")

    checks: dict[str, Any] = {}
    for name, fn in (("database", db), ("redis", redis), ("storage", store),
                     ("outbox", events)):
        try:
            await asyncio.wait_for(fn(), CHECK_TIMEOUT_S)
            checks[name] = "ok"
        except OutboxFull as e:
            checks[name] = f"full: {e}"
        except Exception as e:
            checks[name] = f"error: {type(e).__name__}"
    ok = all(v == "ok" for v in checks.values())
    return JSONResponse({"status": "ok" if ok else "unavailable", "checks": checks},
                        status_code=200 if ok else 503)


class StreamToken(BaseModel):
    token: str
    expires_in_s: int


@router.post("/v1/auth/stream-token", response_model=StreamToken, tags=["auth"],
             responses=_UNAUTHENTICATED,
             summary="A short-lived token for WebSocket/SSE/media URLs (?token=)")
async def stream_token(request: Request, caller: CallerDep) -> StreamToken:
    svc = services_of(request)
    ttl = svc.settings.api.stream_token_ttl_s
    return StreamToken(token=await issue_stream_token(svc.redis, caller.id, ttl_s=ttl),
                       expires_in_s=ttl)
