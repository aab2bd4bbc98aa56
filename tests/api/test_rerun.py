"""``POST /v1/tasks/{id}/rerun`` on SQLite and PostgreSQL: a new task from the source's
parameters with the body's overrides, made like any create (202, the task JSON,
``Location``, idempotency, quotas), ``rerun_of`` naming the source."""

from __future__ import annotations

import httpx
import pytest

from tests.api.conftest import Api
from tests.api.test_tasks_api import _complete, jpeg_bytes
from vidmaas.db import tasks as repo
from vidmaas.db.models import Task
from vidmaas.domain import events as ev
from vidmaas.domain.status import TaskStatus

SOURCE = {"prompt": "a red kite", "model": "tiny-t2v", "size": "96*64", "num_frames": 13,
          "steps": 7, "seed": 1234, "negative_prompt": "blurry"}


async def _source(api: Api, **body: object) -> dict[str, object]:
    r = await api.client.post("/v1/tasks", json={**SOURCE, **body}, headers=api.auth("alice"))
    assert r.status_code == 202, r.text
    return r.json()  # type: ignore[no-any-return]


async def _rerun(api: Api, task_id: str, body: object = None, user: str = "alice",
                 **headers: str) -> httpx.Response:
    return await api.client.post(f"/v1/tasks/{task_id}/rerun", json=body,
                                 headers={**api.auth(user), **headers})


async def test_a_rerun_without_a_body_repeats_the_task_with_its_seed_and_names_the_source(
        api: Api) -> None:
    src = await _source(api)
    assert src["rerun_of"] is None
    r = await _rerun(api, str(src["id"]))
    assert r.status_code == 202, r.text
    new = r.json()
    assert r.headers["location"] == f"/v1/tasks/{new['id']}"
    assert new["id"] != src["id"] and new["rerun_of"] == src["id"]
    assert new["status"] == "queued" and new["queue_position"] == 2
    assert new["params"] == src["params"] and new["params"]["seed"] == 1234
    assert (new["prompt"], new["negative_prompt"], new["model"]) == (
        "a red kite", "blurry", "tiny-t2v")
    got = await api.client.get(f"/v1/tasks/{new['id']}", headers=api.auth("alice"))
    assert got.json()["rerun_of"] == src["id"]
    queued = await api.app.state.services.lifecycle.queue.position(
        user_id=(await _row(api, new["id"])).user_id, task_id=new["id"])
    assert queued is not None


async def _row(api: Api, task_id: str) -> Task:
    async with api.app.state.services.sessions() as s:
        task = await repo.get_task(session=s, task_id=task_id)
    assert task is not None
    return task


async def test_overrides_replace_single_fields_and_null_takes_the_creates_default(
        api: Api) -> None:
    src = await _source(api)
    r = await _rerun(api, str(src["id"]), {"prompt": "a blue kite", "steps": 3,
                                           "size": "64*96", "seed": None,
                                           "negative_prompt": None})
    assert r.status_code == 202, r.text
    new = r.json()
    assert new["prompt"] == "a blue kite" and new["negative_prompt"] is None
    assert new["params"]["steps"] == 3 and new["params"]["size"] == "64*96"
    assert new["params"]["num_frames"] == 13  # not overridden: the source's
    assert new["params"]["seed"] != 1234  # a fresh random seed (1 in 2**32 to collide)
    seeded = await _rerun(api, str(src["id"]), {"seed": 99})
    assert seeded.json()["params"]["seed"] == 99 and seeded.json()["prompt"] == "a red kite"


