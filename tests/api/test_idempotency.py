"""``Idempotency-Key``: the same key with the same request returns the same task; the same
key with a different request is refused (``idempotency_key_reused``), also when the two
race; keys are per user. On SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx

from tests.api.conftest import Api
from tests.api.test_tasks_api import png_bytes

BODY = {"prompt": "a kite over a hill", "model": "tiny-t2v", "size": "64*64", "steps": 3}


def _key(api: Api, user: str, key: str) -> dict[str, str]:
    return {**api.auth(user), "Idempotency-Key": key}


async def _tasks(api: Api, user: str = "alice") -> list[dict[str, Any]]:
    r = await api.client.get("/v1/tasks", headers=api.auth(user))
    return list(r.json()["data"])


def _reused(r: httpx.Response, status: int = 422) -> None:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == "idempotency_key_reused"
    assert err.get("field", err.get("param")) == "Idempotency-Key"


async def test_a_key_reused_with_a_different_body_is_refused_and_the_first_task_stays(
        api: Api) -> None:
    first = await api.client.post("/v1/tasks", json=BODY, headers=_key(api, "alice", "k1"))
    assert first.status_code == 202
    for change in ({"prompt": "a dog"}, {"steps": 4}, {"seed": 7}, {"negative_prompt": "x"},
                   {"model": "tiny-ti2v"}):
        r = await api.client.post("/v1/tasks", json={**BODY, **change},
                                  headers=_key(api, "alice", "k1"))
        _reused(r)
    again = await api.client.post("/v1/tasks", json=BODY, headers=_key(api, "alice", "k1"))
    assert again.status_code == 202 and again.json()["id"] == first.json()["id"]
    assert [t["id"] for t in await _tasks(api)] == [first.json()["id"]]


async def test_the_same_request_as_json_or_as_a_form_is_the_same_request(api: Api) -> None:
    as_json = await api.client.post("/v1/tasks", json=BODY, headers=_key(api, "alice", "k2"))
    as_form = await api.client.post("/v1/tasks", headers=_key(api, "alice", "k2"),
                                    data={k: str(v) for k, v in BODY.items()})
    assert as_form.status_code == 202, as_form.text
    assert as_form.json()["id"] == as_json.json()["id"]


async def test_an_omitted_seed_is_the_same_request_although_it_resolved_to_a_random_one(
        api: Api) -> None:
    first = await api.client.post("/v1/tasks", json=BODY, headers=_key(api, "alice", "k3"))
    again = await api.client.post("/v1/tasks", json=BODY, headers=_key(api, "alice", "k3"))
    assert again.json()["id"] == first.json()["id"]
    # Naming the seed it happened to get is a different request.
    seeded = {**BODY, "seed": first.json()["params"]["seed"]}
    _reused(await api.client.post("/v1/tasks", json=seeded, headers=_key(api, "alice", "k3")))


async def test_a_different_image_under_the_same_key_is_a_different_request(api: Api) -> None:
    fields = {"prompt": "make it move", "model": "tiny-ti2v"}

    async def send(image: bytes) -> httpx.Response:
        return await api.client.post("/v1/tasks", headers=_key(api, "alice", "k4"), data=fields,
                                     files={"image": ("a.png", image, "image/png")})

    first = await send(png_bytes())
    assert first.status_code == 202, first.text
    assert (await send(png_bytes())).json()["id"] == first.json()["id"]
    _reused(await send(png_bytes(64, 96)))
    assert len(await _tasks(api)) == 1


async def test_keys_are_per_user(api: Api) -> None:
    mine = await api.client.post("/v1/tasks", json=BODY, headers=_key(api, "alice", "k5"))
    theirs = await api.client.post("/v1/tasks", json={**BODY, "prompt": "bob's own"},
                                   headers=_key(api, "bob", "k5"))
    assert theirs.status_code == 202 and theirs.json()["id"] != mine.json()["id"]


async def test_the_openai_route_refuses_a_reused_key_too(api: Api) -> None:
    video = {"prompt": "a kite", "model": "tiny-t2v", "size": "64x64"}
    first = await api.client.post("/v1/videos", json=video, headers=_key(api, "alice", "k6"))
    assert first.status_code == 200, first.text
    again = await api.client.post("/v1/videos", json=video, headers=_key(api, "alice", "k6"))
    assert again.json()["id"] == first.json()["id"]
    _reused(await api.client.post("/v1/videos", json={**video, "prompt": "a dog"},
                                  headers=_key(api, "alice", "k6")), status=400)
    # The same key on the native route is another request (another API, other fields).
    _reused(await api.client.post("/v1/tasks", json=BODY, headers=_key(api, "alice", "k6")))


async def test_concurrent_creates_with_one_key_and_different_bodies_make_one_task(
        api: Api) -> None:
    bodies = [{**BODY, "prompt": f"racer {i}"} for i in range(6)]
    answers = await asyncio.gather(*(
        api.client.post("/v1/tasks", json=b, headers=_key(api, "alice", "race"))
        for b in bodies))
    statuses = sorted(r.status_code for r in answers)
    assert statuses == [202] + [422] * 5, [r.text for r in answers]
    for r in answers:
        if r.status_code == 422:
            _reused(r)
    tasks = await _tasks(api)
    winner = next(r for r in answers if r.status_code == 202).json()
    assert [t["id"] for t in tasks] == [winner["id"]]


async def test_a_create_that_loses_the_race_on_insert_is_refused_and_its_image_deleted(
        api: Api) -> None:
    """Deterministic: the rival task is inserted while the loser's image is being stored,
    after the loser looked for its key and found nothing."""
    svc = api.app.state.services
    real_put = svc.store.put_bytes
    stored: list[str] = []

    async def put_while_a_rival_wins(key: str, data: bytes, *, content_type: str) -> None:
        await real_put(key, data, content_type=content_type)
        stored.append(key)
        svc.store.put_bytes = real_put
        rival = await api.client.post("/v1/tasks", json={**BODY, "model": "tiny-ti2v"},
                                      headers=_key(api, "alice", "k7"))
        assert rival.status_code == 202, rival.text

    svc.store.put_bytes = put_while_a_rival_wins
    try:
        loser = await api.client.post(
            "/v1/tasks", headers=_key(api, "alice", "k7"),
            data={"prompt": "make it move", "model": "tiny-ti2v"},
            files={"image": ("a.png", png_bytes(), "image/png")})
    finally:
        svc.store.put_bytes = real_put
    _reused(loser)
    assert stored and not await svc.store.exists(stored[0])
    assert len(await _tasks(api)) == 1
