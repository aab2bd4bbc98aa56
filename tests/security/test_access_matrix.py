"""Every route × no key / bad key / another user's key / the owner / an admin.

The table below classifies every route the app serves (HTTP and WebSocket); a route
the table does not know fails ``test_every_route_the_app_serves_is_classified``, so a
new endpoint cannot ship without a decision about who may call it. For task routes,
another user's task must be indistinguishable from a missing one: the same status and
the same body (or the same WebSocket close code).
"""

from __future__ import annotations

import asyncio
import enum
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
import websockets
from websockets.exceptions import ConnectionClosed

from tests.security.live import LiveApi
from vidmaas.api.app import create_app
from vidmaas.config import Settings
from vidmaas.domain.status import TaskStatus
from vidmaas.services import Services

MISSING_TASK = "t" + "0" * 25
MISSING_ENDPOINT = "we_" + "0" * 24
PUBLIC_HOOK = "http://93.184.216.34/hooks"
"""A public address named literally: registered without a resolver, never called."""
BAD_KEY = "vmk_" + "A" * 40


class Kind(enum.Enum):
    PUBLIC = "anyone, no key"
    USER = "any authenticated user, no task involved"
    TASK = "the owner or an admin; others get exactly the missing-task answer"
    TASK_MEDIA = "like TASK, and a ?token= stream token is accepted too"
    WS_USER = "WebSocket, any authenticated user (key or token)"
    WS_TASK = "WebSocket on one task: owner or admin; 4404 for others, like a missing one"
    VIDEO = "OpenAI video by id: the owner or an admin, others like a missing one"
    VIDEO_MEDIA = "like VIDEO, and a ?token= stream token is accepted too"
    ADMIN = "admins only: no key or a bad one 401, any other user 403 admin_required"
    ENDPOINT = "a webhook endpoint: its owner only; anyone else, admins too, like a missing one"


# (method, path with every {param} written {id}) → who may call it.
ROUTES: dict[tuple[str, str], Kind] = {
    ("GET", "/openapi.json"): Kind.PUBLIC,
    ("GET", "/docs"): Kind.PUBLIC,
    ("GET", "/docs/oauth2-redirect"): Kind.PUBLIC,
    ("GET", "/redoc"): Kind.PUBLIC,
    ("GET", "/healthz"): Kind.PUBLIC,
    ("GET", "/readyz"): Kind.PUBLIC,
    ("GET", "/metrics"): Kind.PUBLIC,
    ("GET", "/"): Kind.PUBLIC,
    ("GET", "/static/{id}"): Kind.PUBLIC,
    ("GET", "/v1/models"): Kind.PUBLIC,
    ("GET", "/v1/me"): Kind.USER,
    ("POST", "/v1/auth/stream-token"): Kind.USER,
    ("POST", "/v1/tasks"): Kind.USER,
    ("GET", "/v1/tasks"): Kind.USER,
    ("GET", "/v1/tasks/{id}"): Kind.TASK,
    ("POST", "/v1/tasks/{id}/cancel"): Kind.TASK,
    ("POST", "/v1/tasks/{id}/rerun"): Kind.TASK,
    ("GET", "/v1/tasks/{id}/preview"): Kind.TASK,
    ("GET", "/v1/tasks/{id}/webhooks"): Kind.TASK,
    ("GET", "/v1/tasks/{id}/video"): Kind.TASK_MEDIA,
    ("GET", "/v1/tasks/{id}/poster"): Kind.TASK_MEDIA,
    ("GET", "/v1/tasks/{id}/spritesheet"): Kind.TASK_MEDIA,
    ("GET", "/v1/tasks/{id}/events"): Kind.TASK_MEDIA,
    ("WS", "/v1/tasks/{id}/events"): Kind.WS_TASK,
    ("WS", "/v1/events"): Kind.WS_USER,
    # The OpenAI-compatible Videos API.
    ("POST", "/v1/videos"): Kind.USER,
    ("GET", "/v1/videos"): Kind.USER,
    ("GET", "/v1/videos/{id}"): Kind.VIDEO,
    ("GET", "/v1/videos/{id}/content"): Kind.VIDEO_MEDIA,
    ("DELETE", "/v1/videos/{id}"): Kind.VIDEO,
    ("POST", "/v1/videos/{id}/remix"): Kind.VIDEO,
    # Webhook endpoints: a user's own, nobody else's.
    ("POST", "/v1/webhook-endpoints"): Kind.USER,
    ("GET", "/v1/webhook-endpoints"): Kind.USER,
    ("GET", "/v1/webhook-endpoints/{id}"): Kind.ENDPOINT,
    ("PATCH", "/v1/webhook-endpoints/{id}"): Kind.ENDPOINT,
    ("DELETE", "/v1/webhook-endpoints/{id}"): Kind.ENDPOINT,
    ("POST", "/v1/webhook-endpoints/{id}/test"): Kind.ENDPOINT,
    ("GET", "/v1/webhook-endpoints/{id}/deliveries"): Kind.ENDPOINT,
    # Usage: the caller's own (other users' for admins, checked in tests/api).
    ("GET", "/v1/usage"): Kind.USER,
    # The admin API.
    ("POST", "/v1/admin/users"): Kind.ADMIN,
    ("GET", "/v1/admin/users"): Kind.ADMIN,
    ("GET", "/v1/admin/users/{id}"): Kind.ADMIN,
    ("PATCH", "/v1/admin/users/{id}"): Kind.ADMIN,
    ("POST", "/v1/admin/users/{id}/disable"): Kind.ADMIN,
    ("POST", "/v1/admin/users/{id}/enable"): Kind.ADMIN,
    ("POST", "/v1/admin/users/{id}/keys"): Kind.ADMIN,
    ("GET", "/v1/admin/users/{id}/keys"): Kind.ADMIN,
    ("DELETE", "/v1/admin/keys/{id}"): Kind.ADMIN,
    ("GET", "/v1/admin/queue"): Kind.ADMIN,
}


