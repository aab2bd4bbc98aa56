"""How the Kubernetes executor's parts call the API server and wrap its errors.

Guarantees: one request timeout for every call, one tuple of the client errors a call
may raise, and every one of them re-raised as ``ExecutorError`` with the API's status
and message (truncated), never the third-party exception.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
from typing import Any, Final

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


async def delete_foreground(api: Any, *, group: str, version: str, namespace: str,
                            plural: str, name: str, grace_s: float) -> bool:
    """Delete a custom object and, before it, its pods (foreground), giving them
    ``grace_s`` to exit. False when it was already gone; other failures raise
    ``ExecutorError``."""
    try:
        await api.delete_namespaced_custom_object(
            group, version, namespace, plural, name, propagation_policy="Foreground",
            grace_period_seconds=math.ceil(grace_s), _request_timeout=REQUEST_TIMEOUT_S)
    except CLIENT_ERRORS as e:
        if status_code(e) == 404:
            return False
        raise api_error(f"delete of {name}", e) from e
    return True
