"""What the clients send and how they read the answers: the one wire module that
``Client`` (``client.sync``) and ``AsyncClient`` (``client.aio``) both drive.

Guarantees:
- Every request either client makes is built here as a ``Call`` (method, path, query,
  body, headers, timeout), so the two send the same bytes for the same method.
- ``decoded`` is the one reading of an answer: a non-2xx answer raises
  ``ClientError(status, code, message, field)`` from the server's ``{"error": {...}}``
  body (or a generic ``http_<status>`` code when the body is not one); ``unreachable``
  is the ``ClientError`` (status 0, code ``unreachable``) for a server that does not
  answer. No httpx exception is meant to escape a client's public methods.
- Messages are plain dicts in the server's wire format (docs/streams-and-openai.md):
  ``SSEParser`` turns ``text/event-stream`` lines into them, ``snapshot_of`` makes the
  snapshot a client yields for a task it read itself, and ``is_terminal`` is the one
  answer to "does this message say the task has ended".
"""

from __future__ import annotations

import json
import mimetypes
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

TERMINAL_STATUSES = frozenset({"completed", "failed", "cancelled"})
TERMINAL_EVENTS = frozenset({"completed", "failed", "cancelled", "end"})
TRANSIENT_STATUSES = frozenset({0, 502, 503, 504})
"""Answers after which a stream is reopened instead of the error being raised."""

CONNECT_TIMEOUT_S = 10.0

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


@dataclass(frozen=True, slots=True)
class Call:
    """One HTTP request, as both clients send it."""

    method: str
    path: str
    params: list[tuple[str, str | int]] = field(default_factory=list)
    json: Any = None
    data: dict[str, str] | None = None
    files: dict[str, tuple[str, bytes, str]] | None = None
    headers: dict[str, str] = field(default_factory=dict)
    timeout: httpx.Timeout | None = None
    follow_redirects: bool = False

    def options(self) -> dict[str, Any]:
        """Keyword arguments for ``httpx.(Async)Client.request`` / ``.stream``."""
        out: dict[str, Any] = {}
        if self.params:
            out["params"] = self.params
        if self.json is not None:
            out["json"] = self.json
        if self.data is not None:
            out["data"] = self.data
        if self.files is not None:
            out["files"] = self.files
        if self.headers:
            out["headers"] = self.headers
        if self.timeout is not None:
            out["timeout"] = self.timeout
        if self.follow_redirects:
            out["follow_redirects"] = True
        return out


# ---------------------------------------------------------------- requests

def me() -> Call:
    return Call("GET", "/v1/me")


def models() -> Call:
    return Call("GET", "/v1/models")


def stream_token() -> Call:
    return Call("POST", "/v1/auth/stream-token")


def get(task_id: str) -> Call:
    return Call("GET", f"/v1/tasks/{task_id}")


def cancel(task_id: str) -> Call:
    return Call("POST", f"/v1/tasks/{task_id}/cancel")


def list_page(*, limit: int, cursor: str | None, status: Iterable[str] | None) -> Call:
    params: list[tuple[str, str | int]] = [("limit", limit)]
    if cursor:
        params.append(("cursor", cursor))
    params += [("status", s) for s in status or ()]
    return Call("GET", "/v1/tasks", params=params)


def submit(
    prompt: str, *, model: str | None, size: str | None, num_frames: int | None,
    steps: int | None, seed: int | None, negative_prompt: str | None,
    image: Path | str | None, idempotency_key: str | None,
) -> Call:
    """``POST /v1/tasks``: JSON, or multipart when an image is attached."""
    given = {"prompt": prompt, "model": model, "size": size, "num_frames": num_frames,
             "steps": steps, "seed": seed, "negative_prompt": negative_prompt}
    fields = {k: v for k, v in given.items() if v is not None}
    headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
    if image is None:
        return Call("POST", "/v1/tasks", json=fields, headers=headers)
    return Call("POST", "/v1/tasks", headers=headers,
                data={k: str(v) for k, v in fields.items()},
                files={"image": image_part(Path(image))})


def events(task_id: str, *, after: str | None, read_timeout_s: float) -> Call:
    """``GET /v1/tasks/{id}/events`` as SSE, resuming after ``after``."""
    headers = {"Accept": "text/event-stream"}
    if after:
        headers["Last-Event-ID"] = after
    return Call("GET", f"/v1/tasks/{task_id}/events",
                params=[("after", after)] if after else [], headers=headers,
                timeout=httpx.Timeout(CONNECT_TIMEOUT_S, read=read_timeout_s))


DOWNLOADS = ("video", "poster", "spritesheet")


def download(task_id: str, *, which: str) -> Call:
    """The video (or ``which="poster"`` / ``"spritesheet"``), following a redirect to a
    presigned URL. ``ValueError`` for any other ``which``."""
    if which not in DOWNLOADS:
        raise ValueError(f"which must be one of {', '.join(DOWNLOADS)}; not {which!r}")
    return Call("GET", f"/v1/tasks/{task_id}/{which}", follow_redirects=True)


# ---------------------------------------------------------------- webhook endpoints

ENDPOINTS = "/v1/webhook-endpoints"


def endpoint_path(endpoint_id: str, suffix: str = "") -> str:
    return f"{ENDPOINTS}/{quote(endpoint_id, safe='')}{suffix}"


def create_endpoint(url: str, *, events: Iterable[str] | None, description: str | None,
                    enabled: bool) -> Call:
    body: dict[str, Any] = {"url": url, "enabled": enabled}
    if events is not None:
        body["events"] = list(events)
    if description is not None:
        body["description"] = description
    return Call("POST", ENDPOINTS, json=body)


