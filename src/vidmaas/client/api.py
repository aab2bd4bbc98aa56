"""``Client`` (blocking) and ``AsyncClient``: the native vidmaas API over httpx.

Guarantees:
- Every non-2xx answer raises ``ClientError(status, code, message, field)`` taken from
  the server's ``{"error": {...}}`` body (or a generic code when the body is not one);
  a server that cannot be reached raises ``ClientError`` with status 0 and code
  ``unreachable``. No httpx exception escapes the public methods.
- ``events`` yields the wire-format messages of one task's SSE stream (the first is a
  ``snapshot``) exactly as the server sends them, each with its ``id``.
- ``watch`` is what a person watching a task wants: it yields the same messages,
  resumes after a dropped connection from the last event id it saw (no event lost or
  repeated), falls back to polling ``GET /v1/tasks/{id}`` (yielding ``snapshot``
  messages) when the server has no event stream, and stops after the task ends.
- Tasks are plain dicts in the server's ``TaskOut`` shape (documented at ``/docs``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import mimetypes
import time
from collections.abc import AsyncGenerator, Iterable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import httpx

TERMINAL_STATUSES = frozenset({"completed", "failed", "cancelled"})
TERMINAL_EVENTS = frozenset({"completed", "failed", "cancelled", "end"})

Task = dict[str, Any]
Message = dict[str, Any]


class ClientError(Exception):
    """An error answer from the server (or no answer: status 0)."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None) -> None:
        super().__init__(f"{code}: {message}" + (f" (field: {field})" if field else ""))
        self.status = status
        self.code = code
        self.message = message
        self.field = field


def error_of(response: httpx.Response) -> ClientError:
    """The ``ClientError`` an error response stands for."""
    try:
        body = response.json()
        err = body["error"]
        return ClientError(response.status_code, str(err["code"]), str(err["message"]),
                           err.get("field"))
    except (ValueError, KeyError, TypeError):
        text = response.text[:200].strip() or response.reason_phrase
        return ClientError(response.status_code, f"http_{response.status_code}", text)


def _check(response: httpx.Response) -> httpx.Response:
    if response.status_code >= 400:
        raise error_of(response)
    return response


def _unreachable(server: str, e: Exception) -> ClientError:
    return ClientError(0, "unreachable", f"cannot reach {server}: {e}")


def _create_parts(
    *, prompt: str, model: str | None, size: str | None, num_frames: int | None,
    steps: int | None, seed: int | None, negative_prompt: str | None,
) -> dict[str, Any]:
    fields: dict[str, Any] = {"prompt": prompt, "model": model, "size": size,
                              "num_frames": num_frames, "steps": steps, "seed": seed,
                              "negative_prompt": negative_prompt}
    return {k: v for k, v in fields.items() if v is not None}


def _image_part(image: Path) -> tuple[str, bytes, str]:
    mime = mimetypes.guess_type(image.name)[0] or "application/octet-stream"
    try:
        return image.name, image.read_bytes(), mime
    except OSError as e:
        raise ClientError(0, "image_unreadable", f"cannot read {image}: {e}", "image") from e


def snapshot_state(message: Message) -> dict[str, Any]:
    """The task state a ``snapshot`` carries (in ``data``; ``task`` from polling)."""
    state = message.get("task") or message.get("data") or {}
    return state if isinstance(state, dict) else {}


def is_terminal(message: Message) -> bool:
    """Whether a stream message says the task has ended."""
    kind = message.get("type")
    if kind == "snapshot":
        return str(snapshot_state(message).get("status")) in TERMINAL_STATUSES
    if kind == "failed":
        return not (message.get("data") or {}).get("retryable", False)
    return kind in TERMINAL_EVENTS


class SSEParser:
    """Incremental ``text/event-stream`` parser yielding decoded JSON messages.

    An SSE ``id:`` line fills in the message's ``id`` when its JSON has none.
    """

    def __init__(self) -> None:
        self._data: list[str] = []
        self._id: str | None = None
        self._event: str | None = None

    def feed(self, line: str) -> Message | None:
        if line == "":
            return self._dispatch()
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            self._data.append(value)
        elif name == "id":
            self._id = value
        elif name == "event":
            self._event = value
        return None

    def _dispatch(self) -> Message | None:
        data, event_id, event = "\n".join(self._data), self._id, self._event
        self._data, self._event = [], None
        if not data:
            return None
        try:
            msg = json.loads(data)
        except ValueError:
            return None
        if not isinstance(msg, dict):
            return None
        if event_id and "id" not in msg:
            msg["id"] = event_id
        if event and "type" not in msg:
            msg["type"] = event
        return msg


