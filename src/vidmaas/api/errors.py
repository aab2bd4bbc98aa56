"""The one mapping from errors to HTTP responses.

Guarantees: every error response, whatever raised it (our errors, request validation,
unknown routes, unexpected exceptions), is JSON ``{"error": {"code", "message",
"field"}}`` with a stable machine-readable code. A backing service that cannot be
reached is a 503, never a 500, whichever way its failure arrives: our
``ServiceUnavailable`` errors (``storage_error``, …) and, translated by ``as_ours``,
the database's connection-level errors (``database_unavailable``, classified by
``db.engine.is_unavailable``) and Redis's (``redis_unavailable``, by
``bus.client.is_unavailable``). Every 429 and 503 carries ``Retry-After``. A client
that hung up mid-request gets a 400 (``client_disconnected``), not a logged 500.
Only what is left (a bug) is a 500 ``internal_error`` with a generic message, the
details in the log.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from vidmaas import errors as e
from vidmaas.bus import client as bus_client
from vidmaas.db import engine as db_engine

log = logging.getLogger(__name__)

STATUS: list[tuple[type[e.VidmaasError], int]] = [
    (e.Unauthenticated, 401),
    (e.Forbidden, 403),
    (e.NotFound, 404),
    (e.Conflict, 409),
    (e.PayloadTooLarge, 413),
    (e.UnsupportedMedia, 415),
    (e.InvalidRequest, 422),
    (e.RateLimited, 429),
    (e.ServiceUnavailable, 503),
]

_HTTP_CODES = {400: "bad_request", 401: "unauthenticated", 403: "forbidden", 404: "not_found",
               405: "method_not_allowed", 406: "not_acceptable", 409: "conflict",
               413: "payload_too_large", 415: "unsupported_media_type",
               422: "invalid_request", 429: "rate_limited"}


def status_of(error: e.VidmaasError) -> int:
    for cls, status in STATUS:
        if isinstance(error, cls):
            return status
    return 500


def as_ours(exc: BaseException) -> e.VidmaasError | None:
    """The error a third-party exception stands for at the API boundary, or None (a bug).

    Used by the global handler and by route classes with bodies of their own (the
    OpenAI routes), so that both answer the same status."""
    if isinstance(exc, e.VidmaasError):
        return exc
    if db_engine.is_unavailable(exc):
        return e.DatabaseUnavailable("the database is not reachable right now; retry shortly")
    if bus_client.is_unavailable(exc):
        return e.QueueError("the queue (Redis) is not reachable right now; retry shortly",
                            code="redis_unavailable")
    if isinstance(exc, ClientDisconnect):
        return e.InvalidRequest("the client closed the connection before the request ended",
                                code="client_disconnected")
    return None


def status_of_any(error: e.VidmaasError) -> int:
    """``status_of``, except that a hung-up client is a plain 400."""
    return 400 if error.code == "client_disconnected" else status_of(error)


def retry_headers(error: e.VidmaasError) -> dict[str, str]:
    """``Retry-After`` for a quota (429) and for a backing service that is down (503)."""
    if isinstance(error, (e.RateLimited, e.ServiceUnavailable)):
        return {"Retry-After": str(error.retry_after_s)}
    return {}


def error_body(code: str, message: str, field: str | None = None) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "field": field}}


def _field_of(loc: tuple[Any, ...] | list[Any]) -> str | None:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header", "form")]
    return ".".join(parts) or None


def install(app: FastAPI) -> None:
    def respond(exc: e.VidmaasError) -> JSONResponse:
        status = status_of_any(exc)
        if status >= 500:
            log.warning("request failed: %s: %s", exc.code, exc.message)
        headers = retry_headers(exc) | ({"WWW-Authenticate": "Bearer"} if status == 401 else {})
        return JSONResponse(error_body(exc.code, exc.message, exc.field), status_code=status,
                            headers=headers or None)

    @app.exception_handler(e.VidmaasError)
    async def _ours(_: Request, exc: e.VidmaasError) -> JSONResponse:
        return respond(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        errs = exc.errors()
        first = errs[0] if errs else {}
        field = _field_of(first.get("loc", ()))
        msg = str(first.get("msg", "invalid request"))
        return JSONResponse(error_body("invalid_request", f"{field}: {msg}" if field else msg,
                                       field), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        return JSONResponse(error_body(code, str(exc.detail)), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    def unexpected(exc: Exception) -> JSONResponse:
        ours = as_ours(exc)
        if ours is not None:
            log.warning("request failed: %s (%s: %s)", ours.code, type(exc).__name__,
                        str(exc)[:200])
            return respond(ours)
        log.error("unhandled error", exc_info=exc)
        return JSONResponse(error_body("internal_error", "internal error"), status_code=500)

    async def _third_party(_: Request, exc: Exception) -> JSONResponse:
        return unexpected(exc)

    # The backing services' own error classes get handlers of their own: those answer
    # inside the app (the catch-all below answers too, but the server then logs the
    # exception again as if nothing had handled it).
    for cls in (*db_engine.DRIVER_ERRORS, *bus_client.REDIS_ERRORS, ClientDisconnect):
        app.add_exception_handler(cls, _third_party)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        return unexpected(exc)
