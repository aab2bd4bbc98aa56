"""The one reader of request bodies for the creation routes (``POST /v1/tasks``,
``POST /v1/videos``).

Guarantees:
- The body is read first, with a hard byte limit: a declared ``Content-Length`` over
  it, or a stream that passes it, is ``PayloadTooLarge`` (413 ``payload_too_large``)
  before anything is parsed or the content type is looked at.
- Dispatch by content type: ``application/json`` (or none) is decoded as JSON
  (``invalid_json`` when it is not); ``multipart/form-data`` and
  ``application/x-www-form-urlencoded`` are parsed as a form of at most one file and 32
  fields (``invalid_form`` when they do not parse); anything else is
  ``UnsupportedMedia`` (415 ``unsupported_content_type``). Nothing is validated beyond
  that here: the routes say which fields they take.
- A form's fields are read through ``Form``: a text field that is a file, a file field
  that is text, and an integer field that is not one are each ``InvalidRequest`` naming
  the field; an empty value counts as absent.
- ``validated`` turns a pydantic validation failure into ``InvalidRequest`` naming the
  first offending field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.datastructures import FormData, UploadFile
from starlette.requests import Request
from starlette.types import Message

from vidmaas.errors import InvalidRequest, PayloadTooLarge, UnsupportedMedia

MAX_FORM_FILES = 1
MAX_FORM_FIELDS = 32
FORM_TYPES = frozenset({"multipart/form-data", "application/x-www-form-urlencoded"})
JSON_TYPES = frozenset({"application/json", ""})

M = TypeVar("M", bound=BaseModel)


class Form:
    """A parsed form with typed accessors (see the module doc)."""

    def __init__(self, data: FormData) -> None:
        self._data = data

    def __contains__(self, name: object) -> bool:
        return name in self._data

    def text(self, name: str) -> str | None:
        value = self._data.get(name)
        if value is None or value == "":
            return None
        if isinstance(value, UploadFile):
            raise InvalidRequest(f"{name} must be text", field=name)
        return value

    def integer(self, name: str) -> int | None:
        value = self._data.get(name)
        if value is None or value == "":
            return None
        if isinstance(value, UploadFile):
            raise InvalidRequest(f"{name} must be a number", field=name)
        try:
            return int(value)
        except ValueError as e:
            raise InvalidRequest(f"{name} must be an integer", field=name) from e

    async def file(self, name: str) -> bytes | None:
        """The bytes of an uploaded file part; None when absent or empty."""
        value = self._data.get(name)
        if value is None or value == "":
            return None
        if not isinstance(value, UploadFile):
            raise InvalidRequest(f"{name} must be a file", field=name)
        data = await value.read()
        return data or None


@dataclass(frozen=True, slots=True)
class Body:
    """A creation request's body: a decoded JSON value, or a form."""

    json: Any = None
    """The decoded JSON document (None for a form, or for an empty JSON body)."""
    form: Form | None = None


async def read_bytes(request: Request, *, limit_bytes: int) -> bytes:
    """The whole body, or ``PayloadTooLarge`` as soon as it passes the limit."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit_bytes:
        raise PayloadTooLarge(f"the request body is over {limit_bytes} bytes")
    chunks: list[bytes] = []
    total = 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit_bytes:
            raise PayloadTooLarge(f"the request body is over {limit_bytes} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def content_type(request: Request) -> str:
    """The media type of the body, lower-cased, without parameters ('' when none)."""
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def read_body(request: Request, *, limit_bytes: int) -> Body:
    """Read and decode a creation request's body (see the module doc)."""
    raw = await read_bytes(request, limit_bytes=limit_bytes)
    ctype = content_type(request)
    if ctype in FORM_TYPES:
        return Body(form=Form(await _parse_form(request, raw)))
    if ctype not in JSON_TYPES:
        raise UnsupportedMedia("send application/json or multipart/form-data",
                               code="unsupported_content_type")
    try:
        return Body(json=json.loads(raw or b"null"))
    except ValueError as e:
        raise InvalidRequest("the body is not valid JSON", code="invalid_json") from e


async def _parse_form(request: Request, body: bytes) -> FormData:
    """Parse a multipart/urlencoded body that was already read (and size-checked)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        return await Request(request.scope, receive=replay).form(
            max_files=MAX_FORM_FILES, max_fields=MAX_FORM_FIELDS)
    except Exception as e:
        raise InvalidRequest(f"the form could not be parsed: {e}", code="invalid_form") from e


def validated(model: type[M], raw: Any) -> M:
    """``model`` validated from ``raw``; ``InvalidRequest`` naming the first bad field."""
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        first = e.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or None
        raise InvalidRequest(f"{field}: {first['msg']}" if field else first["msg"],
                             field=field) from e
