"""``vidmaas submit | watch | tasks | cancel`` against a real running API server."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import av
import pytest

from tests.client.live import LiveServer, png
from vidmaas.cli import main
from vidmaas.client import Client


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """No key or server from the machine running the tests; an empty config home."""
    for name in ("VIDMAAS_API_KEY", "VIDMAAS_SERVER", "VIDMAAS_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config-home"))
    monkeypatch.chdir(tmp_path)
    yield


def conn(live: LiveServer, user: str = "alice") -> list[str]:
    return ["--server", live.url, "--api-key", live.keys[user]]


async def vidmaas(*argv: str) -> int:
    return await asyncio.to_thread(main, list(argv))


async def test_submit_prints_the_new_task_id(live: LiveServer,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    assert await vidmaas("submit", "--prompt", "a fox", "--model", "tiny-t2v",
                         "--size", "96*64", "--num-frames", "5", *conn(live)) == 0
    task_id = capsys.readouterr().out.strip()
    task = await asyncio.to_thread(
        lambda: Client(live.url, live.keys["alice"]).get(task_id))
    assert task["params"]["size"] == "96*64" and task["params"]["num_frames"] == 5


async def test_submit_with_an_image_and_tasks_lists_it_newest_first(
        live: LiveServer, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    image = tmp_path / "in.png"
    image.write_bytes(png())
    await vidmaas("submit", "--prompt", "older", *conn(live))
    await vidmaas("submit", "--prompt", "newer with image", "--image", str(image),
                  "--model", "tiny-ti2v", *conn(live))
    older, newer = capsys.readouterr().out.split()
    assert await vidmaas("tasks", *conn(live)) == 0
    out = capsys.readouterr().out
    assert out.index(newer) < out.index(older) and "newer with image" in out
    assert "queued" in out


async def test_cancel_cancels_a_queued_task(live: LiveServer,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    await vidmaas("submit", "--prompt", "never mind", *conn(live))
    task_id = capsys.readouterr().out.strip()
    assert await vidmaas("cancel", task_id, *conn(live)) == 0
    assert capsys.readouterr().out.strip() == f"{task_id} cancelled"
    assert await vidmaas("cancel", task_id, *conn(live)) == 1
    assert capsys.readouterr().err.startswith("vidmaas: ")


async def test_a_missing_key_exits_1_and_says_where_a_key_can_come_from(
        live: LiveServer, capsys: pytest.CaptureFixture[str]) -> None:
    assert await vidmaas("tasks", "--server", live.url) == 1
    err = capsys.readouterr().err
    assert "no API key" in err and "VIDMAAS_API_KEY" in err and "--api-key" in err


async def test_a_server_error_exits_1_with_its_code_message_and_field(
        live: LiveServer, capsys: pytest.CaptureFixture[str]) -> None:
    assert await vidmaas("submit", "--prompt", "x", "--model", "tiny-t2v", "--size", "1*1",
                         *conn(live)) == 1
    err = capsys.readouterr().err
    assert err.startswith("vidmaas: ") and "(field size)" in err
    assert await vidmaas("tasks", "--server", live.url, "--api-key", "vk_wrong") == 1
    assert "unauthenticated" in capsys.readouterr().err


async def test_the_key_and_server_come_from_the_environment_or_the_config_file(
        live: LiveServer, capsys: pytest.CaptureFixture[str], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "config-home" / "vidmaas" / "config.toml"
    config.parent.mkdir(parents=True)
    config.write_text(f'server = "{live.url}"\napi_key = "{live.keys["bob"]}"\n')
    await vidmaas("submit", "--prompt", "bob's, from the config file")
    bobs = capsys.readouterr().out.strip()
    monkeypatch.setenv("VIDMAAS_API_KEY", live.keys["alice"])
    await vidmaas("submit", "--prompt", "alice's, from the environment")
    alices = capsys.readouterr().out.strip()
    await vidmaas("tasks", "--api-key", live.keys["bob"])
    out = capsys.readouterr().out
    assert bobs in out and alices not in out


async def test_submit_wait_shows_progress_and_downloads_the_finished_video(
        live: LiveServer, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    output = tmp_path / "out" / "fox.mp4"
    output.parent.mkdir()
    run = asyncio.create_task(
        vidmaas("submit", "--prompt", "a fox", "--model", "tiny-t2v", "--wait",
                "--output", str(output), *conn(live)), name="cli")
    drv = live.driver
    task_id = await _first_task(live)
    await asyncio.sleep(0.5)
    await drv.start(task_id)
    await drv.progress(task_id, percent=35.0, eta_s=20.0)
    await asyncio.sleep(0.5)
    await drv.progress(task_id, percent=80.0, eta_s=5.0)
    await asyncio.sleep(0.5)
    await drv.complete(task_id)
    assert await asyncio.wait_for(run, 60) == 0
    captured = capsys.readouterr()
    assert captured.out.split() == [task_id, str(output)]
    assert "denoising" in captured.err and "completed" in captured.err
    with av.open(str(output)) as container:
        assert container.streams.video[0].codec_context.name == "h264"


async def test_watch_a_failed_task_exits_1_with_the_failure_reason(
        live: LiveServer, capsys: pytest.CaptureFixture[str]) -> None:
    await vidmaas("submit", "--prompt", "doomed", *conn(live))
    task_id = capsys.readouterr().out.strip()
    run = asyncio.create_task(vidmaas("watch", task_id, *conn(live)), name="cli")
    await asyncio.sleep(0.5)
    await live.driver.start(task_id)
    await live.driver.fail(task_id, code="out_of_memory", message="CUDA out of memory")
    assert await asyncio.wait_for(run, 60) == 1
    err = capsys.readouterr().err
    assert f"task {task_id} failed: out_of_memory: CUDA out of memory" in err


async def _first_task(live: LiveServer) -> str:
    from vidmaas.db import tasks as repo

    svc = live.app.state.services
    for _ in range(200):
        async with svc.sessions() as s:
            rows = await repo.list_tasks(session=s, user_id=None, limit=1)
        if rows:
            return rows[0].id
        await asyncio.sleep(0.05)
    raise AssertionError("the CLI did not submit")


async def test_wait_downloads_even_when_the_end_is_streamed_before_it_is_recorded(
        live: LiveServer, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    await vidmaas("submit", "--prompt", "racy", *conn(live))
    task_id = capsys.readouterr().out.strip()
    run = asyncio.create_task(vidmaas("watch", task_id, "-o", str(tmp_path / "racy.mp4"),
                                      *conn(live)), name="cli")
    await asyncio.sleep(0.5)
    await live.driver.start(task_id)
    await live.driver.complete(task_id, recorded_after_s=1.5)
    assert await asyncio.wait_for(run, 60) == 0
    assert (tmp_path / "racy.mp4").stat().st_size > 1000


async def test_json_output_and_a_status_filter_are_for_scripts(
        live: LiveServer, capsys: pytest.CaptureFixture[str]) -> None:
    assert await vidmaas("submit", "--prompt", "kept", "--json", *conn(live)) == 0
    kept = json.loads(capsys.readouterr().out)
    await vidmaas("submit", "--prompt", "dropped", *conn(live))
    dropped = capsys.readouterr().out.strip()
    await vidmaas("cancel", dropped, *conn(live))
    capsys.readouterr()
    assert await vidmaas("tasks", "--status", "queued", "--json", *conn(live)) == 0
    page = json.loads(capsys.readouterr().out)
    assert [t["id"] for t in page["data"]] == [kept["id"]] and kept["status"] == "queued"
    assert await vidmaas("tasks", "--status", "cancelled", *conn(live)) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[:2] for line in lines] == [[dropped, "cancelled"]]
