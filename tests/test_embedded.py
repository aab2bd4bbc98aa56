"""`vidmaas up` as a newcomer runs it: a real subprocess, a real tiny model, real video."""

from __future__ import annotations

import io
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import av
import httpx
import psutil
import pytest

from tests.support.services import free_port

pytestmark = pytest.mark.slow

START_TIMEOUT_S = 90.0
JOB_TIMEOUT_S = 100.0


@dataclass
class Up:
    proc: subprocess.Popen[str]
    url: str
    key: str
    data_dir: Path
    output: list[str]

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}


def _start(data_dir: Path, *, env_extra: dict[str, str] | None = None) -> Up:
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env_extra or {})}
    proc = subprocess.Popen(
        [sys.executable, "-m", "vidmaas.cli", "up", "--data-dir", str(data_dir),
         "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=env)
    assert proc.stdout is not None
    output: list[str] = []
    deadline = time.monotonic() + START_TIMEOUT_S
    url = key = None
    while time.monotonic() < deadline and (url is None or key is None):
        line = proc.stdout.readline()
        if not line:
            if proc.poll() is not None:
                raise AssertionError("vidmaas up exited:\n" + "".join(output))
            continue
        output.append(line)
        if m := re.search(r"vidmaas is up: (http://\S+)", line):
            url = m.group(1).rstrip("/")
        if m := re.search(r"admin API key: (vmk_\S+)", line):
            key = m.group(1)
    assert url and key, "vidmaas up did not announce itself:\n" + "".join(output)
    # Keep draining its output so it never blocks on a full pipe.
    import threading

    def drain() -> None:
        for line in proc.stdout:  # type: ignore[union-attr]
            output.append(line)

    threading.Thread(target=drain, daemon=True).start()
    return Up(proc=proc, url=url, key=key, data_dir=data_dir, output=output)


def _stop(up: Up) -> None:
    up.proc.send_signal(signal.SIGINT)
    try:
        up.proc.wait(60)
    except subprocess.TimeoutExpired as e:
        up.proc.kill()
        up.proc.wait()
        raise AssertionError("vidmaas up did not stop on Ctrl-C:\n"
                             + "".join(up.output[-40:])) from e


def _left_behind(data_dir: Path) -> list[str]:
    """Processes whose command line or environment mentions the data directory."""
    marker = str(data_dir)
    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            cmd = " ".join(p.info["cmdline"] or [])
            env = p.environ() if marker not in cmd else {}
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        if marker in cmd or any(marker in v for v in env.values()):
            found.append(f"{p.info['pid']}: {cmd[:120]}")
    return found


@pytest.fixture
def data_dir(tmp_path: Path, tiny_model_root: Path) -> Iterator[Path]:
    """A data directory whose tiny models are already made (generation is tested by
    the runtime's own tests; here it would only cost time)."""
    d = tmp_path / "vidmaas-data"
    shutil.copytree(tiny_model_root, d / "models")
    yield d


def _wait_terminal(client: httpx.Client, up: Up, task_id: str) -> dict[str, object]:
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while time.monotonic() < deadline:
        task = client.get(f"{up.url}/v1/tasks/{task_id}", headers=up.auth).json()
        if task["status"] in ("completed", "failed", "cancelled"):
            return dict(task)
        time.sleep(0.3)
    raise AssertionError("task did not finish:\n" + "".join(up.output[-60:]))


def test_vidmaas_up_generates_a_decodable_video_and_ctrl_c_leaves_nothing_running(
        data_dir: Path) -> None:
    up = _start(data_dir)
    try:
        with httpx.Client(timeout=30) as client:
            assert client.get(f"{up.url}/readyz").status_code == 200
            page = client.get(f"{up.url}/")
            assert page.status_code == 200
            r = client.post(f"{up.url}/v1/tasks", headers=up.auth,
                            json={"prompt": "a lighthouse in a storm", "steps": 2})
            assert r.status_code == 202, r.text
            task = _wait_terminal(client, up, r.json()["id"])
            assert task["status"] == "completed", task
            video = client.get(f"{up.url}{task['video_url']}", headers=up.auth)
            assert video.status_code == 200
        with av.open(io.BytesIO(video.content)) as container:
            stream = container.streams.video[0]
            frames = list(container.decode(video=0))
            assert stream.codec_context.name == "h264"
            assert (frames[0].width, frames[0].height) == (64, 64)
            assert len(frames) == 9
    finally:
        _stop(up)
    assert up.proc.returncode == 0, "".join(up.output[-40:])
    assert _left_behind(data_dir) == []


def test_cli_users_work_against_a_running_up_and_queued_tasks_survive_a_restart(
        data_dir: Path) -> None:
    up = _start(data_dir, env_extra={"VIDMAAS_GPU_CAPACITY": "0"})
    try:
        made = subprocess.run([sys.executable, "-m", "vidmaas.cli", "users", "create", "carol",
                               "--data-dir", str(data_dir)], capture_output=True, text=True,
                              check=True)
        carol = made.stdout.strip().splitlines()[-1]
        assert carol.startswith("vmk_")
        with httpx.Client(timeout=30) as client:
            r = client.post(f"{up.url}/v1/tasks", headers={"Authorization": f"Bearer {carol}"},
                            json={"prompt": "waiting for a GPU", "steps": 2})
            assert r.status_code == 202
            task_id = r.json()["id"]
            time.sleep(1.0)
            got = client.get(f"{up.url}/v1/tasks/{task_id}", headers=up.auth).json()
            assert got["status"] == "queued"
    finally:
        _stop(up)
    again = _start(data_dir, env_extra={"VIDMAAS_GPU_CAPACITY": "1"})
    try:
        assert again.key == up.key  # the admin key is kept in the data directory
        with httpx.Client(timeout=30) as client:
            assert _wait_terminal(client, again, task_id)["status"] == "completed"
    finally:
        _stop(again)
    assert _left_behind(data_dir) == []
