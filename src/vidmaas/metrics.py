"""Prometheus metrics of every vidmaas role, defined once.

Guarantees:
- Every metric name, label set and bucket layout lives here and nowhere else; the
  api, dispatcher and relay import :class:`Metrics` and call its fields or its
  helpers, never ``prometheus_client`` constructors of their own.
- Nothing is registered at import time. ``Metrics()`` builds its own
  ``CollectorRegistry``, so any number of app instances (tests, ``vidmaas up``
  running three roles in one process) can coexist without "Duplicated timeseries"
  errors. A role exposes only the registry it was given.
- Gauges that mirror a snapshot (queue depth per user, tasks by status) are set
  from a whole mapping by :meth:`Metrics.set_queue_depths` and
  :meth:`Metrics.set_task_counts`: a user or status absent from the snapshot is
  removed or zeroed, so stale series never linger.
- Label values that come from the outside world are bounded: HTTP metrics take the
  route *template* (``/v1/tasks/{task_id}``), never the raw path, and an unknown
  status, stage or outcome is folded into ``other``. Usage counters are per model
  (registry ids), never per user.
- :func:`render` gives the text exposition format and :data:`CONTENT_TYPE` its
  media type; :class:`MetricsServer` serves ``/metrics``, ``/healthz`` and
  ``/readyz`` for roles without an HTTP server of their own (dispatcher, relay), and
  :class:`Heartbeat` turns "the main loop ran recently" into a liveness check.

Several replicas of a role export the same snapshot gauges (queue depth, GPUs in
use); aggregate them with ``max`` in PromQL, not ``sum``. Counters and histograms
are per process: aggregate them with ``sum``.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from vidmaas.domain.events import Stage
from vidmaas.domain.status import TaskStatus

CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"
"""Media type of :func:`render`'s output (Prometheus text format 0.0.4)."""

TASK_STATUSES: Final = tuple(status.value for status in TaskStatus)
"""Statuses exported by ``vidmaas_tasks`` and ``vidmaas_task_outcomes_total``."""

STAGES: Final = tuple(stage.value for stage in Stage)
"""Stages of the job runtime (DESIGN §4), the label values of ``vidmaas_stage_duration_seconds``."""

WEBHOOK_OUTCOMES: Final = ("delivered", "retrying", "failed", "rejected", "skipped")
"""Outcomes of one webhook delivery attempt: accepted (2xx), will be retried, gave up
after the last attempt, refused before sending (a private address, a bad URL), or not
sent because its endpoint was disabled."""

STREAM_TRANSPORTS: Final = ("websocket", "sse")
"""Transports of live event connections."""

_OTHER: Final = "other"
_MODEL: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
"""What a model id looks like (registry ids); anything else is counted as ``other``."""

# Stages last from well under a second (tiny models) to tens of minutes (A14B at 720P).
_STAGE_BUCKETS_S: Final = (
    0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 2400.0, 3600.0,
)
# The dispatch gap should be milliseconds; seconds mean the dispatcher is stuck.
_GAP_BUCKETS_S: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# Queue waits range from nothing to hours when GPUs are scarce.
_WAIT_BUCKETS_S: Final = (
    0.1, 1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 14400.0,
)
_HTTP_BUCKETS_S: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def _bounded(value: str, allowed: tuple[str, ...]) -> str:
    return value if value in allowed else _OTHER


