"""The FastAPI application factory.

Guarantees: ``create_app(settings)`` builds a fresh app with no global state; its
services (database, Redis, store) open in the lifespan and close when it ends, unless
a ``Services`` is passed in (``vidmaas up`` shares one between the roles), in which
case the caller owns it. Extra routers (event streams, the OpenAI API, the web page)
are mounted by ``create_app`` when their modules are present.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI

from vidmaas import __version__
from vidmaas.api import errors
from vidmaas.api.routes import health, models, tasks
from vidmaas.config import Settings
from vidmaas.services import Services

log = logging.getLogger(__name__)

# Optional route modules, mounted when present: each exposes ``install(app)``.
_OPTIONAL = ("vidmaas.api.routes.events", "vidmaas.api.routes.videos",
             "vidmaas.api.routes.webhooks",
             "vidmaas.api.routes.ui", "vidmaas.api.routes.metrics")


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
    for name in _OPTIONAL:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:
                raise
            continue
        module.install(app)
    return app
