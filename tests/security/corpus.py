"""Hostile request bodies for the creation routes, and the code each must get.

Every entry is a body a careless or hostile client can send to ``POST /v1/tasks`` or
``POST /v1/videos``: JSON the parser cannot take (nesting thousands deep, numbers
past a double, NaN, duplicate keys, bytes that are not UTF-8, lone surrogates, NUL
characters in any text field, values that are not objects), forms that do not parse
or hide a problem (a file with a name and no bytes, a truncated upload, the same
field twice, a file under a name the route does not take), urlencoded bodies
likewise, and a model whose GPUs per job exceed the platform's capacity. Each must be
refused with the given machine-readable code — the same on both routes, where only
the status differs (422 natively, 400 on OpenAI's API) — and create nothing. Used by
the security tests (over real HTTP) and the OpenAPI fuzz tests (validated against the
document).
"""

from __future__ import annotations

from dataclasses import dataclass

BOUNDARY = "hostile-boundary-7f3a"
MULTIPART = f"multipart/form-data; boundary={BOUNDARY}"
URLENCODED = "application/x-www-form-urlencoded"
JSON = "application/json"


@dataclass(frozen=True)
class Hostile:
    name: str
    content_type: str
    body: bytes
    code: str
    field: str | None = None
    """The field the error must name, where one is to blame."""


def part(name: str, value: bytes, *, filename: str | None = None,
         content_type: str | None = None, raw_name: bytes | None = None) -> bytes:
    """One multipart part (``raw_name`` puts bytes that may not be UTF-8 in the name)."""
    disposition = b'form-data; name="' + (raw_name or name.encode()) + b'"'
    if filename is not None:
        disposition += b'; filename="' + filename.encode() + b'"'
    head = b"Content-Disposition: " + disposition + b"\r\n"
    if content_type:
        head += b"Content-Type: " + content_type.encode() + b"\r\n"
    return b"--" + BOUNDARY.encode() + b"\r\n" + head + b"\r\n" + value + b"\r\n"


def multipart(*parts: bytes, close: bool = True) -> bytes:
    return b"".join(parts) + (b"--" + BOUNDARY.encode() + b"--\r\n" if close else b"")


def _json(text: str) -> bytes:
    return text.encode()


