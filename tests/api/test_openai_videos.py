"""The OpenAI-compatible /v1/videos API, driven by the official ``openai`` package against a
real uvicorn server over real Redis and SQLite/PostgreSQL. Tasks are moved through their
lifecycle by the test (no GPU), with a real MP4 in the object store."""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import AsyncIterator
from pathlib import Path

import av
import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from tests.api.test_streams import Server, serve, settings_for, start_running
from vidmaas.config import Settings, StorageSettings
from vidmaas.db import tasks as repo
from vidmaas.domain import events as ev
from vidmaas.domain.status import TaskStatus
from vidmaas.storage.base import output_key, preview_key

# The openai package marks its videos methods deprecated (OpenAI's own Sora service); the
# wire shape is what this server implements.
pytestmark = pytest.mark.filterwarnings("ignore:The Sora API:DeprecationWarning")


def mp4_bytes(frames: int = 9) -> bytes:
    out = io.BytesIO()
    with av.open(out, mode="w", format="mp4") as container:
        stream = container.add_stream("h264", rate=8)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        for i in range(frames):
            img = np.full((64, 64, 3), i * 20, dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return out.getvalue()


def jpeg_bytes() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 200, 30)).save(out, format="JPEG")
    return out.getvalue()


def png_bytes() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(out, format="PNG")
    return out.getvalue()


def oa_settings(db_url: str, redis_url: str, storage: StorageSettings) -> Settings:
    s = settings_for(db_url, redis_url, storage)
    s.api.openai_default_model = "tiny-t2v"
    return s


@pytest.fixture
async def server(db_url: str, redis_url: str, local_storage: StorageSettings,
                 ) -> AsyncIterator[Server]:
    async for s in serve(oa_settings(db_url, redis_url, local_storage), db_url):
        yield s


@pytest.fixture
async def server_sqlite(sqlite_url: str, redis_url: str, local_storage: StorageSettings,
                        ) -> AsyncIterator[Server]:
    async for s in serve(oa_settings(sqlite_url, redis_url, local_storage), sqlite_url):
        yield s


def client(server: Server, user: str = "alice") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(api_key=server.keys[user], base_url=server.base_url + "/v1",
                              max_retries=0, timeout=30)


def spritesheet_bytes(frames: int = 9) -> tuple[bytes, dict[str, int]]:
    """The runtime's spritesheet of ``mp4_bytes``' frames, and its layout."""
    import tempfile
    from pathlib import Path

    from vidmaas.runtime.postprocess import write_spritesheet

    shades = np.arange(frames, dtype=np.uint8)[:, None, None, None] * 20
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "s.jpg"
        layout = write_spritesheet(np.broadcast_to(shades, (frames, 64, 64, 3)), path)
        return path.read_bytes(), layout


async def finish_with_files(server: Server, task_id: str, video: bytes, *,
                            spritesheet: bool = True) -> None:
    """Complete with the files the runtime uploads (no spritesheet when not
    ``spritesheet``: a result made before spritesheets)."""
    svc = server.svc
    await start_running(server, task_id)
    async with svc.sessions() as s:
        await repo.update_progress(session=s, task_id=task_id, values={"progress": 40.0})
    vkey, pkey = output_key(task_id, "video.mp4"), output_key(task_id, "poster.jpg")
    await svc.store.put_bytes(vkey, video, content_type="video/mp4")
    await svc.store.put_bytes(pkey, jpeg_bytes(), content_type="image/jpeg")
    result: dict[str, object] = {
        "video_key": vkey, "poster_key": pkey, "width": 64, "height": 64,
        "num_frames": 9, "fps": 8, "duration_s": 1.125, "seed": 1, "timings": {}}
    if spritesheet:
        skey = output_key(task_id, "spritesheet.jpg")
        sheet, layout = spritesheet_bytes()
        await svc.store.put_bytes(skey, sheet, content_type="image/jpeg")
        result |= {"spritesheet_key": skey, "spritesheet": layout}
    await asyncio.sleep(0.3)  # let a poll see it in progress
    await svc.lifecycle.finish(
        task_id=task_id, to=TaskStatus.COMPLETED, expected=TaskStatus.RUNNING,
        fields={"progress": 100.0, "video_key": vkey, "poster_key": pkey, "result": result},
        event=ev.Event(task_id, ev.EventType.COMPLETED, result))


