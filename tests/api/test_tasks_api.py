"""The native task API against real SQLite/PostgreSQL, Redis and object stores."""

from __future__ import annotations

import io
import struct
import zlib

import httpx
import pytest
from PIL import Image

from tests.api.conftest import Api, api_settings, make_users
from vidmaas.api.app import create_app
from vidmaas.config import StorageSettings
from vidmaas.domain import events as ev
from vidmaas.domain.status import TaskStatus

JSON_TASK = {"prompt": "a cat surfing a wave at sunset", "model": "tiny-t2v"}


def png_bytes(w: int = 64, h: int = 64) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (w, h), (200, 30, 30)).save(out, format="PNG")
    return out.getvalue()


def jpeg_bytes(w: int = 64, h: int = 64) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (w, h), (20, 130, 30)).save(out, format="JPEG")
    return out.getvalue()


def png_bomb(side: int) -> bytes:
    """A PNG header claiming side×side pixels, with almost no data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\x00" * 1024)) + chunk(b"IEND", b""))


async def create(api: Api, user: str = "alice", **body: object) -> httpx.Response:
    return await api.client.post("/v1/tasks", json={**JSON_TASK, **body}, headers=api.auth(user))


async def test_a_json_create_answers_202_with_a_queued_task_and_its_position(api: Api) -> None:
    r = await create(api)
    assert r.status_code == 202, r.text
    task = r.json()
    assert task["status"] == "queued"
    assert task["queue_position"] == 1
    assert task["params"]["size"] == "64*64" and task["params"]["num_frames"] == 9
    assert r.headers["location"] == f"/v1/tasks/{task['id']}"
    r2 = await create(api, user="bob")
    assert r2.json()["queue_position"] == 2


async def test_the_created_task_is_in_the_queue_and_its_queued_event_is_published(
        api: Api) -> None:
    from vidmaas.bus.events import read_task_events
    task = (await create(api)).json()
    svc = api.app.state.services
    assert await svc.lifecycle.queue.is_queued(user_id=(await _user_id(api, "alice")),
                                               task_id=task["id"])
    events = await read_task_events(svc.redis, task["id"])
    assert [e.type for _, e in events] == [ev.EventType.QUEUED]
    assert events[0][1].data["position"] == 1


async def _user_id(api: Api, name: str) -> str:
    r = await api.client.get("/v1/me", headers=api.auth(name))
    return str(r.json()["id"])


async def test_requests_without_a_key_or_with_a_bad_key_get_401(api: Api) -> None:
    for headers in ({}, {"Authorization": "Bearer vmk_nope"}, {"Authorization": "Basic abc"}):
        for method, path in (("GET", "/v1/tasks"), ("POST", "/v1/tasks"),
                             ("GET", "/v1/tasks/t0000000000000000000000000"), ("GET", "/v1/me")):
            r = await api.client.request(method, path, headers=headers, json=JSON_TASK)
            assert r.status_code == 401, (method, path, headers)
            assert r.json()["error"]["code"] == "unauthenticated"


async def test_another_users_task_is_indistinguishable_from_a_missing_one(api: Api) -> None:
    task = (await create(api, user="alice")).json()
    missing = "t" + "0" * 25
    for suffix, method in (("", "GET"), ("/cancel", "POST"), ("/video", "GET"),
                           ("/poster", "GET"), ("/spritesheet", "GET"), ("/preview", "GET")):
        theirs = await api.client.request(method, f"/v1/tasks/{task['id']}{suffix}",
                                          headers=api.auth("bob"))
        gone = await api.client.request(method, f"/v1/tasks/{missing}{suffix}",
                                        headers=api.auth("bob"))
        assert theirs.status_code == gone.status_code == 404
        assert theirs.json() == gone.json()
    listing = await api.client.get("/v1/tasks", headers=api.auth("bob"))
    assert listing.json()["data"] == []
    admin = await api.client.get(f"/v1/tasks/{task['id']}", headers=api.auth("root"))
    assert admin.status_code == 200


async def test_a_retried_create_with_the_same_idempotency_key_returns_the_same_task(
        api: Api) -> None:
    headers = {**api.auth("alice"), "Idempotency-Key": "retry-1"}
    first = await api.client.post("/v1/tasks", json=JSON_TASK, headers=headers)
    again = await api.client.post("/v1/tasks", json=JSON_TASK, headers=headers)
    assert first.status_code == again.status_code == 202
    assert first.json()["id"] == again.json()["id"]
    listing = await api.client.get("/v1/tasks", headers=api.auth("alice"))
    assert len(listing.json()["data"]) == 1
    # The key is per user: bob's identical key makes bob's own task.
    bob = await api.client.post("/v1/tasks", json=JSON_TASK,
                                headers={**api.auth("bob"), "Idempotency-Key": "retry-1"})
    assert bob.json()["id"] != first.json()["id"]


async def test_the_task_list_is_newest_first_and_pages_with_a_cursor(api: Api) -> None:
    ids = [(await create(api, prompt=f"p{i}")).json()["id"] for i in range(5)]
    seen: list[str] = []
    cursor = None
    while True:
        params: dict[str, str | int] = {"limit": 2}
        if cursor:
            params["cursor"] = cursor
        page = (await api.client.get("/v1/tasks", params=params, headers=api.auth("alice"))).json()
        seen += [t["id"] for t in page["data"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == list(reversed(ids))


async def test_the_task_list_filters_by_status(api: Api) -> None:
    a = (await create(api)).json()
    await create(api)
    await api.client.post(f"/v1/tasks/{a['id']}/cancel", headers=api.auth("alice"))
    r = await api.client.get("/v1/tasks", params={"status": "cancelled"},
                             headers=api.auth("alice"))
    assert [t["id"] for t in r.json()["data"]] == [a["id"]]


async def test_cancelling_a_queued_task_cancels_it_at_once_and_a_second_cancel_is_409(
        api: Api) -> None:
    task = (await create(api)).json()
    r = await api.client.post(f"/v1/tasks/{task['id']}/cancel", headers=api.auth("alice"))
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    svc = api.app.state.services
    assert await svc.lifecycle.queue.position(user_id=await _user_id(api, "alice"),
                                              task_id=task["id"]) is None
    again = await api.client.post(f"/v1/tasks/{task['id']}/cancel", headers=api.auth("alice"))
    assert again.status_code == 409
    assert again.json()["error"]["code"] == "illegal_transition"


async def test_cancelling_a_running_task_sets_the_flag_and_moves_it_to_cancelling(
        api: Api) -> None:
    from vidmaas.bus.control import cancel_requested
    task = (await create(api)).json()
    lc = api.app.state.services.lifecycle
    await lc.transition(task_id=task["id"], to=TaskStatus.DISPATCHING, expected=TaskStatus.QUEUED)
    await lc.transition(task_id=task["id"], to=TaskStatus.RUNNING,
                        expected=TaskStatus.DISPATCHING)
    r = await api.client.post(f"/v1/tasks/{task['id']}/cancel", headers=api.auth("alice"))
    assert r.json()["status"] == "cancelling"
    assert await cancel_requested(api.app.state.services.redis, task["id"]) == "alice"


@pytest.mark.parametrize(("body", "field", "code"), [
    ({"size": "100*100"}, "size", "unsupported_size"),
    ({"num_frames": 10}, "num_frames", "unsupported_num_frames"),
    ({"steps": 500}, "steps", "unsupported_steps"),
    ({"model": "no-such-model"}, "model", "unknown_model"),
    ({"prompt": ""}, "prompt", "invalid_request"),
    ({"seed": -1}, "seed", "invalid_request"),
    ({"surprise": 1}, "surprise", "invalid_request"),
])
async def test_parameters_the_model_cannot_do_get_422_naming_the_field(
        api: Api, body: dict[str, object], field: str, code: str) -> None:
    r = await create(api, **body)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["field"] == field
    assert r.json()["error"]["code"] == code


async def test_a_malformed_json_body_gets_422_and_an_unknown_content_type_415(api: Api) -> None:
    r = await api.client.post("/v1/tasks", content=b"{not json", headers={
        **api.auth("alice"), "Content-Type": "application/json"})
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_json"
    r = await api.client.post("/v1/tasks", content=b"x", headers={
        **api.auth("alice"), "Content-Type": "text/plain"})
    assert r.status_code == 415


async def test_a_multipart_create_with_an_image_stores_a_reencoded_png(
        api_any_store: Api) -> None:
    api = api_any_store
    r = await api.client.post("/v1/tasks", headers=api.auth("alice"), data={
        "prompt": "make it move", "model": "tiny-ti2v", "steps": "3"},
        files={"image": ("photo.jpg", jpeg_bytes(), "image/jpeg")})
    assert r.status_code == 202, r.text
    task = r.json()
    assert task["has_image"] and task["params"]["steps"] == 3
    store = api.app.state.services.store
    stored = await store.get_bytes(f"inputs/{task['id']}/image.png")
    assert stored.startswith(b"\x89PNG")
    assert Image.open(io.BytesIO(stored)).size == (64, 64)


@pytest.mark.parametrize(("payload", "status", "code"), [
    (b"this is not an image at all", 415, "unsupported_image_type"),
    (b"<svg xmlns='http://www.w3.org/2000/svg'/>", 415, "unsupported_image_type"),
    (jpeg_bytes()[:200], 422, "invalid_image"),
    (png_bomb(30000), 422, "image_too_large"),
    (b"GIF89a" + b"\x00" * 64, 415, "unsupported_image_type"),
])
async def test_bad_images_are_refused_and_leave_nothing_behind(
        api: Api, payload: bytes, status: int, code: str) -> None:
    r = await api.client.post("/v1/tasks", headers=api.auth("alice"), data={
        "prompt": "x", "model": "tiny-ti2v"}, files={"image": ("cat.png", payload, "image/png")})
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code
    assert r.json()["error"]["field"] == "image"
    listing = await api.client.get("/v1/tasks", headers=api.auth("alice"))
    assert listing.json()["data"] == []
    root = api.app.state.services.store.root
    assert not (root / "inputs").exists() or not any((root / "inputs").rglob("*.png"))


async def test_an_image_for_a_text_only_model_is_refused(api: Api) -> None:
    r = await api.client.post("/v1/tasks", headers=api.auth("alice"), data={
        "prompt": "x", "model": "tiny-t2v"}, files={"image": ("a.png", png_bytes(), "image/png")})
    assert r.status_code == 422
    assert r.json()["error"]["code"] == "image_not_supported"


async def test_a_body_over_the_upload_limit_gets_413_before_it_is_read(
        sqlite_url: str, redis_url: str, local_storage: StorageSettings) -> None:
    from tests.api.conftest import start_api
    settings = api_settings(db_url=sqlite_url, redis_url=redis_url, storage=local_storage)
    settings.api.max_upload_bytes = 100_000
    async for api in start_api(settings, sqlite_url):
        big = b"\x89PNG\r\n\x1a\n" + b"\x00" * 200_000
        r = await api.client.post("/v1/tasks", headers=api.auth("alice"),
                                  data={"prompt": "x", "model": "tiny-ti2v"},
                                  files={"image": ("a.png", big, "image/png")})
        assert r.status_code == 413
        assert r.json()["error"]["code"] == "payload_too_large"

        async def chunks():  # no Content-Length: counted as it streams
            for _ in range(30):
                yield b"x" * 10_000
        r = await api.client.post("/v1/tasks", content=chunks(), headers={
            **api.auth("alice"), "Content-Type": "application/json"})
        assert r.status_code == 413


async def test_a_user_at_the_queued_cap_gets_429_with_retry_after(
        sqlite_url: str, redis_url: str, local_storage: StorageSettings) -> None:
    from tests.api.conftest import start_api
    settings = api_settings(db_url=sqlite_url, redis_url=redis_url, storage=local_storage)
    settings.api.max_queued_per_user = 2
    async for api in start_api(settings, sqlite_url):
        assert (await create(api)).status_code == 202
        assert (await create(api)).status_code == 202
        r = await create(api)
        assert r.status_code == 429
        assert int(r.headers["retry-after"]) > 0
        assert r.json()["error"]["code"] == "too_many_queued"
        assert (await create(api, user="bob")).status_code == 202


async def test_a_failed_enqueue_after_the_insert_leaves_the_task_queued_not_lost(
        sqlite_url: str, local_storage: StorageSettings) -> None:
    from tests.support.services import free_port
    dead_redis = f"redis://127.0.0.1:{free_port()}/0"
    settings = api_settings(db_url=sqlite_url, redis_url=dead_redis, storage=local_storage)
    keys = await make_users(sqlite_url)
    app = create_app(settings)
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        auth = {"Authorization": f"Bearer {keys['alice']}"}
        r = await client.post("/v1/tasks", json=JSON_TASK, headers=auth)
        assert r.status_code == 202
        assert r.json()["status"] == "queued" and r.json()["queue_position"] is None
        got = await client.get(f"/v1/tasks/{r.json()['id']}", headers=auth)
        assert got.json()["status"] == "queued"


SPRITE = {"columns": 5, "rows": 2, "count": 9, "tile_width": 64, "tile_height": 64}


async def _complete(api: Api, task_id: str, *, spritesheet: bool = True) -> None:
    """Complete with a video, a poster and (unless not ``spritesheet``: a result made
    before spritesheets) a spritesheet."""
    svc = api.app.state.services
    await svc.store.put_bytes(f"outputs/{task_id}/video.mp4", b"\x00\x00\x00\x18ftypmp42fake",
                              content_type="video/mp4")
    await svc.store.put_bytes(f"outputs/{task_id}/poster.jpg", jpeg_bytes(),
                              content_type="image/jpeg")
    result: dict[str, object] = {"width": 64, "height": 64}
    if spritesheet:
        key = f"outputs/{task_id}/spritesheet.jpg"
        await svc.store.put_bytes(key, jpeg_bytes(5 * 64, 2 * 64), content_type="image/jpeg")
        result |= {"spritesheet_key": key, "spritesheet": SPRITE}
    lc = svc.lifecycle
    await lc.transition(task_id=task_id, to=TaskStatus.DISPATCHING, expected=TaskStatus.QUEUED)
    await lc.transition(task_id=task_id, to=TaskStatus.RUNNING, expected=TaskStatus.DISPATCHING)
    await lc.finish(task_id=task_id, to=TaskStatus.COMPLETED, expected=TaskStatus.RUNNING,
                    fields={"video_key": f"outputs/{task_id}/video.mp4",
                            "poster_key": f"outputs/{task_id}/poster.jpg", "progress": 100.0,
                            "result": result})


async def test_the_video_of_an_unfinished_task_is_409(api: Api) -> None:
    task = (await create(api)).json()
    r = await api.client.get(f"/v1/tasks/{task['id']}/video", headers=api.auth("alice"))
    assert r.status_code == 409 and r.json()["error"]["code"] == "video_not_ready"


async def test_a_completed_tasks_video_and_poster_download(api_any_store: Api) -> None:
    api = api_any_store
    task = (await create(api)).json()
    await _complete(api, task["id"])
    got = (await api.client.get(f"/v1/tasks/{task['id']}", headers=api.auth("alice"))).json()
    assert got["video_url"] == f"/v1/tasks/{task['id']}/video"
    r = await api.client.get(got["video_url"], headers=api.auth("alice"))
    if api.settings.storage.url.startswith("s3://"):
        assert r.status_code == 307
        async with httpx.AsyncClient() as plain:
            body = (await plain.get(r.headers["location"])).content
        forged = r.headers["location"].replace("Signature=", "Signature=0")
        async with httpx.AsyncClient() as plain:
            assert (await plain.get(forged)).status_code == 403
    else:
        assert r.status_code == 200 and r.headers["content-type"] == "video/mp4"
        # A finished output never changes: the browser may keep it, no shared cache.
        assert r.headers["cache-control"] == "private, max-age=86400, immutable"
        body = r.content
        ranged = await api.client.get(got["video_url"], headers={
            **api.auth("alice"), "Range": "bytes=0-3"})
        assert ranged.status_code == 206 and ranged.content == body[:4]
    assert body.endswith(b"ftypmp42fake")
    poster = await api.client.get(got["poster_url"], headers=api.auth("alice"))
    if poster.status_code == 307:
        async with httpx.AsyncClient() as plain:
            poster = await plain.get(poster.headers["location"])
    assert poster.status_code == 200 and poster.content[:3] == b"\xff\xd8\xff"


async def _follow(r: httpx.Response) -> httpx.Response:
    if r.status_code == 307:
        async with httpx.AsyncClient() as plain:
            return await plain.get(r.headers["location"])
    return r


async def test_a_completed_tasks_spritesheet_downloads_by_key_or_token_as_its_layout_says(
        api_any_store: Api) -> None:
    api = api_any_store
    task = (await create(api)).json()
    assert task["spritesheet_url"] is None and task["spritesheet"] is None
    r = await api.client.get(f"/v1/tasks/{task['id']}/spritesheet", headers=api.auth("alice"))
    assert r.status_code == 409 and r.json()["error"]["code"] == "spritesheet_not_ready"
    await _complete(api, task["id"])
    got = (await api.client.get(f"/v1/tasks/{task['id']}", headers=api.auth("alice"))).json()
    assert got["spritesheet_url"] == f"/v1/tasks/{task['id']}/spritesheet"
    assert got["spritesheet"] == SPRITE
    token = (await api.client.post("/v1/auth/stream-token",
                                   headers=api.auth("alice"))).json()["token"]
    by_key = api.client.get(got["spritesheet_url"], headers=api.auth("alice"))
    by_token = api.client.get(got["spritesheet_url"], params={"token": token})
    for asked in (by_key, by_token):
        r = await _follow(await asked)
        assert r.status_code == 200, r.text
        sheet = Image.open(io.BytesIO(r.content))
        assert (sheet.format, sheet.size) == ("JPEG", (5 * 64, 2 * 64))


async def test_a_task_completed_without_a_spritesheet_has_none_and_its_route_is_404(
        api: Api) -> None:
    task = (await create(api)).json()
    await _complete(api, task["id"], spritesheet=False)
    got = (await api.client.get(f"/v1/tasks/{task['id']}", headers=api.auth("alice"))).json()
    assert got["status"] == "completed" and got["poster_url"] is not None
    assert got["spritesheet_url"] is None and got["spritesheet"] is None
    r = await api.client.get(f"/v1/tasks/{task['id']}/spritesheet", headers=api.auth("alice"))
    assert r.status_code == 404 and r.json()["error"]["code"] == "no_spritesheet"


async def test_a_stream_token_authenticates_media_urls_but_not_the_rest_of_the_api(
        api: Api) -> None:
    task = (await create(api)).json()
    await _complete(api, task["id"])
    token = (await api.client.post("/v1/auth/stream-token",
                                   headers=api.auth("alice"))).json()["token"]
    r = await api.client.get(f"/v1/tasks/{task['id']}/video", params={"token": token})
    assert r.status_code == 200
    r = await api.client.get(f"/v1/tasks/{task['id']}", params={"token": token})
    assert r.status_code == 401
    bob_token = (await api.client.post("/v1/auth/stream-token",
                                       headers=api.auth("bob"))).json()["token"]
    r = await api.client.get(f"/v1/tasks/{task['id']}/video", params={"token": bob_token})
    assert r.status_code == 404


async def test_models_are_listed_with_their_sizes_frames_and_gpus(api: Api) -> None:
    r = await api.client.get("/v1/models")
    models = {m["id"]: m for m in r.json()["data"]}
    assert {"wan2.2-ti2v-5b", "wan2.2-t2v-a14b", "wan2.2-i2v-a14b", "tiny-t2v",
            "tiny-ti2v"} <= models.keys()
    assert models["wan2.2-ti2v-5b"]["sizes"] == ["1280*704", "704*1280"]
    assert models["wan2.2-t2v-a14b"]["default_frames"] == 81
    assert models["wan2.2-t2v-a14b"]["gpus_per_job"] == 8
    assert r.json()["default"] == "tiny-t2v"
    assert "model_dir" not in models["tiny-t2v"]


async def test_health_and_readiness_report_the_backing_services(api: Api) -> None:
    assert (await api.client.get("/healthz")).status_code == 200
    r = await api.client.get("/readyz")
    assert r.status_code == 200, r.text
    assert r.json()["checks"] == {"database": "ok", "redis": "ok", "storage": "ok",
                                  "outbox": "ok"}


async def test_errors_for_unknown_routes_are_json(api: Api) -> None:
    r = await api.client.get("/v1/nothing-here")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
