"""Behaviour of the shared metrics (vidmaas.metrics) and logging (vidmaas.logs) modules."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from vidmaas.logs import bind_task_id, configure_logging, task_id_var
from vidmaas.metrics import CONTENT_TYPE, Heartbeat, Metrics, MetricsServer, render


def _samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(render(metrics).decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


# ---------------------------------------------------------------- metrics

def test_two_metrics_instances_coexist_without_sharing_values() -> None:
    a, b = Metrics(role="api"), Metrics(role="dispatcher")
    a.observe_event("progress")
    assert _samples(a)[("vidmaas_events_relayed_total", (("type", "progress"),))] == 1
    assert ("vidmaas_events_relayed_total", (("type", "progress"),)) not in _samples(b)
    assert _samples(b)[("vidmaas_role_info", (("role", "dispatcher"),))] == 1


def test_render_exposes_every_required_metric_family() -> None:
    names = {f.name for f in text_string_to_metric_families(render(Metrics()).decode())}
    assert {
        "vidmaas_queue_depth", "vidmaas_queue_depth_total", "vidmaas_gpus_in_use",
        "vidmaas_gpu_capacity", "vidmaas_tasks", "vidmaas_stage_duration_seconds",
        "vidmaas_dispatch_gap_seconds", "vidmaas_events_relayed", "vidmaas_stream_connections",
        "vidmaas_webhook_deliveries", "vidmaas_http_requests",
        "vidmaas_http_request_duration_seconds",
    } <= names
    assert CONTENT_TYPE.startswith("text/plain; version=0.0.4")


def test_every_metric_is_documented_in_the_operator_guide() -> None:
    from pathlib import Path

    guide = (Path(__file__).resolve().parents[1] / "docs" / "deploy.md").read_text()
    for family in text_string_to_metric_families(render(Metrics()).decode()):
        if family.name.endswith("_created"):  # prometheus_client's creation timestamps
            continue
        name = family.name + ("_total" if family.type == "counter" else "")
        assert f"`{name}`" in guide, f"docs/deploy.md does not describe {name}"


def test_queue_depth_snapshot_drops_users_whose_queue_emptied() -> None:
    m = Metrics()
    m.set_queue_depths({"alice": 3, "bob": 1})
    m.set_queue_depths({"alice": 2})
    s = _samples(m)
    assert s[("vidmaas_queue_depth", (("user", "alice"),))] == 2
    assert ("vidmaas_queue_depth", (("user", "bob"),)) not in s
    assert s[("vidmaas_queue_depth_total", ())] == 2


def test_task_counts_snapshot_zeroes_statuses_it_does_not_mention() -> None:
    m = Metrics()
    m.set_task_counts({"running": 4, "queued": 7})
    m.set_task_counts({"queued": 1})
    s = _samples(m)
    assert s[("vidmaas_tasks", (("status", "queued"),))] == 1
    assert s[("vidmaas_tasks", (("status", "running"),))] == 0


def test_capacity_dispatch_and_stage_observations_are_exported() -> None:
    m = Metrics()
    m.set_capacity(in_use=3, capacity=8)
    m.observe_dispatch(executor="kubernetes", gap_s=0.02, queue_wait_s=12.0)
    m.observe_stage_timings({"denoise_s": 42.0, "upload": 1.5, "imports_s": 9.0,
                             "decode_s": "n/a"})
    s = _samples(m)
    assert s[("vidmaas_gpus_in_use", ())] == 3
    assert s[("vidmaas_gpu_capacity", ())] == 8
    assert s[("vidmaas_dispatch_gap_seconds_count", ())] == 1
    assert s[("vidmaas_dispatches_total", (("executor", "kubernetes"),))] == 1
    assert s[("vidmaas_stage_duration_seconds_sum", (("stage", "denoise"),))] == 42.0
    assert s[("vidmaas_stage_duration_seconds_count", (("stage", "upload"),))] == 1
    assert ("vidmaas_stage_duration_seconds_count", (("stage", "decode"),)) not in s
    assert ("vidmaas_stage_duration_seconds_count", (("stage", "other"),)) not in s


def test_unbounded_label_values_are_folded_into_other() -> None:
    m = Metrics()
    m.observe_webhook("delivered")
    m.observe_webhook("teapot")
    m.stream_opened("websocket")
    m.stream_opened("websocket")
    m.stream_closed("websocket")
    m.stream_opened("carrier-pigeon")
    s = _samples(m)
    assert s[("vidmaas_webhook_deliveries_total", (("outcome", "delivered"),))] == 1
    assert s[("vidmaas_webhook_deliveries_total", (("outcome", "other"),))] == 1
    assert s[("vidmaas_stream_connections", (("transport", "websocket"),))] == 1
    assert s[("vidmaas_stream_connections", (("transport", "other"),))] == 1


def test_http_requests_are_counted_by_route_template_and_status() -> None:
    m = Metrics()
    m.observe_http(method="GET", route="/v1/tasks/{task_id}", status=404, duration_s=0.003)
    s = _samples(m)
    key = ("vidmaas_http_requests_total",
           (("method", "GET"), ("route", "/v1/tasks/{task_id}"), ("status", "404")))
    assert s[key] == 1


def _get(url: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.headers["Content-Type"], resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers["Content-Type"], e.read()


def test_metrics_server_serves_metrics_and_probes_until_closed() -> None:
    m = Metrics(role="relay")
    alive = {"ok": True}
    with MetricsServer(m, host="127.0.0.1", port=0, is_alive=lambda: alive["ok"],
                       is_ready=lambda: False) as server:
        base = f"http://127.0.0.1:{server.port}"
        status, ctype, body = _get(base + "/metrics")
        assert status == 200 and ctype == CONTENT_TYPE
        assert b'vidmaas_role_info{role="relay"} 1.0' in body
        assert _get(base + "/healthz")[0] == 200
        assert _get(base + "/readyz")[0] == 503
        alive["ok"] = False
        assert _get(base + "/healthz")[0] == 503
        assert _get(base + "/nope")[0] == 404
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(base + "/metrics", timeout=2)


def test_a_probe_that_raises_answers_unavailable_instead_of_crashing_the_server() -> None:
    def broken() -> bool:
        raise RuntimeError("database gone")

    with MetricsServer(Metrics(), host="127.0.0.1", port=0, is_alive=broken) as server:
        base = f"http://127.0.0.1:{server.port}"
        assert _get(base + "/healthz")[0] == 503
        assert _get(base + "/readyz")[0] == 503
        assert _get(base + "/metrics")[0] == 200


def test_a_heartbeat_goes_stale_when_the_loop_stops_beating() -> None:
    now = [100.0]
    beat = Heartbeat(max_age_s=30.0, clock=lambda: now[0])
    now[0] += 29.0
    assert beat.is_alive()
    now[0] += 2.0
    assert not beat.is_alive()
    beat.beat()
    assert beat.is_alive()


# ---------------------------------------------------------------- logs

@pytest.fixture
def log_stream() -> Iterator[io.StringIO]:
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    stream = io.StringIO()
    yield stream
    for h in list(root.handlers):
        if h not in handlers:
            root.removeHandler(h)
    root.setLevel(level)


def _json_lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]


def test_json_lines_carry_ts_level_logger_message_and_the_task_id_from_extra(
    log_stream: io.StringIO,
) -> None:
    configure_logging(level="info", json=True, stream=log_stream)
    logging.getLogger("vidmaas.dispatcher").info(
        "launched %s", "wan22-job-abc", extra={"task_id": "abc", "attempt": 2})
    logging.getLogger("vidmaas.dispatcher").debug("below the level")
    [line] = _json_lines(log_stream)
    assert line["message"] == "launched wan22-job-abc"
    assert line["task_id"] == "abc"
    assert line["level"] == "INFO"
    assert line["logger"] == "vidmaas.dispatcher"
    assert line["attempt"] == 2
    assert isinstance(line["ts"], str) and line["ts"].endswith("Z")


async def test_task_id_comes_from_the_context_variable_across_awaits(
    log_stream: io.StringIO,
) -> None:
    configure_logging(level="DEBUG", json=True, stream=log_stream)
    log = logging.getLogger("vidmaas.relay")

    async def work(task_id: str) -> None:
        with bind_task_id(task_id):
            await asyncio.sleep(0)
            log.debug("applied")

    await asyncio.gather(work("t1"), work("t2"))
    log.info("no task here")
    lines = _json_lines(log_stream)
    assert sorted(str(x["task_id"]) for x in lines[:2]) == ["t1", "t2"]
    assert lines[2]["task_id"] is None
    assert task_id_var.get() is None


def test_exception_text_is_in_the_json_line(log_stream: io.StringIO) -> None:
    configure_logging(level="INFO", json=True, stream=log_stream)
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logging.getLogger("vidmaas").exception("job failed", extra={"task_id": "t9"})
    [line] = _json_lines(log_stream)
    assert "RuntimeError: boom" in str(line["exc"])
    assert line["task_id"] == "t9"


@pytest.mark.parametrize("json_format", [True, False])
def test_secrets_are_redacted_from_messages_extras_and_tracebacks(
    log_stream: io.StringIO, json_format: bool,
) -> None:
    # A uvicorn server started earlier in the process sets its access logger's level.
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
    configure_logging(level="INFO", json=json_format, stream=log_stream)
    log = logging.getLogger("vidmaas.api")
    log.info("request headers %s", {"Authorization": "Bearer vmk_live_SECRET1"})
    log.info("key %s created", "vmk_abcdefSECRET2", extra={"header": "authorization: SECRET3"})
    log.info("connecting to %s", "redis://:SECRET4@redis:6379/0")
    log.info("db postgresql+asyncpg://vidmaas:SECRET5@pg:5432/vidmaas")
    logging.getLogger("uvicorn.access").info(
        '%s - "%s %s HTTP/%s" %d', "10.0.0.1:5000", "GET",
        "/v1/tasks/t1/events?token=SECRET7&last_event_id=1-0", "1.1", 101)
    log.info("presigned https://s3/x.mp4?X-Amz-Credential=SECRET8&X-Amz-Signature=SECRET9")
    try:
        raise ValueError("bad key vmk_SECRET6")
    except ValueError:
        log.exception("failed")
    out = log_stream.getvalue()
    for n in range(1, 10):
        assert f"SECRET{n}" not in out
    assert "[redacted]" in out
    assert "redis:6379/0" in out  # only the password goes, the host stays readable
    assert "last_event_id=1-0" in out


def test_text_format_is_readable_with_the_task_id(log_stream: io.StringIO) -> None:
    configure_logging(level="INFO", json=False, stream=log_stream)
    with bind_task_id("t42"):
        logging.getLogger("vidmaas.api").warning("slow")
    line = log_stream.getvalue().strip()
    assert " WARNING vidmaas.api [task=t42] slow" in line


def test_configuring_twice_replaces_the_handler_instead_of_duplicating_lines(
    log_stream: io.StringIO,
) -> None:
    configure_logging(level="INFO", json=True, stream=io.StringIO())
    configure_logging(level="INFO", json=True, stream=log_stream)
    logging.getLogger("vidmaas").info("once")
    assert len(_json_lines(log_stream)) == 1


def test_an_unknown_level_is_refused(log_stream: io.StringIO) -> None:
    with pytest.raises(ValueError, match="unknown log level"):
        configure_logging(level="LOUD", json=True, stream=log_stream)