@pytest.mark.parametrize(("body", "status", "code", "field"), [
    ({"bogus": 1}, 422, "invalid_request", "bogus"),
    ({"prompt": None}, 422, "invalid_request", "prompt"),
    ({"prompt": ""}, 422, "invalid_request", "prompt"),
    ({"num_frames": 10}, 422, None, "num_frames"),
    ({"size": "1280*720"}, 422, None, "size"),
    ({"seed": "7"}, 422, "invalid_request", "seed"),
    ({"model": "wan2.2-t2v-a14b"}, 422, "model_unavailable", "model"),
    ({"webhook_url": "http://127.0.0.1/hook"}, 422, None, "webhook_url"),
    ([1, 2], 422, "body_not_an_object", None),
])
async def test_overrides_are_checked_as_a_create_checks_its_fields_and_nothing_is_created(
        api: Api, body: object, status: int, code: str | None, field: str | None) -> None:
    src = await _source(api)
    r = await _rerun(api, str(src["id"]), body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    if code is not None:
        assert err["code"] == code
    assert err.get("field") == field
    listing = await api.client.get("/v1/tasks", headers=api.auth("alice"))
    assert [t["id"] for t in listing.json()["data"]] == [src["id"]]


async def test_a_form_body_is_415_and_another_users_or_a_missing_task_404(api: Api) -> None:
    src = await _source(api)
    r = await api.client.post(f"/v1/tasks/{src['id']}/rerun", data={"prompt": "x"},
                              headers=api.auth("alice"))
    assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_content_type"
    theirs = await _rerun(api, str(src["id"]), {"prompt": "mine now"}, user="bob")
    missing = await _rerun(api, "t" + "0" * 25, {"prompt": "mine now"}, user="bob")
    assert theirs.status_code == missing.status_code == 404
    assert theirs.content == missing.content
    # An admin may rerun anyone's task; the new task is the admin's own.
    admin = await _rerun(api, str(src["id"]), user="root")
    assert admin.status_code == 202
    assert (await _row(api, admin.json()["id"])).user_id != (
        await _row(api, str(src["id"]))).user_id


async def test_a_failed_a_cancelled_and_a_completed_task_can_all_be_rerun(api: Api) -> None:
    svc = api.app.state.services
    failed, cancelled, completed = (await _source(api), await _source(api),
                                    await _source(api))
    lc = svc.lifecycle
    fid = str(failed["id"])
    await lc.transition(task_id=fid, to=TaskStatus.DISPATCHING, expected=TaskStatus.QUEUED)
    await lc.finish(task_id=fid, to=TaskStatus.FAILED, expected=TaskStatus.DISPATCHING,
                    fields={"error_code": "job_failed", "error_message": "boom"},
                    event=ev.Event(fid, ev.EventType.FAILED, {"code": "job_failed",
                                                             "message": "boom"}))
    await api.client.post(f"/v1/tasks/{cancelled['id']}/cancel", headers=api.auth("alice"))
    await _complete(api, str(completed["id"]))
    for src in (failed, cancelled, completed):
        got = await api.client.get(f"/v1/tasks/{src['id']}", headers=api.auth("alice"))
        assert got.json()["status"] in ("failed", "cancelled", "completed")
        r = await _rerun(api, str(src["id"]), {"prompt": "again"})
        assert r.status_code == 202, r.text
        assert r.json()["rerun_of"] == src["id"]
        assert r.json()["status"] == "queued"


async def test_a_rerun_with_an_idempotency_key_is_made_once_and_the_key_binds_the_source(
        api: Api) -> None:
    a, b = await _source(api), await _source(api)
    first = await _rerun(api, str(a["id"]), {"prompt": "p"}, **{"Idempotency-Key": "rr-1"})
    again = await _rerun(api, str(a["id"]), {"prompt": "p"}, **{"Idempotency-Key": "rr-1"})
    assert first.status_code == again.status_code == 202
    assert first.json()["id"] == again.json()["id"]
    other = await _rerun(api, str(b["id"]), {"prompt": "p"}, **{"Idempotency-Key": "rr-1"})
    assert other.status_code == 422
    assert other.json()["error"]["code"] == "idempotency_key_reused"
    listing = await api.client.get("/v1/tasks", headers=api.auth("alice"))
    assert len(listing.json()["data"]) == 3


async def test_a_reruns_input_image_is_a_copy_that_outlives_the_sources_image(
        api: Api) -> None:
    r = await api.client.post("/v1/tasks", headers=api.auth("alice"), data={
        "prompt": "make it move", "model": "tiny-ti2v"},
        files={"image": ("photo.jpg", jpeg_bytes(), "image/jpeg")})
    src = r.json()
    store = api.app.state.services.store
    new = (await _rerun(api, src["id"])).json()
    assert new["has_image"] and new["model"] == "tiny-ti2v"
    src_key, new_key = (await _row(api, src["id"])).input_key, (
        await _row(api, new["id"])).input_key
    assert src_key and new_key and src_key != new_key
    assert await store.get_bytes(new_key) == await store.get_bytes(src_key)
    await store.delete(src_key)
    assert await store.exists(new_key)
    # A source whose image is gone cannot be rerun: 409, nothing created.
    gone = await _rerun(api, src["id"])
    assert gone.status_code == 409
    assert gone.json()["error"]["code"] == "source_image_missing"
