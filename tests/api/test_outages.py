"""Backing services down, as a client of the API sees it — against real servers that the
tests stop and start (a private PostgreSQL cluster, a private SeaweedFS, a private Redis).

- PostgreSQL stopped (cleanly or like a crash): every request answers 503
  ``database_unavailable`` with ``Retry-After``, quickly, never a 500 and never a hang;
  ``/readyz`` says the database is down; once the server is back the very next request
  succeeds (no restart of the API) and nothing accepted before the outage is lost. A
  server that accepts connections but never answers costs a request at most the
  connect timeout.
- The object store down (stopped, or answering 5xx) during an input upload: 503
  ``storage_error`` with ``Retry-After`` and no task row (none in the database, for any
  user, and the idempotency key stays free for the retry); the database failing after the
  image was stored deletes the image. A download with the store down is a 503.
- Redis down: creating still answers 202 at once (the task waits in the database for
  the reconciler), listing still works (positions unknown), cancelling a queued task
  works (it is recorded in the database); what needs Redis itself answers 503
  ``redis_unavailable``.
"""

from __future__ import annotations

import asyncio
import secrets
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from pydantic import SecretStr

from tests.api.conftest import Api, api_settings, start_api
from tests.api.test_tasks_api import png_bytes
from tests.support import services
from vidmaas.config import StorageSettings
from vidmaas.db.migrate import upgrade_sync

QUICK_S = 5.0
"""An answer during an outage comes within this (it is about 0.1 s on an idle machine)."""

TASK = {"prompt": "a kite over a hill", "model": "tiny-t2v"}


def _unavailable(r: httpx.Response, code: str) -> None:
    assert r.status_code == 503, r.text
    assert int(r.headers["Retry-After"]) > 0
    body = r.json()["error"]
    assert body["code"] == code, body


async def _timed(coro: Any) -> tuple[httpx.Response, float]:
    t0 = time.monotonic()
    r = await coro
    return r, time.monotonic() - t0


# ---------------------------------------------------------------- PostgreSQL


@pytest.fixture(scope="module")
def pg_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[services.PrivatePostgres]:
    reason = services.private_postgres_unavailable()
    if reason is not None:
        pytest.skip(reason)
    with services.private_postgres(tmp_path_factory.mktemp("pg")) as pg:
        yield pg


@pytest.fixture
def pg_db(pg_cluster: services.PrivatePostgres) -> str:
    if not pg_cluster.running:
        pg_cluster.start()
    url = pg_cluster.create_database("t_" + secrets.token_hex(5))
    upgrade_sync(url)
    return url


@pytest.fixture
async def pg_api(pg_db: str, pg_cluster: services.PrivatePostgres, redis_url: str,
                 local_storage: StorageSettings) -> AsyncIterator[Api]:
    settings = api_settings(db_url=pg_db, redis_url=redis_url, storage=local_storage)
    settings.api.key_cache_ttl_s = 0  # every request authenticates against the database
    async for api in start_api(settings, pg_db):
        yield api
        if not pg_cluster.running:
            await asyncio.to_thread(pg_cluster.start)


@pytest.mark.parametrize("mode", ["fast", "immediate"])
async def test_with_postgres_down_requests_answer_503_quickly_and_recover_when_it_returns(
        pg_api: Api, pg_cluster: services.PrivatePostgres, mode: str) -> None:
    api, c, alice = pg_api, pg_api.client, pg_api.auth("alice")
    before = await c.post("/v1/tasks", json=TASK, headers=alice)
    assert before.status_code == 202, before.text
    task_id = before.json()["id"]

    await asyncio.to_thread(pg_cluster.stop, mode=mode)
    calls = [
        c.post("/v1/tasks", json=TASK, headers=alice),
        c.post("/v1/tasks", headers=alice, data={"prompt": "x", "model": "tiny-t2v"}),
        c.get("/v1/tasks", headers=alice),
        c.get(f"/v1/tasks/{task_id}", headers=alice),
        c.post(f"/v1/tasks/{task_id}/cancel", headers=alice),
        c.get("/v1/me", headers=alice),
    ]
    for call in calls:
        r, took = await _timed(call)
        _unavailable(r, "database_unavailable")
        assert took < QUICK_S, f"{r.request.method} {r.request.url.path} took {took:.1f} s"
    videos = await c.get("/v1/videos", headers=alice)
    assert videos.status_code == 503 and "Retry-After" in videos.headers
    assert videos.json()["error"]["code"] == "database_unavailable"  # OpenAI's body shape
    assert videos.json()["error"]["type"] == "server_error"
    ready = await c.get("/readyz")
    assert ready.status_code == 503 and ready.json()["checks"]["database"] != "ok"

    await asyncio.to_thread(pg_cluster.start)
    t0 = time.monotonic()
    again = await c.get(f"/v1/tasks/{task_id}", headers=alice)
    recovered_s = time.monotonic() - t0
    assert again.status_code == 200, again.text
    assert again.json()["status"] == "queued"  # accepted before the outage, still there
    assert recovered_s < QUICK_S
    after = await c.post("/v1/tasks", json=TASK, headers=alice)
    assert after.status_code == 202, after.text
    assert (await c.get("/readyz")).status_code == 200
    listing = (await c.get("/v1/tasks", headers=alice)).json()["data"]
    assert {t["id"] for t in listing} == {task_id, after.json()["id"]}
    assert api.app.state.services.settings.database.connect_timeout_s > 0


