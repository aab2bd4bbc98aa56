"""A real API server on 127.0.0.1 for client, CLI and browser tests, and a task driver.

``live_server`` runs uvicorn in the test's event loop on a free port (real Redis,
SQLite, a local object store) and stops it at the end, so no asyncio task leaks.
``Driver`` moves tasks through their life the way the dispatcher, the job runtime and
the relay would (status by ``Lifecycle``, events by ``publish``, progress written to
the row as the relay does, a real H.264 MP4, poster and spritesheet in the store). It stands in
for them until ``vidmaas up`` runs the real ones in these tests.
"""

from __future__ import annotations

import asyncio
import gc
import io
import re
import tempfile
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from PIL import Image
from starlette.types import ASGIApp, Receive, Scope, Send

from tests.api.conftest import api_settings, make_users
from tests.support.services import free_port
from vidmaas.api.app import create_app
from vidmaas.config import Settings, StorageSettings
from vidmaas.db import tasks as repo
from vidmaas.domain import events as ev
from vidmaas.domain.status import TaskStatus
from vidmaas.services import Services


def make_frames(*, width: int = 64, height: int = 64, frames: int = 16) -> Any:
    """The frames of ``make_mp4`` (uint8 F×H×W×3): red rises frame by frame."""
    import numpy as np

    out = np.zeros((frames, height, width, 3), dtype=np.uint8)
    for i in range(frames):
        out[i, ..., 0] = (i * 255) // max(1, frames - 1)
        out[i, :, : width // 2, 1] = 180
        out[i, height // 2:, :, 2] = 200
    return out


def make_mp4(*, width: int = 64, height: int = 64, frames: int = 16, fps: int = 8) -> bytes:
    """A small real H.264 MP4 (yuv420p, +faststart) that browsers can play."""
    import av

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "v.mp4"
        with av.open(str(path), "w", options={"movflags": "+faststart"}) as out:
            stream = out.add_stream("libx264", rate=fps)
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            for img in make_frames(width=width, height=height, frames=frames):
                for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                    out.mux(packet)
            for packet in stream.encode():
                out.mux(packet)
        return path.read_bytes()


def make_spritesheet(*, width: int = 64, height: int = 64, frames: int = 16,
                     ) -> tuple[bytes, dict[str, int]]:
    """The runtime's spritesheet of ``make_mp4``'s frames, and its layout."""
    from vidmaas.runtime.postprocess import write_spritesheet

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "s.jpg"
        layout = write_spritesheet(make_frames(width=width, height=height, frames=frames), path)
        return path.read_bytes(), layout


def jpeg(width: int = 64, height: int = 64, color: tuple[int, int, int] = (40, 90, 200)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, "JPEG")
    return buf.getvalue()


def png(width: int = 64, height: int = 64, color: tuple[int, int, int] = (200, 80, 40)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, "PNG")
    return buf.getvalue()


@dataclass
class Driver:
    """Plays the dispatcher, the job runtime and the relay for one server."""

    svc: Services

    async def start(self, task_id: str) -> None:
        lc = self.svc.lifecycle
        task = await lc.transition(task_id=task_id, to=TaskStatus.DISPATCHING,
                                   expected=TaskStatus.QUEUED,
                                   event=ev.dispatched(task_id, executor="test",
                                                       job_name=f"test-{task_id}", attempt=1))
        await lc.queue.remove(user_id=task.user_id, task_id=task_id)
        await lc.queue.announce_move()
        await lc.transition(task_id=task_id, to=TaskStatus.RUNNING,
                            expected=TaskStatus.DISPATCHING,
                            event=ev.started(task_id, world_size=1, host="test"))

    async def progress(self, task_id: str, *, percent: float, stage: ev.Stage = ev.Stage.DENOISE,
                       eta_s: float | None = 12.0) -> None:
        lc = self.svc.lifecycle
        await lc.publish(ev.stage(task_id, stage))
        event_id = await lc.publish(ev.progress(task_id, step=int(percent), total=100,
                                                percent=percent, eta_s=eta_s, stage_=stage))
        async with self.svc.sessions() as s:
            await repo.update_progress(session=s, task_id=task_id, values={
                "progress": percent, "stage": stage.value, "eta_s": eta_s,
                "last_event_id": event_id})

    async def preview(self, task_id: str, *, step: int, total: int = 40,
                      color: tuple[int, int, int] = (30, 160, 90)) -> bytes:
        """Store a preview image and announce it, as the runtime's preview thread does;
        the image's bytes."""
        from vidmaas.storage.base import preview_key

        data = jpeg(256, 144, color)
        key = preview_key(task_id)
        await self.svc.store.put_bytes(key, data, content_type="image/jpeg")
        await self.svc.lifecycle.publish(ev.preview(task_id, key=key, step=step, total=total,
                                                    width=256, height=144))
        return data

    async def complete(self, task_id: str, *, recorded_after_s: float | None = None) -> None:
        """Upload a real video, poster and spritesheet and complete the task.

        ``recorded_after_s``: publish ``completed`` first and record it in the row only
        that much later, as when the runtime's event reaches clients before the relay
        has applied it.
        """
        store = self.svc.store
        video_key, poster_key = f"outputs/{task_id}/video.mp4", f"outputs/{task_id}/poster.jpg"
        await store.put_bytes(video_key, make_mp4(), content_type="video/mp4")
        await store.put_bytes(poster_key, jpeg(), content_type="image/jpeg")
        sheet_key = f"outputs/{task_id}/spritesheet.jpg"
        sheet, layout = make_spritesheet()
        await store.put_bytes(sheet_key, sheet, content_type="image/jpeg")
        result = {"video_key": video_key, "poster_key": poster_key, "width": 64, "height": 64,
                  "num_frames": 16, "fps": 8, "duration_s": 2.0, "seed": 1, "timings": {},
                  "spritesheet_key": sheet_key, "spritesheet": layout}
        event = ev.Event(task_id, ev.EventType.COMPLETED, result)
        if recorded_after_s is not None:
            await self.svc.lifecycle.publish(event)
            await asyncio.sleep(recorded_after_s)
        await self.svc.lifecycle.finish(
            task_id=task_id, to=TaskStatus.COMPLETED, expected=TaskStatus.RUNNING,
            fields={"video_key": video_key, "poster_key": poster_key, "progress": 100.0,
                    "stage": None, "eta_s": None, "result": result},
            event=None if recorded_after_s is not None else event)

    async def retry(self, task_id: str, *, code: str, message: str) -> None:
        """A retryable failure: the runtime's ``failed`` event, then back to ``queued``."""
        lc = self.svc.lifecycle
        await lc.publish(ev.failed(task_id, code=code, message=message, retryable=True))
        async with self.svc.sessions() as s:
            task = await repo.get_task(session=s, task_id=task_id)
        assert task is not None
        await lc.fail_or_retry(task, code=code, message=message, retryable=True,
                               publish_failed=False)
        await lc.publish(ev.queued(task_id, position=1))

    async def give_up(self, task_id: str, *, code: str, message: str) -> None:
        """A retryable failure with no attempt left: the runtime's ``failed`` event
        (retryable), then the task fails without another event, as the relay does."""
        await self.svc.lifecycle.publish(ev.failed(task_id, code=code, message=message,
                                                   retryable=True))
        await self.svc.lifecycle.finish(
            task_id=task_id, to=TaskStatus.FAILED, expected=TaskStatus.RUNNING,
            fields={"error_code": code, "error_message": message}, event=None)

    async def fail(self, task_id: str, *, code: str, message: str) -> None:
        await self.svc.lifecycle.finish(
            task_id=task_id, to=TaskStatus.FAILED, expected=TaskStatus.RUNNING,
            fields={"error_code": code, "error_message": message},
            event=ev.failed(task_id, code=code, message=message, retryable=False))

    async def cancelled(self, task_id: str) -> None:
        """What the dispatcher does once the job of a ``cancelling`` task has stopped."""
        await self.svc.lifecycle.finish(task_id=task_id, to=TaskStatus.CANCELLED,
                                        expected=TaskStatus.CANCELLING,
                                        event=ev.cancelled(task_id, by="test"))


@dataclass
class LiveServer:
    url: str
    app: FastAPI
    settings: Settings
    keys: dict[str, str]
    driver: Driver


def _hiding(app: ASGIApp, hidden: re.Pattern[str]) -> ASGIApp:
    async def asgi(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and hidden.fullmatch(scope["path"]):
            missing = JSONResponse({"error": {"code": "not_found", "message": "Not Found",
                                              "field": None}}, status_code=404)
            await missing(scope, receive, send)
            return
        await app(scope, receive, send)

    return asgi


@asynccontextmanager
async def live_server(*, db_url: str, redis_url: str, storage: StorageSettings,
                      hidden: re.Pattern[str] | None = None) -> AsyncIterator[LiveServer]:
    """``hidden``: HTTP paths it matches answer 404, as a server without them would."""
    settings = api_settings(db_url=db_url, redis_url=redis_url, storage=storage)
    keys = await make_users(db_url)
    app = create_app(settings)
    port = free_port()
    served = app if hidden is None else _hiding(app, hidden)
    config = uvicorn.Config(served, host="127.0.0.1", port=port, log_config=None, lifespan="on",
                            ws="websockets-sansio", timeout_graceful_shutdown=2)
    server = uvicorn.Server(config)
    before = asyncio.all_tasks()
    threads_before = set(threading.enumerate())
    task = asyncio.create_task(server.serve(), name=f"uvicorn:{port}")
    try:
        for _ in range(400):
            if server.started or task.done():
                break
            await asyncio.sleep(0.025)
        if not server.started:
            if task.done():
                task.result()
            raise RuntimeError("the API server did not start")
        svc: Services = app.state.services
        await svc.store.ensure_ready()
        yield LiveServer(url=f"http://127.0.0.1:{port}", app=app, settings=settings, keys=keys,
                         driver=Driver(svc))
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 15)
        # Streams cut at shutdown finish in tasks of their own (an abandoned async
        # generator's aclose(), aiosqlite's graceful close), some only once collected:
        # collect now and let them finish, so the server leaves nothing behind.
        gc.collect()
        for _ in range(100):
            rest = [t for t in asyncio.all_tasks() - before
                    if t is not asyncio.current_task() and not t.done()]
            if not rest:
                break
            await asyncio.sleep(0.05)
        # A database call the shutdown cancelled still runs in aiosqlite's thread and
        # hands its result to this loop when done: let those threads end (the engine is
        # disposed) before the test's loop closes under them.
        for _ in range(100):
            if not [t for t in set(threading.enumerate()) - threads_before
                    if t.is_alive() and "_connection_worker_thread" in t.name]:
                break
            await asyncio.sleep(0.05)
