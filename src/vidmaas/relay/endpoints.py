"""Deliveries for the webhook endpoints a user registered (``/v1/webhook-endpoints``).

Guarantees:
- ``EndpointDeliveries.record`` turns one applied event of a task into one
  ``WebhookDelivery`` row per enabled endpoint of the task's user whose filter names the
  event type, each with the endpoint's id. The row's ``delivery_id`` comes from
  (endpoint, task, event id), terminal events from (endpoint, task), so a redelivered
  event or a second terminal event records nothing new.
- ``progress`` is recorded at most once per endpoint and task in
  ``webhooks.endpoint_progress_interval_s``.
- A task created through ``/v1/videos`` (``source == "openai"``) gets OpenAI's event
  envelope for its end (``video.completed`` / ``video.failed``, ``data.id`` the video
  id); its other events, and every event of a native task, get the native body the
  task's own webhook gets.
- A user's enabled endpoints are read at most every ``CACHE_S`` seconds per user (the
  relay asks for nearly every progress event); a change reaches recording within that
  time, and the sender re-reads the endpoint before each attempt (a disabled or
  deleted one gets nothing), so disabling stops deliveries at once.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from vidmaas.config import WebhookSettings
from vidmaas.db import endpoints as repo
from vidmaas.db import webhooks as rows
from vidmaas.db.engine import Sessions
from vidmaas.db.models import Task, WebhookEndpoint
from vidmaas.domain import webhooks as policy
from vidmaas.domain.events import Event, EventType

CACHE_S = 2.0
MAX_CACHED_USERS = 10_000
OPENAI_SOURCE = "openai"


class EndpointDeliveries:
    """Records endpoint deliveries; see the module docstring."""

    def __init__(self, *, sessions: Sessions, settings: WebhookSettings,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.sessions = sessions
        self.settings = settings
        self.clock = clock
        self._cache: dict[str, tuple[float, list[WebhookEndpoint]]] = {}

    async def endpoints_of(self, user_id: str) -> list[WebhookEndpoint]:
        """The user's enabled endpoints, as read at most ``CACHE_S`` ago."""
        now = self.clock()
        hit = self._cache.get(user_id)
        if hit is not None and hit[0] > now:
            return hit[1]
        async with self.sessions() as session:
            found = await repo.enabled_for_user(session=session, user_id=user_id)
        if len(self._cache) >= MAX_CACHED_USERS:
            self._cache.clear()
        self._cache[user_id] = (now + CACHE_S, found)
        return found

    async def wants(self, user_id: str, event_type: EventType) -> bool:
        """Does any endpoint of the user get events of this type?"""
        return any(event_type.value in e.events for e in await self.endpoints_of(user_id))

    async def record(self, *, task: Task, event: Event, event_id: str,
                     native: dict[str, Any], now: datetime) -> int:
        """Record the endpoint deliveries of one applied event; the number of new rows."""
        targets = [e for e in await self.endpoints_of(task.user_id)
                   if event.type.value in e.events]
        key = "terminal" if event.type.terminal else event_id
        created = 0
        for endpoint in targets:
            if event.type is EventType.PROGRESS and await self._throttled(task.id, endpoint.id,
                                                                          now):
                continue
            delivery_id = policy.endpoint_delivery_id(endpoint_id=endpoint.id, task_id=task.id,
                                                      event_id=key)
            payload: dict[str, Any] = native
            if task.source == OPENAI_SOURCE:
                payload = policy.openai_envelope(
                    delivery_id=delivery_id, task_id=task.id, event_type=event.type.value,
                    created_at=int(now.timestamp())) or native
            async with self.sessions() as session:
                if await rows.record(session=session, task_id=task.id, delivery_id=delivery_id,
                                     url=endpoint.url, event_id=event_id,
                                     event_type=event.type.value, payload=payload, due_at=now,
                                     endpoint_id=endpoint.id):
                    created += 1
        return created

    async def _throttled(self, task_id: str, endpoint_id: str, now: datetime) -> bool:
        since = now - timedelta(seconds=self.settings.endpoint_progress_interval_s)
        async with self.sessions() as session:
            last = await rows.last_recorded_at(session=session, task_id=task_id, url="",
                                               event_type=EventType.PROGRESS.value,
                                               endpoint_id=endpoint_id)
        return last is not None and last > since
