"""Quotas and priorities where users meet them: POST /v1/tasks over HTTP, on both databases."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

from tests.api.conftest import Api
from tests.api.test_tasks_api import png_bytes
from vidmaas.bus.queue import TaskQueue
from vidmaas.db import tasks as repo
from vidmaas.db import users
from vidmaas.db.models import UsageDaily


async def _set(api: Api, name: str, **fields: object) -> str:
    async with api.app.state.services.sessions() as s:
        user = await users.get_user_by_name(session=s, name=name)
        assert user is not None
        for k, v in fields.items():
            setattr(user, k, v)
        await s.commit()
        return user.id


async def test_a_create_over_the_daily_gpu_seconds_answers_429_naming_the_quota_and_its_reset(
        api: Api) -> None:
    uid = await _set(api, "alice", quota_gpu_seconds_day=100.0)
    async with api.app.state.services.sessions() as s:
        s.add(UsageDaily(user_id=uid, day=datetime.now(UTC).date(), model="tiny-t2v",
                         tasks=3, gpu_seconds=120.0, queue_wait_s=0.0))
        await s.commit()
    r = await api.client.post("/v1/tasks", json={"prompt": "a cat"}, headers=api.auth("alice"))
    assert r.status_code == 429
    err = r.json()["error"]
    assert (err["code"], err["field"]) == ("quota_exceeded", "gpu_seconds_day")
    assert 0 < int(r.headers["Retry-After"]) <= 24 * 3600 + 1
    # bob has no such quota: the same create is accepted.
    ok = await api.client.post("/v1/tasks", json={"prompt": "a cat"}, headers=api.auth("bob"))
    assert ok.status_code == 202


async def test_a_priority_above_the_users_maximum_is_refused_and_a_lower_one_is_queued_so(
        api: Api) -> None:
    high = await api.client.post("/v1/tasks", json={"prompt": "p", "priority": "high"},
                                 headers=api.auth("alice"))
    assert high.status_code == 422
    assert (high.json()["error"]["code"], high.json()["error"]["field"]) == \
        ("priority_not_allowed", "priority")
    bad = await api.client.post("/v1/tasks", data={"prompt": "p", "priority": "urgent"},
                                headers=api.auth("alice"))
    assert bad.status_code == 422 and bad.json()["error"]["code"] == "invalid_priority"
    first = await api.client.post("/v1/tasks", json={"prompt": "p"}, headers=api.auth("alice"))
    low = await api.client.post("/v1/tasks", data={"prompt": "p", "priority": "low"},
                                headers=api.auth("alice"))
    later = await api.client.post("/v1/tasks", json={"prompt": "p"}, headers=api.auth("alice"))
    assert low.status_code == 202
    async with api.app.state.services.sessions() as s:
        row = await repo.get_task(session=s, task_id=low.json()["id"])
        assert row is not None and row.priority == "low"
    q = TaskQueue(api.app.state.services.redis)
    order = [c.task_id for c in await q.order(limit=10)]
    assert order == [first.json()["id"], later.json()["id"], low.json()["id"]]


async def test_concurrent_creates_never_exceed_the_users_queued_tasks_quota(api: Api) -> None:
    await _set(api, "alice", quota_queued_tasks=3)
    answers = await asyncio.gather(*(
        api.client.post("/v1/tasks", json={"prompt": f"p{i}"}, headers=api.auth("alice"))
        for i in range(10)))
    codes = sorted(r.status_code for r in answers)
    assert codes == [202] * 3 + [429] * 7
    assert {r.json()["error"]["code"] for r in answers if r.status_code == 429} == \
        {"too_many_queued"}


async def test_a_create_with_an_image_over_a_quota_is_refused_and_leaves_no_image_behind(
        api: Api) -> None:
    await _set(api, "alice", quota_queued_tasks=1)
    first = await api.client.post("/v1/tasks", json={"prompt": "p"}, headers=api.auth("alice"))
    assert first.status_code == 202
    store = api.app.state.services.store
    root = store.path("inputs")
    before = sorted(root.rglob("*")) if root.exists() else []
    r = await api.client.post(
        "/v1/tasks", headers=api.auth("alice"),
        data={"prompt": "make it move", "model": "tiny-ti2v"},
        files={"image": ("a.png", png_bytes(), "image/png")})
    assert r.status_code == 429 and r.json()["error"]["code"] == "too_many_queued"
    after = sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []
    assert after == [p for p in before if p.is_file()]
