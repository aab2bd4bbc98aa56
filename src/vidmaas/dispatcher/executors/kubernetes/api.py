"""How the Kubernetes executor's parts call the API server and wrap its errors.

Guarantees: one request timeout for every call, one tuple of the client errors a call
may raise, and every one of them re-raised as ``ExecutorError`` with the API's status
and message (truncated), never the third-party exception.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Final

import aiohttp
from kubernetes_asyncio import client as k8s

from vidmaas.errors import ExecutorError

REQUEST_TIMEOUT_S: Final = 30.0

CLIENT_ERRORS: Final = (k8s.ApiException, aiohttp.ClientError, asyncio.TimeoutError, OSError,
                        ValueError)


def api_error(what: str, e: BaseException) -> ExecutorError:
    """``e`` as an ``ExecutorError`` saying which call failed and why."""
    if isinstance(e, k8s.ApiException):
        detail = f"{e.status} {e.reason}"
        body = e.body.decode("utf-8", "replace") if isinstance(e.body, bytes) else e.body
        if isinstance(body, str):
            with contextlib.suppress(ValueError):
                detail += f": {json.loads(body).get('message', '')}"[:300]
        return ExecutorError(f"Kubernetes {what} failed: {detail}")
    return ExecutorError(f"Kubernetes {what} failed: {type(e).__name__}: {str(e)[:300]}")


def status_code(e: BaseException) -> int | None:
    """The HTTP status of an API error (404, 409…), None for other errors."""
    return int(e.status) if isinstance(e, k8s.ApiException) and e.status else None
