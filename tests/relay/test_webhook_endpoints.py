"""Webhook endpoints end to end: registered over the API, delivered by a relay to a real
HTTP receiver on 127.0.0.1, on SQLite and PostgreSQL."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
from pydantic import SecretStr

from tests.api.conftest import Api, api_settings, start_api
from tests.relay.support import (
    COMPLETED_DATA,
    FAST,
    Received,
    World,
    eventually,
    make_settings,
    receiver,
    running,
    services,
)
from vidmaas.config import RelaySettings, StorageSettings, WebhookSettings
from vidmaas.db import endpoints as endpoint_repo
from vidmaas.db.models import WebhookDelivery
from vidmaas.domain import events as ev
from vidmaas.domain import webhooks as policy
from vidmaas.domain.ids import new_endpoint_id, new_endpoint_secret
from vidmaas.domain.status import TaskStatus
from vidmaas.relay.service import Relay
from vidmaas.relay.webhooks import Webhooks, WebhookSender, resolve_host

OPERATOR_SECRET = "operator-secret-0123"


def hooks_settings(**extra: Any) -> WebhookSettings:
    return WebhookSettings(**{"signing_secret": SecretStr(OPERATOR_SECRET),
                              "allow_hosts": ["127.0.0.1"], "backoff_initial_s": 0.05,
                              "timeout_s": 5.0, "endpoint_progress_interval_s": 60.0,
                              **extra})


@dataclass
class Stack:
    api: Api
    world: World
    users: dict[str, str]
    """user name → id."""

    async def endpoint(self, url: str, *, user: str = "alice", **body: Any) -> dict[str, Any]:
        r = await self.api.client.post("/v1/webhook-endpoints", json={"url": url, **body},
                                       headers=self.api.auth(user))
        assert r.status_code == 201, r.text
        made: dict[str, Any] = r.json()
        return made

    async def log(self, endpoint_id: str, user: str = "alice") -> list[dict[str, Any]]:
        r = await self.api.client.get(f"/v1/webhook-endpoints/{endpoint_id}/deliveries",
                                      headers=self.api.auth(user))
        assert r.status_code == 200, r.text
        rows: list[dict[str, Any]] = r.json()["data"]
        return rows

    def relay(self, *, resolve: policy.Resolver = resolve_host, name: str = "r1",
              settings: RelaySettings = FAST, **hooks: Any) -> Relay:
        cfg = self.world.svc.settings.webhooks.model_copy(update=hooks)
        sender = WebhookSender(sessions=self.world.svc.sessions, settings=cfg,
                               poll_interval_s=0.05, resolve=resolve)
        webhooks = Webhooks(sessions=self.world.svc.sessions, settings=cfg, sender=sender)
        return Relay(self.world.svc, consumer_name=name, settings=settings, webhooks=webhooks)


@pytest.fixture
async def stack(db_url: str, redis_url: str, local_storage: StorageSettings,
                ) -> AsyncIterator[Stack]:
    settings = api_settings(db_url=db_url, redis_url=redis_url, storage=local_storage,
                            webhooks=hooks_settings())
    async for api in start_api(settings, db_url):
        users = {}
        for name in ("alice", "bob"):
            users[name] = (await api.client.get("/v1/me", headers=api.auth(name))).json()["id"]
        async with services(make_settings(db_url=db_url, redis_url=redis_url,
                                          storage=local_storage,
                                          webhooks=hooks_settings())) as world:
            yield Stack(api=api, world=world, users=users)


def verifies(got: Received, secret: str) -> bool:
    """The Standard Webhooks check a receiver makes, with nothing but the standard library."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    msg_id, ts = got.headers["webhook-id"], got.headers["webhook-timestamp"]
    mac = hmac.new(key, f"{msg_id}.{ts}.".encode() + got.body, hashlib.sha256)
    return got.headers["webhook-signature"] == "v1," + base64.b64encode(mac.digest()).decode()


async def complete(world: World, task_id: str) -> None:
    await world.publish(ev.started(task_id, world_size=1, host="h"))
    await world.publish(ev.Event(task_id, ev.EventType.COMPLETED, COMPLETED_DATA))


async def settled(world: World, n: int) -> bool:
    rows = await world.deliveries()
    return len(rows) == n and all(r.status != "pending" for r in rows)


# ---------------------------------------------------------------- delivery


