"""Fixtures for the job runtime: tiny checkpoints of every layout, running the real
``vidmaas-job`` as a process against the real Redis and SeaweedFS, reading its events
back, and a TCP proxy that can cut the job's Redis connection."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis

from vidmaas.bus import keys
from vidmaas.bus.events import parse_entries
from vidmaas.config import StorageSettings
from vidmaas.domain.events import Event, EventType
from vidmaas.domain.ids import new_task_id

BIN = Path(sys.executable).parent
VIDMAAS_JOB = str(BIN / "vidmaas-job")
TORCHRUN = str(BIN / "torchrun")

# Small enough to keep a whole job a few seconds on a CPU (DESIGN §6).
JOB_ARGS = ["--size", "64*64", "--frame-num", "9", "--sample-steps", "3", "--seed", "7"]


@pytest.fixture(scope="session")
def tiny_models(tiny_model_root: Path) -> dict[str, Path]:
    """Layout → tiny checkpoint directory (t2v and ti2v from the shared root, plus a14b)."""
    from vidmaas.runtime.tiny import make_tiny

    models = {"t2v": tiny_model_root / "tiny-t2v", "ti2v": tiny_model_root / "tiny-ti2v",
              "a14b": tiny_model_root / "tiny-a14b",
              "a14b-i2v": tiny_model_root / "tiny-a14b-i2v"}
    for layout in ("a14b", "a14b-i2v"):
        if not models[layout].exists():
            make_tiny(models[layout], layout)
    return models


@dataclass
class Job:
    """One task's job: its environment, and helpers to run steps and read what it did."""

    task_id: str
    env: dict[str, str]
    redis_url: str
    storage: StorageSettings | None
    work_dir: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def command(self, step: str, *args: str, model: str = "tiny-t2v",
                prompt: str = "a red fox in the snow") -> list[str]:
        """``vidmaas-job STEP`` with the model's registry arguments (as the executors pass
        them, ``model_args``), then ``args``, which override them (argparse: last wins)."""
        return [VIDMAAS_JOB, step, "--prompt", prompt, "--model", model, *JOB_ARGS,
                *registry_args(model), *args]

    def run(self, cmd: Sequence[str], *, extra_env: Mapping[str, str] | None = None,
            timeout_s: float = 100) -> subprocess.CompletedProcess[str]:
        # A session of its own, as the executors start jobs: signals meant for a job's
        # process group never reach pytest.
        return subprocess.run(list(cmd), env={**self.env, **(extra_env or {})},
                              capture_output=True, text=True, timeout=timeout_s, check=False,
                              start_new_session=True)

    def start(self, cmd: Sequence[str], *, extra_env: Mapping[str, str] | None = None,
              ) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(list(cmd), env={**self.env, **(extra_env or {})},
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                start_new_session=True)
        self.procs.append(proc)
        return proc

    def events(self) -> list[Event]:
        client = redis.Redis.from_url(self.redis_url, decode_responses=True)
        try:
            entries = client.xrange(keys.task_events(self.task_id))
        finally:
            client.close()
        return [e for _, e in parse_entries(entries)]

    def of_type(self, type_: EventType) -> list[Event]:
        return [e for e in self.events() if e.type is type_]

    def wait_for(self, predicate: Any, *, timeout_s: float = 60) -> list[Event]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            got = self.events()
            if predicate(got):
                return got
            time.sleep(0.05)
        raise AssertionError(f"events never matched; got {[e.type.value for e in got]}")

    def set_cancel_flag(self, by: str = "user") -> None:
        client = redis.Redis.from_url(self.redis_url, decode_responses=True)
        try:
            client.set(keys.cancel_flag(self.task_id), by, ex=600)
        finally:
            client.close()

    def s3(self) -> Any:
        assert self.storage is not None
        return boto3_client(self.storage)

    def bucket_prefix(self) -> tuple[str, str]:
        assert self.storage is not None
        _, _, rest = self.storage.url.partition("s3://")
        bucket, _, prefix = rest.partition("/")
        return bucket, prefix

    def object_keys(self) -> list[str]:
        bucket, prefix = self.bucket_prefix()
        resp = self.s3().list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/outputs/{self.task_id}/")
        return sorted(o["Key"].removeprefix(prefix + "/") for o in resp.get("Contents", []))

    def get_object(self, key: str) -> bytes:
        bucket, prefix = self.bucket_prefix()
        return bytes(self.s3().get_object(Bucket=bucket, Key=f"{prefix}/{key}")["Body"].read())

    def put_object(self, key: str, data: bytes) -> None:
        bucket, prefix = self.bucket_prefix()
        self.s3().put_object(Bucket=bucket, Key=f"{prefix}/{key}", Body=data)


