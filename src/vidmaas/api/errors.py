"""The one mapping from errors to HTTP responses.

Guarantees: every error response, whatever raised it (our errors, request validation,
unknown routes, unexpected exceptions), is JSON ``{"error": {"code", "message",
"field"}}`` with a stable machine-readable code; unexpected exceptions become a 500
with a generic message (details only in the log); 429s carry ``Retry-After``.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from vidmaas import errors as e

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


def error_body(code: str, message: str, field: str | None = None) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "field": field}}


def _field_of(loc: tuple[Any, ...] | list[Any]) -> str | None:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header", "form")]
    return ".".join(parts) or None


def install(app: FastAPI) -> None:
    @app.exception_handler(e.VidmaasError)
    async def _ours(_: Request, exc: e.VidmaasError) -> JSONResponse:
        status = status_of(exc)
        if status >= 500:
            log.warning("request failed: %s: %s", exc.code, exc.message)
        headers = {"Retry-After": str(exc.retry_after_s)} \
            if isinstance(exc, e.RateLimited) else None
        headers = (headers or {}) | ({"WWW-Authenticate": "Bearer"} if status == 401 else {})
        return JSONResponse(error_body(exc.code, exc.message, exc.field), status_code=status,
                            headers=headers or None)

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

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return JSONResponse(error_body("internal_error", "internal error"), status_code=500)
