"""Hostile bodies over real HTTP: each is refused with its code on both creation routes,
nothing is created, and no route at all answers a 5xx to any of them."""

from __future__ import annotations

import logging
import secrets

import httpx
import pytest

from tests.security.corpus import Hostile, corpus, ids
from tests.security.live import LiveApi
from tests.security.test_access_matrix import served_routes

ROUTES = {"/v1/tasks": ("image", 422), "/v1/videos": ("input_reference", 400)}
TASKS_CORPUS = corpus(file_field="image")
VIDEOS_CORPUS = corpus(file_field="input_reference")


def _code_and_field(body: dict[str, dict[str, str | None]]) -> tuple[str | None, str | None]:
    err = body["error"]
    return err["code"], err.get("field", err.get("param"))


def _check(api: LiveApi, path: str, entries: list[Hostile]) -> None:
    status = ROUTES[path][1]
    wrong = []
    with httpx.Client(base_url=api.base_url, timeout=30) as client:
        for h in entries:
            r = client.post(path, content=h.body,
                            headers={**api.auth("alice"), "Content-Type": h.content_type})
            got = (r.status_code, *_code_and_field(r.json()))
            want = (status, h.code, h.field if h.field is not None else got[2])
            if got != want:
                wrong.append(f"{h.name}: got {got}, want {want}: {r.text[:160]}")
        listing = client.get("/v1/tasks", headers=api.auth("alice")).json()
    assert not wrong, "\n".join(wrong)
    assert listing["data"] == [], "a hostile body created a task"


def test_every_hostile_body_is_refused_with_its_code_on_the_native_route(
        live: LiveApi) -> None:
    _check(live, "/v1/tasks", TASKS_CORPUS)


def test_every_hostile_body_is_refused_with_its_code_on_the_openai_route(
        live: LiveApi) -> None:
    _check(live, "/v1/videos", VIDEOS_CORPUS)


@pytest.mark.parametrize("entry", TASKS_CORPUS[:3], ids=ids(TASKS_CORPUS[:3]))
def test_a_body_nested_thousands_deep_is_a_4xx_not_an_internal_error(
        live: LiveApi, entry: Hostile) -> None:
    for path in ROUTES:
        r = httpx.post(f"{live.base_url}{path}", content=entry.body, timeout=30,
                       headers={**live.auth("alice"), "Content-Type": entry.content_type})
        assert r.status_code == ROUTES[path][1], r.text
        assert _code_and_field(r.json())[0] == "json_too_deep"


def test_no_route_answers_a_server_error_to_any_hostile_body(
        live: LiveApi, caplog: pytest.LogCaptureFixture) -> None:
    bodies = {h.name: h for h in TASKS_CORPUS + VIDEOS_CORPUS}
    some_id = "t" + secrets.token_hex(13)
    routes = sorted({(m, p) for m, p in served_routes(live.app) if m != "WS"})
    assert len(routes) >= 15
    failures = []
    caplog.set_level(logging.ERROR)
    with httpx.Client(base_url=live.base_url, timeout=30) as client:
        for method, template in routes:
            path = template.replace("{id}", some_id)
            for h in bodies.values():
                for auth in (live.auth("alice"), {}):
                    r = client.request(method, path, content=h.body,
                                       headers={**auth, "Content-Type": h.content_type})
                    if r.status_code >= 500:
                        failures.append(f"{method} {path} {h.name}: {r.status_code} {r.text[:80]}")
    assert not failures, "\n".join(failures[:20])
    unhandled = [rec.getMessage() for rec in caplog.records if "unhandled" in rec.getMessage()]
    assert not unhandled


RERUN_VALID = {"json-empty", "json-whitespace"}
"""No body is a rerun's documented way to say "the same again"."""


def _answers(api: LiveApi, path: str, entries: list[Hostile]) -> dict[str, tuple[int, str]]:
    with httpx.Client(base_url=api.base_url, timeout=30) as client:
        out = {}
        for h in entries:
            r = client.post(path, content=h.body,
                            headers={**api.auth("alice"), "Content-Type": h.content_type})
            out[h.name] = (r.status_code, str(r.json()["error"]["code"]))
    return out


def _made(api: LiveApi, path: str, body: dict[str, str]) -> str:
    r = httpx.post(api.base_url + path, json=body, headers=api.auth("alice"), timeout=30)
    assert r.status_code < 300, r.text
    return str(r.json()["id"])


def test_every_hostile_body_on_a_rerun_or_a_remix_is_a_4xx_and_creates_nothing(
        live: LiveApi) -> None:
    task = _made(live, "/v1/tasks", {"prompt": "source", "model": "tiny-t2v"})
    video = _made(live, "/v1/videos", {"prompt": "source", "model": "tiny-t2v"})
    wrong = []
    for path, entries, status in (
            (f"/v1/tasks/{task}/rerun", [h for h in TASKS_CORPUS if h.name not in RERUN_VALID],
             422),
            (f"/v1/videos/{video}/remix", VIDEOS_CORPUS, 400)):
        for h in entries:
            got = _answers(live, path, [h])[h.name]
            if h.content_type != "application/json":
                want = (415, "unsupported_content_type")  # JSON only
            elif path.endswith("/remix") and h.code == "model_unavailable":
                want = (409, "video_not_completed")  # remix ignores model: the source decides
            else:
                want = (status, h.code)  # decoded exactly as a create's body
            if got != want:
                wrong.append(f"{path} {h.name}: got {got}, want {want}")
    assert not wrong, "\n".join(wrong)
    with httpx.Client(base_url=live.base_url, timeout=30) as client:
        tasks = client.get("/v1/tasks", headers=live.auth("alice")).json()["data"]
    assert {t["id"] for t in tasks} == {task, video}, "a hostile body created a task"
