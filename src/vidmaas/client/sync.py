"""``Client``: the native vidmaas API over a blocking httpx client.

Guarantees: the requests, the reading of answers and errors (``client.wire``) and the
behaviour of ``watch`` and ``wait`` (``client.watch``) are those ``AsyncClient`` uses;
this module only performs them. Every failure is a ``ClientError``; no httpx exception
escapes a public method. Tasks are plain dicts in the server's ``TaskOut`` shape.
"""

from __future__ import annotations

import time
from collections.abc import Generator, Iterable, Iterator
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
        """Who the API key belongs to: ``{id, name, is_admin}``."""
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

    def download(self, task_id: str, path: Path | str, *, which: str = "video") -> Path:
        """Save the finished task's video (or ``which="poster"``) to ``path``.

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

