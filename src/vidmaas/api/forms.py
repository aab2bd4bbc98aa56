"""Strict parsing of the creation routes' forms (``multipart/form-data`` and
``application/x-www-form-urlencoded``), from a body already read and size-checked.

Guarantees:
- A form parses completely or not at all: a multipart body without a boundary, with a
  part that is not ``form-data`` or has no name, that does not end with its closing
  boundary (a truncated upload), or an urlencoded body that is not ASCII, is
  ``invalid_form``; a field name, file name or text value that is not UTF-8 is
  ``invalid_encoding`` (nothing is guessed from Latin-1); more than ``max_files``
  files or ``max_fields`` text fields is ``invalid_form``; the same name twice is
  ``duplicate_field`` naming it. All are ``InvalidRequest`` (422; 400 on OpenAI's API).
- ``Form`` reads fields by kind: a text field that is a file, a file field that is
  text, and an integer field that is not a plain decimal integer are each
  ``invalid_request`` naming the field; an empty text value counts as absent; a text
  value holding a NUL character is ``invalid_text``. A file part with a file name and
  no bytes is ``empty_image`` (the user attached something that is not there); a file
  part with neither name nor bytes is what a browser sends for an untouched file
  input, and counts as absent.
- ``Form.refuse_unknown`` names the first field a route does not take.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from dataclasses import dataclass, field
from urllib.parse import unquote_to_bytes

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, MultipartState, parse_options_header

from vidmaas.errors import InvalidRequest

_INTEGER = re.compile(r"[+-]?[0-9]{1,20}")


@dataclass(frozen=True, slots=True)
class FilePart:
    """An uploaded file part: its (client-given) file name and its bytes."""

    filename: str
    data: bytes
    content_type: str | None = None


Value = str | FilePart


class Form:
    """A parsed form with typed accessors (see the module doc)."""

    def __init__(self, items: list[tuple[str, Value]]) -> None:
        self._items: dict[str, Value] = {}
        for name, value in items:
            if name in self._items:
                raise InvalidRequest(f"{name} is given more than once", field=name,
                                     code="duplicate_field")
            self._items[name] = value

    def __contains__(self, name: object) -> bool:
        return name in self._items

    @property
    def names(self) -> list[str]:
        return list(self._items)

    def refuse_unknown(self, allowed: Collection[str], *, files_only: bool = False) -> None:
        """``invalid_request`` naming the first field not in ``allowed`` (with
        ``files_only``, only unknown *file* parts are refused: an API that ignores
        unknown text fields must still not drop an attached file)."""
        for name, value in self._items.items():
            if name in allowed or (files_only and not isinstance(value, FilePart)):
                continue
            kind = "file" if isinstance(value, FilePart) else "field"
            raise InvalidRequest(f"{name}: unknown {kind}; this route takes "
                                 f"{', '.join(sorted(allowed))}", field=name)

    def text(self, name: str) -> str | None:
        value = self._items.get(name)
        if value is None or value == "":
            return None
        if isinstance(value, FilePart):
            raise InvalidRequest(f"{name} must be text", field=name)
        if "\x00" in value:
            raise InvalidRequest(f"{name} contains a NUL character", field=name,
                                 code="invalid_text")
        return value

    def integer(self, name: str) -> int | None:
        value = self._items.get(name)
        if value is None or value == "":
            return None
        if isinstance(value, FilePart):
            raise InvalidRequest(f"{name} must be a number", field=name)
        if not _INTEGER.fullmatch(value.strip()):
            raise InvalidRequest(f"{name} must be an integer", field=name)
        return int(value)

    def file(self, name: str) -> bytes | None:
        """The bytes of an uploaded file part; None when absent (see the module doc)."""
        value = self._items.get(name)
        if value is None or value == "":
            return None
        if not isinstance(value, FilePart):
            raise InvalidRequest(f"{name} must be a file", field=name)
        if not value.data:
            if not value.filename:
                return None  # a browser's untouched file input
            raise InvalidRequest(f"the file {value.filename[:64]!r} sent as {name} is empty",
                                 field=name, code="empty_image")
        return value.data


def _utf8(raw: bytes, what: str, *, field_name: str | None = None) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidRequest(f"the form's {what} is not UTF-8", field=field_name,
                             code="invalid_encoding") from e


def _invalid(message: str) -> InvalidRequest:
    return InvalidRequest(f"the form could not be parsed: {message}", code="invalid_form")


def parse_urlencoded(body: bytes, *, max_fields: int) -> Form:
    """An ``application/x-www-form-urlencoded`` body (ASCII, values UTF-8 once decoded)."""
    try:
        text = body.decode("ascii")
    except UnicodeDecodeError as e:
        raise _invalid("an urlencoded body must be ASCII (percent-encode the rest)") from e
    items: list[tuple[str, Value]] = []
    for pair in text.split("&"):
        if not pair:
            continue
        raw_name, _, raw_value = pair.partition("=")
        name = _utf8(unquote_to_bytes(raw_name.replace("+", " ")), "field name")
        value = _utf8(unquote_to_bytes(raw_value.replace("+", " ")), "value", field_name=name)
        items.append((name, value))
        if len(items) > max_fields:
            raise _invalid(f"more than {max_fields} fields")
    return Form(items)


@dataclass
class _Part:
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    name: str = ""
    filename: str | None = None
    data: bytearray = field(default_factory=bytearray)


class _Multipart:
    """Callbacks for python-multipart's streaming parser, collecting whole parts."""

    def __init__(self, *, max_files: int, max_fields: int) -> None:
        self.max_files, self.max_fields = max_files, max_fields
        self.items: list[tuple[str, Value]] = []
        self.files = self.fields = 0
        self.part = _Part()
        self._header_name = bytearray()
        self._header_value = bytearray()

    def on_part_begin(self) -> None:
        self.part = _Part()

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def on_header_end(self) -> None:
        self.part.headers.append((bytes(self._header_name).lower(), bytes(self._header_value)))
        self._header_name.clear()
        self._header_value.clear()

    def on_headers_finished(self) -> None:
        headers = dict(self.part.headers)
        disposition, options = parse_options_header(headers.get(b"content-disposition", b""))
        if disposition != b"form-data" or b"name" not in options:
            raise _invalid('every part needs "Content-Disposition: form-data; name=…"')
        self.part.name = _utf8(options[b"name"], "field name")
        if b"filename" in options:
            self.part.filename = _utf8(options[b"filename"], "file name",
                                       field_name=self.part.name)
            self.files += 1
            if self.files > self.max_files:
                raise _invalid(f"more than {self.max_files} file(s)")
        else:
            self.fields += 1
            if self.fields > self.max_fields:
                raise _invalid(f"more than {self.max_fields} fields")

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        self.part.data += data[start:end]

    def on_part_end(self) -> None:
        part = self.part
        if part.filename is None:
            self.items.append((part.name, _utf8(bytes(part.data), "value",
                                                field_name=part.name)))
        else:
            ctype = dict(part.headers).get(b"content-type")
            self.items.append((part.name, FilePart(
                filename=part.filename, data=bytes(part.data),
                content_type=ctype.decode("latin-1") if ctype else None)))


def parse_multipart(body: bytes, *, content_type: str, max_files: int, max_fields: int,
                    ) -> Form:
    """A ``multipart/form-data`` body, parsed to its closing boundary (module doc)."""
    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise _invalid("the Content-Type has no boundary")
    collector = _Multipart(max_files=max_files, max_fields=max_fields)
    callbacks = {name: getattr(collector, name) for name in (
        "on_part_begin", "on_part_data", "on_part_end", "on_header_field",
        "on_header_value", "on_header_end", "on_headers_finished")}
    try:
        parser = MultipartParser(boundary, callbacks)  # type: ignore[arg-type]
        parser.write(body)
        parser.finalize()
    except FormParserError as e:
        raise _invalid(str(e)) from e
    if parser.state != MultipartState.END:
        raise _invalid("the body ends before its closing boundary (a truncated upload?)")
    return Form(collector.items)