def served_routes(app: object) -> Iterator[tuple[str, str]]:
    """(method, normalised path) of every route ``app`` serves, WebSockets as ``WS``."""
    def walk(routes: list[object]) -> Iterator[tuple[str, str]]:
        for route in routes:
            contexts = getattr(route, "effective_route_contexts", None)
            if contexts is not None:  # an included router (FastAPI ≥ 0.120)
                for ctx in contexts():
                    original = ctx.original_route
                    path = ctx.path or (ctx.frontend_prefix + original.path)
                    if "WebSocket" in type(original).__name__:
                        yield "WS", path
                    else:
                        for m in sorted(ctx.methods or ()):
                            yield m, path
                continue
            path = str(getattr(route, "path", ""))
            if "WebSocket" in type(route).__name__:
                yield "WS", path
            else:
                for m in sorted(getattr(route, "methods", None) or ()):
                    yield m, path
            sub = getattr(route, "routes", None)
            if sub:
                yield from walk(list(sub))

    for method, path in walk(list(app.routes)):  # type: ignore[attr-defined]
        if method == "HEAD":
            continue
        yield method, re.sub(r"\{[^}]+\}", "{id}", path)


def test_every_route_the_app_serves_is_classified() -> None:
    app = create_app(Settings())
    served = set(served_routes(app))
    unknown = sorted(served - set(ROUTES))
    assert not unknown, f"routes missing from the security table: {unknown}"
    # The core routes must really be there (the walk itself must not silently miss any).
    core = {k for k in ROUTES if not k[1].startswith("/v1/videos")}
    assert core <= served, sorted(core - served)


# ---------------------------------------------------------------- a world to probe


@dataclass
class World:
    api: LiveApi
    queued: str
    """alice's queued task."""
    completed: str
    """alice's completed task, with a video, a poster and its last live preview."""
    tokens: dict[str, str]
    video: str | None
    """alice's OpenAI video id, when /v1/videos is served."""
    endpoint: str
    """alice's webhook endpoint."""
    endpoint_secret: str


async def _create(client: httpx.AsyncClient, api: LiveApi, user: str = "alice") -> str:
    r = await client.post("/v1/tasks", json={"prompt": "a secret prompt of alice",
                                             "model": "tiny-t2v"}, headers=api.auth(user))
    assert r.status_code == 202, r.text
    return str(r.json()["id"])


