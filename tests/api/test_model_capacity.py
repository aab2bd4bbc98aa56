"""A model that needs more GPUs per job than the platform has is unavailable: listed as
such, and refused on every create path before anything is written."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator

import pytest
from PIL import Image

from tests.api.conftest import Api, api_settings, start_api
from vidmaas.config import StorageSettings


@pytest.fixture
async def two_gpus(sqlite_url: str, redis_url: str, local_storage: StorageSettings,
                   ) -> AsyncIterator[Api]:
    settings = api_settings(db_url=sqlite_url, redis_url=redis_url, storage=local_storage,
                            gpu_capacity=2)
    async for a in start_api(settings, sqlite_url):
        yield a


def _png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(out, format="PNG")
    return out.getvalue()


async def _task_count(api: Api) -> int:
    r = await api.client.get("/v1/tasks", headers=api.auth("alice"))
    assert r.status_code == 200, r.text
    return len(r.json()["data"])


async def test_models_list_says_which_models_the_capacity_cannot_run_and_why(
        two_gpus: Api) -> None:
    r = await two_gpus.client.get("/v1/models")
    models = {m["id"]: m for m in r.json()["data"]}
    assert (models["wan2.2-ti2v-5b"]["available"],
            models["wan2.2-ti2v-5b"]["unavailable_reason"]) == (True, None)
    a14b = models["wan2.2-t2v-a14b"]
    assert a14b["available"] is False
    assert "needs 8 GPUs per job" in a14b["unavailable_reason"]
    assert "has 2 GPUs in all" in a14b["unavailable_reason"]


@pytest.mark.parametrize("how", ["json", "form"])
async def test_a_native_create_of_a_model_too_large_for_the_capacity_is_refused(
        two_gpus: Api, how: str) -> None:
    if how == "json":
        r = await two_gpus.client.post("/v1/tasks", headers=two_gpus.auth("alice"),
                                       json={"prompt": "a lighthouse", "model": "wan2.2-t2v-a14b"})
    else:  # image-to-video, multipart with its image
        r = await two_gpus.client.post(
            "/v1/tasks", headers=two_gpus.auth("alice"),
            data={"prompt": "a lighthouse", "model": "wan2.2-i2v-a14b"},
            files={"image": ("a.png", _png(), "image/png")})
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert (error["code"], error["field"]) == ("model_unavailable", "model")
    assert "needs 8 GPUs per job" in error["message"] and "has 2 GPUs" in error["message"]
    assert await _task_count(two_gpus) == 0
    ok = await two_gpus.client.post("/v1/tasks", headers=two_gpus.auth("alice"),
                                    json={"prompt": "a lighthouse", "model": "tiny-t2v"})
    assert ok.status_code == 202, ok.text


async def test_an_openai_create_of_a_model_too_large_for_the_capacity_is_refused(
        two_gpus: Api) -> None:
    r = await two_gpus.client.post("/v1/videos", headers=two_gpus.auth("alice"),
                                   json={"prompt": "a lighthouse", "model": "wan2.2-t2v-a14b"})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert (error["code"], error["param"], error["type"]) == \
        ("model_unavailable", "model", "invalid_request_error")
    assert "needs 8 GPUs per job" in error["message"]
    assert await _task_count(two_gpus) == 0


async def test_a_capacity_of_zero_pauses_admission_and_refuses_no_model(
        sqlite_url: str, redis_url: str, local_storage: StorageSettings) -> None:
    settings = api_settings(db_url=sqlite_url, redis_url=redis_url, storage=local_storage,
                            gpu_capacity=0)
    async for api in start_api(settings, sqlite_url):
        models = (await api.client.get("/v1/models")).json()["data"]
        assert models and all(m["available"] for m in models)
        r = await api.client.post("/v1/tasks", json={"prompt": "wait for the GPUs",
                                                     "model": "wan2.2-t2v-a14b"},
                                  headers=api.auth("alice"))
        assert r.status_code == 202, r.text
        assert r.json()["status"] == "queued"
