"""Webhook targets on private, loopback, link-local and metadata addresses are refused at
create time (422, field ``webhook_url``) unless allow-listed, and no task is created."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from tests.api.conftest import Api, start_api
from tests.security.live import LiveApi, live_api
from vidmaas.config import Settings
from vidmaas.db import tasks as repo

REFUSED = [
    "http://127.0.0.1/hook",
    "http://127.1/hook",
    "http://localhost:8080/hook",
    "http://2130706433/hook",  # 127.0.0.1 as one decimal number
    "http://0x7f000001/hook",
    "http://0.0.0.0/hook",
    "http://10.0.0.1/hook",
    "http://172.16.5.4/hook",
    "http://192.168.1.1/hook",
    "http://100.64.0.1/hook",  # carrier-grade NAT
    "http://169.254.169.254/latest/meta-data/iam/security-credentials/",
    "http://169.254.170.2/v2/credentials",  # ECS task metadata
    "http://[::1]/hook",
    "http://[fe80::1]/hook",
    "http://[fc00::1]/hook",
    "http://[::ffff:127.0.0.1]/hook",
    "http://[::ffff:169.254.169.254]/hook",
    "http://224.0.0.1/hook",
    "http://user:pass@127.0.0.1/hook",
    "file:///etc/passwd",
    "gopher://127.0.0.1:6379/_FLUSHALL",
    "ftp://example.com/x",
]


@pytest.mark.parametrize("url", REFUSED)
async def test_a_webhook_on_a_private_or_metadata_address_is_refused_at_create(
        live: LiveApi, url: str) -> None:
    async with httpx.AsyncClient(base_url=live.base_url) as c:
        r = await c.post("/v1/tasks", headers=live.auth("alice"), json={
            "prompt": "x", "model": "tiny-t2v", "webhook_url": url})
        assert r.status_code == 422, (url, r.text)
        assert r.json()["error"]["field"] == "webhook_url"
        form = await c.post("/v1/tasks", headers=live.auth("alice"), data={
            "prompt": "x", "model": "tiny-t2v", "webhook_url": url})
        assert form.status_code == 422, (url, form.text)
        assert (await c.get("/v1/tasks", headers=live.auth("alice"))).json()["data"] == []


async def test_an_allow_listed_private_host_is_accepted(live_settings: Settings) -> None:
    settings = live_settings.model_copy(update={"webhooks": live_settings.webhooks.model_copy(
        update={"allow_hosts": ["127.0.0.1"]})})
    with live_api(settings) as live:
        async with httpx.AsyncClient(base_url=live.base_url) as c:
            ok = await c.post("/v1/tasks", headers=live.auth("alice"), json={
                "prompt": "x", "model": "tiny-t2v", "webhook_url": "http://127.0.0.1:9/hook"})
            assert ok.status_code == 202, ok.text
            # The allow list is per host: the metadata address stays refused.
            meta = await c.post("/v1/tasks", headers=live.auth("alice"), json={
                "prompt": "x", "model": "tiny-t2v",
                "webhook_url": "http://169.254.169.254/latest/meta-data/"})
            assert meta.status_code == 422


@pytest.fixture
async def plain_api(live_settings: Settings, sqlite_url: str) -> AsyncIterator[Api]:
    """The app exactly as ``create_app(settings)`` builds it, over ASGI."""
    async for api in start_api(live_settings, sqlite_url):
        yield api


@pytest.mark.parametrize("url", ["http://127.0.0.1:8080/hook", "http://10.1.2.3/hook",
                                 "http://169.254.169.254/latest/meta-data/"])
async def test_a_plain_app_refuses_a_private_webhook_whatever_else_is_mounted(
        plain_api: Api, url: str) -> None:
    api = plain_api
    # The check is part of task creation, not something a router leaves on the app.
    if hasattr(api.app.state, "validate_webhook"):
        del api.app.state.validate_webhook
    json_body = await api.client.post("/v1/tasks", headers=api.auth("alice"), json={
        "prompt": "x", "model": "tiny-t2v", "webhook_url": url})
    assert json_body.status_code == 422, json_body.text
    assert json_body.json()["error"]["field"] == "webhook_url"
    assert json_body.json()["error"]["code"] == "webhook_target_not_allowed"
    form = await api.client.post("/v1/tasks", headers=api.auth("alice"), data={
        "prompt": "x", "model": "tiny-t2v", "webhook_url": url})
    assert form.status_code == 422 and form.json()["error"]["field"] == "webhook_url"
    assert (await api.client.get("/v1/tasks", headers=api.auth("alice"))).json()[
        "data"] == []
    # The OpenAI API takes no webhook: a webhook_url there is ignored, never stored.
    video = await api.client.post("/v1/videos", headers=api.auth("alice"), json={
        "prompt": "x", "model": "tiny-t2v", "webhook_url": url})
    assert video.status_code == 200, video.text
    async with api.app.state.services.sessions() as s:
        task = await repo.get_task(session=s, task_id=video.json()["id"])
    assert task is not None and task.webhook_url is None
