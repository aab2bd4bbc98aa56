"""The one reader of request bodies for the creation routes (``POST /v1/tasks``,
``POST /v1/videos``).

Guarantees:
- The body is read first, with a hard byte limit: a declared ``Content-Length`` over
  it, or a stream that passes it, is ``PayloadTooLarge`` (413 ``payload_too_large``)
  before anything is parsed or the content type is looked at.
- Dispatch by content type: ``application/json`` (or none) is decoded as JSON;
  ``multipart/form-data`` and ``application/x-www-form-urlencoded`` are parsed by
  ``api.forms`` (at most one file and 32 fields; its own codes); anything else is
  ``UnsupportedMedia`` (415 ``unsupported_content_type``). Nothing is validated beyond
  that here: the routes say which fields they take.
- Whatever the bytes, a JSON body the parser cannot take is ``InvalidRequest`` with a
  machine-readable code, never an unexpected error: not UTF-8 (a UTF-8 byte order
  mark is skipped) is ``invalid_encoding``; not JSON is ``invalid_json``; ``NaN``,
  ``Infinity``, a number that overflows a double (``1e999``) or an integer of more
  than ``MAX_INTEGER_DIGITS`` digits is ``invalid_number``; nesting deeper than
  ``MAX_JSON_DEPTH`` (the parser's own recursion limit included) is ``json_too_deep``;
  more than ``MAX_JSON_VALUES`` values is ``too_many_json_values``; an object naming a
  key twice is ``duplicate_field`` (parsers disagree on which one wins, so neither
  does); a string or key holding a NUL character or a lone UTF-16 surrogate
  (``"\\ud800"``) is ``invalid_text`` naming where; an empty body is ``empty_body``
  and any other value than an object is ``body_not_an_object``. The status is 422
  (400 on OpenAI's API, like every invalid request there).
- ``validated`` turns a pydantic validation failure into ``InvalidRequest`` naming the
  first offending field.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request

from vidmaas.api.forms import Form, parse_multipart, parse_urlencoded
from vidmaas.errors import InvalidRequest, PayloadTooLarge, UnsupportedMedia

MAX_FORM_FILES = 1
MAX_FORM_FIELDS = 32
MAX_JSON_DEPTH = 16
"""Containers inside containers: the creation bodies need 2."""
MAX_JSON_VALUES = 10_000
"""Values (scalars and containers) in one body."""
MAX_INTEGER_DIGITS = 40
JSON_TYPES = frozenset({"application/json", ""})
_BAD_TEXT = re.compile(r"[\x00\ud800-\udfff]")

M = TypeVar("M", bound=BaseModel)


@dataclass(frozen=True, slots=True)
class Body:
    """A creation request's body: a decoded JSON object, or a form."""

    json: dict[str, Any] | None = None
    """The decoded JSON object (None for a form)."""
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
    if ctype == "multipart/form-data":
        return Body(form=parse_multipart(raw, content_type=request.headers["content-type"],
                                         max_files=MAX_FORM_FILES, max_fields=MAX_FORM_FIELDS))
    if ctype == "application/x-www-form-urlencoded":
        return Body(form=parse_urlencoded(raw, max_fields=MAX_FORM_FIELDS))
    if ctype not in JSON_TYPES:
        raise UnsupportedMedia("send application/json or multipart/form-data",
                               code="unsupported_content_type")
    return Body(json=decode_json_object(raw))


def decode_json_object(raw: bytes) -> dict[str, Any]:
    """A JSON object from a body's bytes, or ``InvalidRequest`` (see the module doc)."""
    if not raw.strip():
        raise InvalidRequest("the body is empty; send a JSON object", code="empty_body")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidRequest("the body is not UTF-8", code="invalid_encoding") from e
    try:
        value = json.loads(text.removeprefix("\ufeff"), object_pairs_hook=_object,
                           parse_constant=_constant, parse_float=_float, parse_int=_int)
    except RecursionError as e:
        raise InvalidRequest(f"the JSON is nested more than {MAX_JSON_DEPTH} levels deep",
                             code="json_too_deep") from e
    except ValueError as e:  # JSONDecodeError is one
        raise InvalidRequest("the body is not valid JSON", code="invalid_json") from e
    _check_tree(value)
    if not isinstance(value, dict):
        raise InvalidRequest(f"the body must be a JSON object, not {_kind(value)}",
                             code="body_not_an_object")
    return value


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise InvalidRequest(f"the JSON object names {key[:64]!r} twice",
                                 field=_printable(key), code="duplicate_field")
        out[key] = value
    return out


def _bad_number(text: str, why: str) -> NoReturn:
    raise InvalidRequest(f"the number {text[:24]}{'…' if len(text) > 24 else ''} {why}",
                         code="invalid_number")


def _constant(text: str) -> NoReturn:
    _bad_number(text, "is not JSON (NaN and Infinity are not numbers in JSON)")


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        _bad_number(text, "is too large")
    return value


def _int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INTEGER_DIGITS:
        _bad_number(text, f"has more than {MAX_INTEGER_DIGITS} digits")
    return int(text)


def _kind(value: Any) -> str:
    names = {list: "an array", str: "a string", bool: "a boolean", type(None): "null",
             int: "a number", float: "a number"}
    return names.get(type(value), "that")


def _printable(text: str) -> str:
    return _BAD_TEXT.sub("\N{REPLACEMENT CHARACTER}", text)[:64]


def _check_tree(root: Any) -> None:
    """Depth, size and text checks over a decoded value, without recursion."""
    stack: list[tuple[Any, str, int]] = [(root, "", 1)]
    seen = 0
    while stack:
        value, path, depth = stack.pop()
        seen += 1
        if seen > MAX_JSON_VALUES:
            raise InvalidRequest(f"the JSON holds more than {MAX_JSON_VALUES} values",
                                 code="too_many_json_values")
        if isinstance(value, str):
            if _BAD_TEXT.search(value):
                raise InvalidRequest(
                    f"{path or 'the body'}: text must not hold a NUL character or a lone "
                    "UTF-16 surrogate", field=path or None, code="invalid_text")
            continue
        if not isinstance(value, (dict, list)):
            continue
        if depth > MAX_JSON_DEPTH:
            raise InvalidRequest(f"the JSON is nested more than {MAX_JSON_DEPTH} levels deep",
                                 code="json_too_deep")
        if isinstance(value, dict):
            for key, item in value.items():
                where = f"{path}.{_printable(key)}" if path else _printable(key)
                if _BAD_TEXT.search(key):
                    raise InvalidRequest(f"the key {where!r} holds a NUL character or a lone "
                                         "UTF-16 surrogate", field=where, code="invalid_text")
                stack.append((item, where, depth + 1))
        else:
            stack.extend((item, f"{path}.{i}" if path else str(i), depth + 1)
                         for i, item in enumerate(value))


def validated(model: type[M], raw: Any) -> M:
    """``model`` validated from ``raw``; ``InvalidRequest`` naming the first bad field."""
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        first = e.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or None
        raise InvalidRequest(f"{field}: {first['msg']}" if field else first["msg"],
                             field=field) from e
