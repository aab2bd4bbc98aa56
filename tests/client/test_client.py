"""The Python client library against a real running API server."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import av
import pytest
from PIL import Image

from tests.client.live import LiveServer, png
from vidmaas.client import AsyncClient, Client, ClientError
from vidmaas.client.config import ConfigError, resolve
from vidmaas.client.wire import SSEParser, is_terminal, snapshot_state


def client(live: LiveServer, user: str = "alice") -> Client:
    return Client(live.url, live.keys[user])


async def test_a_submitted_task_is_fetched_and_listed_newest_first(live: LiveServer) -> None:
    def run() -> tuple[dict, dict, dict, dict]:
        with client(live) as c:
            first = c.submit("a red fox", model="tiny-t2v", size="96*64", num_frames=5,
                             steps=2, seed=7)
            second = c.submit("a blue whale")
            return first, second, c.get(first["id"]), c.list(limit=10)

    first, second, got, page = await asyncio.to_thread(run)
    assert first["status"] == "queued" and first["queue_position"] == 1
    assert first["params"] == {**first["params"], "size": "96*64", "num_frames": 5, "steps": 2,
                               "seed": 7}
    assert got["id"] == first["id"] and got["prompt"] == "a red fox"
    assert [t["id"] for t in page["data"]] == [second["id"], first["id"]]


async def test_an_image_is_sent_as_multipart_and_the_task_has_it(live: LiveServer,
                                                                 tmp_path: Path) -> None:
    image = tmp_path / "cat.png"
    image.write_bytes(png())
    task = await asyncio.to_thread(
        lambda: client(live).submit("a cat", model="tiny-ti2v", image=image))
    assert task["has_image"] is True and task["model"] == "tiny-ti2v"


async def test_a_parameter_the_model_cannot_do_raises_a_client_error_naming_the_field(
        live: LiveServer) -> None:
    def run() -> None:
        with client(live) as c:
            c.submit("a fox", model="tiny-t2v", size="1280*720")

    with pytest.raises(ClientError) as info:
        await asyncio.to_thread(run)
    assert info.value.status == 422 and info.value.field == "size"
    assert info.value.code and info.value.message


async def test_a_bad_key_and_an_unreachable_server_raise_client_errors(live: LiveServer) -> None:
    def bad_key() -> None:
        with Client(live.url, "vk_not_a_key") as c:
            c.list()

    def nobody_home() -> None:
        with Client("http://127.0.0.1:9", "k", timeout_s=2) as c:
            c.models()

    with pytest.raises(ClientError) as info:
        await asyncio.to_thread(bad_key)
    assert info.value.status == 401 and info.value.code == "unauthenticated"
    with pytest.raises(ClientError) as info:
        await asyncio.to_thread(nobody_home)
    assert info.value.status == 0 and info.value.code == "unreachable"


async def test_another_users_task_looks_missing_and_cannot_be_cancelled(live: LiveServer) -> None:
    task = await asyncio.to_thread(lambda: client(live, "alice").submit("mine"))

    def as_bob() -> list[int]:
        codes = []
        with client(live, "bob") as c:
            for call in (c.get, c.cancel):
                try:
                    call(task["id"])
                except ClientError as e:
                    codes.append(e.status)
            codes.append(len(c.list()["data"]))
        return codes

    assert await asyncio.to_thread(as_bob) == [404, 404, 0]


async def test_cancelling_a_queued_task_cancels_it_and_a_second_cancel_is_a_conflict(
        live: LiveServer) -> None:
    def run() -> tuple[dict, int]:
        with client(live) as c:
            task = c.submit("to be cancelled")
            done = c.cancel(task["id"])
            try:
                c.cancel(task["id"])
            except ClientError as e:
                return done, e.status
            return done, 200

    done, second = await asyncio.to_thread(run)
    assert done["status"] == "cancelled" and second == 409


async def test_the_same_idempotency_key_returns_the_same_task(live: LiveServer) -> None:
    def run() -> tuple[str, str]:
        with client(live) as c:
            a = c.submit("once", idempotency_key="k-123")
            b = c.submit("once", idempotency_key="k-123")
            return a["id"], b["id"]

    a, b = await asyncio.to_thread(run)
    assert a == b


async def test_watch_follows_a_task_to_completion_and_download_saves_a_playable_video(
        live: LiveServer, tmp_path: Path) -> None:
    task = await asyncio.to_thread(lambda: client(live).submit("a fox", model="tiny-t2v"))
    seen: list[dict] = []

    def watch() -> Path:
        with client(live) as c:
            for msg in c.watch(task["id"], poll_interval_s=0.2):
                seen.append(msg)
            sheet = c.download(task["id"], tmp_path / "fox-sheet.jpg", which="spritesheet")
            with Image.open(sheet) as im:
                assert im.format == "JPEG" and im.width > 0
            with pytest.raises(ValueError):
                c.download(task["id"], tmp_path / "x", which="../admin")
            return c.download(task["id"], tmp_path / "fox.mp4")

    watcher = asyncio.create_task(asyncio.to_thread(watch), name="watch")
    drv = live.driver
    await asyncio.sleep(0.5)
    await drv.start(task["id"])
    await drv.progress(task["id"], percent=40.0)
    await asyncio.sleep(0.6)
    await drv.complete(task["id"])
    path = await asyncio.wait_for(watcher, 30)
    assert is_terminal(seen[-1])
    statuses = [snapshot_state(m)["status"] if m["type"] == "snapshot" else m["type"]
                for m in seen]
    assert statuses[0] == "queued" and statuses[-1] == "completed"
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264" and stream.frames > 0
    assert not path.with_name("fox.mp4.part").exists()


async def test_the_async_client_submits_lists_and_cancels(live: LiveServer) -> None:
    async with AsyncClient(live.url, live.keys["alice"]) as c:
        models = await c.models()
        task = await c.submit("async fox", model=models["default"])
        assert (await c.get(task["id"]))["id"] == task["id"]
        assert [t["id"] for t in (await c.list())["data"]] == [task["id"]]
        assert (await c.cancel(task["id"]))["status"] == "cancelled"
        with pytest.raises(ClientError) as info:
            await c.submit("x", steps=0)
        assert info.value.field == "steps"


def test_the_sse_parser_joins_data_lines_and_takes_the_id_field() -> None:
    p = SSEParser()
    lines = [": keep-alive", "id: 5-0", "event: progress",
             'data: {"type": "progress",', 'data:  "data": {"percent": 5}}', "",
             'data: {"type": "snapshot", "task": {"status": "completed"}}', ""]
    out = [m for m in (p.feed(line) for line in lines) if m is not None]
    assert out[0] == {"type": "progress", "data": {"percent": 5}, "id": "5-0"}
    assert is_terminal(out[1])
    assert not is_terminal({"type": "failed", "data": {"retryable": True}})


def test_flags_override_the_environment_which_overrides_the_config_file(tmp_path: Path) -> None:
    cfg = tmp_path / "config.toml"
    cfg.write_text('server = "http://file:1"\napi_key = "from-file"\n')
    env = {"VIDMAAS_CONFIG": str(cfg)}
    assert resolve(server=None, api_key=None, config_path=None, env=env).api_key == "from-file"
    env |= {"VIDMAAS_API_KEY": "from-env", "VIDMAAS_SERVER": "http://env:2"}
    got = resolve(server=None, api_key=None, config_path=None, env=env)
    assert (got.server, got.api_key) == ("http://env:2", "from-env")
    got = resolve(server="http://flag:3/", api_key="from-flag", config_path=None, env=env)
    assert (got.server, got.api_key, got.source_of_key) == ("http://flag:3", "from-flag",
                                                             "--api-key")
    empty = resolve(server=None, api_key=None, config_path=None,
                    env={"XDG_CONFIG_HOME": str(tmp_path / "none")})
    assert (empty.server, empty.api_key) == ("http://127.0.0.1:8000", None)


def test_a_config_file_that_does_not_parse_is_an_error(tmp_path: Path) -> None:
    cfg = tmp_path / "config.toml"
    cfg.write_text("server = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        resolve(server=None, api_key=None, config_path=str(cfg), env={})
    with pytest.raises(ConfigError, match="does not exist"):
        resolve(server=None, api_key=None, config_path=str(tmp_path / "nope.toml"), env={})


async def test_the_async_client_watches_a_task_to_completion_and_downloads_it(
        live: LiveServer, tmp_path: Path) -> None:
    async with AsyncClient(live.url, live.keys["alice"]) as c:
        task = await c.submit("async watch", model="tiny-t2v")

        async def drive() -> None:
            await asyncio.sleep(0.3)
            await live.driver.start(task["id"])
            await live.driver.progress(task["id"], percent=50.0)
            await live.driver.complete(task["id"], recorded_after_s=0.5)

        driver = asyncio.create_task(drive(), name="drive")
        kinds = []
        async with contextlib.aclosing(c.watch(task["id"])) as stream:
            async for msg in stream:
                kinds.append(msg["type"])
        await driver
        assert kinds[0] == "snapshot" and "progress" in kinds and kinds[-1] == "completed"
        assert (await c.wait(task["id"]))["status"] == "completed"
        path = await c.download(task["id"], tmp_path / "a.mp4")
        assert path.read_bytes()[4:8] == b"ftyp"