async def test_the_openai_client_creates_a_video_polls_it_to_completion_and_downloads_it(
        server: Server) -> None:
    oa = client(server)
    video = await oa.videos.create(prompt="a red fox in snow", model="tiny-t2v",
                                   size="64x64", seconds="1")  # type: ignore[arg-type]
    assert video.object == "video" and video.status == "queued" and video.progress == 0
    assert video.size == "64x64" and video.seconds == "1" and video.model == "tiny-t2v"
    assert video.error is None and video.completed_at is None and video.created_at > 0
    row = await _row(server, video.id)
    assert row.source == "openai" and row.params["num_frames"] == 9
    mp4 = mp4_bytes()
    seen: list[str] = []

    async def watch() -> openai.types.Video:
        while True:
            v = await oa.videos.retrieve(video.id)
            seen.append(v.status)
            if v.status in ("completed", "failed"):
                return v
            await asyncio.sleep(0.05)

    watcher = asyncio.create_task(watch(), name="poller")
    await finish_with_files(server, video.id, mp4)
    done = await asyncio.wait_for(watcher, 10)
    assert "in_progress" in seen
    assert done.status == "completed" and done.progress == 100
    assert done.completed_at is not None and done.completed_at >= done.created_at
    content = await oa.videos.download_content(video.id)
    assert content.content == mp4
    with av.open(io.BytesIO(content.content)) as c:
        assert c.streams.video[0].codec_context.name == "h264"
    thumb = await oa.videos.download_content(video.id, variant="thumbnail")
    assert thumb.content[:3] == b"\xff\xd8\xff"
    # The sync client too (in a thread: this server runs on the test's event loop).
    with openai.OpenAI(api_key=server.keys["alice"], base_url=server.base_url + "/v1",
                       max_retries=0, timeout=30) as sync:
        sprite = await asyncio.to_thread(sync.videos.download_content, video.id,
                                         variant="spritesheet")
    sheet = Image.open(io.BytesIO(sprite.content))
    assert (sheet.format, sheet.size) == ("JPEG", (5 * 64, 2 * 64))  # 9 tiles, 5 a row
    pixels = np.asarray(sheet.convert("L")).astype(int)
    assert pixels[:64, :64].mean() < 10 and pixels[64:, 192:256].mean() > 150  # frames 0, 8
    await oa.close()


async def test_a_video_completed_without_a_spritesheet_answers_404_for_that_variant(
        server: Server) -> None:
    oa = client(server)
    video = await oa.videos.create(prompt="an older result")
    await finish_with_files(server, video.id, mp4_bytes(), spritesheet=False)
    assert (await oa.videos.download_content(video.id, variant="thumbnail")).content
    with pytest.raises(openai.NotFoundError) as nf:
        await oa.videos.download_content(video.id, variant="spritesheet")
    assert nf.value.code == "no_spritesheet"
    r = await server.http.get(f"/v1/videos/{video.id}/content",
                              params={"variant": "storyboard"}, headers=server.auth("alice"))
    assert r.status_code == 400 and r.json()["error"]["code"] == "unsupported_variant"
    await oa.close()


async def _row(server: Server, task_id: str) -> repo.Task:
    async with server.svc.sessions() as s:
        task = await repo.get_task(session=s, task_id=task_id)
    assert task is not None
    return task