@pytest.fixture
def silent_server() -> Iterator[int]:
    """A TCP port that accepts connections and never says a word (a hung database)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    held: list[socket.socket] = []
    stopping = threading.Event()

    def accept() -> None:
        sock.settimeout(0.2)
        while not stopping.is_set():
            try:
                held.append(sock.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield int(sock.getsockname()[1])
    finally:
        stopping.set()
        thread.join(5)
        for s in held:
            s.close()
        sock.close()


async def test_a_database_that_never_answers_costs_a_request_the_connect_timeout_not_a_hang(
        silent_server: int, pg_db: str, redis_url: str, local_storage: StorageSettings,
) -> None:
    settings = api_settings(db_url=pg_db, redis_url=redis_url, storage=local_storage)
    settings.api.key_cache_ttl_s = 0
    async for api in start_api(settings, pg_db):
        svc = api.app.state.services
        from vidmaas.db.engine import make_engine, make_sessionmaker

        await svc.engine.dispose()
        hung = settings.database.model_copy(update={
            "url": f"postgresql+asyncpg://postgres@127.0.0.1:{silent_server}/x",
            "connect_timeout_s": 1.0})
        svc.engine = make_engine(hung)
        svc.sessions = make_sessionmaker(svc.engine)
        r, took = await _timed(api.client.get("/v1/tasks", headers=api.auth("alice")))
        _unavailable(r, "database_unavailable")
        assert 0.9 < took < QUICK_S, took


# ---------------------------------------------------------------- the object store


@pytest.fixture(scope="module")
def weed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[services.PrivateSeaweedFS]:
    with services.private_seaweedfs(tmp_path_factory.mktemp("weed")) as w:
        yield w


def _s3_settings(server: services.S3Server, *, endpoint: str | None = None,
                 ) -> StorageSettings:
    return StorageSettings(
        url=f"s3://{server.bucket}/t-{secrets.token_hex(4)}",
        s3_endpoint_url=endpoint or server.endpoint_url, redirect_downloads=False,
        s3_access_key_id=SecretStr(server.access_key),
        s3_secret_access_key=SecretStr(server.secret_key))


@pytest.fixture
async def s3_api(weed: services.PrivateSeaweedFS, sqlite_url: str, redis_url: str,
                 ) -> AsyncIterator[Api]:
    if weed.proc is None:
        await asyncio.to_thread(weed.start)
    settings = api_settings(db_url=sqlite_url, redis_url=redis_url,
                            storage=_s3_settings(weed.server))
    async for api in start_api(settings, sqlite_url):
        yield api
        if weed.proc is None:
            await asyncio.to_thread(weed.start)


def _image_create(api: Api, field: str = "image") -> Any:
    path = "/v1/tasks" if field == "image" else "/v1/videos"
    data = {"prompt": "make it move", "model": "tiny-ti2v"}
    if field == "input_reference":
        data["size"] = "64x64"
    return api.client.post(path, headers=api.auth("alice"), data=data,
                           files={field: ("photo.png", png_bytes(), "image/png")})


@pytest.mark.parametrize("field", ["image", "input_reference"])
async def test_an_upload_with_the_store_down_is_503_and_leaves_no_task(
        s3_api: Api, weed: services.PrivateSeaweedFS, field: str) -> None:
    api = s3_api
    await asyncio.to_thread(weed.kill)
    r, took = await _timed(_image_create(api, field))
    _unavailable(r, "storage_error")
    assert took < QUICK_S + 5, took  # botocore retries a refused connection a few times
    listing = await api.client.get("/v1/tasks", headers=api.auth("alice"))
    assert listing.json()["data"] == []
    await asyncio.to_thread(weed.start)
    ok = await _image_create(api, field)
    assert ok.status_code in (200, 202), ok.text
    assert ok.json().get("has_image", True)


async def test_no_task_row_is_left_pointing_at_an_input_the_store_never_took(
        s3_api: Api, weed: services.PrivateSeaweedFS) -> None:
    from vidmaas.db import tasks as repo

    api, svc = s3_api, s3_api.app.state.services
    headers = {**api.auth("alice"), "Idempotency-Key": "outage-" + secrets.token_hex(4)}

    def create() -> Any:
        return api.client.post("/v1/tasks", headers=headers,
                               data={"prompt": "make it move", "model": "tiny-ti2v"},
                               files={"image": ("photo.png", png_bytes(), "image/png")})

    async def rows() -> list[Any]:
        async with svc.sessions() as s:  # every user, every status: not just a listing
            return await repo.list_tasks(session=s, user_id=None, limit=100)

    await asyncio.to_thread(weed.kill)
    _unavailable(await create(), "storage_error")
    assert await rows() == []
    await asyncio.to_thread(weed.start)
    ok = await create()  # the failed create claimed neither a row nor the key
    assert ok.status_code == 202, ok.text
    [task] = await rows()
    assert task.id == ok.json()["id"] and task.input_key is not None
    assert await svc.store.exists(task.input_key)


class _Failing(BaseHTTPRequestHandler):
    """An S3 endpoint that answers every request 503 SlowDown."""

    def _fail(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        body = b"<Error><Code>ServiceUnavailable</Code><Message>down</Message></Error>"
        self.send_response(503)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _fail

    def log_message(self, *args: object) -> None:
        pass


async def test_a_store_answering_5xx_at_upload_is_503_and_leaves_no_task(
        weed: services.PrivateSeaweedFS, sqlite_url: str, redis_url: str) -> None:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Failing)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        endpoint = f"http://127.0.0.1:{httpd.server_address[1]}"
        settings = api_settings(db_url=sqlite_url, redis_url=redis_url,
                                storage=_s3_settings(weed.server, endpoint=endpoint))
        async for api in start_api_without_store_check(settings, sqlite_url):
            r = await _image_create(api)
            _unavailable(r, "storage_error")
            assert (await api.client.get("/v1/tasks", headers=api.auth("alice"))
                    ).json()["data"] == []
    finally:
        httpd.shutdown()
        httpd.server_close()


async def start_api_without_store_check(settings: Any, db_url: str) -> AsyncIterator[Api]:
    from tests.api.conftest import make_users
    from vidmaas.api.app import create_app

    keys = await make_users(db_url)
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield Api(app=app, settings=settings, client=client, keys=keys)


def _put_then(real_put: Any, stored: list[str], then: Any) -> Any:
    """A store's ``put_bytes`` that stores for real, then runs ``then`` (a fault)."""
    async def put(key: str, data: bytes, *, content_type: str) -> None:
        await real_put(key, data, content_type=content_type)
        stored.append(key)
        await asyncio.to_thread(then)

    return put


