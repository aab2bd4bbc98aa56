"""The admin API over HTTP on SQLite and PostgreSQL: users, keys, shares, the queue view,
usage and /v1/me."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta

import httpx
import pytest
from sqlalchemy import update

from tests.api.conftest import Api, api_settings, start_api
from vidmaas.bus import keys
from vidmaas.config import StorageSettings
from vidmaas.db import tasks as repo
from vidmaas.db.engine import make_engine, make_sessionmaker
from vidmaas.db.models import ApiKey, User, utcnow
from vidmaas.domain.fairness import Share
from vidmaas.domain.status import TaskStatus
from vidmaas.services import Services


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def _admin(api: Api, method: str, path: str, **kw: object) -> httpx.Response:
    return await api.client.request(method, path, headers=api.auth("root"), **kw)  # type: ignore[arg-type]


async def _db(api: Api, stmt: object) -> None:
    engine = make_engine(api.settings.database.url)
    try:
        async with make_sessionmaker(engine)() as s:
            await s.execute(stmt)  # type: ignore[call-overload]
            await s.commit()
    finally:
        await engine.dispose()


async def test_an_admin_makes_a_user_whose_key_works_and_whose_secret_is_shown_once(
        api: Api) -> None:
    r = await _admin(api, "POST", "/v1/admin/users",
                     json={"name": "carol", "weight": 2.5, "max_priority": "high",
                           "quota_gpu_seconds_day": 3600, "key_name": "laptop"})
    assert r.status_code == 201, r.text
    made = r.json()
    user, key = made["user"], made["key"]
    assert (user["name"], user["weight"], user["max_priority"], user["disabled"]) == (
        "carol", 2.5, "high", False)
    assert user["quotas"]["gpu_seconds_day"] == 3600 and user["quotas"]["queued_tasks"] is None
    assert user["limits"]["queued_tasks"] == api.settings.api.max_queued_per_user
    assert key["secret"].startswith("vmk_") and key["secret"].startswith(key["prefix"])
    assert key["name"] == "laptop" and key["active"] and key["last_used_at"] is None
    me = await api.client.get("/v1/me", headers=bearer(key["secret"]))
    assert me.status_code == 200
    assert (me.json()["name"], me.json()["weight"], me.json()["limits"]["gpu_seconds_day"]) \
        == ("carol", 2.5, 3600)
    # The secret never shows again; the list shows when the key was last used.
    listed = await _admin(api, "GET", f"/v1/admin/users/{user['id']}/keys")
    assert listed.status_code == 200
    assert key["secret"] not in listed.text
    [row] = listed.json()["data"]
    assert row["prefix"] == key["prefix"] and row["last_used_at"] is not None
    # The weight is in the queue at once.
    svc: Services = api.app.state.services
    assert await svc.redis.hget(keys.USER_SHARES, user["id"]) == Share(2.5, 0).encode()
    shown = await _admin(api, "GET", f"/v1/admin/users/{user['id']}")
    assert shown.json() == user


async def test_listing_users_pages_by_cursor_and_filters_by_name(api: Api) -> None:
    for i in range(3):
        assert (await _admin(api, "POST", "/v1/admin/users",
                             json={"name": f"user-{i}", "key": False})).status_code == 201
    seen: list[str] = []
    cursor = None
    while True:
        params = {"limit": 2} | ({"cursor": cursor} if cursor else {})
        page = (await _admin(api, "GET", "/v1/admin/users", params=params)).json()
        seen += [u["name"] for u in page["data"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert sorted(seen) == sorted(["alice", "bob", "root", "user-0", "user-1", "user-2"])
    assert len(seen) == len(set(seen))
    only = (await _admin(api, "GET", "/v1/admin/users", params={"name": "bob"})).json()
    assert [u["name"] for u in only["data"]] == ["bob"]


async def test_bad_changes_get_their_own_codes_and_taken_names_409(api: Api) -> None:
    alice = (await _admin(api, "GET", "/v1/admin/users", params={"name": "alice"})).json()
    alice_id = alice["data"][0]["id"]
    cases = [({"weight": 0}, 422, "invalid_weight", "weight"),
             ({"weight": 101}, 422, "invalid_weight", "weight"),
             ({"max_priority": "urgent"}, 422, "invalid_priority", "max_priority"),
             ({"quota_queued_tasks": -1}, 422, "invalid_quota", "quota_queued_tasks"),
             ({"quota_gpu_seconds_month": -0.5}, 422, "invalid_quota",
              "quota_gpu_seconds_month"),
             ({"name": "bob"}, 409, "user_exists", "name"),
             ({"name": None}, 422, "invalid_name", "name"),
             ({"is_admin": None}, 422, "invalid_request", "is_admin"),
             ({"password": "x"}, 422, "invalid_request", "password")]
    for body, status, code, field in cases:
        r = await _admin(api, "PATCH", f"/v1/admin/users/{alice_id}", json=body)
        assert r.status_code == status, (body, r.text)
        assert (r.json()["error"]["code"], r.json()["error"]["field"]) == (code, field), body
    r = await _admin(api, "POST", "/v1/admin/users", json={"name": "alice"})
    assert r.status_code == 409 and r.json()["error"]["code"] == "user_exists"
    for path in ("/v1/admin/users/u0000000000000000000", "/v1/admin/users/a%20b",
                 "/v1/admin/users/nope/keys"):
        r = await _admin(api, "GET", path)
        assert r.status_code == 404 and r.json()["error"]["code"] == "user_not_found", path
    r = await _admin(api, "DELETE", "/v1/admin/keys/999999")
    assert r.status_code == 404 and r.json()["error"]["code"] == "key_not_found"
    for body in ({"expires_in_s": -5}, {"expires_at": "2001-01-01T00:00:00Z"},
                 {"expires_in_s": 10, "expires_at": "2999-01-01T00:00:00Z"}):
        r = await _admin(api, "POST", f"/v1/admin/users/{alice_id}/keys", json=body)
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_expiry", body


async def test_null_resets_to_the_settings_defaults_and_shares_follow(api: Api) -> None:
    api.settings.quotas.gpus_at_once = 3
    made = (await _admin(api, "POST", "/v1/admin/users",
                         json={"name": "dave", "weight": 4, "quota_gpus_at_once": 1})).json()
    uid = made["user"]["id"]
    svc: Services = api.app.state.services
    assert await svc.redis.hget(keys.USER_SHARES, uid) == Share(4.0, 1).encode()
    r = await _admin(api, "PATCH", f"/v1/admin/users/{uid}",
                     json={"weight": None, "quota_gpus_at_once": None, "max_priority": "low"})
    assert r.status_code == 200, r.text
    got = r.json()
    assert (got["weight"], got["quotas"]["gpus_at_once"], got["limits"]["gpus_at_once"],
            got["max_priority"]) == (1.0, None, 3, "low")
    assert await svc.redis.hget(keys.USER_SHARES, uid) == Share(1.0, 3).encode()
    r = await _admin(api, "PATCH", f"/v1/admin/users/{uid}", json={"max_priority": None})
    assert r.json()["max_priority"] == "normal"


async def test_disabling_a_user_stops_their_keys_and_enabling_restores_them(api: Api) -> None:
    alice_id = (await api.client.get("/v1/me", headers=api.auth("alice"))).json()["id"]
    r = await api.client.post("/v1/tasks", json={"prompt": "kept"}, headers=api.auth("alice"))
    task_id = r.json()["id"]
    r = await _admin(api, "POST", f"/v1/admin/users/{alice_id}/disable")
    assert r.status_code == 200 and r.json()["disabled"] and r.json()["disabled_at"]
    # This process forgets her cached key at once.
    r = await api.client.get("/v1/me", headers=api.auth("alice"))
    assert r.status_code == 401
    # Her task goes on.
    r = await api.client.get(f"/v1/tasks/{task_id}", headers=api.auth("root"))
    assert r.json()["status"] == "queued"
    r = await _admin(api, "POST", f"/v1/admin/users/{alice_id}/enable")
    assert r.status_code == 200 and not r.json()["disabled"]
    assert (await api.client.get("/v1/me", headers=api.auth("alice"))).status_code == 200


async def test_a_revoked_key_stops_and_the_users_other_keys_go_on(api: Api) -> None:
    bob_id = (await api.client.get("/v1/me", headers=api.auth("bob"))).json()["id"]
    extra = (await _admin(api, "POST", f"/v1/admin/users/{bob_id}/keys",
                          json={"name": "ci"})).json()
    assert (await api.client.get("/v1/me", headers=bearer(extra["secret"]))).status_code == 200
    r = await _admin(api, "DELETE", f"/v1/admin/keys/{extra['id']}")
    assert r.status_code == 200 and r.json()["revoked_at"] and not r.json()["active"]
    assert (await api.client.get("/v1/me", headers=bearer(extra["secret"]))).status_code == 401
    assert (await api.client.get("/v1/me", headers=api.auth("bob"))).status_code == 200
    again = await _admin(api, "DELETE", f"/v1/admin/keys/{extra['id']}")
    assert again.json()["revoked_at"] == r.json()["revoked_at"]


@pytest.fixture
async def cached_api(sqlite_url: str, redis_url: str, local_storage: StorageSettings,
                     ) -> AsyncIterator[Api]:
    settings = api_settings(db_url=sqlite_url, redis_url=redis_url, storage=local_storage)
    settings.api.key_cache_ttl_s = 0.5
    async for a in start_api(settings, sqlite_url):
        yield a


async def test_changes_made_elsewhere_take_effect_within_the_cache_ttl(cached_api: Api) -> None:
    api = cached_api
    alice_id = (await api.client.get("/v1/me", headers=api.auth("alice"))).json()["id"]
    # Disabled by another process (straight in the database): within the TTL.
    await _db(api, update(User).where(User.id == alice_id).values(disabled_at=utcnow()))
    await asyncio.sleep(0.6)
    assert (await api.client.get("/v1/me", headers=api.auth("alice"))).status_code == 401
    await _db(api, update(User).where(User.id == alice_id).values(disabled_at=None))
    # Expired by another process: within the TTL.
    assert (await api.client.get("/v1/me", headers=api.auth("alice"))).status_code == 200
    await _db(api, update(ApiKey).where(ApiKey.user_id == alice_id)
              .values(expires_at=utcnow() - timedelta(seconds=1)))
    await asyncio.sleep(0.6)
    assert (await api.client.get("/v1/me", headers=api.auth("alice"))).status_code == 401


async def test_a_cached_key_never_outlives_its_expiry(api: Api) -> None:
    api.settings.api.key_cache_ttl_s = 60.0
    bob_id = (await api.client.get("/v1/me", headers=api.auth("bob"))).json()["id"]
    short = (await _admin(api, "POST", f"/v1/admin/users/{bob_id}/keys",
                          json={"expires_in_s": 1.0})).json()
    assert short["expires_at"]
    assert (await api.client.get("/v1/me", headers=bearer(short["secret"]))).status_code == 200
    await asyncio.sleep(1.2)
    assert (await api.client.get("/v1/me", headers=bearer(short["secret"]))).status_code == 401


async def test_last_used_is_written_on_a_cache_miss_not_per_request(api: Api) -> None:
    api.settings.api.key_cache_ttl_s = 60.0
    bob_id = (await api.client.get("/v1/me", headers=api.auth("bob"))).json()["id"]
    long_ago = utcnow() - timedelta(days=1)
    await _db(api, update(ApiKey).where(ApiKey.user_id == bob_id).values(last_used_at=long_ago))
    for _ in range(5):  # cache hits: nothing written
        assert (await api.client.get("/v1/me", headers=api.auth("bob"))).status_code == 200
    [key] = (await _admin(api, "GET", f"/v1/admin/users/{bob_id}/keys")).json()["data"]
    assert key["last_used_at"].startswith(long_ago.date().isoformat())
    api.app.state.key_cache.forget_user(bob_id)  # the next request misses the cache
    assert (await api.client.get("/v1/me", headers=api.auth("bob"))).status_code == 200
    [key] = (await _admin(api, "GET", f"/v1/admin/users/{bob_id}/keys")).json()["data"]
    assert key["last_used_at"].startswith(utcnow().date().isoformat())


async def _run(api: Api, task_id: str, *, seconds: float, finish: bool) -> None:
    svc: Services = api.app.state.services
    lc = svc.lifecycle
    started = utcnow() - timedelta(seconds=seconds)
    await lc.transition(task_id=task_id, to=TaskStatus.DISPATCHING, expected=TaskStatus.QUEUED,
                        fields={"dispatched_at": started})
    async with svc.sessions() as s:
        task = await repo.get_task(session=s, task_id=task_id)
    assert task is not None
    await lc.queue.remove(user_id=task.user_id, task_id=task_id)
    await lc.transition(task_id=task_id, to=TaskStatus.RUNNING, expected=TaskStatus.DISPATCHING,
                        fields={"started_at": started})
    if finish:
        await lc.finish(task_id=task_id, to=TaskStatus.COMPLETED, expected=TaskStatus.RUNNING)


async def _submit(api: Api, user: str, model: str = "tiny-t2v") -> str:
    r = await api.client.post("/v1/tasks", json={"prompt": f"{user}'s", "model": model},
                              headers=api.auth(user))
    assert r.status_code == 202, r.text
    return str(r.json()["id"])


async def test_usage_and_me_show_what_finished_tasks_used(api: Api) -> None:
    done = await _submit(api, "alice")
    await _run(api, done, seconds=20, finish=True)
    me = (await api.client.get("/v1/me", headers=api.auth("alice"))).json()
    assert me["usage"]["tasks_today"] == me["usage"]["tasks_month"] == 1
    assert me["usage"]["gpu_seconds_today"] == pytest.approx(20.0, abs=1.0)
    assert me["usage"]["queued_tasks"] == 0
    assert me["limits"]["queued_tasks"] == api.settings.api.max_queued_per_user
    mine = (await api.client.get("/v1/usage", headers=api.auth("alice"))).json()
    [row] = mine["data"]
    assert (row["model"], row["tasks"], row["user_name"]) == ("tiny-t2v", 1, "alice")
    assert row["gpu_seconds"] == pytest.approx(20.0, abs=1.0)
    assert mine["totals"]["gpu_seconds"] == row["gpu_seconds"]
    assert mine["since"] == utcnow().date().replace(day=1).isoformat()
    bobs = (await api.client.get("/v1/usage", headers=api.auth("bob"))).json()
    assert bobs["data"] == [] and bobs["totals"]["tasks"] == 0
    everyone = (await _admin(api, "GET", "/v1/usage", params={"all": "true"})).json()
    assert [r["user_name"] for r in everyone["data"]] == ["alice"]
    alice_id = me["id"]
    hers = (await _admin(api, "GET", "/v1/usage", params={"user_id": alice_id})).json()
    assert hers["data"] == mine["data"]
    today = utcnow().date()
    r = await api.client.get("/v1/usage", headers=api.auth("alice"),
                             params={"since": today.isoformat(),
                                     "until": (today - timedelta(days=1)).isoformat()})
    assert r.status_code == 422 and r.json()["error"]["field"] == "since"


async def test_the_queue_view_shows_waiting_tasks_in_order_with_estimates_and_what_runs(
        api: Api) -> None:
    running = await _submit(api, "bob")
    await _run(api, running, seconds=5, finish=False)
    waiting = [await _submit(api, "alice"), await _submit(api, "alice"),
               await _submit(api, "bob")]
    r = await _admin(api, "GET", "/v1/admin/queue")
    assert r.status_code == 200, r.text
    view = r.json()
    assert view["capacity"] == api.settings.gpu_capacity
    assert view["queued_by_model"] == {"tiny-t2v": 3}
    names = view["user_names"]
    assert {names[u]: n for u, n in view["queued_by_user"].items()} == {"alice": 2, "bob": 1}
    assert sorted(q["task_id"] for q in view["queued"]) == sorted(waiting)
    assert [q["position"] for q in view["queued"]] == [1, 2, 3]
    starts = [q["starts_in_s"] for q in view["queued"]]
    assert all(s is not None for s in starts) and starts == sorted(starts)
    for q in view["queued"]:
        got = (await api.client.get(f"/v1/tasks/{q['task_id']}", headers=api.auth("root")))
        assert got.json()["queue_position"] == q["position"]
    [run] = view["running"]
    assert (run["task_id"], run["user_name"], run["status"], run["gpus"]) == (
        running, "bob", "running", 1)
    assert view["workers"] == []