async def test_what_the_model_cannot_do_is_refused_with_openai_error_bodies(
        server: Server) -> None:
    oa = client(server)
    cases = [({"size": "1280x720"}, "unsupported_size", "size"),
             ({"seconds": "12"}, "unsupported_seconds", "seconds"),
             ({"seconds": "-1"}, "invalid_seconds", "seconds"),
             ({"size": "64*64"}, "invalid_size", "size"),
             ({"model": "sora-2"}, "unknown_model", "model")]
    for extra, code, param in cases:
        with pytest.raises(openai.BadRequestError) as info:
            await oa.videos.create(prompt="x", **extra)  # type: ignore[arg-type]
        assert info.value.status_code == 400
        assert info.value.code == code, extra
        assert info.value.param == param
        assert info.value.type == "invalid_request_error"
    # Nothing was written for the refused requests.
    assert (await oa.videos.list()).data == []
    bad = openai.AsyncOpenAI(api_key="vmk_wrong", base_url=server.base_url + "/v1",
                             max_retries=0)
    with pytest.raises(openai.AuthenticationError) as auth:
        await bad.videos.list()
    assert auth.value.status_code == 401 and auth.value.type == "authentication_error"
    mine = await oa.videos.create(prompt="mine")
    bob = client(server, "bob")
    for call in (bob.videos.retrieve(mine.id), bob.videos.download_content(mine.id),
                 bob.videos.delete(mine.id)):
        with pytest.raises(openai.NotFoundError) as nf:
            await call
        assert nf.value.code == "video_not_found"
    with pytest.raises(openai.ConflictError):  # not ready yet
        await oa.videos.download_content(mine.id)
    await asyncio.gather(oa.close(), bad.close(), bob.close())


async def test_videos_are_listed_newest_first_in_pages_and_native_tasks_are_not_videos(
        server_sqlite: Server) -> None:
    server = server_sqlite
    oa = client(server)
    ids = [(await oa.videos.create(prompt=f"clip {i}")).id for i in range(5)]
    r = await server.http.post("/v1/tasks", json={"prompt": "native"},
                               headers=server.auth("alice"))
    native = r.json()["id"]
    bob = client(server, "bob")
    await bob.videos.create(prompt="bob's")
    await bob.close()
    page = await oa.videos.list(limit=2)
    assert [v.id for v in page.data] == ids[::-1][:2] and page.has_more
    everything = [v.id async for v in oa.videos.list(limit=2)]
    assert everything == ids[::-1]
    ascending = [v.id async for v in oa.videos.list(limit=3, order="asc")]
    assert ascending == ids
    raw = (await server.http.get("/v1/videos", params={"limit": 2, "after": ids[3]},
                                 headers=server.auth("alice"))).json()
    assert raw["object"] == "list" and raw["first_id"] == ids[2] and raw["last_id"] == ids[1]
    with pytest.raises(openai.NotFoundError):
        await oa.videos.retrieve(native)
    await oa.close()


async def test_deleting_cancels_an_unfinished_video_and_removes_a_finished_ones_files(
        server_sqlite: Server) -> None:
    server = server_sqlite
    oa = client(server)
    queued = await oa.videos.create(prompt="to cancel")
    gone = await oa.videos.delete(queued.id)
    assert gone.id == queued.id and gone.deleted and gone.object == "video.deleted"
    after = await oa.videos.retrieve(queued.id)
    assert after.status == "failed" and after.error is not None
    assert after.error.code == "cancelled"
    finished = await oa.videos.create(prompt="to delete")
    await finish_with_files(server, finished.id, mp4_bytes())
    await server.svc.store.put_bytes(preview_key(finished.id), jpeg_bytes(),
                                     content_type="image/jpeg")
    assert (await oa.videos.download_content(finished.id)).content
    assert await server.svc.store.exists(output_key(finished.id, "spritesheet.jpg"))
    await oa.videos.delete(finished.id)
    with pytest.raises(openai.NotFoundError):
        await oa.videos.retrieve(finished.id)
    with pytest.raises(openai.NotFoundError):
        await oa.videos.download_content(finished.id)
    for name in ("video.mp4", "poster.jpg", "spritesheet.jpg"):
        assert not await server.svc.store.exists(output_key(finished.id, name)), name
    assert not await server.svc.store.exists(preview_key(finished.id))
    assert [v.id async for v in oa.videos.list()] == [queued.id]
    await oa.close()