async def _complete(settings: Settings, task_id: str) -> None:
    from tests.api.test_tasks_api import jpeg_bytes
    from vidmaas.storage.base import preview_key

    svc = Services.open(settings)
    try:
        await svc.store.put_bytes(f"outputs/{task_id}/video.mp4", b"\x00\x00\x00\x18ftypmp42x",
                                  content_type="video/mp4")
        await svc.store.put_bytes(f"outputs/{task_id}/poster.jpg", jpeg_bytes(),
                                  content_type="image/jpeg")
        await svc.store.put_bytes(preview_key(task_id), jpeg_bytes(), content_type="image/jpeg")
        await svc.store.put_bytes(f"outputs/{task_id}/spritesheet.jpg", jpeg_bytes(),
                                  content_type="image/jpeg")
        lc = svc.lifecycle
        await lc.transition(task_id=task_id, to=TaskStatus.DISPATCHING,
                            expected=TaskStatus.QUEUED)
        await lc.transition(task_id=task_id, to=TaskStatus.RUNNING,
                            expected=TaskStatus.DISPATCHING)
        await lc.finish(task_id=task_id, to=TaskStatus.COMPLETED, expected=TaskStatus.RUNNING,
                        fields={"video_key": f"outputs/{task_id}/video.mp4",
                                "poster_key": f"outputs/{task_id}/poster.jpg",
                                "progress": 100.0, "result": {
                                    "width": 64, "height": 64,
                                    "spritesheet_key": f"outputs/{task_id}/spritesheet.jpg",
                                    "spritesheet": {"columns": 1, "rows": 1, "count": 1,
                                                    "tile_width": 64, "tile_height": 64}}})
    finally:
        await svc.close()


@pytest.fixture
async def world(live: LiveApi) -> World:
    async with httpx.AsyncClient(base_url=live.base_url) as c:
        queued = await _create(c, live)
        completed = await _create(c, live)
        await _complete(live.settings, completed)
        tokens = {}
        for user in ("alice", "bob", "root"):
            r = await c.post("/v1/auth/stream-token", headers=live.auth(user))
            tokens[user] = r.json()["token"]
        video = None
        if ("POST", "/v1/videos") in set(served_routes(live.app)):
            r = await c.post("/v1/videos", json={"prompt": "alice's video", "model": "tiny-t2v"},
                             headers=live.auth("alice"))
            assert r.status_code < 300, r.text
            video = str(r.json()["id"])
        r = await c.post("/v1/webhook-endpoints", json={"url": PUBLIC_HOOK},
                         headers=live.auth("alice"))
        assert r.status_code == 201, r.text
    return World(api=live, queued=queued, completed=completed, tokens=tokens, video=video,
                 endpoint=str(r.json()["id"]), endpoint_secret=str(r.json()["secret"]))


def _http_routes(app: object, *kinds: Kind) -> list[tuple[str, str]]:
    return sorted((m, p) for m, p in set(served_routes(app))
                  if m != "WS" and ROUTES.get((m, p)) in kinds)


def _url(path: str, ident: str) -> str:
    return path.replace("{id}", ident)


# ---------------------------------------------------------------- HTTP


