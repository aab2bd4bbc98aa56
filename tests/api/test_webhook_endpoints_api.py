"""``/v1/webhook-endpoints`` over the API: who sees what, the URL policy at registration
and at change, the per-user limit, and what a change does (SQLite and PostgreSQL)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from tests.api.conftest import Api, api_settings, start_api
from vidmaas.config import StorageSettings, WebhookSettings
from vidmaas.db import endpoints

PUBLIC = "http://93.184.216.34/hooks"
"""A public address, named literally: accepted without a resolver."""
BASE = "/v1/webhook-endpoints"


@pytest.fixture
async def limited(db_url: str, redis_url: str, local_storage: StorageSettings,
                  ) -> AsyncIterator[Api]:
    settings = api_settings(db_url=db_url, redis_url=redis_url, storage=local_storage,
                            webhooks=WebhookSettings(max_endpoints_per_user=2))
    async for a in start_api(settings, db_url):
        yield a


async def _make(api: Api, user: str = "alice", **body: object) -> dict[str, object]:
    r = await api.client.post(BASE, json={"url": PUBLIC, **body}, headers=api.auth(user))
    assert r.status_code == 201, r.text
    made: dict[str, object] = r.json()
    return made


async def test_another_users_endpoint_answers_exactly_like_a_missing_one(api: Api) -> None:
    made = await _make(api)
    theirs, missing = str(made["id"]), "we_" + "0" * 24
    calls = [("GET", ""), ("PATCH", ""), ("DELETE", ""), ("POST", "/test"),
             ("GET", "/deliveries")]
    for user in ("bob", "root"):  # an admin too: endpoints are their owner's alone
        for method, suffix in calls:
            body = {"enabled": False} if method == "PATCH" else None
            a = await api.client.request(method, f"{BASE}/{theirs}{suffix}", json=body,
                                         headers=api.auth(user))
            b = await api.client.request(method, f"{BASE}/{missing}{suffix}", json=body,
                                         headers=api.auth(user))
            assert a.status_code == b.status_code == 404, (user, method, suffix, a.text)
            assert a.content == b.content
            assert a.json()["error"]["code"] == "webhook_endpoint_not_found"
        listed = await api.client.get(BASE, headers=api.auth(user))
        assert listed.json()["data"] == []
    # Nothing the others tried changed alice's endpoint.
    mine = await api.client.get(f"{BASE}/{theirs}", headers=api.auth("alice"))
    assert mine.status_code == 200 and mine.json()["enabled"] is True


@pytest.mark.parametrize(("url", "code"), [
    ("http://localhost:9000/hook", "webhook_target_not_allowed"),  # a name → loopback
    ("http://10.0.0.7/hook", "webhook_target_not_allowed"),
    ("http://169.254.169.254/latest/meta-data/", "webhook_target_not_allowed"),
    ("http://[::1]/hook", "webhook_target_not_allowed"),
    ("ftp://example.com/hook", "invalid_webhook_url"),
    ("http://user:pw@93.184.216.34/hook", "invalid_webhook_url"),
])
async def test_a_private_or_unusable_url_is_refused_at_registration_and_at_change(
        api: Api, url: str, code: str) -> None:
    r = await api.client.post(BASE, json={"url": url}, headers=api.auth("alice"))
    assert r.status_code == 422, r.text
    assert (r.json()["error"]["code"], r.json()["error"]["field"]) == (code, "url")
    assert (await api.client.get(BASE, headers=api.auth("alice"))).json()["data"] == []
    made = await _make(api)
    r = await api.client.patch(f"{BASE}/{made['id']}", json={"url": url},
                               headers=api.auth("alice"))
    assert r.status_code == 422 and r.json()["error"]["code"] == code
    shown = await api.client.get(f"{BASE}/{made['id']}", headers=api.auth("alice"))
    assert shown.json()["url"] == PUBLIC


async def test_a_user_may_register_only_so_many_endpoints(limited: Api) -> None:
    api = limited
    first = await _make(api)
    await _make(api)
    r = await api.client.post(BASE, json={"url": PUBLIC}, headers=api.auth("alice"))
    assert r.status_code == 409 and r.json()["error"]["code"] == "webhook_endpoint_limit"
    await _make(api, "bob")  # a limit per user
    assert (await api.client.delete(f"{BASE}/{first['id']}",
                                    headers=api.auth("alice"))).status_code == 200
    await _make(api)


async def test_creates_at_once_cannot_pass_the_limit_together(limited: Api) -> None:
    api = limited
    answers = await asyncio.gather(*(api.client.post(BASE, json={"url": PUBLIC},
                                                     headers=api.auth("alice"))
                                     for _ in range(6)))
    assert sorted(r.status_code for r in answers) == [201, 201, 409, 409, 409, 409]
    listed = await api.client.get(BASE, headers=api.auth("alice"))
    assert len(listed.json()["data"]) == 2


async def test_a_change_takes_only_the_fields_given_and_the_secret_is_never_shown_again(
        api: Api) -> None:
    made = await _make(api, events=["start", "completed", "start"], description="prod")
    assert made["events"] == ["started", "completed"]
    auth = api.auth("alice")
    r = await api.client.patch(f"{BASE}/{made['id']}", headers=auth,
                               json={"events": ["progress", "failed"],
                                     "url": "http://93.184.216.35/v2"})
    assert r.status_code == 200, r.text
    assert (r.json()["events"], r.json()["url"], r.json()["enabled"],
            r.json()["description"]) == (["progress", "failed"], "http://93.184.216.35/v2",
                                         True, "prod")
    r = await api.client.patch(f"{BASE}/{made['id']}", headers=auth,
                               json={"enabled": False, "description": None})
    assert (r.json()["enabled"], r.json()["description"]) == (False, None)
    test = await api.client.post(f"{BASE}/{made['id']}/test", headers=auth)
    assert test.status_code == 409
    assert test.json()["error"]["code"] == "webhook_endpoint_disabled"
    for bad in ({"events": ["output"]}, {"events": []}, {"secret": "whsec_x"},
                {"enabled": "yes"}):
        r = await api.client.patch(f"{BASE}/{made['id']}", headers=auth, json=bad)
        assert r.status_code == 422, bad
    for path in ("", f"/{made['id']}"):
        r = await api.client.get(BASE + path, headers=auth)
        assert str(made["secret"]) not in r.text and "secret" not in r.text


async def test_deleting_an_endpoint_removes_it_and_its_log(api: Api) -> None:
    made = await _make(api)
    auth = api.auth("alice")
    assert (await api.client.post(f"{BASE}/{made['id']}/test", headers=auth)).status_code \
        == 202
    log = await api.client.get(f"{BASE}/{made['id']}/deliveries", headers=auth)
    assert [d["event_type"] for d in log.json()["data"]] == ["test"]
    r = await api.client.delete(f"{BASE}/{made['id']}", headers=auth)
    assert r.json() == {"id": made["id"], "object": "webhook_endpoint", "deleted": True}
    for path in ("", "/deliveries"):
        r = await api.client.get(f"{BASE}/{made['id']}{path}", headers=auth)
        assert r.status_code == 404
    async with api.app.state.services.sessions() as s:
        assert await endpoints.deliveries_page(session=s, endpoint_id=str(made["id"]),
                                               limit=10) == []


async def test_endpoints_are_listed_a_page_at_a_time(api: Api) -> None:
    made = {str((await _make(api))["id"]) for _ in range(3)}
    auth = api.auth("alice")
    first = (await api.client.get(f"{BASE}?limit=2", headers=auth)).json()
    rest = (await api.client.get(f"{BASE}?limit=2&cursor={first['next_cursor']}",
                                 headers=auth)).json()
    assert rest["next_cursor"] is None
    assert {e["id"] for e in first["data"] + rest["data"]} == made
    assert len(first["data"]) == 2
