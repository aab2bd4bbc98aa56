"""`vidmaas up` as a newcomer runs it: a real subprocess, a real tiny model, real video."""

from __future__ import annotations

import io
import subprocess
import sys
import time
from pathlib import Path

import av
import httpx
import pytest

from tests.support.embedded import JOB_TIMEOUT_S, Up, left_behind, start_up, stop_up

pytestmark = pytest.mark.slow


@pytest.fixture
def data_dir(embedded_data_dir: Path) -> Path:
    return embedded_data_dir


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
    up = start_up(data_dir)
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
        stop_up(up)
    assert up.proc.returncode == 0, "".join(up.output[-40:])
    assert left_behind(data_dir) == []


def test_cli_users_work_against_a_running_up_and_queued_tasks_survive_a_restart(
        data_dir: Path) -> None:
    up = start_up(data_dir, env_extra={"VIDMAAS_GPU_CAPACITY": "0"})
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
        stop_up(up)
    again = start_up(data_dir, env_extra={"VIDMAAS_GPU_CAPACITY": "1"})
    try:
        assert again.key == up.key  # the admin key is kept in the data directory
        with httpx.Client(timeout=30) as client:
            assert _wait_terminal(client, again, task_id)["status"] == "completed"
    finally:
        stop_up(again)
    assert left_behind(data_dir) == []
