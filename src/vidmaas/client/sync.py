"""``Client``: the native vidmaas API over a blocking httpx client.

Guarantees: the requests, the reading of answers and errors (``client.wire``) and the
behaviour of ``watch`` and ``wait`` (``client.watch``) are those ``AsyncClient`` uses;
this module only performs them. Every failure is a ``ClientError``; no httpx exception
escapes a public method. Tasks are plain dicts in the server's ``TaskOut`` shape.
"""

from __future__ import annotations

import time
from collections.abc import Generator, Iterable, Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import httpx

from vidmaas.client import wire
from vidmaas.client.watch import Deadline, Do, WatchPolicy
from vidmaas.client.wire import ClientError, Message, Task


class Client:
    """A blocking client. Use as a context manager, or call ``close()``."""

    def __init__(self, server: str, api_key: str | None, *, timeout_s: float = 30.0,
                 transport: httpx.BaseTransport | None = None) -> None:
        self.server = server.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=self.server, headers=headers, timeout=timeout_s,
                                  transport=transport)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _call(self, call: wire.Call) -> dict[str, Any]:
        try:
            return wire.decoded(self._http.request(call.method, call.path, **call.options()))
        except httpx.TransportError as e:
            raise wire.unreachable(self.server, e) from e

    # ------------------------------------------------------------ REST

    def me(self) -> dict[str, Any]:
        """Who the API key belongs to: ``{id, name, is_admin, weight, max_priority, limits,
        usage}``."""
        return self._call(wire.me())

    def models(self) -> dict[str, Any]:
        """``{data: [model, ...], default: id}``."""
        return self._call(wire.models())

    def submit(
        self, prompt: str, *, model: str | None = None, size: str | None = None,
        num_frames: int | None = None, steps: int | None = None, seed: int | None = None,
        negative_prompt: str | None = None, image: Path | str | None = None,
        idempotency_key: str | None = None,
    ) -> Task:
        """Create a task; with ``image`` it is sent as multipart. Returns the task."""
        return self._call(wire.submit(
            prompt, model=model, size=size, num_frames=num_frames, steps=steps, seed=seed,
            negative_prompt=negative_prompt, image=image, idempotency_key=idempotency_key))

    def get(self, task_id: str) -> Task:
        return self._call(wire.get(task_id))

    def list(self, *, limit: int = 20, cursor: str | None = None,
             status: Iterable[str] | None = None) -> dict[str, Any]:
        """One page, newest first: ``{data: [task, ...], next_cursor}``."""
        return self._call(wire.list_page(limit=limit, cursor=cursor, status=status))

    def cancel(self, task_id: str) -> Task:
        """Cancel a task (queued: at once; running: it becomes ``cancelling``)."""
        return self._call(wire.cancel(task_id))

    def stream_token(self) -> dict[str, Any]:
        """A short-lived ``{token, expires_in_s}`` for ``?token=`` URLs."""
        return self._call(wire.stream_token())

    # ------------------------------------------------------------ webhook endpoints

    def create_endpoint(self, url: str, *, events: Iterable[str] | None = None,
                        description: str | None = None,
                        enabled: bool = True) -> dict[str, Any]:
        """Register a webhook endpoint for all your tasks; the answer holds its ``secret``
        (``whsec_…``), shown this once."""
        return self._call(wire.create_endpoint(url, events=events, description=description,
                                                  enabled=enabled))

    def list_endpoints(self, *, limit: int = 20, cursor: str | None = None,
                       ) -> dict[str, Any]:
        """One page of your endpoints: ``{data, next_cursor}``."""
        return self._call(wire.endpoints_page(limit=limit, cursor=cursor))

    def get_endpoint(self, endpoint_id: str) -> dict[str, Any]:
        return self._call(wire.Call("GET", wire.endpoint_path(endpoint_id)))

    def update_endpoint(self, endpoint_id: str, changes: Mapping[str, Any],
                        ) -> dict[str, Any]:
        """Change ``url``, ``events``, ``enabled`` or ``description``."""
        return self._call(wire.update_endpoint(endpoint_id, changes))

    def delete_endpoint(self, endpoint_id: str) -> dict[str, Any]:
        return self._call(wire.Call("DELETE", wire.endpoint_path(endpoint_id)))

    def test_endpoint(self, endpoint_id: str) -> dict[str, Any]:
        """Record a test delivery (the relay sends it); returns the delivery."""
        return self._call(wire.Call("POST", wire.endpoint_path(endpoint_id, "/test")))

    def endpoint_deliveries(self, endpoint_id: str, *, limit: int = 20,
                            cursor: str | None = None) -> dict[str, Any]:
        """The endpoint's delivery log, newest first: ``{data, next_cursor}``."""
        return self._call(wire.endpoint_deliveries(endpoint_id, limit=limit,
                                                       cursor=cursor))

    # ------------------------------------------------------------ usage and admin

    def usage(self, *, since: str | None = None, until: str | None = None,
              user_id: str | None = None, all_users: bool = False) -> dict[str, Any]:
        """Usage by day and model (``{since, until, data, totals}``); ISO dates; other
        users' (``user_id``, ``all_users``) for admins only."""
        return self._call(wire.usage(since=since, until=until, user_id=user_id,
                                     all_users=all_users))

    def create_user(self, name: str, *, is_admin: bool = False, weight: float | None = None,
                    max_priority: str | None = None,
                    quotas: Mapping[str, float | int | None] | None = None, key: bool = True,
                    key_name: str | None = None) -> dict[str, Any]:
        """Admin: a new user (``quotas``: ``queued_tasks``, ``gpus_at_once``,
        ``gpu_seconds_day``, ``gpu_seconds_month``) and, with ``key``, a first API key:
        ``{user, key}``; ``key["secret"]`` is shown this once."""
        fields = {"weight": weight, "max_priority": max_priority,
                  **{f"quota_{k}": v for k, v in (quotas or {}).items()}}
        return self._call(wire.admin_create_user(name, is_admin=is_admin, key=key,
                                                 key_name=key_name, fields=fields))

    def list_users(self, *, limit: int = 50, cursor: str | None = None,
                   name: str | None = None) -> dict[str, Any]:
        """Admin: one page of users, oldest first: ``{data, next_cursor}``."""
        return self._call(wire.admin_users(limit=limit, cursor=cursor, name=name))

    def get_user(self, user_id: str) -> dict[str, Any]:
        return self._call(wire.admin_user(user_id))

    def update_user(self, user_id: str, changes: Mapping[str, Any]) -> dict[str, Any]:
        """Admin: change ``name``, ``is_admin``, ``weight``, ``max_priority`` or
        ``quota_<name>``; a None value resets it to the server's default."""
        return self._call(wire.admin_update_user(user_id, changes))

    def disable_user(self, user_id: str) -> dict[str, Any]:
        """Admin: the user's keys stop working; their tasks go on."""
        return self._call(wire.admin_set_disabled(user_id, disabled=True))

    def enable_user(self, user_id: str) -> dict[str, Any]:
        return self._call(wire.admin_set_disabled(user_id, disabled=False))

    def create_key(self, user_id: str, *, name: str | None = None,
                   expires_in_s: float | None = None,
                   expires_at: str | None = None) -> dict[str, Any]:
        """Admin: a new key for the user; its ``secret`` is in this answer only."""
        return self._call(wire.admin_create_key(user_id, name=name, expires_in_s=expires_in_s,
                                                expires_at=expires_at))

    def list_keys(self, user_id: str) -> dict[str, Any]:
        """Admin: ``{data: [key, ...]}`` (prefix, name, created, last used, expiry)."""
        return self._call(wire.admin_keys(user_id))

    def revoke_key(self, key_id: int) -> dict[str, Any]:
        return self._call(wire.admin_revoke_key(key_id))

    def admin_queue(self, *, limit: int = 100) -> dict[str, Any]:
        """Admin: the queue by model and user, estimated starts, what runs, workers."""
        return self._call(wire.admin_queue(limit=limit))

    def download(self, task_id: str, path: Path | str, *, which: str = "video") -> Path:
        """Save the finished task's video (or ``which="poster"`` / ``"spritesheet"``) to
        ``path``.

        Written to a temporary name first, so ``path`` never holds half a file.
        """
        call = wire.download(task_id, which=which)
        target = Path(path)
        tmp = wire.partial_path(target)
        try:
            with self._http.stream(call.method, call.path, **call.options()) as r:
                if r.status_code >= 400:
                    r.read()
                    raise wire.error_of(r)
                with tmp.open("wb") as f:
                    for chunk in r.iter_bytes():
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

    def events(self, task_id: str, *, after: str | None = None,
               read_timeout_s: float = 60.0) -> Generator[Message, None, None]:
        """The task's SSE stream: a ``snapshot`` then events, until the server closes it."""
        call = wire.events(task_id, after=after, read_timeout_s=read_timeout_s)
        try:
            with self._http.stream(call.method, call.path, **call.options()) as r:
                if r.status_code >= 400:
                    r.read()
                    raise wire.error_of(r)
                if wire.stream_done(r):
                    return
                parser = wire.SSEParser()
                for line in r.iter_lines():
                    msg = parser.feed(line)
                    if msg is not None:
                        yield msg
        except httpx.TransportError as e:
            raise wire.unreachable(self.server, e) from e

    def watch(self, task_id: str, *, after: str | None = None, poll_interval_s: float = 2.0,
              max_reconnects: int = 30) -> Iterator[Message]:
        """Follow a task to its end (the rules are ``client.watch``'s module doc)."""
        policy = WatchPolicy(task_id, after=after, poll_interval_s=poll_interval_s,
                             max_reconnects=max_reconnects)
        stream: Generator[Message, None, None] | None = None
        step = policy.start()
        try:
            while True:
                yield from step.emit
                if step.do is Do.STOP:
                    return
                if step.delay_s > 0:
                    time.sleep(step.delay_s)
                try:
                    if step.do is Do.FETCH:
                        step = policy.task(self.get(task_id))
                        continue
                    if step.do is Do.OPEN:
                        if stream is not None:
                            stream.close()
                        stream = self.events(task_id, after=policy.last_event_id)
                    assert stream is not None
                    msg = next(stream, None)
                except ClientError as e:
                    if stream is not None:
                        stream.close()
                        stream = None
                    step = policy.failed(e)
                    continue
                step = policy.ended() if msg is None else policy.message(msg)
        finally:
            if stream is not None:
                stream.close()

    def wait(self, task_id: str, *, timeout_s: float = 60.0, interval_s: float = 0.5) -> Task:
        """The task once its row says it ended (a stream's terminal event can arrive
        before the server has recorded it); ``ClientError`` ``timeout`` otherwise."""
        deadline = Deadline(task_id, timeout_s=timeout_s)
        while True:
            task = self.get(task_id)
            if deadline.done(task):
                return task
            time.sleep(interval_s)

