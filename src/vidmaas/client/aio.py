"""``AsyncClient``: ``Client`` for asyncio code, over an async httpx client.

Guarantees: the same methods as ``Client`` with the same arguments and results,
awaited; the requests, the reading of answers and errors (``client.wire``) and the
behaviour of ``watch`` and ``wait`` (``client.watch``) are shared with it, so the two
cannot drift. ``events`` and ``watch`` are async generators: leave them early inside
``contextlib.aclosing`` and the HTTP stream closes at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import httpx

from vidmaas.client import wire
from vidmaas.client.watch import Deadline, Do, WatchPolicy
from vidmaas.client.wire import ClientError, Message, Task


class AsyncClient:
    """``Client`` for asyncio code: the same calls, awaited; ``watch`` is an async iterator."""

    def __init__(self, server: str, api_key: str | None, *, timeout_s: float = 30.0,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.server = server.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.AsyncClient(base_url=self.server, headers=headers,
                                       timeout=timeout_s, transport=transport)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: type[BaseException] | BaseException | TracebackType | None,
                        ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _call(self, call: wire.Call) -> dict[str, Any]:
        try:
            return wire.decoded(
                await self._http.request(call.method, call.path, **call.options()))
        except httpx.TransportError as e:
            raise wire.unreachable(self.server, e) from e

    # ------------------------------------------------------------ REST

    async def me(self) -> dict[str, Any]:
        """Who the API key belongs to: ``{id, name, is_admin, weight, max_priority, limits,
        usage}``."""
        return await self._call(wire.me())

    async def models(self) -> dict[str, Any]:
        """``{data: [model, ...], default: id}``."""
        return await self._call(wire.models())

    async def submit(
        self, prompt: str, *, model: str | None = None, size: str | None = None,
        num_frames: int | None = None, steps: int | None = None, seed: int | None = None,
        negative_prompt: str | None = None, image: Path | str | None = None,
        idempotency_key: str | None = None,
    ) -> Task:
        """Create a task; with ``image`` it is sent as multipart. Returns the task."""
        return await self._call(wire.submit(
            prompt, model=model, size=size, num_frames=num_frames, steps=steps, seed=seed,
            negative_prompt=negative_prompt, image=image, idempotency_key=idempotency_key))

    async def get(self, task_id: str) -> Task:
        return await self._call(wire.get(task_id))

    async def list(self, *, limit: int = 20, cursor: str | None = None,
                   status: Iterable[str] | None = None) -> dict[str, Any]:
        """One page, newest first: ``{data: [task, ...], next_cursor}``."""
        return await self._call(wire.list_page(limit=limit, cursor=cursor, status=status))

    async def cancel(self, task_id: str) -> Task:
        """Cancel a task (queued: at once; running: it becomes ``cancelling``)."""
        return await self._call(wire.cancel(task_id))

    async def stream_token(self) -> dict[str, Any]:
        """A short-lived ``{token, expires_in_s}`` for ``?token=`` URLs."""
        return await self._call(wire.stream_token())

    # ------------------------------------------------------------ webhook endpoints

    async def create_endpoint(self, url: str, *, events: Iterable[str] | None = None,
                              description: str | None = None,
                              enabled: bool = True) -> dict[str, Any]:
        """Register a webhook endpoint for all your tasks; the answer holds its ``secret``
        (``whsec_…``), shown this once."""
        return await self._call(wire.create_endpoint(url, events=events, description=description,
                                                        enabled=enabled))

    async def list_endpoints(self, *, limit: int = 20, cursor: str | None = None,
                             ) -> dict[str, Any]:
        """One page of your endpoints: ``{data, next_cursor}``."""
        return await self._call(wire.endpoints_page(limit=limit, cursor=cursor))

    async def get_endpoint(self, endpoint_id: str) -> dict[str, Any]:
        return await self._call(wire.Call("GET", wire.endpoint_path(endpoint_id)))

    async def update_endpoint(self, endpoint_id: str, changes: Mapping[str, Any],
                              ) -> dict[str, Any]:
        """Change ``url``, ``events``, ``enabled`` or ``description``."""
        return await self._call(wire.update_endpoint(endpoint_id, changes))

    async def delete_endpoint(self, endpoint_id: str) -> dict[str, Any]:
        return await self._call(wire.Call("DELETE", wire.endpoint_path(endpoint_id)))

    async def test_endpoint(self, endpoint_id: str) -> dict[str, Any]:
        """Record a test delivery (the relay sends it); returns the delivery."""
        return await self._call(wire.Call("POST", wire.endpoint_path(endpoint_id, "/test")))

    async def endpoint_deliveries(self, endpoint_id: str, *, limit: int = 20,
                                  cursor: str | None = None) -> dict[str, Any]:
        """The endpoint's delivery log, newest first: ``{data, next_cursor}``."""
        return await self._call(wire.endpoint_deliveries(endpoint_id, limit=limit,
                                                             cursor=cursor))

    # ------------------------------------------------------------ usage and admin

    async def usage(self, *, since: str | None = None, until: str | None = None,
              user_id: str | None = None, all_users: bool = False) -> dict[str, Any]:
        """Usage by day and model (``{since, until, data, totals}``); ISO dates; other
        users' (``user_id``, ``all_users``) for admins only."""
        return await self._call(wire.usage(since=since, until=until, user_id=user_id,
                                     all_users=all_users))

    async def create_user(self, name: str, *, is_admin: bool = False, weight: float | None = None,
                    max_priority: str | None = None,
                    quotas: Mapping[str, float | int | None] | None = None, key: bool = True,
                    key_name: str | None = None) -> dict[str, Any]:
        """Admin: a new user (``quotas``: ``queued_tasks``, ``gpus_at_once``,
        ``gpu_seconds_day``, ``gpu_seconds_month``) and, with ``key``, a first API key:
        ``{user, key}``; ``key["secret"]`` is shown this once."""
        fields = {"weight": weight, "max_priority": max_priority,
                  **{f"quota_{k}": v for k, v in (quotas or {}).items()}}
        return await self._call(wire.admin_create_user(name, is_admin=is_admin, key=key,
                                                 key_name=key_name, fields=fields))

    async def list_users(self, *, limit: int = 50, cursor: str | None = None,
                   name: str | None = None) -> dict[str, Any]:
        """Admin: one page of users, oldest first: ``{data, next_cursor}``."""
        return await self._call(wire.admin_users(limit=limit, cursor=cursor, name=name))

    async def get_user(self, user_id: str) -> dict[str, Any]:
        return await self._call(wire.admin_user(user_id))

    async def update_user(self, user_id: str, changes: Mapping[str, Any]) -> dict[str, Any]:
        """Admin: change ``name``, ``is_admin``, ``weight``, ``max_priority`` or
        ``quota_<name>``; a None value resets it to the server's default."""
        return await self._call(wire.admin_update_user(user_id, changes))

    async def disable_user(self, user_id: str) -> dict[str, Any]:
        """Admin: the user's keys stop working; their tasks go on."""
        return await self._call(wire.admin_set_disabled(user_id, disabled=True))

    async def enable_user(self, user_id: str) -> dict[str, Any]:
        return await self._call(wire.admin_set_disabled(user_id, disabled=False))

    async def create_key(self, user_id: str, *, name: str | None = None,
                   expires_in_s: float | None = None,
                   expires_at: str | None = None) -> dict[str, Any]:
        """Admin: a new key for the user; its ``secret`` is in this answer only."""
        return await self._call(wire.admin_create_key(user_id, name=name, expires_in_s=expires_in_s,
                                                expires_at=expires_at))

    async def list_keys(self, user_id: str) -> dict[str, Any]:
        """Admin: ``{data: [key, ...]}`` (prefix, name, created, last used, expiry)."""
        return await self._call(wire.admin_keys(user_id))

    async def revoke_key(self, key_id: int) -> dict[str, Any]:
        return await self._call(wire.admin_revoke_key(key_id))

    async def admin_queue(self, *, limit: int = 100) -> dict[str, Any]:
        """Admin: the queue by model and user, estimated starts, what runs, workers."""
        return await self._call(wire.admin_queue(limit=limit))

    async def download(self, task_id: str, path: Path | str, *, which: str = "video") -> Path:
        """``Client.download``: never leaves half a file at ``path``."""
        call = wire.download(task_id, which=which)
        target = Path(path)
        tmp = wire.partial_path(target)
        try:
            async with self._http.stream(call.method, call.path, **call.options()) as r:
                if r.status_code >= 400:
                    await r.aread()
                    raise wire.error_of(r)
                with tmp.open("wb") as f:
                    async for chunk in r.aiter_bytes():
                        f.write(chunk)
        except httpx.TransportError as e:
            tmp.unlink(missing_ok=True)
            raise wire.unreachable(self.server, e) from e
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        tmp.replace(target)
        return target

    # ------------------------------------------------------------ events

    async def events(self, task_id: str, *, after: str | None = None,
                     read_timeout_s: float = 60.0) -> AsyncGenerator[Message, None]:
        """The task's SSE stream, as ``Client.events``."""
        call = wire.events(task_id, after=after, read_timeout_s=read_timeout_s)
        try:
            async with self._http.stream(call.method, call.path, **call.options()) as r:
                if r.status_code >= 400:
                    await r.aread()
                    raise wire.error_of(r)
                if wire.stream_done(r):
                    return
                parser = wire.SSEParser()
                async for line in r.aiter_lines():
                    msg = parser.feed(line)
                    if msg is not None:
                        yield msg
        except httpx.TransportError as e:
            raise wire.unreachable(self.server, e) from e

    async def watch(self, task_id: str, *, after: str | None = None,
                    poll_interval_s: float = 2.0, max_reconnects: int = 30,
                    ) -> AsyncGenerator[Message, None]:
        """``Client.watch`` for asyncio (the rules are ``client.watch``'s module doc)."""
        policy = WatchPolicy(task_id, after=after, poll_interval_s=poll_interval_s,
                             max_reconnects=max_reconnects)
        stream: AsyncGenerator[Message, None] | None = None
        step = policy.start()
        try:
            while True:
                for msg in step.emit:
                    yield msg
                if step.do is Do.STOP:
                    return
                if step.delay_s > 0:
                    await asyncio.sleep(step.delay_s)
                try:
                    if step.do is Do.FETCH:
                        step = policy.task(await self.get(task_id))
                        continue
                    if step.do is Do.OPEN:
                        if stream is not None:
                            await stream.aclose()
                        stream = self.events(task_id, after=policy.last_event_id)
                    assert stream is not None
                    got = await anext(stream, None)
                except ClientError as e:
                    if stream is not None:
                        await stream.aclose()
                        stream = None
                    step = policy.failed(e)
                    continue
                step = policy.ended() if got is None else policy.message(got)
        finally:
            if stream is not None:
                await stream.aclose()

    async def wait(self, task_id: str, *, timeout_s: float = 60.0, interval_s: float = 0.5,
                   ) -> Task:
        """``Client.wait``: the task once its row says it ended."""
        deadline = Deadline(task_id, timeout_s=timeout_s)
        while True:
            task = await self.get(task_id)
            if deadline.done(task):
                return task
            await asyncio.sleep(interval_s)
