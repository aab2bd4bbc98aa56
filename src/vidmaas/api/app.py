"""The FastAPI application factory.

Guarantees: ``create_app(settings)`` builds a fresh app with no global state; its
services (database, Redis, store) open in the lifespan and close when it ends, unless
a ``Services`` is passed in (``vidmaas up`` shares one between the roles), in which
case the caller owns it. Every router is imported here by name and mounted on every
app: a missing one is an import error at start, never a silently absent route. No
security check depends on what is mounted (the webhook target check at task creation
is part of ``api.creation``).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI

from vidmaas import __version__
from vidmaas.api import errors
from vidmaas.api.routes import (
    admin,
    events,
    health,
    metrics,
    models,
    tasks,
    ui,
    usage,
    video_remix,
    videos,
    webhook_endpoints,
    webhooks,
)
from vidmaas.config import Settings
from vidmaas.services import Services

log = logging.getLogger(__name__)


def create_app(settings: Settings, *, services: Services | None = None) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        owned = services is None
        svc = Services.open(settings) if services is None else services
        app.state.services = svc
        try:
            for hook in app.state.startup_hooks:
                await hook(app)
            yield
        finally:
            for hook in reversed(app.state.shutdown_hooks):
                await hook(app)
            if owned:
                await svc.close()

    app = FastAPI(title="vidmaas", version=__version__, lifespan=lifespan,
                  description="Video generation as a service: queue, fair GPU admission, "
                              "live progress, watermarked delivery.")
    app.state.settings = settings
    app.state.startup_hooks = []
    app.state.shutdown_hooks = []
    errors.install(app)
    app.include_router(health.router)
    app.include_router(models.router)
    app.include_router(tasks.router)
    app.include_router(usage.router)  # /v1/me, /v1/usage
    app.include_router(admin.router)  # /v1/admin/...
    events.install(app)  # the SSE/WebSocket routes and the stream hub's start and stop
    videos.install(app)
    video_remix.install(app)  # POST /v1/videos/{id}/remix
    webhooks.install(app)
    app.include_router(webhook_endpoints.router)  # /v1/webhook-endpoints
    ui.install(app)
    metrics.install(app)  # /metrics and the request-counting middleware
    return app