async def test_an_endpoint_hears_every_task_of_its_user_signed_with_the_secret_shown_once(
        stack: Stack) -> None:
    with receiver() as rx:
        made = await stack.endpoint(rx.url)
        secret = made["secret"]
        assert secret.startswith("whsec_") and made["events"] == [
            "started", "completed", "failed", "cancelled"]
        world = stack.world
        mine = [await world.task(user_id=stack.users["alice"]) for _ in range(2)]
        theirs = await world.task(user_id=stack.users["bob"])
        async with running(stack.relay()):
            for t in (*mine, theirs):
                await complete(world, t.id)
            await eventually(lambda: settled(world, 4))
    assert len(rx.received) == 4
    assert all(verifies(got, secret) for got in rx.received)
    assert not any(verifies(got, "whsec_" + base64.b64encode(OPERATOR_SECRET.encode())
                            .decode()) for got in rx.received)
    bodies = [got.json() for got in rx.received]
    assert sorted((b["task_id"], b["type"]) for b in bodies) == sorted(
        (t.id, kind) for t in mine for kind in ("started", "completed"))
    assert theirs.id not in json.dumps(bodies)
    # The log, newest first, a page at a time; the secret is never shown again.
    client, auth = stack.api.client, stack.api.auth("alice")
    first = await client.get(f"/v1/webhook-endpoints/{made['id']}/deliveries?limit=3",
                             headers=auth)
    rest = await client.get(f"/v1/webhook-endpoints/{made['id']}/deliveries?limit=3&cursor="
                            f"{first.json()['next_cursor']}", headers=auth)
    log = first.json()["data"] + rest.json()["data"]
    assert rest.json()["next_cursor"] is None
    recorded = [d.delivery_id for d in await stack.world.deliveries()]
    assert [d["id"] for d in log] == recorded[::-1]
    assert set(recorded) == {got.headers["webhook-id"] for got in rx.received}
    assert {d["status"] for d in log} == {"delivered"}
    for path in ("", f"/{made['id']}", f"/{made['id']}/deliveries"):
        r = await client.get("/v1/webhook-endpoints" + path, headers=auth)
        assert r.status_code == 200 and secret not in r.text, path


async def test_an_endpoint_gets_only_the_events_it_asked_for(stack: Stack) -> None:
    with receiver() as done_rx, receiver() as start_rx:
        await stack.endpoint(done_rx.url, events=["completed"])
        await stack.endpoint(start_rx.url, events=["start", "progress"])
        world = stack.world
        task = await world.task(user_id=stack.users["alice"])
        async with running(stack.relay()):
            await world.publish(ev.started(task.id, world_size=1, host="h"))
            await world.publish(ev.progress(task.id, step=1, total=3, percent=10.0, eta_s=1.0))
            await world.publish(ev.Event(task.id, ev.EventType.COMPLETED, COMPLETED_DATA))
            await eventually(lambda: settled(world, 3))
    assert [got.json()["type"] for got in done_rx.received] == ["completed"]
    assert sorted(got.json()["type"] for got in start_rx.received) == ["progress", "started"]


@pytest.mark.parametrize(("interval_s", "expected"), [(60.0, 1), (0.0, 2)])
async def test_progress_reaches_an_endpoint_at_most_once_per_interval(
        stack: Stack, interval_s: float, expected: int) -> None:
    with receiver() as rx:
        await stack.endpoint(rx.url, events=["progress"])
        world = stack.world
        task = await world.task(user_id=stack.users["alice"])
        async with running(stack.relay(endpoint_progress_interval_s=interval_s)):
            # One progress event, delivered, then another: two separate relay runs.
            await world.publish(ev.progress(task.id, step=1, total=3, percent=10.0, eta_s=1.0))
            await eventually(lambda: settled(world, 1))
            await world.publish(ev.progress(task.id, step=2, total=3, percent=20.0, eta_s=1.0))
            await eventually(world.stream_drained)
            await eventually(lambda: settled(world, expected))
    assert len(rx.received) == expected


async def test_a_receiver_answering_500_gets_retries_until_it_accepts(stack: Stack) -> None:
    with receiver([500, 500]) as rx:
        made = await stack.endpoint(rx.url, events=["completed"])
        world = stack.world
        task = await world.task(user_id=stack.users["alice"])
        async with running(stack.relay()):
            await complete(world, task.id)
            await eventually(lambda: settled(world, 1))
    assert len(rx.received) == 3
    assert len({got.headers["webhook-id"] for got in rx.received}) == 1
    assert all(verifies(got, made["secret"]) for got in rx.received)
    [row] = await stack.log(made["id"])
    assert (row["status"], row["attempts"], row["last_status_code"], row["task_id"]) == (
        "delivered", 3, 200, task.id)