async def test_the_database_failing_after_the_image_is_stored_deletes_the_image(
        weed: services.PrivateSeaweedFS, pg_db: str, pg_cluster: services.PrivatePostgres,
        redis_url: str) -> None:
    if weed.proc is None:
        await asyncio.to_thread(weed.start)
    settings = api_settings(db_url=pg_db, redis_url=redis_url,
                            storage=_s3_settings(weed.server))
    settings.api.key_cache_ttl_s = 60  # alice is known before the database goes
    async for api in start_api(settings, pg_db):
        svc = api.app.state.services
        assert (await api.client.get("/v1/me", headers=api.auth("alice"))).status_code == 200
        real_put = svc.store.put_bytes
        stored: list[str] = []
        svc.store.put_bytes = _put_then(real_put, stored,
                                        lambda: pg_cluster.stop(mode="immediate"))
        try:
            r = await _image_create(api)
        finally:
            svc.store.put_bytes = real_put
            await asyncio.to_thread(pg_cluster.start)
        _unavailable(r, "database_unavailable")
        assert stored, "the image was never stored: the test did not test the order"
        assert not await svc.store.exists(stored[0]), "an image no task points at was kept"
        assert (await api.client.get("/v1/tasks", headers=api.auth("alice"))
                ).json()["data"] == []


