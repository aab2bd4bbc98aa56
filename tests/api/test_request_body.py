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


# ---------------------------------------------------------------- files, numbers, text

def _png() -> bytes:
    from tests.api.test_tasks_api import png_bytes

    return png_bytes()


async def _nothing_created(api: Api) -> None:
    listing = await api.client.get("/v1/tasks", headers=api.auth("alice"))
    assert listing.json()["data"] == []


@pytest.mark.parametrize("route", ROUTES, ids=IDS)
async def test_a_file_attached_with_a_name_and_no_bytes_is_refused_not_ignored(
        api: Api, route: Route) -> None:
    r = await api.client.post(route.path, headers=api.auth("alice"),
                              data={"prompt": "make it move", "model": "tiny-ti2v"},
                              files={route.file_field: ("photo.png", b"", "image/png")})
    assert r.status_code == route.invalid_status, r.text
    assert route.code_and_field(r.json()) == ("empty_image", route.file_field)
    await _nothing_created(api)


@pytest.mark.parametrize("route", ROUTES, ids=IDS)
async def test_an_untouched_browser_file_input_means_no_image(api: Api, route: Route) -> None:
    # What a browser sends for a file input nobody touched: no file name, no bytes.
    r = await api.client.post(route.path, headers=api.auth("alice"),
                              data={"prompt": "a kite", "model": "tiny-t2v"},
                              files={route.file_field: ("", b"", "application/octet-stream")})
    assert r.status_code == route.created_status, r.text
    task = (await api.client.get(f"/v1/tasks/{r.json()['id']}", headers=api.auth("alice")))
    assert task.json()["has_image"] is False


async def test_an_empty_data_url_image_is_refused(api: Api) -> None:
    ref = "data:image/png;base64,"
    as_json = await api.client.post("/v1/videos", headers=api.auth("alice"), json={
        "prompt": "x", "model": "tiny-ti2v", "input_reference": {"image_url": ref}})
    as_form = await api.client.post("/v1/videos", headers=api.auth("alice"), data={
        "prompt": "x", "model": "tiny-ti2v", "input_reference[image_url]": ref})
    for r in (as_json, as_form):
        assert r.status_code == 400, r.text
        assert r.json()["error"]["code"] == "empty_image"
    await _nothing_created(api)


@pytest.mark.parametrize("value", [True, "5", 9.0, [9], {"n": 9}])
async def test_numbers_in_a_json_body_must_be_json_integers(api: Api, value: object) -> None:
    for name in ("num_frames", "steps", "seed"):
        r = await api.client.post("/v1/tasks", headers=api.auth("alice"), json={
            "prompt": "x", "model": "tiny-t2v", name: value})
        assert r.status_code == 422, (name, value, r.text)
        assert r.json()["error"]["field"] == name
    await _nothing_created(api)


@pytest.mark.parametrize("value", ["٣", "1_000", "0x10", "9.0", "1e3", "9" * 30, "- 3"])
async def test_numbers_in_a_form_are_plain_decimal_integers(api: Api, value: str) -> None:
    r = await api.client.post("/v1/tasks", headers=api.auth("alice"), data={
        "prompt": "x", "model": "tiny-t2v", "seed": value})
    assert r.status_code == 422, r.text
    assert r.json()["error"]["field"] == "seed"


@pytest.mark.parametrize(("field", "value"), [
    ("model", "tiny-t2v\x1b[2J"), ("size", "64*64\n"), ("webhook_url",
                                                       "https://example.com/\r\nX-Evil: 1"),
    ("prompt", "a\x00b"), ("negative_prompt", "blurry\x00")])
async def test_text_fields_refuse_nul_and_one_line_fields_any_control_character(
        api: Api, field: str, value: str) -> None:
    for send in ("json", "data"):
        r = await api.client.post("/v1/tasks", headers=api.auth("alice"), **{send: {
            "prompt": "x", "model": "tiny-t2v", field: value}})  # type: ignore[arg-type]
        assert r.status_code == 422, r.text
        assert r.json()["error"]["code"] == "invalid_text"
        assert r.json()["error"]["field"] == field
    await _nothing_created(api)