async def test_protected_routes_answer_401_without_a_key_or_with_a_bad_key(world: World) -> None:
    api = world.api
    routes = _http_routes(api.app, Kind.USER, Kind.TASK, Kind.TASK_MEDIA, Kind.VIDEO,
                          Kind.VIDEO_MEDIA, Kind.ENDPOINT)
    assert routes
    bodies = set()
    async with httpx.AsyncClient(base_url=api.base_url) as c:
        for method, path in routes:
            ident = world.video if path.startswith("/v1/videos/") else world.completed
            if path.startswith("/v1/webhook-endpoints/"):
                ident = world.endpoint
            for headers in ({}, {"Authorization": f"Bearer {BAD_KEY}"},
                            {"Authorization": "Basic YWxpY2U6c2VjcmV0"},
                            {"Authorization": "Bearer"}):
                r = await c.request(method, _url(path, ident or MISSING_TASK), headers=headers,
                                    json={"prompt": "x"} if method == "POST" else None)
                assert r.status_code == 401, (method, path, headers, r.text)
                assert r.headers["www-authenticate"] == "Bearer"
                assert r.json()["error"]["code"] in ("unauthenticated", "invalid_api_key")
                assert world.completed not in r.text and "alice" not in r.text
                assert BAD_KEY not in r.text
                bodies.add(r.json()["error"]["code"])
            # A stream token is for media and stream URLs only.
            r = await c.request(method, _url(path, ident or MISSING_TASK) + "?token="
                                + world.tokens["alice"])
            expected_ok = ROUTES[(method, path)] in (Kind.TASK_MEDIA, Kind.VIDEO_MEDIA)
            assert (r.status_code != 401) == expected_ok, (method, path, r.status_code)
            bogus = await c.request(method, _url(path, ident or MISSING_TASK) + "?token=st_nope")
            assert bogus.status_code == 401, (method, path)
    assert bodies <= {"unauthenticated", "invalid_api_key"}


async def test_someone_elses_task_is_indistinguishable_from_a_missing_one(world: World) -> None:
    api = world.api
    routes = _http_routes(api.app, Kind.TASK, Kind.TASK_MEDIA, Kind.VIDEO, Kind.VIDEO_MEDIA)
    async with httpx.AsyncClient(base_url=api.base_url) as c:
        for method, path in routes:
            if ROUTES[(method, path)] in (Kind.VIDEO, Kind.VIDEO_MEDIA):
                if world.video is None:
                    continue
                theirs_id, missing_id = world.video, "video_" + "0" * 24
            else:
                theirs_id, missing_id = world.completed, MISSING_TASK
            for ident in (theirs_id, world.queued if theirs_id == world.completed else theirs_id):
                creds: list[tuple[dict[str, str], str]] = [(api.auth("bob"), "")]
                if ROUTES[(method, path)] in (Kind.TASK_MEDIA, Kind.VIDEO_MEDIA):
                    creds.append(({}, "?token=" + world.tokens["bob"]))
                for headers, query in creds:
                    theirs = await c.request(method, _url(path, ident) + query, headers=headers)
                    gone = await c.request(method, _url(path, missing_id) + query,
                                           headers=headers)
                    assert theirs.status_code == gone.status_code == 404, (method, path)
                    assert theirs.content == gone.content, (method, path)
                    assert ident not in theirs.text and "alice" not in theirs.text
        # Listings are scoped: bob sees none of alice's tasks, even filtered by status.
        for query in ("", "?status=queued", "?status=completed", f"?cursor={MISSING_TASK}"):
            r = await c.get("/v1/tasks" + query, headers=api.auth("bob"))
            assert r.status_code == 200 and r.json()["data"] == [], query
        # Alice's tasks are still as they were: bob's cancel did nothing.
        r = await c.get(f"/v1/tasks/{world.queued}", headers=api.auth("alice"))
        assert r.json()["status"] == "queued"


async def test_the_owner_and_an_admin_reach_every_task_route(world: World) -> None:
    api = world.api
    routes = _http_routes(api.app, Kind.TASK, Kind.TASK_MEDIA)
    async with httpx.AsyncClient(base_url=api.base_url) as c:
        for user in ("alice", "root"):
            for method, path in routes:
                ident = world.completed
                if path.endswith("/cancel"):
                    ident = await _create(c, api)  # a fresh queued one to cancel
                headers = api.auth(user)
                if path.endswith("/events"):
                    headers = {**headers, "Accept": "text/event-stream"}
                r = await c.request(method, _url(path, ident), headers=headers, timeout=30)
                ok = (202,) if path.endswith("/rerun") else (200, 307)  # a rerun is a create
                assert r.status_code in ok, (user, method, path, r.status_code, r.text)
        # The admin sees alice's tasks in the list; alice sees her own; media by token too.
        listing = await c.get("/v1/tasks", headers=api.auth("root"))
        assert world.queued in {t["id"] for t in listing.json()["data"]}
        for which in ("video", "poster", "spritesheet"):
            r = await c.get(f"/v1/tasks/{world.completed}/{which}?token={world.tokens['alice']}")
            assert r.status_code in (200, 307)


