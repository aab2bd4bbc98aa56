"""``POST /v1/tasks`` and ``POST /v1/videos`` read their bodies the same way (``api.body``):
the same limits, content types and machine-readable codes for a body that is not what
it claims; only the status of an invalid request differs (OpenAI answers those 400)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from tests.api.conftest import Api, api_settings, start_api
from vidmaas.config import StorageSettings


@dataclass(frozen=True)
class Route:
    path: str
    file_field: str
    invalid_status: int
    """The status of an invalid request: 422 natively, 400 on the OpenAI API."""
    created_status: int

    def code_and_field(self, body: dict[str, dict[str, str | None]]) -> tuple[str | None,
                                                                             str | None]:
        err = body["error"]
        return err["code"], err.get("field", err.get("param"))


ROUTES = [Route("/v1/tasks", "image", 422, 202), Route("/v1/videos", "input_reference", 400, 200)]
IDS = ["tasks", "videos"]


@pytest.fixture
async def small(sqlite_url: str, redis_url: str, local_storage: StorageSettings,
                ) -> AsyncIterator[Api]:
    """The API with a 10 kB body limit."""
    settings = api_settings(db_url=sqlite_url, redis_url=redis_url, storage=local_storage)
    settings.api.max_upload_bytes = 10_000
    async for api in start_api(settings, sqlite_url):
        yield api


@pytest.mark.parametrize("route", ROUTES, ids=IDS)
async def test_a_body_that_is_not_the_json_it_claims_is_invalid_json(
        api: Api, route: Route) -> None:
    r = await api.client.post(route.path, content=b'{"prompt": "x",', headers={
        **api.auth("alice"), "Content-Type": "application/json"})
    assert r.status_code == route.invalid_status, r.text
    assert route.code_and_field(r.json()) == ("invalid_json", None)


@pytest.mark.parametrize("route", ROUTES, ids=IDS)
async def test_a_content_type_neither_json_nor_a_form_is_415(api: Api, route: Route) -> None:
    r = await api.client.post(route.path, content=b"prompt=x", headers={
        **api.auth("alice"), "Content-Type": "text/plain; charset=utf-8"})
    assert r.status_code == 415
    assert route.code_and_field(r.json()) == ("unsupported_content_type", None)


@pytest.mark.parametrize("route", ROUTES, ids=IDS)
async def test_a_body_over_the_limit_is_413_whatever_it_claims_to_be(
        small: Api, route: Route) -> None:
    api = small
    for ctype in ("application/json", "text/plain"):
        r = await api.client.post(route.path, content=b"x" * 20_000, headers={
            **api.auth("alice"), "Content-Type": ctype})
        assert r.status_code == 413, (ctype, r.text)
        assert route.code_and_field(r.json()) == ("payload_too_large", None)


@pytest.mark.parametrize("route", ROUTES, ids=IDS)
async def test_a_multipart_body_that_does_not_parse_is_invalid_form(
        api: Api, route: Route) -> None:
    r = await api.client.post(route.path, content=b"--nope\r\nnot a part", headers={
        **api.auth("alice"), "Content-Type": "multipart/form-data"})
    assert r.status_code == route.invalid_status, r.text
    assert route.code_and_field(r.json())[0] == "invalid_form"


@pytest.mark.parametrize("route", ROUTES, ids=IDS)
async def test_text_where_the_file_part_belongs_and_a_file_as_the_prompt_name_the_field(
        api: Api, route: Route) -> None:
    r = await api.client.post(route.path, headers=api.auth("alice"), data={
        "prompt": "x", "model": "tiny-ti2v", route.file_field: "not a file"})
    assert r.status_code == route.invalid_status, r.text
    assert route.code_and_field(r.json()) == ("invalid_request", route.file_field)
    r = await api.client.post(route.path, headers=api.auth("alice"),
                              files={"prompt": ("p.txt", b"x", "text/plain")})
    assert r.status_code == route.invalid_status, r.text
    assert route.code_and_field(r.json()) == ("invalid_request", "prompt")
    listing = await api.client.get("/v1/tasks", headers=api.auth("alice"))
    assert listing.json()["data"] == []


@pytest.mark.parametrize("route", ROUTES, ids=IDS)
async def test_a_urlencoded_form_and_a_json_body_both_create(api: Api, route: Route) -> None:
    form = await api.client.post(route.path, headers=api.auth("alice"),
                                 data={"prompt": "from a form", "model": "tiny-t2v"})
    assert form.status_code == route.created_status, form.text
    as_json = await api.client.post(route.path, headers=api.auth("alice"),
                                    json={"prompt": "from json", "model": "tiny-t2v"})
    assert as_json.status_code == route.created_status, as_json.text
    assert form.json()["prompt"] == "from a form" and as_json.json()["prompt"] == "from json"
