"""The same scenarios against the blocking ``Client`` and the ``AsyncClient``, live.

Each test runs once per client: the blocking one in a worker thread, the asyncio one
in the test's loop, against the same kind of real server. What one client does, the
other does too.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import re
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from tests.client.live import LiveServer, live_server
from vidmaas.client import AsyncClient, Client, ClientError
from vidmaas.client.wire import Message, is_terminal, snapshot_state
from vidmaas.config import StorageSettings

KINDS = ["sync", "async"]


class Either:
    """One client of either kind, driven through the same awaitable calls."""

    def __init__(self, kind: str, server: str, api_key: str | None, **options: Any) -> None:
        self.kind, self.server, self.api_key, self.options = kind, server, api_key, options

    async def call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        if self.kind == "sync":
            def run() -> Any:
                with Client(self.server, self.api_key, **self.options) as c:
                    return getattr(c, name)(*args, **kwargs)
            return await asyncio.to_thread(run)
        async with AsyncClient(self.server, self.api_key, **self.options) as c:
            return await getattr(c, name)(*args, **kwargs)

    async def watch(self, task_id: str, seen: list[Message], **kwargs: Any) -> None:
        """Watch to the end, appending every yielded message to ``seen`` as it comes."""
        if self.kind == "sync":
            def run() -> None:
                with Client(self.server, self.api_key) as c:
                    for msg in c.watch(task_id, **kwargs):
                        seen.append(msg)
            await asyncio.to_thread(run)
            return
        async with (AsyncClient(self.server, self.api_key) as c,
                    contextlib.aclosing(c.watch(task_id, **kwargs)) as stream):
            async for msg in stream:
                seen.append(msg)


def either(kind: str, live: LiveServer, user: str = "alice") -> Either:
    return Either(kind, live.url, live.keys[user])


def kinds_of(seen: list[Message]) -> list[str]:
    """Message types, with a snapshot shown as ``snapshot:<status>``; queue position
    pushes left out (they come whenever the queue moves)."""
    return [f"snapshot:{snapshot_state(m).get('status')}" if m["type"] == "snapshot"
            else m["type"] for m in seen if m["type"] != "queued"]


async def watching(client: Either, task_id: str, seen: list[Message],
                   **kwargs: Any) -> asyncio.Task[None]:
    """Start a watch and return once it has its first message (the snapshot)."""
    task = asyncio.create_task(client.watch(task_id, seen, **kwargs), name="watch")
    for _ in range(500):
        if seen or task.done():
            break
        await asyncio.sleep(0.02)
    assert seen, "the watch yielded nothing"
    return task


@pytest.fixture
async def streamless(sqlite_url: str, redis_url: str, local_storage: StorageSettings,
                     ) -> AsyncIterator[LiveServer]:
    """A live server without the per-task event stream (an older or trimmed server)."""
    async with live_server(db_url=sqlite_url, redis_url=redis_url, storage=local_storage,
                           hidden=re.compile(r"/v1/tasks/[^/]+/events")) as server:
        yield server


@pytest.mark.parametrize("kind", KINDS)
async def test_both_clients_follow_a_task_from_its_snapshot_to_completion(
        kind: str, live: LiveServer, tmp_path: Path) -> None:
    c = either(kind, live)
    task = await c.call("submit", "a fox", model="tiny-t2v")
    seen: list[Message] = []
    watch = await watching(c, task["id"], seen)
    await live.driver.start(task["id"])
    await live.driver.progress(task["id"], percent=40.0)
    await live.driver.complete(task["id"])
    await asyncio.wait_for(watch, 30)
    assert kinds_of(seen) == ["snapshot:queued", "dispatched", "started", "stage", "progress",
                              "completed"]
    done = await c.call("wait", task["id"])
    assert done["status"] == "completed"
    path = await c.call("download", task["id"], tmp_path / "fox.mp4")
    assert path.read_bytes()[4:8] == b"ftyp"
    # The driver's spritesheet: the 16 frames of its video, 5 to a row.
    assert done["spritesheet"] == {"columns": 5, "rows": 4, "count": 16, "tile_width": 64,
                                   "tile_height": 64}
    async with httpx.AsyncClient(base_url=live.url) as raw:
        r = await raw.get(done["spritesheet_url"],
                          headers={"Authorization": f"Bearer {live.keys['alice']}"})
    assert r.status_code == 200 and Image.open(io.BytesIO(r.content)).size == (320, 256)


@pytest.mark.parametrize("kind", KINDS)
async def test_both_clients_end_a_watch_on_a_settled_snapshot_after_a_final_failure(
        kind: str, live: LiveServer) -> None:
    c = either(kind, live)
    task = await c.call("submit", "doomed", model="tiny-t2v")
    seen: list[Message] = []
    watch = await watching(c, task["id"], seen)
    await live.driver.start(task["id"])
    await live.driver.give_up(task["id"], code="oom", message="out of memory, no attempt left")
    # The stream carries only the retryable failure; the watch must find the end itself.
    await asyncio.wait_for(watch, 20)
    assert kinds_of(seen)[-2:] == ["failed", "snapshot:failed"]
    assert seen[-2]["data"]["retryable"] is True and not is_terminal(seen[-2])
    final = snapshot_state(seen[-1])
    assert final["id"] == task["id"] and final["error"]["code"] == "oom"


@pytest.mark.parametrize("kind", KINDS)
async def test_both_clients_keep_watching_through_a_retry_to_the_end(
        kind: str, live: LiveServer) -> None:
    c = either(kind, live)
    task = await c.call("submit", "retried", model="tiny-t2v")
    seen: list[Message] = []
    watch = await watching(c, task["id"], seen)
    await live.driver.start(task["id"])
    await live.driver.retry(task["id"], code="node_lost", message="the node went away")
    await asyncio.sleep(0.5)
    assert not watch.done(), "a retryable failure ended the watch"
    await live.driver.start(task["id"])
    await live.driver.complete(task["id"])
    await asyncio.wait_for(watch, 30)
    kinds = kinds_of(seen)
    assert "failed" in kinds and kinds[-1] == "completed"
    assert kinds.count("started") == 2


@pytest.mark.parametrize("kind", KINDS)
async def test_both_clients_poll_a_server_without_an_event_stream(
        kind: str, streamless: LiveServer) -> None:
    live = streamless
    c = either(kind, live)
    task = await c.call("submit", "polled", model="tiny-t2v")
    seen: list[Message] = []
    watch = await watching(c, task["id"], seen, poll_interval_s=0.1)
    await live.driver.start(task["id"])
    await asyncio.sleep(0.4)
    await live.driver.complete(task["id"])
    await asyncio.wait_for(watch, 30)
    kinds = kinds_of(seen)
    assert kinds[0] == "snapshot:queued" and kinds[-1] == "snapshot:completed"
    assert "snapshot:running" in kinds
    assert len(kinds) == len(set(kinds)), "an unchanged task was yielded twice"


@pytest.mark.parametrize("kind", KINDS)
async def test_both_clients_say_who_the_key_is_and_issue_working_stream_tokens(
        kind: str, live: LiveServer) -> None:
    c = either(kind, live, "bob")
    me = await c.call("me")
    assert me["name"] == "bob" and me["is_admin"] is False and me["id"]
    token = await c.call("stream_token")
    assert token["expires_in_s"] == live.settings.api.stream_token_ttl_s
    task = await c.call("submit", "a token's task")
    async with httpx.AsyncClient(base_url=live.url) as raw:
        # Without a key, the token alone authenticates the media URL: not ready, not 401.
        r = await raw.get(f"/v1/tasks/{task['id']}/poster", params={"token": token["token"]})
        assert r.status_code == 409 and r.json()["error"]["code"] == "poster_not_ready"
        r = await raw.get(f"/v1/tasks/{task['id']}/poster", params={"token": "nope"})
        assert r.status_code == 401


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("make,status,code", [
    (lambda live: Either("", live.url, "vk_not_a_key"), 401, "unauthenticated"),
    (lambda live: Either("", "http://127.0.0.1:9", "k", timeout_s=2), 0, "unreachable"),
])
async def test_both_clients_raise_the_same_client_errors(
        kind: str, live: LiveServer, make: Callable[[LiveServer], Either], status: int,
        code: str) -> None:
    c = make(live)
    c.kind = kind
    with pytest.raises(ClientError) as info:
        await c.call("list")
    assert (info.value.status, info.value.code) == (status, code)
    with pytest.raises(ClientError) as info:
        await either(kind, live).call("submit", "x", model="tiny-t2v", size="1280*720")
    assert (info.value.status, info.value.field) == (422, "size")
    with pytest.raises(ClientError) as info:
        await either(kind, live, "bob").call("get", "t" + "0" * 25)
    assert (info.value.status, info.value.code) == (404, "task_not_found")
