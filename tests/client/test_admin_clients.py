"""The admin and usage calls of both Python clients, against a live server."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tests.client.live import LiveServer
from tests.client.test_both_clients import KINDS
from tests.client.test_both_clients import Either as _Either
from vidmaas.client import AsyncClient, Client, ClientError
from vidmaas.domain.status import TaskStatus


class Either(_Either):
    """``call`` with the method name positional-only (the calls here take ``name=``)."""

    async def call(self, method: str, /, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        if self.kind == "sync":
            def run() -> Any:
                with Client(self.server, self.api_key, **self.options) as c:
                    return getattr(c, method)(*args, **kwargs)
            return await asyncio.to_thread(run)
        async with AsyncClient(self.server, self.api_key, **self.options) as c:
            return await getattr(c, method)(*args, **kwargs)


@pytest.mark.parametrize("kind", KINDS)
async def test_an_admin_manages_users_and_keys_through_either_client(
        kind: str, live: LiveServer) -> None:
    root = Either(kind, live.url, live.keys["root"])
    made = await root.call("create_user", "erin", weight=2.0, max_priority="high",
                           quotas={"gpu_seconds_day": 600}, key_name="first")
    user, key = made["user"], made["key"]
    assert (user["weight"], user["max_priority"], user["quotas"]["gpu_seconds_day"]) == (
        2.0, "high", 600)
    erin = Either(kind, live.url, key["secret"])
    me = await erin.call("me")
    assert (me["name"], me["limits"]["gpu_seconds_day"], me["usage"]["tasks_today"]) == (
        "erin", 600, 0)
    found = await root.call("list_users", name="erin")
    assert [u["id"] for u in found["data"]] == [user["id"]]
    assert (await root.call("get_user", user["id"]))["name"] == "erin"
    changed = await root.call("update_user", user["id"],
                              {"weight": None, "quota_queued_tasks": 4})
    assert changed["weight"] == 1.0 and changed["limits"]["queued_tasks"] == 4
    second = await root.call("create_key", user["id"], name="ci", expires_in_s=3600)
    assert second["secret"] and second["expires_at"]
    keys = (await root.call("list_keys", user["id"]))["data"]
    assert [k["name"] for k in keys] == ["first", "ci"]
    assert all("secret" not in k for k in keys)
    revoked = await root.call("revoke_key", second["id"])
    assert revoked["revoked_at"] and not revoked["active"]
    with pytest.raises(ClientError) as e:
        await Either(kind, live.url, second["secret"]).call("me")
    assert e.value.status == 401
    assert (await root.call("disable_user", user["id"]))["disabled"]
    with pytest.raises(ClientError) as e:
        await erin.call("me")
    assert e.value.status == 401
    assert not (await root.call("enable_user", user["id"]))["disabled"]
    assert (await erin.call("me"))["name"] == "erin"


@pytest.mark.parametrize("kind", KINDS)
async def test_usage_and_the_queue_view_through_either_client(kind: str,
                                                              live: LiveServer) -> None:
    alice, root = Either(kind, live.url, live.keys["alice"]), Either(kind, live.url,
                                                                     live.keys["root"])
    done = await alice.call("submit", "used", model="tiny-t2v")
    await live.driver.start(done["id"])
    await live.driver.complete(done["id"])
    waiting = await alice.call("submit", "waiting", model="tiny-t2v")
    mine = await alice.call("usage")
    assert [(r["model"], r["tasks"]) for r in mine["data"]] == [("tiny-t2v", 1)]
    everyone = await root.call("usage", all_users=True, since=mine["since"])
    assert everyone["totals"]["tasks"] == 1
    view = await root.call("admin_queue", limit=10)
    assert [q["task_id"] for q in view["queued"]] == [waiting["id"]]
    assert view["queued"][0]["user_name"] == "alice"
    with pytest.raises(ClientError) as e:
        await alice.call("admin_queue")
    assert (e.value.status, e.value.code) == (403, "admin_required")
    with pytest.raises(ClientError) as e:
        await alice.call("create_user", "mallory")
    assert (e.value.status, e.value.code) == (403, "admin_required")
    with pytest.raises(ClientError) as e:
        await root.call("create_user", "alice")
    assert (e.value.code, e.value.field) == ("user_exists", "name")
    with pytest.raises(ClientError) as e:
        await root.call("create_user", "zed", weight=500.0)
    assert (e.value.code, e.value.field) == ("invalid_weight", "weight")
    task = await alice.call("get", done["id"])
    assert task["status"] == TaskStatus.COMPLETED.value
