"""Schemathesis against the app's own OpenAPI document, on a real server.

Each documented operation (the native ``/v1/tasks``, ``/v1/models``, ``/v1/me``, the
stream token, ``/v1/usage``, ``/v1/webhook-endpoints``, the admin API, and
``/v1/videos`` when it is served) is
called with generated requests, authenticated with a real key (the admin operations
also with an admin's), against uvicorn on 127.0.0.1 over SQLite and a real
Redis. Every response must be a non-5xx whose status code, content type, headers and
body are the ones the document declares. Bounded: a few examples per operation.

Besides what schemathesis generates from the document (valid requests, and invalid
ones in its negative mode), the hostile-body corpus (``tests/security/corpus.py``:
nesting thousands deep, numbers past a double, NaN, duplicate keys, bytes that are not
UTF-8, lone surrogates, NUL characters, empty files, truncated uploads) is replayed on
both creation routes in every content type and validated the same way, so a new
error code or status that the document does not declare fails here.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode, checks

from tests.api.conftest import api_settings
from tests.security.corpus import corpus
from tests.security.live import LiveApi, live_api
from vidmaas.api.app import create_app
from vidmaas.config import Settings, StorageSettings

MAX_EXAMPLES = 12

# Generated task ids match no task, so the event stream answers at once (404/422/401).
SKIP: set[tuple[str, str]] = set()

CHECKS = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_schema_conformance,
    checks.response_headers_conformance,
]


def _schema() -> schemathesis.BaseSchema:
    return schemathesis.openapi.from_dict(create_app(Settings()).openapi())


def _operations() -> list[str]:
    labels = []
    for result in _schema().get_all_operations():
        op = result.ok()
        if (op.method.upper(), op.path) not in SKIP:
            labels.append(f"{op.method.upper()} {op.path}")
    return sorted(labels)


@pytest.fixture
def fuzz_api(sqlite_url: str, redis_url: str, local_storage: StorageSettings,
             ) -> Iterator[LiveApi]:
    s = api_settings(db_url=sqlite_url, redis_url=redis_url, storage=local_storage)
    s.api.stream_ping_interval_s = 0.5
    with live_api(s) as api:
        yield api


def test_the_document_lists_the_native_operations() -> None:
    ops = set(_operations())
    for needed in ("POST /v1/tasks", "GET /v1/tasks", "GET /v1/tasks/{task_id}",
                   "POST /v1/tasks/{task_id}/cancel", "POST /v1/tasks/{task_id}/rerun",
                   "GET /v1/models", "GET /v1/me",
                   "POST /v1/webhook-endpoints", "GET /v1/webhook-endpoints",
                   "GET /v1/webhook-endpoints/{endpoint_id}",
                   "PATCH /v1/webhook-endpoints/{endpoint_id}",
                   "DELETE /v1/webhook-endpoints/{endpoint_id}",
                   "POST /v1/webhook-endpoints/{endpoint_id}/test",
                   "GET /v1/webhook-endpoints/{endpoint_id}/deliveries"):
        assert needed in ops


@pytest.mark.parametrize("label", _operations())
def test_generated_requests_get_documented_non_5xx_answers(fuzz_api: LiveApi,
                                                           label: str) -> None:
    method, path = label.split(" ", 1)
    schema = schemathesis.openapi.from_url(f"{fuzz_api.base_url}/openapi.json")
    op = schema[path][method]
    headers = fuzz_api.auth("alice")

    @given(case=op.as_strategy())
    @settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    def run(case: schemathesis.Case) -> None:
        case.call_and_validate(base_url=fuzz_api.base_url, headers=headers, checks=CHECKS,
                               timeout=30)

    run()


@pytest.mark.parametrize("label", [op for op in _operations() if " /v1/admin/" in op])
def test_generated_admin_requests_get_documented_non_5xx_answers(fuzz_api: LiveApi,
                                                                 label: str) -> None:
    method, path = label.split(" ", 1)
    schema = schemathesis.openapi.from_url(f"{fuzz_api.base_url}/openapi.json")
    op = schema[path][method]
    headers = fuzz_api.auth("root")

    @given(case=op.as_strategy())
    @settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    def run(case: schemathesis.Case) -> None:
        case.call_and_validate(base_url=fuzz_api.base_url, headers=headers, checks=CHECKS,
                               timeout=30)

    run()


@pytest.mark.parametrize("label", _operations())
def test_unauthenticated_requests_get_documented_answers_too(fuzz_api: LiveApi,
                                                             label: str) -> None:
    method, path = label.split(" ", 1)
    schema = schemathesis.openapi.from_url(f"{fuzz_api.base_url}/openapi.json")
    op = schema[path][method]

    @given(case=op.as_strategy())
    @settings(max_examples=3, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    def run(case: schemathesis.Case) -> None:
        case.call_and_validate(base_url=fuzz_api.base_url, checks=CHECKS, timeout=30,
                               headers={"Authorization": "Bearer vmk_not-a-real-key"})

    run()


CREATION = {"/v1/tasks": "image", "/v1/videos": "input_reference"}


@pytest.mark.parametrize("path", sorted(CREATION))
def test_hostile_bodies_get_documented_4xx_answers(fuzz_api: LiveApi, path: str) -> None:
    schema = schemathesis.openapi.from_url(f"{fuzz_api.base_url}/openapi.json")
    op = schema[path]["POST"]
    failures = []
    for hostile in corpus(file_field=CREATION[path]):
        if hostile.content_type == "multipart/form-data":
            continue  # the transport adds a boundary of its own; the security tests send it
        case = op.Case(body=hostile.body, media_type=hostile.content_type.split(";")[0],
                       headers={**fuzz_api.auth("alice"), "Content-Type": hostile.content_type})
        response = case.call(base_url=fuzz_api.base_url, timeout=30)
        try:
            case.validate_response(response, checks=CHECKS)
        except Exception as e:
            failures.append(f"{hostile.name}: {e}")
        if not 400 <= response.status_code < 500:
            failures.append(f"{hostile.name}: {response.status_code}")
        elif response.json()["error"]["code"] != hostile.code:
            failures.append(f"{hostile.name}: {response.json()['error']}")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("path", sorted(CREATION))
def test_generated_invalid_bodies_get_documented_non_5xx_answers(fuzz_api: LiveApi,
                                                                 path: str) -> None:
    schema = schemathesis.openapi.from_url(f"{fuzz_api.base_url}/openapi.json")
    op = schema[path]["POST"]
    headers = fuzz_api.auth("alice")

    @given(case=op.as_strategy(generation_mode=GenerationMode.NEGATIVE))
    @settings(max_examples=MAX_EXAMPLES * 2, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    def run(case: schemathesis.Case) -> None:
        case.call_and_validate(base_url=fuzz_api.base_url, headers=headers, checks=CHECKS,
                               timeout=30)

    run()