def _stream_fallback(e: ClientError) -> bool:
    """The server has no event stream route (as opposed to: no such task)."""
    return e.status in (404, 405, 501) and e.code != "task_not_found"


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

    def _request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        try:
            return _check(self._http.request(method, path, **kw))
        except httpx.TransportError as e:
            raise _unreachable(self.server, e) from e

    # ------------------------------------------------------------ REST

    def me(self) -> dict[str, Any]:
        """Who the API key belongs to: ``{id, name, is_admin}``."""
        return dict(self._request("GET", "/v1/me").json())

    def models(self) -> dict[str, Any]:
        """``{data: [model, ...], default: id}``."""
        return dict(self._request("GET", "/v1/models").json())

    def submit(
        self, prompt: str, *, model: str | None = None, size: str | None = None,
        num_frames: int | None = None, steps: int | None = None, seed: int | None = None,
        negative_prompt: str | None = None, image: Path | str | None = None,
        idempotency_key: str | None = None,
    ) -> Task:
        """Create a task; with ``image`` it is sent as multipart. Returns the task."""
        fields = _create_parts(prompt=prompt, model=model, size=size, num_frames=num_frames,
                               steps=steps, seed=seed, negative_prompt=negative_prompt)
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        if image is None:
            r = self._request("POST", "/v1/tasks", json=fields, headers=headers)
        else:
            r = self._request("POST", "/v1/tasks", headers=headers,
                              data={k: str(v) for k, v in fields.items()},
                              files={"image": _image_part(Path(image))})
        return dict(r.json())

    def get(self, task_id: str) -> Task:
        return dict(self._request("GET", f"/v1/tasks/{task_id}").json())

    def list(self, *, limit: int = 20, cursor: str | None = None,
             status: Iterable[str] | None = None) -> dict[str, Any]:
        """One page, newest first: ``{data: [task, ...], next_cursor}``."""
        params: list[tuple[str, str | int]] = [("limit", limit)]
        if cursor:
            params.append(("cursor", cursor))
        params += [("status", s) for s in status or ()]
        return dict(self._request("GET", "/v1/tasks", params=params).json())

    def cancel(self, task_id: str) -> Task:
        """Cancel a task (queued: at once; running: it becomes ``cancelling``)."""
        return dict(self._request("POST", f"/v1/tasks/{task_id}/cancel").json())

    def stream_token(self) -> dict[str, Any]:
        """A short-lived ``{token, expires_in_s}`` for ``?token=`` URLs."""
        return dict(self._request("POST", "/v1/auth/stream-token").json())

    def download(self, task_id: str, path: Path | str, *, which: str = "video") -> Path:
        """Save the finished task's video (or ``which="poster"``) to ``path``.

        Written to a temporary name first, so ``path`` never holds half a file.
        """
        target = Path(path)
        tmp = target.with_name(target.name + ".part")
        try:
            with self._http.stream("GET", f"/v1/tasks/{task_id}/{which}",
                                   follow_redirects=True) as r:
                if r.status_code >= 400:
                    r.read()
                    raise error_of(r)
                with tmp.open("wb") as f:
                    for chunk in r.iter_bytes():
                        f.write(chunk)
        except httpx.TransportError as e:
            tmp.unlink(missing_ok=True)
            raise _unreachable(self.server, e) from e
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        tmp.replace(target)
        return target

    # ------------------------------------------------------------ events

    def events(self, task_id: str, *, after: str | None = None,
               read_timeout_s: float = 60.0) -> Iterator[Message]:
        """The task's SSE stream: a ``snapshot`` then events, until the server closes it."""
        params = {"after": after} if after else {}
        headers = {"Accept": "text/event-stream"}
        if after:
            headers["Last-Event-ID"] = after
        timeout = httpx.Timeout(10.0, read=read_timeout_s)
        try:
            with self._http.stream("GET", f"/v1/tasks/{task_id}/events", params=params,
                                   headers=headers, timeout=timeout) as r:
                if r.status_code >= 400:
                    r.read()
                    raise error_of(r)
                if r.status_code == 204:  # finished, and the client has every event
                    return
                parser = SSEParser()
                for line in r.iter_lines():
                    msg = parser.feed(line.rstrip("\r"))
                    if msg is not None:
                        yield msg
        except httpx.TransportError as e:
            raise _unreachable(self.server, e) from e

    def watch(self, task_id: str, *, after: str | None = None, poll_interval_s: float = 2.0,
              max_reconnects: int = 30) -> Iterator[Message]:
        """Follow a task to its end over the event stream, resuming after drops.

        Falls back to polling when the server has no stream; a retryable ``failed``
        does not end the watch (a retry may follow) unless the task itself has ended.
        Keep-alive ``ping`` messages are not yielded. If the stream closes without a
        terminal message, the task is read once: ended, its snapshot ends the watch.
        """
        last = after
        drops = 0
        while True:
            try:
                for msg in self.events(task_id, after=last):
                    drops = 0
                    if msg.get("id"):
                        last = str(msg["id"])
                    if msg.get("type") == "ping":
                        continue
                    yield msg
                    if is_terminal(msg):
                        return
                    if msg.get("type") == "failed":
                        snap = self._settled(task_id)
                        if snap is not None:
                            yield snap
                            return
            except ClientError as e:
                if _stream_fallback(e):
                    yield from self._poll(task_id, interval_s=poll_interval_s)
                    return
                if e.status not in (0, 502, 503, 504):
                    raise
            else:
                task = self.get(task_id)
                if task["status"] in TERMINAL_STATUSES:
                    yield {"type": "snapshot", "task_id": task_id, "task": task}
                    return
            drops += 1
            if drops > max_reconnects:
                raise ClientError(0, "stream_lost", "the event stream keeps dropping")
            time.sleep(min(0.2 * 2 ** drops, 5.0))

    def wait(self, task_id: str, *, timeout_s: float = 60.0, interval_s: float = 0.5) -> Task:
        """The task once its row says it ended (a stream's terminal event can arrive
        before the server has recorded it); ``ClientError`` ``timeout`` otherwise."""
        deadline = time.monotonic() + timeout_s
        while True:
            task = self.get(task_id)
            if task["status"] in TERMINAL_STATUSES:
                return task
            if time.monotonic() > deadline:
                raise ClientError(0, "timeout", f"task {task_id} is still {task['status']}")
            time.sleep(interval_s)

    def _settled(self, task_id: str, *, wait_s: float = 5.0) -> Message | None:
        """After a retryable failure: a snapshot if the task ended, None if it retries."""
        deadline = time.monotonic() + wait_s
        while True:
            task = self.get(task_id)
            if task["status"] in TERMINAL_STATUSES:
                return {"type": "snapshot", "task": task}
            if task["status"] == "queued" or time.monotonic() > deadline:
                return None
            time.sleep(0.25)

    def _poll(self, task_id: str, *, interval_s: float) -> Iterator[Message]:
        seen: Any = None
        while True:
            task = self.get(task_id)
            state = (task["status"], task["progress"], task["stage"], task["queue_position"])
            if state != seen:
                seen = state
                yield {"type": "snapshot", "task": task}
            if task["status"] in TERMINAL_STATUSES:
                return
            time.sleep(interval_s)


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

    async def _request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        try:
            return _check(await self._http.request(method, path, **kw))
        except httpx.TransportError as e:
            raise _unreachable(self.server, e) from e

    async def models(self) -> dict[str, Any]:
        return dict((await self._request("GET", "/v1/models")).json())

    async def submit(
        self, prompt: str, *, model: str | None = None, size: str | None = None,
        num_frames: int | None = None, steps: int | None = None, seed: int | None = None,
        negative_prompt: str | None = None, image: Path | str | None = None,
        idempotency_key: str | None = None,
    ) -> Task:
        fields = _create_parts(prompt=prompt, model=model, size=size, num_frames=num_frames,
                               steps=steps, seed=seed, negative_prompt=negative_prompt)
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        if image is None:
            r = await self._request("POST", "/v1/tasks", json=fields, headers=headers)
        else:
            r = await self._request("POST", "/v1/tasks", headers=headers,
                                    data={k: str(v) for k, v in fields.items()},
                                    files={"image": _image_part(Path(image))})
        return dict(r.json())

    async def get(self, task_id: str) -> Task:
        return dict((await self._request("GET", f"/v1/tasks/{task_id}")).json())

    async def list(self, *, limit: int = 20, cursor: str | None = None,
                   status: Iterable[str] | None = None) -> dict[str, Any]:
        params: list[tuple[str, str | int]] = [("limit", limit)]
        if cursor:
            params.append(("cursor", cursor))
        params += [("status", s) for s in status or ()]
        return dict((await self._request("GET", "/v1/tasks", params=params)).json())

    async def cancel(self, task_id: str) -> Task:
        return dict((await self._request("POST", f"/v1/tasks/{task_id}/cancel")).json())

    async def events(self, task_id: str, *, after: str | None = None,
                     read_timeout_s: float = 60.0) -> AsyncGenerator[Message, None]:
        """The task's SSE stream, as ``Client.events``."""
        params = {"after": after} if after else {}
        headers = {"Accept": "text/event-stream"}
        if after:
            headers["Last-Event-ID"] = after
        timeout = httpx.Timeout(10.0, read=read_timeout_s)
        try:
            async with self._http.stream("GET", f"/v1/tasks/{task_id}/events", params=params,
                                         headers=headers, timeout=timeout) as r:
                if r.status_code >= 400:
                    await r.aread()
                    raise error_of(r)
                if r.status_code == 204:
                    return
                parser = SSEParser()
                async for line in r.aiter_lines():
                    msg = parser.feed(line.rstrip("\r"))
                    if msg is not None:
                        yield msg
        except httpx.TransportError as e:
            raise _unreachable(self.server, e) from e

    async def watch(self, task_id: str, *, after: str | None = None,
                    poll_interval_s: float = 2.0, max_reconnects: int = 30,
                    ) -> AsyncGenerator[Message, None]:
        """``Client.watch`` for asyncio: resumes after drops, polls without a stream."""
        last = after
        drops = 0
        while True:
            try:
                # aclosing: leaving early closes the HTTP stream now, not at collection.
                async with contextlib.aclosing(self.events(task_id, after=last)) as stream:
                    async for msg in stream:
                        drops = 0
                        if msg.get("id"):
                            last = str(msg["id"])
                        if msg.get("type") == "ping":
                            continue
                        yield msg
                        if is_terminal(msg):
                            return
            except ClientError as e:
                if _stream_fallback(e):
                    async with contextlib.aclosing(
                            self._poll(task_id, interval_s=poll_interval_s)) as polled:
                        async for snap in polled:
                            yield snap
                    return
                if e.status not in (0, 502, 503, 504):
                    raise
            else:
                task = await self.get(task_id)
                if task["status"] in TERMINAL_STATUSES:
                    yield {"type": "snapshot", "task_id": task_id, "task": task}
                    return
            drops += 1
            if drops > max_reconnects:
                raise ClientError(0, "stream_lost", "the event stream keeps dropping")
            await asyncio.sleep(min(0.2 * 2 ** drops, 5.0))

    async def _poll(self, task_id: str, *, interval_s: float) -> AsyncGenerator[Message, None]:
        seen: Any = None
        while True:
            task = await self.get(task_id)
            state = (task["status"], task["progress"], task["stage"], task["queue_position"])
            if state != seen:
                seen = state
                yield {"type": "snapshot", "task": task}
            if task["status"] in TERMINAL_STATUSES:
                return
            await asyncio.sleep(interval_s)

    async def wait(self, task_id: str, *, timeout_s: float = 60.0, interval_s: float = 0.5,
                   ) -> Task:
        """``Client.wait``: the task once its row says it ended."""
        deadline = time.monotonic() + timeout_s
        while True:
            task = await self.get(task_id)
            if task["status"] in TERMINAL_STATUSES:
                return task
            if time.monotonic() > deadline:
                raise ClientError(0, "timeout", f"task {task_id} is still {task['status']}")
            await asyncio.sleep(interval_s)

    async def download(self, task_id: str, path: Path | str, *, which: str = "video") -> Path:
        target = Path(path)
        tmp = target.with_name(target.name + ".part")
        try:
            async with self._http.stream("GET", f"/v1/tasks/{task_id}/{which}",
                                         follow_redirects=True) as r:
                if r.status_code >= 400:
                    await r.aread()
                    raise error_of(r)
                with tmp.open("wb") as f:
                    async for chunk in r.aiter_bytes():
                        f.write(chunk)
        except httpx.TransportError as e:
            tmp.unlink(missing_ok=True)
            raise _unreachable(self.server, e) from e
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        tmp.replace(target)
        return target
