"""Outgoing webhooks: recorded once per (target, event), signed, retried, never lost.

Guarantees:
- ``Webhooks.record`` turns one applied event into ``WebhookDelivery`` rows: one for the
  task's own ``webhook_url`` when the event type is in the task's filter (default:
  started, completed, failed, cancelled; ``progress`` only when asked for, and then at
  most one per ``progress_min_interval_s`` per task and target), and one per global URL
  (the default types). The row's ``delivery_id`` is derived from (url, task, event id) and
  unique, so recording an event again (a redelivered stream entry) sends nothing twice;
  terminal events are keyed by (url, task), so a task's end is announced once per target
  even when both the runtime and the dispatcher published one. The user's registered
  endpoints get theirs too (``relay.endpoints``).
- ``WebhookSender`` is the only sender. It picks due ``pending`` rows from the
  database, claims each by compare-and-set (several relays never send one attempt
  twice at once), and POSTs the stored payload signed per Standard Webhooks
  (``webhook-id``, ``webhook-timestamp``, ``webhook-signature``). An endpoint's
  delivery is checked against its endpoint first: a disabled or deleted endpoint's is
  ``skipped``, never sent; the others go to the endpoint's current URL signed with its
  own secret. Because the queue is the table, retries survive a relay restart: a row
  claimed by a sender that died (or that could not read the endpoint) is due again
  when its claim lease ends.
- Before every attempt the target is resolved and checked against the SSRF policy
  (``domain.webhooks.check_target``); a refused target is marked ``refused`` and never
  contacted. The request goes to the checked address (the host name travels in
  ``Host`` and TLS SNI), so a name that re-resolves elsewhere cannot slip past the
  check. Redirects are not followed.
- A 2xx answer marks the row ``delivered``. Anything else is retried with exponential
  backoff from ``backoff_initial_s`` until ``max_attempts``; then it is ``failed``.
  Progress deliveries are best-effort: one attempt. Every attempt records its status
  code or error (truncated).
- Recording the outcome of an attempt is shielded from cancellation; an attempt cut
  short by a shutdown does not count and is due again after ``backoff_initial_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import time
from collections.abc import Callable, Coroutine
from datetime import timedelta
from typing import Any, Protocol

import httpx

from vidmaas import __version__
from vidmaas.config import WebhookSettings
from vidmaas.db import endpoints
from vidmaas.db import webhooks as rows
from vidmaas.db.engine import Sessions
from vidmaas.db.models import Task, WebhookDelivery, utcnow
from vidmaas.db.webhooks import DELIVERED, FAILED, PENDING, REFUSED, SKIPPED
from vidmaas.domain import webhooks as policy
from vidmaas.domain.events import Event, EventType
from vidmaas.logs import TaskLog
from vidmaas.metrics import Metrics
from vidmaas.relay.endpoints import EndpointDeliveries

log = logging.getLogger(__name__)
tlog = TaskLog(log)

MAX_ERROR_CHARS = 500
PROGRESS_MIN_INTERVAL_S = 5.0
CLAIM_MARGIN_S = 30.0

DeliveryStatus = str
__all__ = ["DELIVERED", "FAILED", "PENDING", "REFUSED", "SKIPPED", "Subscriber",
           "WebhookSender", "Webhooks"]


async def resolve_host(host: str, port: int) -> list[str]:
    """The addresses of a host name (the system resolver, off the event loop)."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    seen: list[str] = []
    for info in infos:
        address = str(info[4][0])
        if address not in seen:
            seen.append(address)
    return seen


def body_of(payload: dict[str, Any]) -> bytes:
    """The exact bytes sent (and signed) for a stored payload."""
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False,
                      sort_keys=True).encode()


def _iso(value: Any) -> str | None:
    return None if value is None else value.isoformat()


def task_summary(task: Task) -> dict[str, Any]:
    """What a webhook says about the task besides the event itself."""
    out: dict[str, Any] = {
        "id": task.id, "status": task.status, "progress": round(task.progress, 2),
        "stage": task.stage, "model": task.model, "attempts": task.attempts,
        "created_at": _iso(task.created_at), "started_at": _iso(task.started_at),
        "finished_at": _iso(task.finished_at),
    }
    if task.error_code is not None:
        out["error"] = {"code": task.error_code,
                        "message": (task.error_message or "")[:MAX_ERROR_CHARS]}
    if task.video_key is not None:
        out["video_url"] = f"/v1/tasks/{task.id}/video"
        out["poster_url"] = f"/v1/tasks/{task.id}/poster"
        if task.spritesheet is not None:
            out["spritesheet_url"] = f"/v1/tasks/{task.id}/spritesheet"
    return out


