"""Hostile uploads through a real server: each refused with a 4xx, nothing left behind.

A decompression bomb, a 100 MB body (streamed: refused with 413 long before it is all
sent), polyglots, an SVG and a truncated JPEG. "Nothing left behind" means no task row
for the user and no file under ``inputs/`` in the object store.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import zipfile
from pathlib import Path

import httpx
import pytest

from tests.api.test_tasks_api import jpeg_bytes, png_bomb
from tests.security.live import LiveApi

HUNDRED_MB = 100 * 1024 * 1024


def _zip_payload() -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        z.writestr("evil.html", "<script>alert(document.cookie)</script>")
    return out.getvalue()


def jpeg_html_polyglot() -> bytes:
    """Starts like a JPEG (so sniffing says JPEG), but the rest is an HTML page."""
    return (b"\xff\xd8\xff\xe0\x00\x10JFIF\x00<html><body><script>alert(1)</script>"
            b"</body></html>" + b"\x00" * 64)


HOSTILE = {
    "decompression bomb (PNG claiming 30000×30000)": (png_bomb(30000), 422),
    "decompression bomb (PNG claiming 100000×1)": (png_bomb(100_000), 422),
    "SVG": (b"<?xml version='1.0'?><svg xmlns='http://www.w3.org/2000/svg' "
            b"onload='alert(1)'><script>alert(2)</script></svg>", 415),
    "truncated JPEG": (jpeg_bytes(256, 256)[:300], 422),
    "JPEG header over an HTML body (polyglot)": (jpeg_html_polyglot(), 422),
    "ZIP with a JPEG name": (_zip_payload(), 415),
    "HTML page": (b"<!doctype html><html><script>alert(1)</script></html>", 415),
    "empty file with a PNG name": (b"\x89PNG\r\n\x1a\n", 422),
}


def _inputs(root: Path) -> list[Path]:
    inputs = root / "inputs"
    return [p for p in inputs.rglob("*") if p.is_file()] if inputs.exists() else []


async def _assert_nothing_left(client: httpx.AsyncClient, api: LiveApi) -> None:
    listing = await client.get("/v1/tasks", headers=api.auth("alice"))
    assert listing.json()["data"] == []
    assert _inputs(Path(api.settings.storage.url.removeprefix("file://"))) == []


@pytest.mark.parametrize("name", sorted(HOSTILE))
async def test_a_hostile_upload_is_refused_with_a_4xx_and_leaves_nothing_behind(
        live: LiveApi, name: str) -> None:
    payload, status = HOSTILE[name]
    async with httpx.AsyncClient(base_url=live.base_url) as c:
        r = await c.post("/v1/tasks", headers=live.auth("alice"),
                         data={"prompt": "animate this", "model": "tiny-ti2v"},
                         files={"image": ("photo.jpg", payload, "image/jpeg")})
        assert r.status_code == status, (name, r.text)
        assert r.json()["error"]["field"] == "image"
        await _assert_nothing_left(c, live)


async def test_a_valid_jpeg_carrying_a_zip_tail_is_stored_only_as_a_clean_png(
        live: LiveApi) -> None:
    """A true JPEG/ZIP polyglot is a valid JPEG: it is accepted, but what is stored is a
    fresh PNG of the pixels; the ZIP (and its HTML) does not survive re-encoding."""
    polyglot = jpeg_bytes(64, 64) + _zip_payload()
    assert zipfile.is_zipfile(io.BytesIO(polyglot))
    async with httpx.AsyncClient(base_url=live.base_url) as c:
        r = await c.post("/v1/tasks", headers=live.auth("alice"),
                         data={"prompt": "animate this", "model": "tiny-ti2v"},
                         files={"image": ("photo.jpg", polyglot, "image/jpeg")})
        assert r.status_code == 202, r.text
    stored = _inputs(Path(live.settings.storage.url.removeprefix("file://")))
    assert len(stored) == 1 and stored[0].name == "image.png"
    data = stored[0].read_bytes()
    assert data.startswith(b"\x89PNG") and b"PK\x03\x04" not in data and b"<script" not in data
    assert not zipfile.is_zipfile(io.BytesIO(data))


async def _post_streaming(port: int, headers: list[str], *, total: int,
                          chunked: bool) -> tuple[int, int]:
    """Send a body of ``total`` bytes in 256 KiB pieces over a raw socket, stopping as soon
    as the server answers; (status, bytes sent)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = "POST /v1/tasks HTTP/1.1\r\nHost: 127.0.0.1\r\n" + "".join(
        h + "\r\n" for h in headers)
    head += "Transfer-Encoding: chunked\r\n" if chunked else f"Content-Length: {total}\r\n"
    writer.write((head + "\r\n").encode())
    piece = b"\x89PNG\r\n\x1a\n" + b"\x00" * (256 * 1024 - 8)
    sent = 0
    answer = asyncio.ensure_future(reader.readline())
    try:
        while sent < total and not answer.done():
            data = (f"{len(piece):x}\r\n".encode() + piece + b"\r\n") if chunked else piece
            writer.write(data)
            try:
                await asyncio.wait_for(writer.drain(), 5)
            except (ConnectionError, TimeoutError):
                break
            sent += len(piece)
            await asyncio.sleep(0)
        status_line = await asyncio.wait_for(answer, 30)
    finally:
        if not answer.done():
            answer.cancel()
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    return int(status_line.split()[1]), sent


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_a_100_mb_body_is_refused_with_413_without_being_read_to_the_end(
        live: LiveApi, chunked: bool) -> None:
    port = int(live.base_url.rsplit(":", 1)[1])
    headers = [live.auth("alice")["Authorization"].join(["Authorization: ", ""]),
               "Content-Type: multipart/form-data; boundary=xyz"]
    status, sent = await _post_streaming(port, headers, total=HUNDRED_MB, chunked=chunked)
    assert status == 413
    # The limit is 20 MiB; the server stopped reading far below 100 MB.
    assert sent < HUNDRED_MB // 2, sent
    async with httpx.AsyncClient(base_url=live.base_url) as c:
        await _assert_nothing_left(c, live)