def registry_args(model: str) -> list[str]:
    """The arguments the executors add for ``model``'s defaults (``model_args`` and the
    model's fps); none for a model not in the registry."""
    from vidmaas.domain.jobs import model_args
    from vidmaas.domain.models import ModelRegistry

    registry = ModelRegistry.load()
    if model not in registry:
        return []
    return [*model_args(registry[model]), "--fps", str(registry[model].fps)]


def boto3_client(storage: StorageSettings) -> Any:
    import boto3
    from botocore.config import Config

    assert storage.s3_access_key_id is not None and storage.s3_secret_access_key is not None
    return boto3.client(
        "s3", endpoint_url=storage.s3_endpoint_url, region_name="us-east-1",
        aws_access_key_id=storage.s3_access_key_id.get_secret_value(),
        aws_secret_access_key=storage.s3_secret_access_key.get_secret_value(),
        config=Config(signature_version="s3v4", s3={"addressing_style": "path"}))


def job_env(*, task_id: str, redis_url: str, storage: StorageSettings | None, model_dir: Path,
            work_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("VIDMAAS_", "AWS_", "PET_", "MASTER_"))
           and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update({
        "VIDMAAS_TASK_ID": task_id, "VIDMAAS_REDIS_URL": redis_url,
        "VIDMAAS_MODEL_DIR": str(model_dir), "VIDMAAS_WORK_DIR": str(work_dir),
        "VIDMAAS_HEARTBEAT_INTERVAL_S": "0.5", "VIDMAAS_PROGRESS_INTERVAL_S": "0",
        # Live previews are off unless a test turns them on (test_previews.py), so the
        # other tests' object listings hold only what postprocess uploads.
        "VIDMAAS_PREVIEW_MAX": "0",
        "OMP_NUM_THREADS": "1", "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
    })
    if storage is not None:
        assert storage.s3_access_key_id is not None and storage.s3_secret_access_key is not None
        env.update({
            "VIDMAAS_STORAGE_URL": storage.url,
            "VIDMAAS_STORAGE_S3_ENDPOINT_URL": storage.s3_endpoint_url or "",
            "AWS_ACCESS_KEY_ID": storage.s3_access_key_id.get_secret_value(),
            "AWS_SECRET_ACCESS_KEY": storage.s3_secret_access_key.get_secret_value(),
        })
    return env


@pytest.fixture
def job(redis_url: str, s3_storage: StorageSettings, tiny_models: dict[str, Path],
        tmp_path: Path) -> Iterator[Job]:
    """A fresh task whose job talks to the real Redis and S3, tiny-t2v by default."""
    task_id = new_task_id()
    work = tmp_path / "work"
    j = Job(task_id=task_id, redis_url=redis_url, storage=s3_storage, work_dir=work,
            env=job_env(task_id=task_id, redis_url=redis_url, storage=s3_storage,
                        model_dir=tiny_models["t2v"], work_dir=work))
    yield j
    for proc in j.procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()


# ---------------------------------------------------------------- a Redis that blips

class FlakyProxy:
    """A TCP proxy to a server that can drop every connection and refuse new ones."""

    def __init__(self, host: str, port: int) -> None:
        self._target = (host, port)
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self.port = int(self._listener.getsockname()[1])
        self._down = threading.Event()
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        self.cuts = 0
        threading.Thread(target=self._accept, daemon=True, name="proxy-accept").start()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self._down.is_set():
                client.close()
                continue
            try:
                upstream = socket.create_connection(self._target, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        """Drop every open connection and refuse new ones until ``restore``."""
        self._down.set()
        self.cuts += 1
        with self._lock:
            conns, self._conns = self._conns, []
        for s in conns:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def restore(self) -> None:
        self._down.clear()

    def close(self) -> None:
        self._closed.set()
        self.cut()
        self._listener.close()


@pytest.fixture
def flaky_redis_url(redis_url: str) -> Iterator[tuple[str, FlakyProxy]]:
    """A URL of the test Redis through a proxy the test can cut."""
    from urllib.parse import urlparse

    parsed = urlparse(redis_url)
    proxy = FlakyProxy(parsed.hostname or "127.0.0.1", parsed.port or 6379)
    url = redis_url.replace(f"{parsed.hostname}:{parsed.port}", f"127.0.0.1:{proxy.port}")
    yield url, proxy
    proxy.close()