def endpoints_page(*, limit: int, cursor: str | None) -> Call:
    params: list[tuple[str, str | int]] = [("limit", limit)]
    return Call("GET", ENDPOINTS, params=params + ([("cursor", cursor)] if cursor else []))


def update_endpoint(endpoint_id: str, changes: Mapping[str, Any]) -> Call:
    """``PATCH``: only the given fields (url, events, enabled, description) change."""
    return Call("PATCH", endpoint_path(endpoint_id), json=dict(changes))


def endpoint_deliveries(endpoint_id: str, *, limit: int, cursor: str | None) -> Call:
    params: list[tuple[str, str | int]] = [("limit", limit)]
    return Call("GET", endpoint_path(endpoint_id, "/deliveries"),
                params=params + ([("cursor", cursor)] if cursor else []))


# ---------------------------------------------------------------- usage and admin

def usage(*, since: str | None, until: str | None, user_id: str | None,
          all_users: bool) -> Call:
    """``GET /v1/usage``: by day and model (``since``/``until`` are ISO dates)."""
    params: list[tuple[str, str | int]] = [(k, v) for k, v in (
        ("since", since), ("until", until), ("user_id", user_id)) if v]
    if all_users:
        params.append(("all", "true"))
    return Call("GET", "/v1/usage", params=params)


def admin_users(*, limit: int, cursor: str | None, name: str | None) -> Call:
    params: list[tuple[str, str | int]] = [("limit", limit)]
    params += [(k, v) for k, v in (("cursor", cursor), ("name", name)) if v]
    return Call("GET", "/v1/admin/users", params=params)


def admin_user(user_id: str) -> Call:
    return Call("GET", f"/v1/admin/users/{quote(user_id, safe='')}")


def admin_create_user(name: str, *, is_admin: bool, key: bool, key_name: str | None,
                      fields: Mapping[str, Any]) -> Call:
    """``fields``: weight, max_priority, quota_<name> (None entries are left out)."""
    body = {"name": name, "is_admin": is_admin, "key": key,
            **{k: v for k, v in fields.items() if v is not None}}
    if key_name:
        body["key_name"] = key_name
    return Call("POST", "/v1/admin/users", json=body)


def admin_update_user(user_id: str, changes: Mapping[str, Any]) -> Call:
    """``PATCH``: only the given fields change; a None value resets one to its default."""
    return Call("PATCH", f"/v1/admin/users/{quote(user_id, safe='')}", json=dict(changes))


def admin_set_disabled(user_id: str, *, disabled: bool) -> Call:
    which = "disable" if disabled else "enable"
    return Call("POST", f"/v1/admin/users/{quote(user_id, safe='')}/{which}")


def admin_create_key(user_id: str, *, name: str | None, expires_in_s: float | None,
                     expires_at: str | None) -> Call:
    body = {k: v for k, v in (("name", name), ("expires_in_s", expires_in_s),
                              ("expires_at", expires_at)) if v is not None}
    return Call("POST", f"/v1/admin/users/{quote(user_id, safe='')}/keys", json=body)


def admin_keys(user_id: str) -> Call:
    return Call("GET", f"/v1/admin/users/{quote(user_id, safe='')}/keys")


def admin_revoke_key(key_id: int) -> Call:
    return Call("DELETE", f"/v1/admin/keys/{int(key_id)}")


def admin_queue(*, limit: int) -> Call:
    return Call("GET", "/v1/admin/queue", params=[("limit", limit)])


def image_part(image: Path) -> tuple[str, bytes, str]:
    mime = mimetypes.guess_type(image.name)[0] or "application/octet-stream"
    try:
        return image.name, image.read_bytes(), mime
    except OSError as e:
        raise ClientError(0, "image_unreadable", f"cannot read {image}: {e}", "image") from e


def partial_path(target: Path) -> Path:
    """Where a download is written until it is complete."""
    return target.with_name(target.name + ".part")


# ---------------------------------------------------------------- answers

def error_of(response: httpx.Response) -> ClientError:
    """The ``ClientError`` an error response stands for (its body must have been read)."""
    try:
        body = response.json()
        err = body["error"]
        return ClientError(response.status_code, str(err["code"]), str(err["message"]),
                           err.get("field"))
    except (ValueError, KeyError, TypeError):
        text = response.text[:200].strip() or response.reason_phrase
        return ClientError(response.status_code, f"http_{response.status_code}", text)


def checked(response: httpx.Response) -> httpx.Response:
    if response.status_code >= 400:
        raise error_of(response)
    return response


def decoded(response: httpx.Response) -> dict[str, Any]:
    """The JSON object of a successful answer; ``ClientError`` for an error answer."""
    return dict(checked(response).json())


def unreachable(server: str, e: Exception) -> ClientError:
    return ClientError(0, "unreachable", f"cannot reach {server}: {e}")


def stream_missing(e: ClientError) -> bool:
    """The server has no event stream route (as opposed to: no such task)."""
    return e.status in (404, 405, 501) and e.code != "task_not_found"


def stream_done(response: httpx.Response) -> bool:
    """204: the task has finished and the client already has every event."""
    return response.status_code == 204


# ---------------------------------------------------------------- messages

def snapshot_state(message: Message) -> dict[str, Any]:
    """The task state a ``snapshot`` carries (in ``data``; ``task`` from polling)."""
    state = message.get("task") or message.get("data") or {}
    return state if isinstance(state, dict) else {}


def snapshot_of(task: Task) -> Message:
    """The snapshot a client yields for a task it read with ``GET /v1/tasks/{id}``."""
    return {"type": "snapshot", "task_id": task.get("id"), "task": task}


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
        line = line.rstrip("\r")
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
