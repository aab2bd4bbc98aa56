"""The API side of webhooks: URL policy at task creation, and the delivery log."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.api.conftest import Api, api_settings, start_api
from tests.relay.support import World, eventually, make_settings, running, services
from vidmaas.config import RelaySettings, StorageSettings, WebhookSettings
from vidmaas.relay.service import Relay
from vidmaas.relay.webhooks import Webhooks

PROMPT = {"prompt": "a red fox in the snow"}


@pytest.fixture
async def api(db_url: str, redis_url: str, local_storage: StorageSettings,
              ) -> AsyncIterator[Api]:
    settings = api_settings(db_url=db_url, redis_url=redis_url, storage=local_storage,
                            webhooks=WebhookSettings(allow_hosts=["127.0.0.2"]))
    async for a in start_api(settings, db_url):
        yield a


async def test_creating_a_task_with_a_private_webhook_target_is_422(api: Api) -> None:
    for url in ("http://127.0.0.1:9000/hook", "http://localhost/hook", "http://10.0.0.7/hook",
                "http://169.254.169.254/latest/meta-data/", "http://[::1]/hook",
                "http://[fe80::1]/hook"):
        r = await api.client.post("/v1/tasks", json={**PROMPT, "webhook_url": url},
                                  headers=api.auth("alice"))
        assert r.status_code == 422, (url, r.text)
        assert r.json()["error"]["code"] == "webhook_target_not_allowed", url
        assert r.json()["error"]["field"] == "webhook_url"
    listed = await api.client.get("/v1/tasks", headers=api.auth("alice"))
    assert listed.json()["data"] == []


async def test_a_webhook_url_that_is_not_http_is_422(api: Api) -> None:
    r = await api.client.post("/v1/tasks", json={**PROMPT, "webhook_url": "file:///etc/passwd"},
                              headers=api.auth("alice"))
    assert r.status_code == 422
    assert r.json()["error"] == {"code": "invalid_webhook_url", "field": "webhook_url",
                                 "message": r.json()["error"]["message"]}


async def test_an_allowed_host_is_accepted_and_its_deliveries_are_listed_to_the_owner_only(
        api: Api, db_url: str, redis_url: str, local_storage: StorageSettings) -> None:
    r = await api.client.post("/v1/tasks", json={**PROMPT, "webhook_url": "http://127.0.0.2:9/h",
                                                 "webhook_events": ["cancelled"]},
                              headers=api.auth("alice"))
    assert r.status_code == 202, r.text
    task_id = r.json()["id"]
    settings = make_settings(db_url=db_url, redis_url=redis_url, storage=local_storage,
                             webhooks=WebhookSettings(allow_hosts=["127.0.0.2"],
                                                      global_urls=["http://127.0.0.2:9/ops"]))
    async with services(settings) as world:
        await _cancel_and_relay(world, task_id)
    mine = await api.client.get(f"/v1/tasks/{task_id}/webhooks", headers=api.auth("alice"))
    assert mine.status_code == 200, mine.text
    rows = mine.json()["data"]
    assert [(d["url"], d["event_type"]) for d in rows] == [("http://127.0.0.2:9/h", "cancelled")]
    assert rows[0]["id"].startswith("msg_") and rows[0]["status"] == "pending"
    admin = await api.client.get(f"/v1/tasks/{task_id}/webhooks", headers=api.auth("root"))
    assert len(admin.json()["data"]) == 2  # the operator's global URL too
    other = await api.client.get(f"/v1/tasks/{task_id}/webhooks", headers=api.auth("bob"))
    assert other.status_code == 404
    assert other.json()["error"]["code"] == "task_not_found"


async def _cancel_and_relay(world: World, task_id: str) -> None:
    """Cancel the queued task, then let a relay (without a sender) record its webhooks."""
    await world.lifecycle.cancel(await world.get(task_id), by="alice")
    hooks = Webhooks(sessions=world.svc.sessions, settings=world.svc.settings.webhooks)
    relay = Relay(world.svc, consumer_name="api-test", webhooks=hooks,
                  settings=RelaySettings(block_ms=50, send_webhooks=False))
    async with running(relay):
        await eventually(world.stream_drained)
    assert (await world.get(task_id)).status == "cancelled"