async def test_a_form_field_the_native_route_does_not_take_is_refused_as_json_is(
        api: Api) -> None:
    for send in ("json", "data"):
        r = await api.client.post("/v1/tasks", headers=api.auth("alice"), **{send: {
            "prompt": "x", "model": "tiny-t2v", "negative_promt": "typo"}})  # type: ignore[arg-type]
        assert r.status_code == 422, r.text
        assert r.json()["error"]["field"] == "negative_promt"
    # The OpenAI route ignores unknown text fields, as OpenAI does...
    ok = await api.client.post("/v1/videos", headers=api.auth("alice"), data={
        "prompt": "x", "model": "tiny-t2v", "user": "someone"})
    assert ok.status_code == 200, ok.text
    # ...but never a file it would drop.
    r = await api.client.post("/v1/videos", headers=api.auth("alice"), data={
        "prompt": "x", "model": "tiny-ti2v"}, files={"image": ("a.png", _png(), "image/png")})
    assert r.status_code == 400 and r.json()["error"]["param"] == "image"


async def test_a_json_body_with_a_utf8_byte_order_mark_is_accepted(api: Api) -> None:
    r = await api.client.post("/v1/tasks", content=b'\xef\xbb\xbf{"prompt": "x"}', headers={
        **api.auth("alice"), "Content-Type": "application/json; charset=utf-8"})
    assert r.status_code == 202, r.text


@pytest.mark.parametrize(("path", "params", "field"), [
    ("/v1/tasks", {"limit": "0"}, "limit"), ("/v1/tasks", {"limit": "-1"}, "limit"),
    ("/v1/tasks", {"limit": "101"}, "limit"), ("/v1/tasks", {"limit": "9" * 5000}, "limit"),
    ("/v1/tasks", {"limit": "1e3"}, "limit"), ("/v1/tasks", {"cursor": "t" * 65}, "cursor"),
    ("/v1/tasks", {"cursor": "t\x00"}, "cursor"), ("/v1/tasks", {"status": "done"}, "status.0"),
    ("/v1/videos", {"after": "v" * 5000}, "after"), ("/v1/videos", {"limit": "-5"}, "limit"),
    ("/v1/videos", {"order": "sideways"}, "order"),
])
async def test_query_values_out_of_range_are_4xx_naming_the_parameter(
        api: Api, path: str, params: dict[str, str], field: str) -> None:
    r = await api.client.get(path, params=params, headers=api.auth("alice"))
    assert r.status_code == (422 if path == "/v1/tasks" else 400), r.text
    err = r.json()["error"]
    assert err.get("field", err.get("param")) == field


@pytest.mark.parametrize("route", ROUTES, ids=IDS)
@pytest.mark.parametrize("key", ["a\x01b", "a\tb", "k" * 129, "", "  "])
async def test_a_malformed_idempotency_key_is_refused_before_anything_is_written(
        api: Api, route: Route, key: str) -> None:
    r = await api.client.post(route.path, json={"prompt": "x", "model": "tiny-t2v"},
                              headers={**api.auth("alice"), "Idempotency-Key": key})
    assert r.status_code == route.invalid_status, r.text
    assert route.code_and_field(r.json())[1] == "Idempotency-Key"
    await _nothing_created(api)


@pytest.mark.parametrize("route", ROUTES, ids=IDS)
async def test_unusual_but_valid_text_is_taken_as_typed(api: Api, route: Route) -> None:
    prompt = "a 😀 cat,\n\tcafé «crème» 中文 \\u0000 {{ x }}"  # an escaped pair, real text
    body = b'{"prompt": "a \\ud83d\\ude00 cat,\\n\\tcaf\\u00e9 \xc2\xabcr\xc3\xa8me\xc2\xbb ' \
           b'\xe4\xb8\xad\xe6\x96\x87 \\\\u0000 {{ x }}", "model": "tiny-t2v"}'
    r = await api.client.post(route.path, content=body, headers={
        **api.auth("alice"), "Content-Type": "application/json"})
    assert r.status_code == route.created_status, r.text
    assert r.json()["prompt"] == prompt
    form = await api.client.post(route.path, headers=api.auth("alice"),
                                 data={"prompt": prompt, "model": "tiny-t2v"})
    assert form.status_code == route.created_status, form.text
    assert form.json()["prompt"] == prompt