def corpus(*, file_field: str) -> list[Hostile]:
    """The hostile bodies; ``file_field`` is the route's file part (``image`` or
    ``input_reference``)."""
    prompt = part("prompt", b"a kite over a hill")
    png_head = b"\x89PNG\r\n\x1a\n"
    return [
        # ---- JSON the parser cannot take
        Hostile("json-nested-5000-arrays", JSON,
                _json('{"prompt": "x", "model": ' + "[" * 5000 + "]" * 5000 + "}"),
                "json_too_deep"),
        Hostile("json-nested-3000-objects", JSON,
                _json('{"a": ' * 3000 + "1" + "}" * 3000), "json_too_deep"),
        Hostile("json-nested-100-arrays", JSON,
                _json('{"prompt": "x", "seconds": ' + "[" * 100 + "]" * 100 + "}"),
                "json_too_deep"),
        Hostile("json-exponent-overflow", JSON, _json('{"prompt": "x", "seed": 1e999}'),
                "invalid_number"),
        Hostile("json-negative-overflow", JSON, _json('{"prompt": "x", "steps": -1e999}'),
                "invalid_number"),
        Hostile("json-5000-digit-integer", JSON,
                _json('{"prompt": "x", "seed": ' + "9" * 5000 + "}"), "invalid_number"),
        Hostile("json-nan", JSON, _json('{"prompt": "x", "seed": NaN}'), "invalid_number"),
        Hostile("json-infinity", JSON, _json('{"prompt": "x", "seconds": Infinity}'),
                "invalid_number"),
        Hostile("json-minus-infinity", JSON, _json('{"prompt": "x", "steps": -Infinity}'),
                "invalid_number"),
        Hostile("json-duplicate-key", JSON,
                _json('{"prompt": "a cat", "prompt": "a dog"}'), "duplicate_field", "prompt"),
        Hostile("json-duplicate-nested-key", JSON,
                _json('{"prompt": "x", "input_reference": {"image_url": "a", '
                      '"image_url": "b"}}'), "duplicate_field", "image_url"),
        Hostile("json-not-utf8", JSON, b'{"prompt": "caf\xe9"}', "invalid_encoding"),
        Hostile("json-utf16", JSON, '{"prompt": "x"}'.encode("utf-16"), "invalid_encoding"),
        Hostile("json-overlong-utf8", JSON, b'{"prompt": "\xc0\xaf"}', "invalid_encoding"),
        Hostile("json-utf8-encoded-surrogate", JSON, b'{"prompt": "\xed\xa0\x80"}',
                "invalid_encoding"),
        Hostile("json-array", JSON, b'[{"prompt": "x"}]', "body_not_an_object"),
        Hostile("json-string", JSON, b'"a kite"', "body_not_an_object"),
        Hostile("json-number", JSON, b"42", "body_not_an_object"),
        Hostile("json-null", JSON, b"null", "body_not_an_object"),
        Hostile("json-true", JSON, b"true", "body_not_an_object"),
        Hostile("json-empty", JSON, b"", "empty_body"),
        Hostile("json-whitespace", JSON, b" \r\n\t ", "empty_body"),
        Hostile("json-lone-surrogate-in-prompt", JSON, _json('{"prompt": "a \\ud800 b"}'),
                "invalid_text", "prompt"),
        Hostile("json-lone-low-surrogate", JSON, _json('{"prompt": "\\udc00"}'),
                "invalid_text", "prompt"),
        Hostile("json-lone-surrogate-in-key", JSON, _json('{"prompt": "x", "\\ud83d": 1}'),
                "invalid_text"),
        Hostile("json-nul-in-prompt", JSON, _json('{"prompt": "a\\u0000b"}'), "invalid_text",
                "prompt"),
        Hostile("json-nul-in-negative-prompt", JSON,
                _json('{"prompt": "x", "negative_prompt": "blurry\\u0000"}'), "invalid_text",
                "negative_prompt"),
        Hostile("json-nul-in-model", JSON, _json('{"prompt": "x", "model": "tiny\\u0000"}'),
                "invalid_text", "model"),
        Hostile("json-nul-in-size", JSON, _json('{"prompt": "x", "size": "64\\u0000x64"}'),
                "invalid_text", "size"),
        Hostile("json-nul-in-webhook-url", JSON,
                _json('{"prompt": "x", "webhook_url": "https://example.com/\\u0000"}'),
                "invalid_text", "webhook_url"),
        Hostile("json-nul-in-seconds", JSON, _json('{"prompt": "x", "seconds": "4\\u0000"}'),
                "invalid_text", "seconds"),
        Hostile("json-nul-in-a-list", JSON,
                _json('{"prompt": "x", "webhook_events": ["completed\\u0000"]}'),
                "invalid_text", "webhook_events.0"),
        Hostile("json-nul-in-a-key", JSON, _json('{"prompt": "x", "a\\u0000": 1}'),
                "invalid_text"),
        Hostile("json-raw-control-character", JSON, b'{"prompt": "a\x01b"}', "invalid_json"),
        Hostile("json-truncated", JSON, b'{"prompt": "x", ', "invalid_json"),
        Hostile("json-trailing-data", JSON, b'{"prompt": "x"} {"prompt": "y"}',
                "invalid_json"),
        Hostile("json-single-quotes", JSON, b"{'prompt': 'x'}", "invalid_json"),
        Hostile("json-comment", JSON, b'{"prompt": "x" /* seed */}', "invalid_json"),
        Hostile("json-20000-values", JSON,
                _json('{"prompt": "x", "extra": [' + ",".join(["0"] * 20000) + "]}"),
                "too_many_json_values"),
        # ---- multipart forms that do not parse or hide a problem
        Hostile("multipart-empty-file-with-a-name", MULTIPART,
                multipart(prompt, part(file_field, b"", filename="photo.png",
                                       content_type="image/png")),
                "empty_image", file_field),
        Hostile("multipart-truncated-upload", MULTIPART,
                multipart(prompt, part(file_field, png_head + b"\x00" * 64,
                                       filename="photo.png")[:-40], close=False),
                "invalid_form"),
        Hostile("multipart-no-closing-boundary", MULTIPART, multipart(prompt, close=False),
                "invalid_form"),
        Hostile("multipart-part-without-a-name", MULTIPART,
                multipart(b"--" + BOUNDARY.encode() + b"\r\nContent-Disposition: form-data"
                          b"\r\n\r\nx\r\n"), "invalid_form"),
        Hostile("multipart-without-a-boundary", "multipart/form-data", multipart(prompt),
                "invalid_form"),
        Hostile("multipart-garbage", MULTIPART, b"\x00\xff not multipart at all",
                "invalid_form"),
        Hostile("multipart-duplicate-prompt", MULTIPART,
                multipart(prompt, part("prompt", b"a dog")), "duplicate_field", "prompt"),
        Hostile("multipart-value-not-utf8", MULTIPART,
                multipart(part("prompt", b"caf\xe9")), "invalid_encoding", "prompt"),
        Hostile("multipart-name-not-utf8", MULTIPART,
                multipart(prompt, part("", b"x", raw_name=b"mod\xe9l")), "invalid_encoding"),
        Hostile("multipart-nul-in-prompt", MULTIPART, multipart(part("prompt", b"a\x00b")),
                "invalid_text", "prompt"),
        Hostile("multipart-two-files", MULTIPART,
                multipart(prompt, part(file_field, png_head, filename="a.png"),
                          part(file_field + "2", png_head, filename="b.png")),
                "invalid_form"),
        Hostile("multipart-40-fields", MULTIPART,
                multipart(prompt, *(part(f"f{i}", b"x") for i in range(40))), "invalid_form"),
        Hostile("multipart-file-under-an-unknown-name", MULTIPART,
                multipart(prompt, part("file", png_head + b"\x00" * 16, filename="a.png")),
                "invalid_request", "file"),
        # ---- a model no job of which fits the platform's GPUs (8 per job; the tests'
        # platform has 1): queued, it would block everyone's queue forever
        Hostile("json-model-larger-than-the-capacity", JSON,
                _json('{"prompt": "x", "model": "wan2.2-t2v-a14b"}'), "model_unavailable",
                "model"),
        Hostile("multipart-model-larger-than-the-capacity", MULTIPART,
                multipart(prompt, part("model", b"wan2.2-t2v-a14b")), "model_unavailable",
                "model"),
        Hostile("urlencoded-model-larger-than-the-capacity", URLENCODED,
                b"prompt=x&model=wan2.2-t2v-a14b", "model_unavailable", "model"),
        # ---- urlencoded forms
        Hostile("urlencoded-raw-non-ascii", URLENCODED, "prompt=café".encode(),
                "invalid_form"),
        Hostile("urlencoded-value-not-utf8", URLENCODED, b"prompt=caf%E9", "invalid_encoding",
                "prompt"),
        Hostile("urlencoded-nul-in-prompt", URLENCODED, b"prompt=a%00b", "invalid_text",
                "prompt"),
        Hostile("urlencoded-duplicate-prompt", URLENCODED, b"prompt=a+cat&prompt=a+dog",
                "duplicate_field", "prompt"),
        Hostile("urlencoded-40-fields", URLENCODED,
                b"prompt=x&" + b"&".join(b"f%d=x" % i for i in range(40)), "invalid_form"),
    ]


def ids(entries: list[Hostile]) -> list[str]:
    return [h.name for h in entries]