async def test_a_download_with_the_store_down_is_503(
        s3_api: Api, weed: services.PrivateSeaweedFS) -> None:
    from tests.api.test_tasks_api import _complete, create

    api = s3_api
    task_id = (await create(api)).json()["id"]
    await _complete(api, task_id)
    ok = await api.client.get(f"/v1/tasks/{task_id}/video", headers=api.auth("alice"))
    assert ok.status_code == 200
    assert ok.headers["cache-control"] == "private, max-age=86400, immutable"
    await asyncio.to_thread(weed.kill)
    for path in (f"/v1/tasks/{task_id}/video", f"/v1/tasks/{task_id}/poster"):
        r = await api.client.get(path, headers=api.auth("alice"))
        _unavailable(r, "storage_error")
    r = await api.client.get(f"/v1/videos/{task_id}/content", headers=api.auth("alice"))
    assert r.status_code in (404, 503)  # a native task is not a video
    await asyncio.to_thread(weed.start)
    # A restarted store may answer for its bucket before it serves the stored objects:
    # until it does, each download is a clean 503 (never a 500 or a 200 whose body
    # breaks off), then the video itself.
    async with asyncio.timeout(60):
        while True:
            back = await api.client.get(f"/v1/tasks/{task_id}/video", headers=api.auth("alice"))
            if back.status_code == 200:
                break
            _unavailable(back, "storage_error")
            await asyncio.sleep(0.2)
    assert back.content == ok.content


# ---------------------------------------------------------------- Redis


async def test_with_redis_down_creating_still_answers_202_at_once_and_listing_works(
        tmp_path: Path, sqlite_url: str, local_storage: StorageSettings) -> None:
    port = services.free_port()
    proc = services.start_redis(tmp_path / "redis", port=port)
    try:
        settings = api_settings(db_url=sqlite_url, redis_url=f"redis://127.0.0.1:{port}/0",
                                storage=local_storage)
        async for api in start_api(settings, sqlite_url):
            c, alice = api.client, api.auth("alice")
            first = await c.post("/v1/tasks", json=TASK, headers=alice)
            assert first.status_code == 202 and first.json()["queue_position"] == 1
            proc.kill()
            proc.wait()
            r, took = await _timed(c.post("/v1/tasks", json=TASK, headers=alice))
            assert r.status_code == 202, r.text
            assert r.json()["status"] == "queued" and r.json()["queue_position"] is None
            assert took < QUICK_S, took
            listing, took = await _timed(c.get("/v1/tasks", headers=alice))
            assert listing.status_code == 200 and took < QUICK_S
            assert [t["queue_position"] for t in listing.json()["data"]] == [None, None]
            got = await c.get(f"/v1/tasks/{r.json()['id']}", headers=alice)
            assert got.status_code == 200
            _unavailable(await c.post("/v1/auth/stream-token", headers=alice),
                         "redis_unavailable")
            # A queued task's cancel is recorded in the database: it stands, and says so.
            cancel = await c.post(f"/v1/tasks/{first.json()['id']}/cancel", headers=alice)
            assert cancel.status_code == 200, cancel.text
            assert cancel.json()["status"] == "cancelled"
            ready = await c.get("/readyz")
            assert ready.status_code == 503 and ready.json()["checks"]["redis"] != "ok"
            proc = services.start_redis(tmp_path / "redis", port=port)
            token = await c.post("/v1/auth/stream-token", headers=alice)
            assert token.status_code == 200, token.text
    finally:
        services.stop(proc)


async def test_an_outbox_at_its_bound_makes_readyz_fail_until_it_drains(
        tmp_path: Path, sqlite_url: str, local_storage: StorageSettings) -> None:
    port = services.free_port()
    proc = services.start_redis(tmp_path / "redis", port=port)
    try:
        settings = api_settings(db_url=sqlite_url, redis_url=f"redis://127.0.0.1:{port}/0",
                                storage=local_storage, outbox={"max_pending": 1,
                                                               "sweep_grace_s": 0.0})
        async for api in start_api(settings, sqlite_url):
            c, alice = api.client, api.auth("alice")
            first = await c.post("/v1/tasks", json=TASK, headers=alice)
            proc.kill()
            proc.wait()
            # Its cancel commits; the ``cancelled`` event waits in the outbox.
            cancel = await c.post(f"/v1/tasks/{first.json()['id']}/cancel", headers=alice)
            assert cancel.json()["status"] == "cancelled"
            ready = await c.get("/readyz")
            assert ready.status_code == 503
            assert ready.json()["checks"]["outbox"] == "full: 1 events waiting"
            assert "vidmaas_outbox_pending 1.0" in (await c.get("/metrics")).text
            proc = services.start_redis(tmp_path / "redis", port=port)
            # The dispatcher sweeps every few seconds; a sweep that meets a connection the
            # old server closed fails, and the next one publishes.
            lifecycle = api.app.state.services.lifecycle
            published = 0
            async with asyncio.timeout(10):
                while not published:
                    try:
                        published = (await lifecycle.sweep_outbox()).published
                    except redis.ConnectionError:
                        await asyncio.sleep(0.2)
            assert published == 1
            assert (await c.get("/readyz")).status_code == 200
            assert "vidmaas_outbox_pending 0.0" in (await c.get("/metrics")).text
    finally:
        services.stop(proc)