class Metrics:
    """All vidmaas metrics on one private registry. Build one per process (or per app)."""

    def __init__(self, *, role: str = "vidmaas") -> None:
        self.role = role
        """Which role this process plays (``api``, ``dispatcher``, ``relay``, ``up``);
        exported as ``vidmaas_role_info``."""
        self.registry = CollectorRegistry(auto_describe=True)
        """The registry :func:`render` exposes; nothing else is registered on it."""
        r = self.registry

        self.role_info = Gauge(
            "vidmaas_role_info", "Always 1; labels say which role this process plays.",
            ["role"], registry=r,
        )
        self.role_info.labels(role=role).set(1)

        # ---- queue and capacity (dispatcher)
        self.queue_depth = Gauge(
            "vidmaas_queue_depth", "Tasks waiting in the queue, per user.", ["user"], registry=r,
        )
        self.queue_depth_total = Gauge(
            "vidmaas_queue_depth_total", "Tasks waiting in the queue, all users.", registry=r,
        )
        self.gpus_in_use = Gauge(
            "vidmaas_gpus_in_use", "GPUs held by dispatching or running jobs.", registry=r,
        )
        self.gpu_capacity = Gauge(
            "vidmaas_gpu_capacity", "GPUs the dispatcher may hand out at once.", registry=r,
        )
        self.outbox_pending = Gauge(
            "vidmaas_outbox_pending",
            "Events stored with their status change and not yet on the Redis streams "
            "(from the database); growing while Redis cannot take them.", registry=r,
        )
        self.tasks = Gauge(
            "vidmaas_tasks", "Tasks by current status (from the database).", ["status"],
            registry=r,
        )
        self.dispatch_gap = Histogram(
            "vidmaas_dispatch_gap_seconds",
            "Time from a task becoming dispatchable (capacity free and the task next in "
            "line) to its job being launched.",
            buckets=_GAP_BUCKETS_S, registry=r,
        )
        self.queue_wait = Histogram(
            "vidmaas_queue_wait_seconds", "Time a task spent queued before dispatch.",
            buckets=_WAIT_BUCKETS_S, registry=r,
        )
        self.dispatches = Counter(
            "vidmaas_dispatches_total", "Jobs launched, by executor.", ["executor"], registry=r,
        )

        # ---- warm pools (dispatcher)
        self.pool_workers = Gauge(
            "vidmaas_pool_workers", "Pool workers, by model and state.", ["model", "state"],
            registry=r,
        )
        self.pool_assignments = Counter(
            "vidmaas_pool_assignments_total",
            "Tasks sent to pool workers, by model; warm: the worker had run a task before "
            "(a cold start avoided).", ["model", "warm"], registry=r,
        )
        self.pool_scaling = Counter(
            "vidmaas_pool_scaling_total", "Pool scaling decisions carried out, by action.",
            ["action"], registry=r,
        )

        # ---- job runtime stages and outcomes (relay, from events)
        self.stage_duration = Histogram(
            "vidmaas_stage_duration_seconds", "Duration of one job stage.", ["stage"],
            buckets=_STAGE_BUCKETS_S, registry=r,
        )
        self.task_outcomes = Counter(
            "vidmaas_task_outcomes_total", "Tasks that reached a terminal status.", ["status"],
            registry=r,
        )
        self.events_relayed = Counter(
            "vidmaas_events_relayed_total", "Events the relay applied, by event type.",
            ["type"], registry=r,
        )
        self.gpu_seconds = Counter(
            "vidmaas_gpu_seconds_total",
            "GPUs x seconds of running time of ended tasks (all attempts), by model.",
            ["model"], registry=r,
        )
        self.queue_wait_seconds = Counter(
            "vidmaas_model_queue_wait_seconds_total",
            "Seconds ended tasks waited for their first dispatch, by model.",
            ["model"], registry=r,
        )
        self.webhook_deliveries = Counter(
            "vidmaas_webhook_deliveries_total", "Webhook delivery attempts, by outcome.",
            ["outcome"], registry=r,
        )

        # ---- api
        self.stream_connections = Gauge(
            "vidmaas_stream_connections", "Open live event connections, by transport.",
            ["transport"], registry=r,
        )
        self.http_requests = Counter(
            "vidmaas_http_requests_total", "HTTP requests answered.",
            ["method", "route", "status"], registry=r,
        )
        self.http_request_duration = Histogram(
            "vidmaas_http_request_duration_seconds", "Time to answer an HTTP request.",
            ["method", "route"], buckets=_HTTP_BUCKETS_S, registry=r,
        )

        for status in TASK_STATUSES:
            self.tasks.labels(status=status).set(0)
        for transport in STREAM_TRANSPORTS:
            self.stream_connections.labels(transport=transport).set(0)
        self._users_seen: set[str] = set()
        self._pool_seen: set[tuple[str, str]] = set()
        self._lock = threading.Lock()

    # ------------------------------------------------------------ snapshot setters

    def set_queue_depths(self, depths: Mapping[str, int]) -> None:
        """Set the per-user queue depth and the total from one snapshot.

        Users missing from ``depths`` (their queue emptied) lose their series."""
        with self._lock:
            for user in self._users_seen - depths.keys():
                self.queue_depth.remove(user)
            for user, depth in depths.items():
                self.queue_depth.labels(user=user).set(depth)
            self._users_seen = set(depths)
            self.queue_depth_total.set(sum(depths.values()))

    def set_capacity(self, *, in_use: int, capacity: int) -> None:
        """Set GPUs in use and the capacity the dispatcher admits against."""
        self.gpus_in_use.set(in_use)
        self.gpu_capacity.set(capacity)

    def set_outbox_pending(self, pending: int) -> None:
        """Set the number of outbox rows waiting to be published."""
        self.outbox_pending.set(pending)

    def set_task_counts(self, counts: Mapping[str, int]) -> None:
        """Set tasks by status from one snapshot; statuses missing from it become 0."""
        for status in TASK_STATUSES:
            self.tasks.labels(status=status).set(counts.get(status, 0))

    def set_pool_workers(self, census: Mapping[tuple[str, str], int]) -> None:
        """Set the workers per (model, state) from one snapshot; absent pairs become 0."""
        with self._lock:
            for labels in self._pool_seen - census.keys():
                self.pool_workers.labels(model=labels[0], state=labels[1]).set(0)
            for (model, state), n in census.items():
                self.pool_workers.labels(model=model, state=state).set(n)
            self._pool_seen = set(census) | self._pool_seen

    # ------------------------------------------------------------ observations

    def observe_assignment(self, *, model: str, warm: bool) -> None:
        """Count one task sent to a pool worker."""
        self.pool_assignments.labels(model=model, warm="true" if warm else "false").inc()

    def observe_scaling(self, *, action: str) -> None:
        """Count one pool scaling decision (``start``, ``drain``, ``retire``)."""
        self.pool_scaling.labels(action=action).inc()

    def observe_dispatch(self, *, executor: str, gap_s: float, queue_wait_s: float) -> None:
        """Record one launched job: the dispatch gap and how long the task waited."""
        self.dispatches.labels(executor=executor).inc()
        self.dispatch_gap.observe(max(gap_s, 0.0))
        self.queue_wait.observe(max(queue_wait_s, 0.0))

    def observe_event(self, event_type: str) -> None:
        """Count one event applied by the relay."""
        self.events_relayed.labels(type=event_type).inc()

    def observe_stage(self, *, stage: str, duration_s: float) -> None:
        """Record how long one runtime stage took (from a ``completed`` event's timings)."""
        self.stage_duration.labels(stage=_bounded(stage, STAGES)).observe(max(duration_s, 0.0))

    def observe_stage_timings(self, timings: Mapping[str, object]) -> None:
        """Record every stage of a ``completed`` event's ``timings``.

        Keys are stage names with the runtime's unit suffix (``denoise_s``) or
        without it (``denoise``); keys that name no stage (``imports_s``) and values
        that are not numbers are skipped."""
        for key, value in timings.items():
            stage = key.removesuffix("_s")
            if stage in STAGES and isinstance(value, int | float) and not isinstance(value, bool):
                self.observe_stage(stage=stage, duration_s=float(value))

    def observe_outcome(self, status: str) -> None:
        """Count a task reaching a terminal status."""
        self.task_outcomes.labels(status=_bounded(status, TASK_STATUSES)).inc()

    def observe_usage(self, *, model: str, gpu_seconds: float | None,
                      queue_wait_s: float | None) -> None:
        """Count what one ended task used (``Task.gpu_seconds``, ``Task.queue_wait_s``):
        call once, where its terminal status is applied. Per model only: user ids would
        make a series per user."""
        label = model if _MODEL.fullmatch(model) else _OTHER
        self.gpu_seconds.labels(model=label).inc(max(gpu_seconds or 0.0, 0.0))
        if queue_wait_s is not None:
            self.queue_wait_seconds.labels(model=label).inc(max(queue_wait_s, 0.0))

    def observe_webhook(self, outcome: str) -> None:
        """Count one webhook delivery attempt by outcome (see :data:`WEBHOOK_OUTCOMES`)."""
        self.webhook_deliveries.labels(outcome=_bounded(outcome, WEBHOOK_OUTCOMES)).inc()

    def stream_opened(self, transport: str) -> None:
        """A WebSocket or SSE connection started; pair with :meth:`stream_closed`."""
        self.stream_connections.labels(transport=_bounded(transport, STREAM_TRANSPORTS)).inc()

    def stream_closed(self, transport: str) -> None:
        """A WebSocket or SSE connection ended."""
        self.stream_connections.labels(transport=_bounded(transport, STREAM_TRANSPORTS)).dec()

    def observe_http(
        self, *, method: str, route: str, status: int, duration_s: float,
    ) -> None:
        """Record one answered HTTP request. ``route`` is the route template, or
        ``unmatched`` for a 404 no route matched; never the raw path."""
        self.http_requests.labels(method=method, route=route, status=str(status)).inc()
        self.http_request_duration.labels(method=method, route=route).observe(
            max(duration_s, 0.0)
        )


