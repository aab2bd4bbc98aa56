"""Composing and running the server roles from settings: the one composition root.

Guarantees: each ``run_*`` function builds its role from the ``Settings`` passed in
(its ``Services``, its executor, its probes; no role opens clients of its own), runs
it until SIGINT/SIGTERM (or until ``stop`` is set), and closes every client it opened,
also on errors. ``Roles`` runs the dispatcher and the relay on one shared ``Services``
(``vidmaas up``), supervising them: a role that crashes is logged and restarted after
a short pause, never silently lost.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
from collections.abc import Awaitable, Callable

from vidmaas.aio import supervise
from vidmaas.config import Settings
from vidmaas.dispatcher.executors.base import Executor
from vidmaas.dispatcher.service import Dispatcher
from vidmaas.metrics import Heartbeat, Metrics, MetricsServer
from vidmaas.relay.service import Relay
from vidmaas.services import Services

log = logging.getLogger(__name__)

RESTART_PAUSE_S = 2.0


def make_executor(settings: Settings) -> Executor:
    if settings.executor == "kubernetes":
        from vidmaas.dispatcher.executors.kubernetes import KubernetesExecutor

        return KubernetesExecutor(settings)
    from vidmaas.dispatcher.executors.local import LocalExecutor

    return LocalExecutor(settings=settings)


def make_dispatcher(services: Services, executor: Executor, *, metrics: Metrics | None = None,
                    heartbeat: Heartbeat | None = None, test_hooks: bool = False) -> Dispatcher:
    return Dispatcher(services, executor, metrics=metrics, heartbeat=heartbeat,
                      test_hooks=test_hooks)


def _consumer_name() -> str:
    """host-pid: a pod's hostname is its name, so consumers are told apart in the group."""
    return f"{socket.gethostname()}-{os.getpid()}"


class Roles:
    """The dispatcher and the relay over one ``Services`` (embedded mode)."""

    def __init__(self, services: Services, *, executor: Executor | None = None) -> None:
        self.services = services
        self.executor = executor or make_executor(services.settings)
        self.dispatcher = make_dispatcher(services, self.executor)
        # One stable name: after a restart this relay first finishes what it left pending.
        self.relay = Relay(services, consumer_name="embedded")
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(supervise("dispatcher", self.dispatcher.run,
                                          stopping=self._stop, log=log,
                                          backoff_initial_s=RESTART_PAUSE_S),
                                name="role-dispatcher"),
            asyncio.create_task(supervise("relay", self.relay.run, stopping=self._stop, log=log,
                                          backoff_initial_s=RESTART_PAUSE_S),
                                name="role-relay"),
        ]

    async def stop(self) -> None:
        self._stop.set()
        self.dispatcher.stop()
        self.relay.stop()
        _, pending = await asyncio.wait(self._tasks, timeout=10)
        for t in pending:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.executor.close()


async def _until_signal(main: Callable[[], Awaitable[None]], on_stop: Callable[[], None]) -> None:
    loop = asyncio.get_running_loop()
    sigs = (signal.SIGTERM, signal.SIGINT)
    for sig in sigs:
        loop.add_signal_handler(sig, on_stop)
    try:
        await main()
    finally:
        for sig in sigs:
            loop.remove_signal_handler(sig)


def _probe_server(settings: Settings, metrics: Metrics, beat: Heartbeat) -> MetricsServer:
    """``/metrics``, ``/healthz`` and ``/readyz`` for a role without an HTTP server."""
    return MetricsServer(metrics, host=settings.metrics_host, port=settings.metrics_port,
                         is_alive=beat.is_alive).start()


async def run_dispatcher(settings: Settings, *, executor: Executor | None = None,
                         probes: bool = True, test_hooks: bool = False) -> None:
    """One dispatcher (``vidmaas dispatcher``) until SIGTERM/SIGINT.

    ``executor``: run jobs there instead of on the executor the settings name (it is
    closed at the end all the same); ``probes``: record metrics and serve ``/metrics``,
    ``/healthz`` and ``/readyz`` on ``metrics_port``; ``test_hooks``: honour the crash
    tests' pauses (a child process of ``tests/dispatcher/test_crash.py`` runs this).
    """
    services = Services.open(settings)
    executor = executor or make_executor(settings)
    metrics = beat = server = None
    if probes:
        metrics = Metrics(role="dispatcher")
        beat = Heartbeat(max_age_s=3 * settings.dispatcher.reconcile_interval_s + 30)
    dispatcher = make_dispatcher(services, executor, metrics=metrics, heartbeat=beat,
                                 test_hooks=test_hooks)
    if metrics is not None and beat is not None:
        server = _probe_server(settings, metrics, beat)
    try:
        await _until_signal(dispatcher.run, dispatcher.stop)
    finally:
        if server is not None:
            server.close()
        await executor.close()
        await services.close()


async def run_relay(settings: Settings) -> None:
    services = Services.open(settings)
    metrics = Metrics(role="relay")
    beat = Heartbeat(max_age_s=120)
    relay = Relay(services, consumer_name=_consumer_name(), metrics=metrics, heartbeat=beat)
    server = _probe_server(settings, metrics, beat)
    try:
        await _until_signal(relay.run, relay.stop)
    finally:
        server.close()
        await services.close()