async def test_an_input_reference_upload_or_data_url_becomes_the_tasks_input_image(
        server_sqlite: Server) -> None:
    server = server_sqlite
    oa = client(server)
    v = await oa.videos.create(prompt="animate this", model="tiny-ti2v",
                               input_reference=("cat.png", png_bytes(), "image/png"))
    row = await _row(server, v.id)
    assert row.input_key is not None and row.model == "tiny-ti2v"
    assert await server.svc.store.exists(row.input_key)
    # A text-only model refuses an image.
    with pytest.raises(openai.BadRequestError) as info:
        await oa.videos.create(prompt="x", model="tiny-t2v",
                               input_reference=("cat.png", png_bytes(), "image/png"))
    assert info.value.code == "image_not_supported"
    # JSON with a base64 data URL and integer seconds, as some clients send it.
    import base64
    data_url = "data:image/png;base64," + base64.b64encode(png_bytes()).decode()
    r = await server.http.post("/v1/videos", headers=server.auth("alice"), json={
        "prompt": "json", "model": "tiny-ti2v", "seconds": 2,
        "input_reference": {"image_url": data_url}})
    assert r.status_code == 200, r.text
    assert r.json()["seconds"] == "2" and (await _row(server, r.json()["id"])).input_key
    r = await server.http.post("/v1/videos", headers=server.auth("alice"), json={
        "prompt": "json", "input_reference": {"image_url": "http://169.254.169.254/x"}})
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "unsupported_input_reference"
    r = await server.http.post("/v1/videos", headers=server.auth("alice"), json={"size": 5})
    assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param",
                                                               "code"}
    async with httpx.AsyncClient(base_url=server.base_url) as h:
        r = await h.get("/v1/videos")
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    await oa.close()


# ------------------------------------------------------------------ polling, remix, pages

def sync_client(server: Server, user: str = "alice") -> openai.OpenAI:
    return openai.OpenAI(api_key=server.keys[user], base_url=server.base_url + "/v1",
                         max_retries=0, timeout=30)


async def _only_video_id(server: Server, oa: openai.AsyncOpenAI) -> str:
    for _ in range(200):
        page = await oa.videos.list()
        if page.data:
            return page.data[0].id
        await asyncio.sleep(0.02)
    raise AssertionError("no video was created")


