"""Live previews on the page, in a real browser: a ``preview`` event brings the latest
image into the task's card (fetched with the API key, shown from a blob: URL, which the
page's policy allows), a reload shows it again, and the video replaces it."""

from __future__ import annotations

import re

import httpx
import pytest
from playwright.async_api import Page, expect

from tests.client.live import LiveServer
from tests.e2e.conftest import Pages
from tests.e2e.test_web_page import submit, task_id_of

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


async def test_a_preview_event_shows_the_latest_preview_in_the_card_until_the_video_arrives(
        pages: Pages, live: LiveServer) -> None:
    page = await pages.open("alice")
    card = await submit(page, "a lighthouse in a storm")
    task_id = await task_id_of(card)
    preview = card.get_by_test_id("preview")
    await live.driver.start(task_id)
    await live.driver.progress(task_id, percent=30.0)
    await expect(card.get_by_test_id("percent")).to_have_text("30%")
    await expect(preview).to_be_hidden()

    await live.driver.preview(task_id, step=4, color=(200, 30, 30))
    await expect(preview).to_be_visible()
    await expect(preview).to_have_attribute("data-step", "4")
    await expect(preview).to_have_attribute("src", re.compile(r"^blob:"))
    red = await _center_pixel(page, task_id)
    assert red[0] > 150 and red[1] < 90, red

    await live.driver.preview(task_id, step=9, color=(30, 30, 200))
    await expect(preview).to_have_attribute("data-step", "9")
    blue = await _center_pixel(page, task_id)
    assert blue[2] > 150 and blue[0] < 90, blue
    size = await preview.evaluate("(img) => [img.naturalWidth, img.naturalHeight]")
    assert size == [256, 144]

    # A reload mid-run shows the latest preview again, from the task's snapshot.
    await page.reload()
    await expect(preview).to_be_visible()
    assert (await _center_pixel(page, task_id))[2] > 150

    await live.driver.complete(task_id)
    await expect(card.get_by_test_id("video")).to_be_visible(timeout=15_000)
    await expect(preview).to_be_hidden()


async def test_the_page_policy_lets_images_come_from_blob_urls(live: LiveServer) -> None:
    async with httpx.AsyncClient() as client:
        csp = (await client.get(live.url + "/")).headers["content-security-policy"]
    img_src = next(d for d in csp.split(";") if d.strip().startswith("img-src")).split()
    assert "blob:" in img_src and "'self'" in img_src


async def _center_pixel(page: Page, task_id: str) -> list[int]:
    """The RGB of the middle of the card's preview as the browser decoded it."""
    rgb: list[int] = await page.evaluate(
        """(id) => {
            const img = document.querySelector(`[data-task-id="${id}"] [data-testid="preview"]`);
            const c = document.createElement("canvas");
            c.width = img.naturalWidth; c.height = img.naturalHeight;
            const ctx = c.getContext("2d");
            ctx.drawImage(img, 0, 0);
            const d = ctx.getImageData(c.width >> 1, c.height >> 1, 1, 1).data;
            return [d[0], d[1], d[2]];
        }""", task_id)
    return rgb