async def test_public_routes_answer_without_a_key_and_leak_no_task(world: World) -> None:
    api = world.api
    async with httpx.AsyncClient(base_url=api.base_url) as c:
        for method, path in _http_routes(api.app, Kind.PUBLIC):
            url = _url(path, "app.js" if path.startswith("/static/") else "x")
            r = await c.request(method, url)
            assert r.status_code < 500, (path, r.status_code)
            assert r.status_code != 401, path
            for secret in (world.queued, world.completed, "a secret prompt of alice",
                           *api.keys.values(), *world.tokens.values()):
                assert secret not in r.text, (path, secret[:8])


async def test_admin_routes_refuse_everyone_but_admins(world: World) -> None:
    api = world.api
    routes = _http_routes(api.app, Kind.ADMIN)
    assert len(routes) >= 10
    async with httpx.AsyncClient(base_url=api.base_url) as c:
        made = await c.post("/v1/admin/users", json={"name": "matrix-target"},
                            headers=api.auth("root"))
        assert made.status_code == 201, made.text
        user_id, key_id = made.json()["user"]["id"], str(made.json()["key"]["id"])
        bodies = {"POST /v1/admin/users": {"name": "matrix-made"},
                  "PATCH /v1/admin/users/{id}": {"weight": 2},
                  "POST /v1/admin/users/{id}/keys": {"name": "extra"}}

        def url(path: str) -> str:
            return _url(path, key_id if path.startswith("/v1/admin/keys/") else user_id)

        for method, path in routes:
            body = bodies.get(f"{method} {path}")
            for headers in ({}, {"Authorization": f"Bearer {BAD_KEY}"},
                            {"Authorization": "Bearer"}):
                r = await c.request(method, url(path), headers=headers, json=body)
                assert r.status_code == 401, (method, path, headers, r.text)
                assert r.json()["error"]["code"] in ("unauthenticated", "invalid_api_key")
            r = await c.request(method, url(path) + "?token=" + world.tokens["root"],
                                json=body)
            assert r.status_code == 401, (method, path, "stream token")
            for user in ("alice", "bob"):
                r = await c.request(method, url(path), headers=api.auth(user), json=body)
                assert r.status_code == 403, (user, method, path, r.text)
                assert r.json()["error"]["code"] == "admin_required"
                assert "secret" not in r.text and user_id not in r.text
        # The admin reaches every one of them (DELETE last: it revokes the key).
        for method, path in sorted(routes, key=lambda r: r[0] == "DELETE"):
            r = await c.request(method, url(path), headers=api.auth("root"),
                                json=bodies.get(f"{method} {path}"))
            assert r.status_code in (200, 201), (method, path, r.text)
        # A key's secret appears in the answer that made it, never again.
        secret = made.json()["key"]["secret"]
        for method, path in routes:
            if method == "GET":
                r = await c.get(url(path), headers=api.auth("root"))
                assert secret not in r.text and "key_hash" not in r.text, path
        # Users cannot read others' usage either.
        r = await c.get(f"/v1/usage?user_id={user_id}", headers=api.auth("alice"))
        assert r.status_code == 403 and r.json()["error"]["code"] == "admin_required"
        r = await c.get("/v1/usage?all=true", headers=api.auth("alice"))
        assert r.status_code == 403


async def test_someone_elses_webhook_endpoint_is_indistinguishable_from_a_missing_one(
        world: World) -> None:
    api = world.api
    routes = _http_routes(api.app, Kind.ENDPOINT)
    assert len(routes) == 5
    async with httpx.AsyncClient(base_url=api.base_url) as c:
        for user in ("bob", "root"):
            for method, path in routes:
                body = {"enabled": False} if method == "PATCH" else None
                theirs = await c.request(method, _url(path, world.endpoint), json=body,
                                         headers=api.auth(user))
                gone = await c.request(method, _url(path, MISSING_ENDPOINT), json=body,
                                       headers=api.auth(user))
                assert theirs.status_code == gone.status_code == 404, (user, method, path)
                assert theirs.content == gone.content, (user, method, path)
                assert world.endpoint not in theirs.text and PUBLIC_HOOK not in theirs.text
            listing = await c.get("/v1/webhook-endpoints", headers=api.auth(user))
            assert listing.status_code == 200 and world.endpoint not in listing.text
        # The owner reaches every one (DELETE last), and the secret is never shown again.
        for method, path in sorted(routes, key=lambda r: r[0] == "DELETE"):
            body = {"description": "checked"} if method == "PATCH" else None
            r = await c.request(method, _url(path, world.endpoint), json=body,
                                headers=api.auth("alice"))
            assert r.status_code in (200, 202), (method, path, r.text)
            assert world.endpoint_secret not in r.text, (method, path)


