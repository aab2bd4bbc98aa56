"""API keys, stream tokens and webhook endpoint secrets never appear in the logs,
whatever the request does.

The role's own logging (``vidmaas.logs.configure_logging``, JSON and text, at DEBUG) is
captured while a real server handles a full cycle: good and bad keys, malformed
headers, 404s, 422s, 413s, an SSE stream and a media URL with ``?token=``, a
WebSocket, and unexpected server errors (Redis down) whose tracebacks are logged.
"""

from __future__ import annotations

import io
import logging

import httpx
import pytest
import websockets
from websockets.exceptions import ConnectionClosed

from tests.security.live import LiveApi, live_api
from tests.support.services import free_port
from vidmaas.config import Settings
from vidmaas.logs import configure_logging

FOREIGN_KEY = "vmk_" + "Zz9" * 14


@pytest.fixture(params=["json", "text"])
def captured(request: pytest.FixtureRequest) -> io.StringIO:
    root = logging.getLogger()
    before_level, before_handlers = root.level, list(root.handlers)
    stream = io.StringIO()
    handler = configure_logging(level="DEBUG", json=request.param == "json", stream=stream)
    yield stream
    root.removeHandler(handler)
    root.handlers[:] = before_handlers
    root.setLevel(before_level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        lg = logging.getLogger(name)
        for h in list(lg.handlers):
            if h is handler:
                lg.removeHandler(h)


async def _full_cycle(api: LiveApi) -> list[str]:
    """Exercise the API; return every secret the requests carried."""
    secrets = [*api.keys.values(), FOREIGN_KEY]
    async with httpx.AsyncClient(base_url=api.base_url) as c:
        alice = api.auth("alice")
        token = (await c.post("/v1/auth/stream-token", headers=alice)).json()["token"]
        secrets.append(token)
        task = (await c.post("/v1/tasks", headers=alice,
                             json={"prompt": "x", "model": "tiny-t2v"})).json()["id"]
        for headers in (alice, api.auth("root"), {"Authorization": f"Bearer {FOREIGN_KEY}"},
                        {"Authorization": f"Basic {FOREIGN_KEY}"},
                        {"Authorization": FOREIGN_KEY}, {"X-Api-Key": FOREIGN_KEY}):
            await c.get(f"/v1/tasks/{task}", headers=headers)
            await c.get("/v1/tasks/" + "t" + "0" * 25, headers=headers)
            await c.post("/v1/tasks", headers=headers, json={"prompt": "", "model": "nope"})
            await c.post("/v1/tasks", headers=headers, content=b"{not json")
            await c.get(f"/v1/tasks?cursor={FOREIGN_KEY}", headers=headers)
        await c.get(f"/v1/tasks/{task}/video?token={token}")
        await c.get(f"/v1/tasks/{task}/poster?token={FOREIGN_KEY}")
        await c.post(f"/v1/tasks/{task}/cancel", headers=alice)
        # A webhook endpoint's signing secret is a secret too.
        made = (await c.post("/v1/webhook-endpoints", headers=alice,
                             json={"url": "http://93.184.216.34/hooks"})).json()
        secrets.append(made["secret"])
        for method, suffix in (("GET", ""), ("PATCH", ""), ("POST", "/test"),
                               ("GET", "/deliveries")):
            await c.request(method, f"/v1/webhook-endpoints/{made['id']}{suffix}",
                            headers=alice, json={"enabled": True} if method == "PATCH" else None)
        async with c.stream("GET", f"/v1/tasks/{task}/events?token={token}") as r:
            async for _ in r.aiter_bytes():
                break
    for url in (f"{api.ws_url}/v1/events?token={token}",
                f"{api.ws_url}/v1/tasks/{task}/events?token={FOREIGN_KEY}"):
        try:
            async with websockets.connect(url, open_timeout=10) as ws:
                await ws.close()
        except ConnectionClosed:
            pass
    return secrets


def _assert_absent(text: str, secrets: list[str]) -> None:
    assert text, "nothing was logged: the capture is not working"
    for secret in secrets:
        body = secret.split("_", 1)[1]
        assert body not in text, f"a secret starting {secret[:7]} appears in the logs"
        assert body[:16] not in text


async def test_no_key_or_token_reaches_the_logs_during_a_full_request_cycle(
        captured: io.StringIO, live_settings: Settings) -> None:
    # A closed SSE connection is noticed at the next ping; keep shutdown quick.
    live_settings.api.stream_ping_interval_s = 0.5
    with live_api(live_settings) as api:
        secrets = await _full_cycle(api)
    text = captured.getvalue()
    # The access log did record the URLs that carried a token: redacted, not absent.
    assert "?token=" in text
    _assert_absent(text, secrets)


async def test_no_key_reaches_the_logs_when_requests_fail_with_server_errors(
        captured: io.StringIO, live_settings: Settings) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    settings = live_settings.model_copy(update={"redis": live_settings.redis.model_copy(
        update={"url": dead})})
    with live_api(settings) as api:
        # A fresh connection per request: after an unhandled error the server drops it.
        for method, path, body in (("POST", "/v1/auth/stream-token", None),
                                   ("POST", "/v1/tasks", {"prompt": "x", "model": "tiny-t2v"}),
                                   ("GET", "/readyz", None)):
            async with httpx.AsyncClient(base_url=api.base_url) as c:
                r = await c.request(method, path, headers=api.auth("alice"), json=body)
                if path == "/v1/auth/stream-token":
                    assert r.status_code >= 500
    text = captured.getvalue()
    assert "Traceback" in text or '"exc"' in text, "the server error was not logged"
    _assert_absent(text, [*api.keys.values()])
