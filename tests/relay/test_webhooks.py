"""Webhooks: signed, filtered, retried against a real HTTP receiver, SSRF-guarded."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import pytest

from tests.relay.support import (
    COMPLETED_DATA,
    FAST,
    Receiver,
    World,
    eventually,
    make_settings,
    receiver,
    running,
    services,
)
from vidmaas.config import StorageSettings, WebhookSettings
from vidmaas.domain import events as ev
from vidmaas.domain import webhooks as policy
from vidmaas.domain.status import TaskStatus
from vidmaas.metrics import Metrics, render
from vidmaas.relay.service import Relay
from vidmaas.relay.webhooks import Webhooks, WebhookSender, resolve_host

SECRET = "whsec-test-0123456789"

WorldFactory = Callable[..., AbstractAsyncContextManager[World]]


@pytest.fixture
def make_world(db_url: str, redis_url: str, local_storage: StorageSettings) -> WorldFactory:
    @contextlib.asynccontextmanager
    async def make(**hooks: Any) -> AsyncIterator[World]:
        cfg = {"signing_secret": SECRET, "allow_hosts": ["127.0.0.1"],
               "backoff_initial_s": 0.05, "timeout_s": 5.0, **hooks}
        settings = make_settings(db_url=db_url, redis_url=redis_url, storage=local_storage,
                                 webhooks=WebhookSettings(**cfg))
        async with services(settings) as w:
            yield w
    return make


def relay_of(world: World, *, resolve: policy.Resolver | None = None,
             progress_min_interval_s: float = 5.0, name: str = "r1",
             metrics: Metrics | None = None) -> Relay:
    cfg = world.svc.settings.webhooks
    sender = WebhookSender(sessions=world.svc.sessions, settings=cfg, poll_interval_s=0.05,
                           metrics=metrics, resolve=resolve or resolve_host)
    hooks = Webhooks(sessions=world.svc.sessions, settings=cfg, sender=sender,
                     progress_min_interval_s=progress_min_interval_s)
    return Relay(world.svc, consumer_name=name, settings=FAST, webhooks=hooks)


async def run_to_completion(world: World, task_id: str) -> None:
    await world.publish(ev.started(task_id, world_size=1, host="h"))
    await world.publish(ev.Event(task_id, ev.EventType.COMPLETED, COMPLETED_DATA))


async def settled(world: World, task_id: str, n: int) -> bool:
    rows = await world.deliveries(task_id)
    return len(rows) == n and all(r.status != "pending" for r in rows)


# ---------------------------------------------------------------- signatures

async def test_a_webhook_is_signed_so_an_independent_implementation_can_verify_it(
        make_world: WorldFactory) -> None:
    with receiver() as rx:
        async with make_world() as world:
            task = await world.task(webhook_url=rx.url, webhook_events=["completed"])
            async with running(relay_of(world)):
                await run_to_completion(world, task.id)
                await eventually(lambda: settled(world, task.id, 1))
    [got] = rx.received
    # Verify from the raw bytes with nothing but the standard library.
    msg_id, ts = got.headers["webhook-id"], got.headers["webhook-timestamp"]
    mac = hmac.new(SECRET.encode(), f"{msg_id}.{ts}.".encode() + got.body, hashlib.sha256)
    assert got.headers["webhook-signature"] == "v1," + base64.b64encode(mac.digest()).decode()
    assert abs(int(ts) - time.time()) < 60
    assert got.path == "/hooks/vidmaas?src=test"
    assert got.headers["content-type"] == "application/json"
    body = json.loads(got.body)
    assert (body["type"], body["task_id"], body["data"]["video_key"]) == (
        "completed", task.id, COMPLETED_DATA["video_key"])
    assert body["task"]["status"] == "completed"
    assert body["task"]["video_url"] == f"/v1/tasks/{task.id}/video"
    assert body["task"]["spritesheet_url"] == f"/v1/tasks/{task.id}/spritesheet"


def test_a_signature_over_another_body_or_secret_does_not_verify() -> None:
    sig = policy.sign(secret=SECRET, msg_id="msg_1", timestamp=1700000000, body=b'{"a":1}')
    assert policy.verify(secret=SECRET, msg_id="msg_1", timestamp=1700000000, body=b'{"a":1}',
                         signature_header=f"v1,bogus {sig}")
    assert not policy.verify(secret=SECRET, msg_id="msg_1", timestamp=1700000000,
                             body=b'{"a":2}', signature_header=sig)
    assert not policy.verify(secret="other", msg_id="msg_1", timestamp=1700000000,
                             body=b'{"a":1}', signature_header=sig)


# ---------------------------------------------------------------- retries

async def test_a_failing_receiver_gets_retries_with_backoff_until_it_accepts(
        make_world: WorldFactory) -> None:
    with receiver([500, 503]) as rx:
        async with make_world() as world:
            task = await world.task(webhook_url=rx.url, webhook_events=["completed"])
            metrics = Metrics(role="relay")
            async with running(relay_of(world, metrics=metrics)):
                await run_to_completion(world, task.id)
                await eventually(lambda: settled(world, task.id, 1))
            [row] = await world.deliveries(task.id)
    assert (row.status, row.attempts, row.last_status_code) == ("delivered", 3, 200)
    text = render(metrics).decode()
    assert 'vidmaas_webhook_deliveries_total{outcome="retrying"} 2.0' in text
    assert 'vidmaas_webhook_deliveries_total{outcome="delivered"} 1.0' in text
    assert row.delivered_at is not None
    ids = {r.headers["webhook-id"] for r in rx.received}
    assert len(rx.received) == 3 and ids == {row.delivery_id}


async def test_a_delivery_gives_up_after_max_attempts_and_records_why(
        make_world: WorldFactory) -> None:
    with receiver(default_status=500) as rx:
        async with make_world(max_attempts=3) as world:
            task = await world.task(webhook_url=rx.url, webhook_events=["completed"])
            async with running(relay_of(world)):
                await run_to_completion(world, task.id)
                await eventually(lambda: settled(world, task.id, 1))
            [row] = await world.deliveries(task.id)
    assert (row.status, row.attempts, row.last_status_code, row.last_error) == (
        "failed", 3, 500, "HTTP 500")
    assert len(rx.received) == 3


async def test_retries_survive_a_relay_restart(make_world: WorldFactory) -> None:
    with receiver(default_status=500) as rx:
        async with make_world(backoff_initial_s=0.5) as world:
            task = await world.task(webhook_url=rx.url, webhook_events=["completed"])
            async with running(relay_of(world, name="first")):
                await run_to_completion(world, task.id)
                await eventually(lambda: _recorded_failure(world, task.id))
            rx.default_status = 204
            async with running(relay_of(world, name="second")):
                await eventually(lambda: settled(world, task.id, 1))
            [row] = await world.deliveries(task.id)
    assert (row.status, row.attempts, row.last_status_code) == ("delivered", 2, 204)


async def test_an_attempt_cut_short_by_a_shutdown_is_made_again_soon(
        make_world: WorldFactory) -> None:
    with receiver() as rx:
        rx.delay_s = 3.0
        async with make_world(backoff_initial_s=0.05) as world:
            task = await world.task(webhook_url=rx.url, webhook_events=["completed"])
            async with running(relay_of(world, name="first")):
                await run_to_completion(world, task.id)
                await eventually(lambda: _received(rx))
            [row] = await world.deliveries(task.id)
            assert (row.status, row.attempts, row.last_error) == (
                "pending", 0, "interrupted by a relay shutdown")
            rx.delay_s = 0.0
            async with running(relay_of(world, name="second")):
                await eventually(lambda: settled(world, task.id, 1))
            [row] = await world.deliveries(task.id)
    assert (row.status, row.attempts) == ("delivered", 1)
    # The receiver saw it twice, under one webhook-id: it drops the duplicate.
    assert len({r.headers["webhook-id"] for r in rx.received}) == 1 == len(rx.received) - 1


async def _received(rx: Receiver) -> bool:
    return bool(rx.received)


async def _recorded_failure(world: World, task_id: str) -> bool:
    rows = await world.deliveries(task_id)
    return bool(rows) and rows[0].last_status_code == 500


async def test_an_unreachable_receiver_is_an_error_that_is_retried(
        make_world: WorldFactory) -> None:
    with receiver() as rx:
        dead_url = rx.url
    async with make_world(max_attempts=2) as world:
        task = await world.task(webhook_url=dead_url, webhook_events=["completed"])
        async with running(relay_of(world)):
            await run_to_completion(world, task.id)
            await eventually(lambda: settled(world, task.id, 1))
        [row] = await world.deliveries(task.id)
    assert (row.status, row.attempts, row.last_status_code) == ("failed", 2, None)
    assert row.last_error and "Connect" in row.last_error


# ---------------------------------------------------------------- filters

async def test_a_task_gets_only_the_events_it_asked_for_and_progress_is_throttled(
        make_world: WorldFactory) -> None:
    with receiver() as rx:
        async with make_world() as world:
            default = await world.task(webhook_url=rx.url)
            only_done = await world.task(webhook_url=rx.url, webhook_events=["completed"])
            progress = await world.task(webhook_url=rx.url,
                                        webhook_events=["progress", "completed"])
            async with running(relay_of(world, progress_min_interval_s=60)):
                for t in (default, only_done, progress):
                    await world.publish(ev.started(t.id, world_size=1, host="h"))
                    for pct in (10.0, 20.0, 30.0):
                        await world.publish(ev.progress(t.id, step=1, total=3, percent=pct,
                                                        eta_s=1.0))
                    await world.publish(ev.Event(t.id, ev.EventType.COMPLETED,
                                                 COMPLETED_DATA))
                await eventually(lambda: settled(world, default.id, 2))
                await eventually(lambda: settled(world, only_done.id, 1))
                await eventually(lambda: settled(world, progress.id, 2))
            kinds = {t.id: [d.event_type for d in await world.deliveries(t.id)]
                     for t in (default, only_done, progress)}
    assert kinds == {default.id: ["started", "completed"], only_done.id: ["completed"],
                     progress.id: ["progress", "completed"]}
    assert len(rx.received) == 5


async def test_global_urls_get_every_tasks_lifecycle_events(make_world: WorldFactory) -> None:
    with receiver() as rx:
        async with make_world(global_urls=[rx.url]) as world:
            task = await world.task()  # no webhook of its own
            async with running(relay_of(world)):
                await run_to_completion(world, task.id)
                await eventually(lambda: settled(world, task.id, 2))
    assert sorted(json.loads(r.body)["type"] for r in rx.received) == ["completed", "started"]


async def test_a_retried_failure_sends_no_failed_webhook_and_a_final_one_sends_exactly_one(
        make_world: WorldFactory) -> None:
    with receiver() as rx:
        async with make_world() as world:
            task = await world.task(webhook_url=rx.url, webhook_events=["failed"])
            async with running(relay_of(world)):
                await world.publish(ev.failed(task.id, code="node_lost", message="x",
                                              retryable=True))
                await eventually(world.stream_drained)
                assert (await world.get(task.id)).status == "queued"
                # Attempt 2 fails for good: the runtime and the dispatcher both say so.
                await world.lifecycle.transition(
                    task_id=task.id, to=TaskStatus.DISPATCHING, expected=TaskStatus.QUEUED,
                    fields={"attempts": 3},
                    event=ev.dispatched(task.id, executor="fake", job_name="j", attempt=3))
                await world.publish(ev.failed(task.id, code="oom", message="y",
                                              retryable=True))
                await world.publish(ev.failed(task.id, code="job_failed", message="z",
                                              retryable=False))
                await eventually(world.stream_drained)
                await eventually(lambda: settled(world, task.id, 1))
            after = await world.get(task.id)
    assert (after.status, after.error_code) == ("failed", "oom")
    [got] = rx.received
    assert json.loads(got.body)["data"]["code"] == "oom"


# ---------------------------------------------------------------- SSRF

def _resolver(table: dict[str, list[str]]) -> policy.Resolver:
    async def resolve(host: str, port: int) -> list[str]:
        if host not in table:
            raise OSError(f"no such host {host}")
        return table[host]
    return resolve


@pytest.mark.parametrize("url", [
    "http://127.0.0.1/h", "http://localhost.test/h", "http://10.0.0.5/h",
    "http://192.168.1.1/h", "http://172.16.0.1/h", "http://169.254.169.254/latest/meta-data",
    "http://169.254.10.1/h", "http://[::1]/h", "http://[fe80::1]/h", "http://[fc00::1]/h",
    "http://224.0.0.1/h", "http://0.0.0.0/h", "http://240.0.0.1/h", "http://100.64.0.1/h",
    "http://[::ffff:127.0.0.1]/h", "http://mixed.test/h",
])
async def test_private_loopback_link_local_metadata_and_reserved_targets_are_refused(
        url: str) -> None:
    resolve = _resolver({"localhost.test": ["127.0.0.1"],
                         "mixed.test": ["93.184.215.14", "10.0.0.1"]})
    with pytest.raises(policy.TargetRefused) as info:
        await policy.check_target(url, allow_hosts=[], resolve=resolve)
    assert info.value.code == "webhook_target_not_allowed"


@pytest.mark.parametrize(("url", "allow"), [
    ("http://127.0.0.1:8080/h", ["127.0.0.1"]),
    ("http://localhost.test/h", ["localhost.test"]),
    ("http://10.1.2.3/h", ["10.0.0.0/8"]),
    ("https://hooks.example.test/h", []),
])
async def test_allow_hosts_and_public_targets_are_accepted(url: str, allow: list[str]) -> None:
    resolve = _resolver({"localhost.test": ["127.0.0.1"],
                         "hooks.example.test": ["93.184.215.14"]})
    target, addresses = await policy.check_target(url, allow_hosts=allow, resolve=resolve)
    assert addresses and target.host in url


@pytest.mark.parametrize(("url", "code"), [
    ("ftp://example.com/x", "invalid_webhook_url"),
    ("http://user:pw@example.com/x", "invalid_webhook_url"),
    ("http:///nohost", "invalid_webhook_url"),
    ("http://example.com:99999/x", "invalid_webhook_url"),
    ("http://nowhere.test/x", "webhook_host_unresolvable"),
])
async def test_unusable_urls_are_refused_with_their_own_code(url: str, code: str) -> None:
    with pytest.raises(policy.TargetRefused) as info:
        await policy.check_target(url, allow_hosts=[], resolve=_resolver({}))
    assert info.value.code == code


async def test_a_target_that_now_resolves_to_a_private_address_is_refused_and_not_sent(
        make_world: WorldFactory) -> None:
    with receiver() as rx:
        async with make_world(allow_hosts=[]) as world:
            url = f"http://hooks.example.test:{rx.port}/h"
            task = await world.task(webhook_url=url, webhook_events=["completed"])
            resolve = _resolver({"hooks.example.test": ["127.0.0.1"]})
            async with running(relay_of(world, resolve=resolve)):
                await run_to_completion(world, task.id)
                await eventually(lambda: settled(world, task.id, 1))
            [row] = await world.deliveries(task.id)
    assert (row.status, row.attempts) == ("refused", 1)
    assert row.last_error and "loopback" in row.last_error
    assert rx.received == []


async def test_a_delivery_goes_to_the_checked_address_with_the_host_name_in_host(
        make_world: WorldFactory) -> None:
    with receiver() as rx:
        async with make_world(allow_hosts=["hooks.internal.test"]) as world:
            url = f"http://hooks.internal.test:{rx.port}/h"
            task = await world.task(webhook_url=url, webhook_events=["completed"])
            resolve = _resolver({"hooks.internal.test": ["127.0.0.1"]})
            async with running(relay_of(world, resolve=resolve)):
                await run_to_completion(world, task.id)
                await eventually(lambda: settled(world, task.id, 1))
    [got] = rx.received
    assert got.headers["host"] == f"hooks.internal.test:{rx.port}"


async def test_a_task_the_dispatcher_failed_announces_its_end_once_and_ignores_a_late_success(
        make_world: WorldFactory) -> None:
    with receiver() as rx:
        async with make_world() as world:
            task = await world.task(webhook_url=rx.url)
            # The watchdog gives up on the job; then the job's own success arrives late.
            await world.lifecycle.finish(
                task_id=task.id, to=TaskStatus.FAILED,
                fields={"error_code": "heartbeat_lost", "error_message": "silent"},
                event=ev.failed(task.id, code="heartbeat_lost", message="silent",
                                retryable=False))
            await world.publish(ev.Event(task.id, ev.EventType.COMPLETED, COMPLETED_DATA))
            async with running(relay_of(world)):
                await eventually(world.stream_drained)
                await eventually(lambda: settled(world, task.id, 1))
            after = await world.get(task.id)
    assert (after.status, after.video_key) == ("failed", None)
    [got] = rx.received
    body = json.loads(got.body)
    assert (body["type"], body["task"]["error"]["code"]) == ("failed", "heartbeat_lost")