async def test_the_async_clients_create_and_poll_completes_paced_by_the_poll_after_header(
        server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    oa = client(server)
    waits: list[float] = []
    slept = asyncio.Event()

    async def sleep(seconds: float) -> None:
        waits.append(seconds)
        slept.set()
        await asyncio.sleep(0.02)

    monkeypatch.setattr(oa.videos, "_sleep", sleep)
    polling = asyncio.create_task(oa.videos.create_and_poll(
        prompt="a paced fox", size="64x64", seconds="1"))  # type: ignore[arg-type]
    await asyncio.wait_for(slept.wait(), 10)
    video_id = await _only_video_id(server, oa)
    await finish_with_files(server, video_id, mp4_bytes())
    done = await asyncio.wait_for(polling, 10)
    assert done.id == video_id and done.status == "completed" and done.progress == 100
    # Queued first in line: 2000 ms, read from the header once and used for every wait.
    assert len(waits) >= 2 and set(waits) == {2.0}
    await oa.close()


def test_the_poll_after_header_follows_the_state_and_finished_videos_have_none() -> None:
    from vidmaas.api.pacing import poll_after_ms

    assert [poll_after_ms(TaskStatus.QUEUED, p) for p in (None, 1, 3, 50)] == [
        2000, 2000, 6000, 10000]
    assert poll_after_ms(TaskStatus.DISPATCHING, None) == 2000
    assert poll_after_ms(TaskStatus.RUNNING, None) == 1000
    assert poll_after_ms(TaskStatus.CANCELLING, None) == 1000
    for done in (TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.CANCELLED):
        assert poll_after_ms(done, None) is None


async def test_the_sync_clients_create_and_poll_and_downloads_of_video_and_thumbnail(
        server_sqlite: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    server = server_sqlite
    oa = sync_client(server)
    loop = asyncio.get_running_loop()
    waits: list[float] = []
    slept = asyncio.Event()

    def sleep(seconds: float) -> None:
        waits.append(seconds)
        loop.call_soon_threadsafe(slept.set)
        time.sleep(0.02)

    monkeypatch.setattr(oa.videos, "_sleep", sleep)
    # The server runs on this loop: the sync client runs in a thread.
    polling = asyncio.ensure_future(asyncio.to_thread(
        oa.videos.create_and_poll, prompt="a sync fox", size="64x64", seconds="1"))
    await asyncio.wait_for(slept.wait(), 10)
    aoa = client(server)
    video_id = await _only_video_id(server, aoa)
    mp4 = mp4_bytes()
    await finish_with_files(server, video_id, mp4)
    done = await asyncio.wait_for(polling, 10)
    assert done.status == "completed" and done.completed_at is not None
    assert len(waits) >= 2 and set(waits) == {2.0}
    video = await asyncio.to_thread(oa.videos.download_content, video_id)
    assert video.content == mp4
    thumb = await asyncio.to_thread(oa.videos.download_content, video_id, variant="thumbnail")
    assert thumb.content[:3] == b"\xff\xd8\xff"
    raw = await asyncio.to_thread(oa.videos.with_raw_response.retrieve, video_id)
    assert "openai-poll-after-ms" not in raw.headers  # finished: no pacing
    await asyncio.gather(asyncio.to_thread(oa.close), aoa.close())


async def test_the_header_is_on_create_and_retrieve_of_an_unfinished_video(
        server: Server) -> None:
    oa = client(server)
    created = await oa.videos.with_raw_response.create(prompt="first")
    assert created.headers["openai-poll-after-ms"] == "2000"
    second = await oa.videos.with_raw_response.create(prompt="second")
    assert second.headers["openai-poll-after-ms"] == "4000"  # second in line
    first_id = created.parse().id
    await start_running(server, first_id)
    running = await oa.videos.with_raw_response.retrieve(first_id)
    assert running.headers["openai-poll-after-ms"] == "1000"
    assert running.parse().status == "in_progress"
    await oa.close()


async def test_a_failed_video_has_openais_error_object_and_timestamps(server: Server) -> None:
    oa = client(server)
    v = await oa.videos.create(prompt="doomed")
    lc = server.svc.lifecycle
    await lc.transition(task_id=v.id, to=TaskStatus.DISPATCHING, expected=TaskStatus.QUEUED)
    await lc.finish(task_id=v.id, to=TaskStatus.FAILED, expected=TaskStatus.DISPATCHING,
                    fields={"error_code": "job_failed", "error_message": "out of memory"},
                    event=ev.Event(v.id, ev.EventType.FAILED, {"code": "job_failed",
                                                              "message": "out of memory"}))
    raw = await oa.videos.with_raw_response.retrieve(v.id)
    failed = raw.parse()
    assert "openai-poll-after-ms" not in raw.headers
    assert failed.status == "failed" and failed.error is not None
    assert (failed.error.code, failed.error.message) == ("job_failed", "out of memory")
    assert failed.completed_at is not None and failed.expires_at is None
    body = raw.http_response.json()
    assert set(body["error"]) == {"code", "message"} and body["remixed_from_video_id"] is None
    assert isinstance(body["seconds"], str) and isinstance(body["progress"], int)
    await oa.close()


async def test_a_remix_is_a_new_video_like_the_completed_source_with_a_new_prompt(
        server: Server) -> None:
    oa = client(server)
    src = await oa.videos.create(prompt="a fox in snow", size="96x64",  # type: ignore[arg-type]
                                 seconds="2")
    with pytest.raises(openai.ConflictError) as early:
        await oa.videos.remix(src.id, prompt="too soon")
    assert early.value.code == "video_not_completed" and early.value.param == "video_id"
    await finish_with_files(server, src.id, mp4_bytes())
    raw = await oa.videos.with_raw_response.remix(src.id, prompt="a fox in rain")
    remix = raw.parse()
    # Queued: 2000 ms a place (the test moved the source without a dispatcher, so its
    # queue entry may still stand ahead).
    assert raw.headers["openai-poll-after-ms"] in ("2000", "4000")
    assert remix.id != src.id and remix.remixed_from_video_id == src.id
    assert remix.status == "queued" and remix.prompt == "a fox in rain"
    assert (remix.size, remix.seconds, remix.model) == ("96x64", "2", src.model)
    a, b = await _row(server, src.id), await _row(server, remix.id)
    assert b.params == a.params and b.source == "openai" and b.rerun_of == src.id
    assert (await oa.videos.retrieve(remix.id)).remixed_from_video_id == src.id
    # Someone else's video is a missing one; a retried remix with a key is made once.
    bob = client(server, "bob")
    for vid in (src.id, "video_" + "0" * 24):
        with pytest.raises(openai.NotFoundError) as nf:
            await bob.videos.remix(vid, prompt="mine")
        assert nf.value.code == "video_not_found"
    key = {"Idempotency-Key": "remix-1"}
    once = await oa.videos.remix(src.id, prompt="again", extra_headers=key)
    twice = await oa.videos.remix(src.id, prompt="again", extra_headers=key)
    assert once.id == twice.id
    with pytest.raises(openai.BadRequestError) as empty:
        await oa.videos.remix(src.id, prompt="")
    assert empty.value.param == "prompt"
    # A deleted source cannot be remixed; its remixes stay.
    await oa.videos.delete(src.id)
    with pytest.raises(openai.NotFoundError):
        await oa.videos.remix(src.id, prompt="after")
    assert (await oa.videos.retrieve(remix.id)).status == "queued"
    await asyncio.gather(oa.close(), bob.close())


async def test_a_remix_keeps_its_own_copy_of_the_sources_input_image(
        server_sqlite: Server, tmp_path: Path) -> None:
    server = server_sqlite
    oa = client(server)
    path = tmp_path / "cat.png"
    path.write_bytes(png_bytes())
    with path.open("rb") as f:  # a file object, as the SDK's docs show it
        src = await oa.videos.create(prompt="animate", model="tiny-ti2v", input_reference=f)
    await finish_with_files(server, src.id, mp4_bytes())
    remix = await oa.videos.remix(src.id, prompt="animate it more")
    a, b = await _row(server, src.id), await _row(server, remix.id)
    assert a.input_key and b.input_key and a.input_key != b.input_key
    store = server.svc.store
    assert await store.get_bytes(b.input_key) == await store.get_bytes(a.input_key)
    await store.delete(a.input_key)
    assert await store.exists(b.input_key)
    await oa.close()


async def test_the_sync_client_pages_with_after_over_several_videos(
        server_sqlite: Server) -> None:
    server = server_sqlite
    oa = sync_client(server)
    ids = [(await asyncio.to_thread(oa.videos.create, prompt=f"page {i}")).id
           for i in range(5)]
    page = await asyncio.to_thread(oa.videos.list, limit=2, after=ids[4])
    assert [v.id for v in page.data] == [ids[3], ids[2]] and page.has_more
    last = await asyncio.to_thread(oa.videos.list, limit=2, after=ids[1])
    assert [v.id for v in last.data] == [ids[0]] and not last.has_more
    walked = await asyncio.to_thread(lambda: [v.id for v in oa.videos.list(limit=2)])
    assert walked == ids[::-1]
    up = await asyncio.to_thread(lambda: [v.id for v in oa.videos.list(limit=2, order="asc")])
    assert up == ids
    await asyncio.to_thread(oa.close)