class Subscriber(Protocol):
    """What decides a task's webhook targets: a task row, or just its subscription."""

    @property
    def user_id(self) -> str: ...

    @property
    def webhook_url(self) -> str | None: ...

    @property
    def webhook_events(self) -> list[str] | None: ...


def _truncate(text: str, limit: int = MAX_ERROR_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


class Webhooks:
    """Records deliveries for applied events and owns the sender that sends them."""

    def __init__(self, *, sessions: Sessions, settings: WebhookSettings,
                 progress_min_interval_s: float = PROGRESS_MIN_INTERVAL_S,
                 sender: WebhookSender | None = None, metrics: Metrics | None = None) -> None:
        self.sessions = sessions
        self.settings = settings
        self.progress_min_interval_s = progress_min_interval_s
        self.sender = sender or WebhookSender(sessions=sessions, settings=settings,
                                              metrics=metrics)
        self.endpoints = EndpointDeliveries(sessions=sessions, settings=settings)

    def targets(self, task: Subscriber, event_type: EventType) -> list[str]:
        """The URLs that get this event of this task (task's own first, then global)."""
        urls: list[str] = []
        if task.webhook_url and event_type.value in policy.wanted_events(task.webhook_events):
            urls.append(task.webhook_url)
        if event_type.value in policy.DEFAULT_EVENTS:
            urls += [u for u in self.settings.global_urls if u not in urls]
        return urls

    async def wants(self, task: Subscriber, event_type: EventType, *,
                    has_endpoints: bool = True) -> bool:
        """Does anyone (a URL or an endpoint of the task's user) get this event type?
        ``has_endpoints=False`` (the user has no enabled endpoint) skips the lookup."""
        if self.targets(task, event_type):
            return True
        return has_endpoints and await self.endpoints.wants(task.user_id, event_type)

    async def record(self, *, task: Task, event: Event, event_id: str,
                     has_endpoints: bool = True) -> int:
        """Record the deliveries of one applied event; the number of new rows.
        ``has_endpoints=False``: the user has no enabled endpoint (no lookup)."""
        urls = self.targets(task, event.type)
        endpoints_too = has_endpoints and await self.endpoints.wants(task.user_id, event.type)
        if not urls and not endpoints_too:
            return 0
        now = utcnow()
        payload = {**event.to_json(event_id=event_id), "timestamp": now.isoformat(),
                   "task": task_summary(task)}
        # A task ends once: one terminal delivery per target, whichever terminal event
        # (the runtime's or the dispatcher's) is applied first.
        key = "terminal" if event.type.terminal else event_id
        created = 0
        for url in urls:
            if event.type is EventType.PROGRESS and await self._throttled(task.id, url):
                continue
            async with self.sessions() as session:
                if not await rows.record(
                        session=session, task_id=task.id,
                        delivery_id=policy.delivery_id(url=url, task_id=task.id, event_id=key),
                        url=url, event_id=event_id, event_type=event.type.value,
                        payload=payload, due_at=now):
                    continue  # recorded before: this is a redelivered event
            created += 1
        if endpoints_too:
            created += await self.endpoints.record(task=task, event=event, event_id=event_id,
                                                   native=payload, now=now)
        if created:
            tlog.info(task.id, "%d webhook deliveries for %s %s", created, event.type.value,
                      event_id)
            self.sender.wake()
        return created

    async def _throttled(self, task_id: str, url: str) -> bool:
        since = utcnow() - timedelta(seconds=self.progress_min_interval_s)
        async with self.sessions() as session:
            last = await rows.last_recorded_at(session=session, task_id=task_id, url=url,
                                               event_type=EventType.PROGRESS.value)
        return last is not None and last > since


class WebhookSender:
    """Sends due deliveries until ``stop()``; see the module docstring."""

    def __init__(self, *, sessions: Sessions, settings: WebhookSettings,
                 poll_interval_s: float = 1.0, concurrency: int = 16,
                 resolve: policy.Resolver = resolve_host,
                 transport: httpx.AsyncBaseTransport | None = None,
                 clock: Callable[[], float] = time.time,
                 metrics: Metrics | None = None) -> None:
        self.sessions = sessions
        self.settings = settings
        self.poll_interval_s = poll_interval_s
        self.concurrency = concurrency
        self.resolve = resolve
        self.transport = transport
        self.clock = clock
        self.metrics = metrics
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._inflight: set[asyncio.Task[None]] = set()
        self._bookkeeping: set[asyncio.Task[None]] = set()
        self.attempts_made = 0

    async def _shielded(self, coro: Coroutine[Any, Any, None]) -> None:
        """Record an outcome even if the attempt is cancelled; ``run()`` awaits it."""
        task = asyncio.create_task(coro, name="webhook-record")
        self._bookkeeping.add(task)
        task.add_done_callback(self._bookkeeping.discard)
        await asyncio.shield(task)

    def wake(self) -> None:
        """New deliveries are due: look now instead of at the next poll."""
        self._wake.set()

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()

    async def run(self) -> None:
        limits = httpx.Limits(max_connections=self.concurrency)
        async with httpx.AsyncClient(timeout=self.settings.timeout_s, follow_redirects=False,
                                     transport=self.transport, limits=limits,
                                     trust_env=False) as client:
            try:
                while not self._stopping.is_set():
                    self._wake.clear()
                    room = self.concurrency - len(self._inflight)
                    claimed = await self._claim_due(limit=room) if room > 0 else []
                    for row in claimed:
                        t = asyncio.create_task(self._deliver(client, row),
                                                name=f"webhook-send-{row.delivery_id}")
                        self._inflight.add(t)
                        t.add_done_callback(self._inflight.discard)
                    if claimed and len(claimed) == room:
                        await asyncio.sleep(0)
                        continue
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), self.poll_interval_s)
            finally:
                pending = list(self._inflight)
                for t in pending:
                    t.cancel()
                await asyncio.gather(*pending, return_exceptions=True)
                await asyncio.gather(*list(self._bookkeeping), return_exceptions=True)

    async def drain(self) -> None:
        """Wait for the attempts in flight (tests)."""
        while self._inflight:
            await asyncio.gather(*list(self._inflight), return_exceptions=True)

    async def _claim_due(self, *, limit: int) -> list[WebhookDelivery]:
        now = utcnow()
        lease = now + timedelta(seconds=self.settings.timeout_s + CLAIM_MARGIN_S)
        async with self.sessions() as session:
            return await rows.claim_due(session=session, now=now, lease_until=lease,
                                        limit=limit)

    def _max_attempts(self, row: WebhookDelivery) -> int:
        if row.event_type == EventType.PROGRESS.value:
            return 1
        return max(1, self.settings.max_attempts)

    async def _endpoint_of(self, row: WebhookDelivery) -> tuple[str, bytes] | None:
        """The URL and key an endpoint's delivery goes to now; None if it may not go."""
        assert row.endpoint_id is not None
        async with self.sessions() as session:
            endpoint = await endpoints.get_any(session=session, endpoint_id=row.endpoint_id)
        if endpoint is None or not endpoint.enabled:
            return None
        return endpoint.url, policy.signing_key(endpoint.secret)

    async def _deliver(self, client: httpx.AsyncClient, row: WebhookDelivery) -> None:
        url, key = row.url, self.settings.signing_secret.get_secret_value().encode()
        if row.endpoint_id is not None:
            try:
                found = await self._endpoint_of(row)
            except Exception:
                # Due again when the claim lapses: at least once, never unsigned.
                tlog.exception(row.task_id, "could not read endpoint %s of webhook %s",
                               row.endpoint_id, row.delivery_id)
                return
            if found is None:
                tlog.info(row.task_id, "webhook %s skipped: endpoint %s is disabled",
                          row.delivery_id, row.endpoint_id)
                self._observe("skipped")
                await self._shielded(self._finish(
                    row, status=SKIPPED, code=None, error="the endpoint is disabled",
                    uncount=True))
                return
            url, key = found
        try:
            _target, addresses = await policy.check_target(
                url, allow_hosts=self.settings.allow_hosts, resolve=self.resolve)
        except policy.TargetRefused as e:
            tlog.warning(row.task_id, "webhook %s refused: %s", row.delivery_id,
                         _truncate(str(e)))
            self._observe("rejected")
            await self._shielded(self._finish(row, status=REFUSED, code=None, error=str(e)))
            return
        status_code: int | None = None
        error: str | None = None
        try:
            status_code = await self._post(client, row, addresses[0], url=url, key=key)
        except asyncio.CancelledError:
            # Stopped mid-attempt: the outcome is unknown, so the attempt does not count
            # and the delivery is due again soon (rather than when the claim lapses).
            await self._shielded(self._finish(
                row, status=PENDING, code=None, error="interrupted by a relay shutdown",
                retry_in_s=self.settings.backoff_initial_s, uncount=True))
            raise
        except httpx.HTTPError as e:
            error = f"{type(e).__name__}: {e}"
        except OSError as e:
            error = f"{type(e).__name__}: {e}"
        self.attempts_made += 1
        if status_code is not None and 200 <= status_code < 300:
            tlog.info(row.task_id, "webhook %s %s delivered (attempt %d, HTTP %d)",
                      row.delivery_id, row.event_type, row.attempts, status_code)
            self._observe("delivered")
            await self._shielded(self._finish(row, status=DELIVERED, code=status_code,
                                              error=None))
            return
        if error is None:
            error = f"HTTP {status_code}"
        if row.attempts >= self._max_attempts(row):
            tlog.warning(row.task_id, "webhook %s %s failed after %d attempts: %s",
                         row.delivery_id, row.event_type, row.attempts, _truncate(error))
            self._observe("failed")
            await self._shielded(self._finish(row, status=FAILED, code=status_code, error=error))
            return
        delay_s = policy.backoff_s(attempt=row.attempts,
                                   initial_s=self.settings.backoff_initial_s)
        tlog.info(row.task_id, "webhook %s attempt %d failed (%s); retry in %.1fs",
                  row.delivery_id, row.attempts, _truncate(error, 200), delay_s)
        self._observe("retrying")
        await self._shielded(self._finish(row, status=PENDING, code=status_code, error=error,
                                          retry_in_s=delay_s))

    def _observe(self, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.observe_webhook(outcome)

    async def _post(self, client: httpx.AsyncClient, row: WebhookDelivery, address: str, *,
                    url: str, key: bytes) -> int:
        target = policy.parse_target(url)
        body = body_of(row.payload)
        timestamp = int(self.clock())
        host_in_url = f"[{address}]" if ":" in address else address
        default_port = 443 if target.scheme == "https" else 80
        host_header = target.host if target.port == default_port \
            else f"{target.host}:{target.port}"
        if ":" in target.host and not target.host.startswith("["):
            host_header = f"[{target.host}]" if target.port == default_port \
                else f"[{target.host}]:{target.port}"
        headers = {
            "content-type": "application/json",
            "user-agent": f"vidmaas-webhooks/{__version__}",
            "host": host_header,
            "webhook-id": row.delivery_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": policy.sign(secret=key, msg_id=row.delivery_id,
                                             timestamp=timestamp, body=body),
        }
        extensions = {"sni_hostname": target.host} if target.scheme == "https" else {}
        request = client.build_request(
            "POST", f"{target.scheme}://{host_in_url}:{target.port}{target.path}",
            content=body, headers=headers, extensions=extensions)
        # Only the status matters: the body is never read (a huge or endless answer costs
        # nothing), and the whole exchange is bounded, not only each read.
        async with asyncio.timeout(self.settings.timeout_s):
            response = await client.send(request, stream=True)
            await response.aclose()
        return response.status_code

    async def _finish(self, row: WebhookDelivery, *, status: DeliveryStatus, code: int | None,
                      error: str | None, retry_in_s: float | None = None,
                      uncount: bool = False) -> None:
        next_at = None if retry_in_s is None else utcnow() + timedelta(seconds=retry_in_s)
        try:
            async with self.sessions() as session:
                await rows.finish_attempt(
                    session=session, row_id=row.id, attempt=row.attempts, status=status,
                    attempts=row.attempts - 1 if uncount else row.attempts, status_code=code,
                    error=None if error is None else _truncate(error), next_attempt_at=next_at)
        except Exception:
            # The claim lease runs out and the attempt is made again: at least once.
            tlog.exception(row.task_id, "could not record webhook %s attempt %d", row.delivery_id,
                           row.attempts)