def render(metrics: Metrics) -> bytes:
    """The metrics in the Prometheus text exposition format (serve with :data:`CONTENT_TYPE`)."""
    return bytes(generate_latest(metrics.registry))


class Heartbeat:
    """Liveness of a loop: call :meth:`beat` every iteration; :meth:`is_alive` says
    whether the last beat is younger than ``max_age_s``. Safe to read from the
    :class:`MetricsServer` threads while the event loop writes it."""

    def __init__(self, *, max_age_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_age_s = max_age_s
        self._clock = clock
        self._last = clock()

    def beat(self) -> None:
        """The loop is making progress."""
        self._last = self._clock()

    def is_alive(self) -> bool:
        """True while the last beat (or construction) is within ``max_age_s``."""
        return self._clock() - self._last <= self.max_age_s


class MetricsServer:
    """A small HTTP server for roles without one of their own (dispatcher, relay).

    Serves ``GET /metrics`` (the registry), ``GET /healthz`` (200 while
    ``is_alive()`` is true, else 503) and ``GET /readyz`` (the same with
    ``is_ready()``); anything else is 404. It runs in daemon threads, so it never
    blocks the role's event loop; ``is_alive``/``is_ready`` are called from those
    threads and must only read simple state (a flag, a timestamp).
    """

    def __init__(
        self,
        metrics: Metrics,
        *,
        host: str,
        port: int,
        is_alive: Callable[[], bool] = lambda: True,
        is_ready: Callable[[], bool] | None = None,
    ) -> None:
        ready = is_ready if is_ready is not None else is_alive
        probes: dict[str, Callable[[], bool]] = {"/healthz": is_alive, "/readyz": ready}

        class _Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._answer(200, render(metrics), CONTENT_TYPE)
                elif path in probes:
                    try:
                        ok = probes[path]()
                    except Exception:  # a probe that raises means "not ok"
                        ok = False
                    self._answer(200 if ok else 503, b"ok\n" if ok else b"unavailable\n",
                                 "text/plain; charset=utf-8")
                else:
                    self._answer(404, b"not found\n", "text/plain; charset=utf-8")

            def _answer(self, status: int, body: bytes, content_type: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass  # scrapes and probes every few seconds would drown the role's log

        self._server = ThreadingHTTPServer((host, port), _Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="vidmaas-metrics-server", daemon=True,
        )

    @property
    def port(self) -> int:
        """The bound port (useful when constructed with ``port=0``)."""
        return int(self._server.server_address[1])

    def start(self) -> MetricsServer:
        """Start serving in a background thread; returns self."""
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop serving and release the port. Safe to call twice."""
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join(timeout=5)
        self._server.server_close()

    def __enter__(self) -> MetricsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
