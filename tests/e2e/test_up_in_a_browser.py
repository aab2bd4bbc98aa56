"""The newcomer flow end to end: a real `vidmaas up`, a real tiny model, a real browser."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from PIL import Image
from playwright.async_api import async_playwright

from tests.e2e.conftest import ARTIFACTS, CHROMIUM, CHROMIUM_ARGS, sign_in
from tests.support.embedded import JOB_TIMEOUT_S, left_behind, start_up, stop_up

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.mark.timeout(300)
async def test_a_newcomer_signs_in_submits_an_image_watches_progress_and_plays_the_video(
        embedded_data_dir: Path, tmp_path: Path) -> None:
    picture = tmp_path / "photo.png"
    Image.new("RGB", (96, 96), (30, 120, 200)).save(picture)
    up = await asyncio.to_thread(start_up, embedded_data_dir)
    try:
        async with async_playwright() as pw:
            browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = await browser.new_page(base_url=up.url, locale="en-US")
            try:
                await page.goto("/")
                await page.wait_for_selector("body[data-ready='1']")
                await sign_in(page, up.key)
                await page.get_by_test_id("model").select_option("tiny-ti2v")
                await page.get_by_test_id("image-input").set_input_files(str(picture))
                await page.get_by_test_id("image-preview").wait_for()
                await page.get_by_test_id("prompt").fill("the sea, slowly moving")
                await page.get_by_test_id("steps").fill("50")  # long enough to watch
                await page.get_by_test_id("submit").click()
                card = page.get_by_test_id("task").first
                await card.wait_for()

                seen: list[float] = []
                loop = asyncio.get_running_loop()
                deadline = loop.time() + JOB_TIMEOUT_S
                while loop.time() < deadline:
                    status = await card.get_attribute("data-status")
                    now = await card.get_by_test_id("progress").get_attribute("aria-valuenow")
                    if now:
                        seen.append(float(now))
                    if status in ("completed", "failed", "cancelled"):
                        break
                    await asyncio.sleep(0.05)
                assert status == "completed", "".join(up.output[-40:])
                assert seen == sorted(seen), f"progress went backwards: {seen}"
                assert any(0 < p < 100 for p in seen), f"never saw the bar move: {seen}"

                video = card.get_by_test_id("video")
                await video.wait_for()
                await page.wait_for_function(
                    "v => v.readyState >= 2 && v.duration > 0", arg=await video.element_handle(),
                    timeout=30_000)
                await page.screenshot(path=_artifact("up-newcomer-playing.png"))
            finally:
                await browser.close()
    finally:
        await asyncio.to_thread(stop_up, up)
    assert left_behind(embedded_data_dir) == []


def _artifact(name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS / name

