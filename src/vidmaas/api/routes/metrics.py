"""``GET /metrics`` for the api role, and HTTP request metrics.

Guarantees: every answered request is counted by method, route template (never the
raw path) and status; a scrape refreshes the snapshot gauges — queue depth per user
and in total, GPUs in use and capacity, tasks by status, outbox rows waiting — from Redis and the
database, so any api replica reports the current picture; a backing service that is
down leaves its gauges as they were and never fails the scrape.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

from fastapi import FastAPI, Request, Response

from vidmaas.api.deps import services_of
from vidmaas.bus.queue import TaskQueue
from vidmaas.db import outbox
from vidmaas.db import tasks as repo
from vidmaas.metrics import CONTENT_TYPE, Metrics, render

log = logging.getLogger(__name__)


def _route_of(request: Request) -> str:
    """The matched route's template; the router records it in the shared scope."""
    route = request.scope.get("route")
    return str(getattr(route, "path", "unmatched")) if route is not None else "unmatched"


async def _refresh(request: Request, metrics: Metrics) -> None:
    svc = services_of(request)
    try:
        queue = TaskQueue(svc.redis)
        metrics.set_queue_depths(await queue.depths())
        metrics.set_capacity(in_use=await queue.gpus_in_use(),
                             capacity=svc.settings.gpu_capacity)
    except Exception as e:
        log.warning("metrics: Redis unavailable (%s)", type(e).__name__)
    try:
        async with svc.sessions() as s:
            metrics.set_task_counts(await repo.count_by_status(session=s))
            metrics.set_outbox_pending(await outbox.count(s))
    except Exception as e:
        log.warning("metrics: database unavailable (%s)", type(e).__name__)


def install(app: FastAPI) -> None:
    metrics = Metrics(role="api")
    app.state.metrics = metrics

    @app.middleware("http")
    async def _count(request: Request,
                     call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        started = time.perf_counter()
        status = 500
        try:
            response = await call_next(request)
            status = response.status_code
            return response
        finally:
            metrics.observe_http(method=request.method, route=_route_of(request),
                                 status=status, duration_s=time.perf_counter() - started)

    @app.get("/metrics", include_in_schema=False)
    async def _metrics(request: Request) -> Response:
        await _refresh(request, metrics)
        return Response(render(metrics), media_type=CONTENT_TYPE)