async def test_a_disabled_endpoint_gets_nothing_and_is_heard_again_once_enabled(
        stack: Stack) -> None:
    client, auth, world = stack.api.client, stack.api.auth("alice"), stack.world
    with receiver() as rx:
        made = await stack.endpoint(rx.url, events=["completed"])
        # Recorded while enabled, disabled before the sender ran: skipped, never sent.
        early = await world.task(user_id=stack.users["alice"])
        recording = stack.relay(settings=RelaySettings(block_ms=50, send_webhooks=False))
        async with running(recording):
            await complete(world, early.id)
            await eventually(lambda: settled_pending(world, 1))
        r = await client.patch(f"/v1/webhook-endpoints/{made['id']}", json={"enabled": False},
                               headers=auth)
        assert r.status_code == 200 and r.json()["enabled"] is False
        late = await world.task(user_id=stack.users["alice"])
        async with running(stack.relay()):
            await eventually(lambda: settled(world, 1))
            await complete(world, late.id)
            await eventually(world.stream_drained)
        assert rx.received == []
        assert [(d["task_id"], d["status"]) for d in await stack.log(made["id"])] == [
            (early.id, "skipped")]
        r = await client.patch(f"/v1/webhook-endpoints/{made['id']}", json={"enabled": True},
                               headers=auth)
        again = await world.task(user_id=stack.users["alice"])
        async with running(stack.relay(name="r2")):
            await complete(world, again.id)
            await eventually(lambda: settled(world, 2))
    assert [got.json()["task_id"] for got in rx.received] == [again.id]


async def settled_pending(world: World, n: int) -> bool:
    return len(await world.deliveries()) == n


async def test_a_videos_task_is_announced_in_openais_event_envelope(stack: Stack) -> None:
    client, auth, world = stack.api.client, stack.api.auth("alice"), stack.world
    with receiver() as rx:
        await stack.endpoint(rx.url, events=["completed", "failed"])
        ids = []
        for _ in range(2):
            r = await client.post("/v1/videos", json={"prompt": "a lighthouse",
                                                      "model": "tiny-t2v"}, headers=auth)
            assert r.status_code == 200, r.text
            ids.append(r.json()["id"])
        done = await world.advance(await world.get(ids[0]), TaskStatus.RUNNING)
        broken = await world.advance(await world.get(ids[1]), TaskStatus.RUNNING)
        native = await world.task(user_id=stack.users["alice"])
        async with running(stack.relay()):
            await complete(world, done.id)
            await complete(world, native.id)
            await world.publish(ev.failed(broken.id, code="oom", message="out of memory",
                                          retryable=False))
            await eventually(lambda: settled(world, 3))
    by_task = {}
    for got in rx.received:
        body = got.json()
        by_task[body.get("data", {}).get("id") or body.get("task_id")] = (got, body)
    got, body = by_task[done.id]
    assert set(body) == {"id", "object", "created_at", "type", "data"}
    assert (body["object"], body["type"], body["data"]) == (
        "event", "video.completed", {"id": done.id})
    assert body["id"].startswith("evt_") and isinstance(body["created_at"], int)
    assert by_task[broken.id][1]["type"] == "video.failed"
    assert by_task[native.id][1]["type"] == "completed"  # a native task: the native body


# ---------------------------------------------------------------- SSRF at delivery


async def test_a_url_that_now_resolves_to_a_private_address_is_refused_at_delivery(
        stack: Stack) -> None:
    world = stack.world
    with receiver() as rx:
        url = f"http://hooks.example.test:{rx.port}/h"
        async with world.svc.sessions() as s:
            endpoint = await endpoint_repo.create(session=s, new=endpoint_repo.NewEndpoint(
                id=new_endpoint_id(), user_id=stack.users["alice"], url=url,
                events=["completed"], secret=new_endpoint_secret()), limit=10)

        async def now_loopback(host: str, port: int) -> list[str]:
            assert host == "hooks.example.test"
            return ["127.0.0.1"]

        task = await world.task(user_id=stack.users["alice"])
        async with running(stack.relay(resolve=now_loopback, allow_hosts=[])):
            await complete(world, task.id)
            await eventually(lambda: settled(world, 1))
        [row] = await world.deliveries()
    assert isinstance(row, WebhookDelivery)
    assert (row.status, row.attempts, row.endpoint_id) == ("refused", 1, endpoint.id)
    assert row.last_error and "loopback" in row.last_error
    assert rx.received == []


async def test_a_test_delivery_reaches_the_endpoint_signed_with_its_secret(
        stack: Stack) -> None:
    with receiver() as rx:
        made = await stack.endpoint(rx.url, events=["completed"])
        r = await stack.api.client.post(f"/v1/webhook-endpoints/{made['id']}/test",
                                        headers=stack.api.auth("alice"))
        assert r.status_code == 202, r.text
        async with running(stack.relay()):
            await eventually(lambda: settled(stack.world, 1))
    [got] = rx.received
    assert verifies(got, made["secret"])
    assert got.headers["webhook-id"] == r.json()["id"]
    assert got.json()["type"] == "test" and got.json()["data"]["endpoint_id"] == made["id"]
    [row] = await stack.log(made["id"])
    assert (row["event_type"], row["status"], row["task_id"]) == ("test", "delivered", None)
