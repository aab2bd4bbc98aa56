"""A real API server for black-box tests: uvicorn on 127.0.0.1 in a thread of its own.

The server runs the app factory's app with its own event loop (its lifespan opens and
closes the services), so tests talk to it exactly as clients do: over TCP, with real
HTTP/1.1 framing, WebSockets and streamed bodies. ``live_api`` makes the users
``alice``, ``bob`` (ordinary) and ``root`` (admin) and yields their keys.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import uvicorn
from fastapi import FastAPI

from tests.api.conftest import make_users
from tests.support.services import free_port
from vidmaas.api.app import create_app
from vidmaas.config import Settings


@dataclass
class LiveApi:
    app: FastAPI
    settings: Settings
    base_url: str
    keys: dict[str, str]

    @property
    def ws_url(self) -> str:
        return self.base_url.replace("http://", "ws://", 1)

    def auth(self, user: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[user]}"}


@contextlib.contextmanager
def serve(app: FastAPI, *, port: int | None = None) -> Iterator[str]:
    """Run ``app`` under uvicorn on 127.0.0.1 in a thread; yields the base URL."""
    port = port or free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None,
                            lifespan="on", ws_ping_interval=None)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the API server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


@contextlib.contextmanager
def live_api(settings: Settings) -> Iterator[LiveApi]:
    """Users alice, bob and root (admin) on ``settings``' database, and the API serving."""
    keys = asyncio.run(make_users(settings.database.url)) if not _loop_running() else None
    if keys is None:
        # Called from inside a running loop: make the users on a helper thread.
        box: dict[str, dict[str, str]] = {}
        t = threading.Thread(target=lambda: box.setdefault(
            "k", asyncio.run(make_users(settings.database.url))))
        t.start()
        t.join()
        keys = box["k"]
    app = create_app(settings)
    with serve(app) as base:
        yield LiveApi(app=app, settings=settings, base_url=base, keys=keys)


def _loop_running() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True