# ---------------------------------------------------------------- WebSocket


async def _ws_outcome(url: str, headers: dict[str, str] | None = None, *,
                      wait_s: float = 10.0) -> tuple[str, object]:
    """("close", code) if the server closes at once, else ("message", first message)."""
    try:
        async with websockets.connect(url, additional_headers=headers or {},
                                      open_timeout=10) as ws:
            try:
                raw = await asyncio.wait_for(ws.recv(), wait_s)
            except TimeoutError:
                return "open", None
            return "message", json.loads(raw)
    except ConnectionClosed as e:
        return "close", e.rcvd.code if e.rcvd else None


async def test_websockets_refuse_missing_bad_and_foreign_credentials(world: World) -> None:
    api = world.api
    served = set(served_routes(api.app))
    ws_routes = sorted(p for m, p in served if m == "WS")
    assert ws_routes and all(ROUTES[("WS", p)] in (Kind.WS_TASK, Kind.WS_USER)
                             for p in ws_routes)
    for path in ws_routes:
        url = api.ws_url + _url(path, world.completed)
        for headers, query in (({}, ""), ({"Authorization": f"Bearer {BAD_KEY}"}, ""),
                               ({}, "?token=st_nope")):
            assert await _ws_outcome(url + query, headers) == ("close", 4401), (path, headers)
        if ROUTES[("WS", path)] is Kind.WS_TASK:
            missing = api.ws_url + _url(path, MISSING_TASK)
            for creds in ((api.auth("bob"), ""), ({}, "?token=" + world.tokens["bob"])):
                theirs = await _ws_outcome(url + creds[1], creds[0])
                gone = await _ws_outcome(missing + creds[1], creds[0])
                assert theirs == gone == ("close", 4404), path
            for creds in ((api.auth("alice"), ""), (api.auth("root"), ""),
                          ({}, "?token=" + world.tokens["alice"])):
                kind, first = await _ws_outcome(url + creds[1], creds[0])
                assert kind == "message", (path, creds, first)
                assert isinstance(first, dict) and first.get("task_id", world.completed) \
                    == world.completed
        else:
            for creds in ((api.auth("bob"), ""), ({}, "?token=" + world.tokens["alice"])):
                kind, first = await _ws_outcome(url + creds[1], creds[0], wait_s=2)
                assert kind in ("open", "message"), (path, kind, first)
                if kind == "message" and creds[0] == api.auth("bob"):
                    assert world.completed not in json.dumps(first)


async def test_the_owner_and_an_admin_reach_every_video_route(world: World) -> None:
    api = world.api
    if world.video is None:
        pytest.skip("/v1/videos is not served")
    routes = _http_routes(api.app, Kind.VIDEO, Kind.VIDEO_MEDIA)
    async with httpx.AsyncClient(base_url=api.base_url) as c:
        for user in ("alice", "root"):
            # DELETE last: it cancels the video.
            for method, path in sorted(routes, key=lambda r: r[0] == "DELETE"):
                body = {"prompt": "remixed"} if path.endswith("/remix") else None
                r = await c.request(method, _url(path, world.video), headers=api.auth(user),
                                    json=body)
                if path.endswith(("/content", "/remix")):
                    assert r.status_code == 409, (user, path, r.text)  # not ready, but found
                else:
                    assert r.status_code == 200, (user, method, path, r.text)
        listing = await c.get("/v1/videos", headers=api.auth("bob"))
        assert world.video not in listing.text
