"""A finished task's card in a real browser: the thumbnail (the poster, scrubbed through
the spritesheet under the pointer or with the arrow keys, playing the video from the
chosen frame) and remix (run it again with a new prompt, refusals shown in the dialog).

The spritesheet test needs the API's ``spritesheet_url``/``spritesheet`` and the test
driver's sheet upload; the remix tests need ``POST /v1/tasks/{id}/rerun``."""

from __future__ import annotations

import json
import math
import re

import pytest
from playwright.async_api import Locator, Page, Route, expect

from tests.client.live import LiveServer
from tests.e2e.conftest import Pages
from tests.e2e.test_web_page import aget, submit, task_id_of

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


async def submitted(page: Page, prompt: str) -> tuple[Locator, str]:
    """Submit from the form: the new card (found by its task's id) and the id."""
    task_id = await task_id_of(await submit(page, prompt))
    return page.locator(f'[data-task-id="{task_id}"]'), task_id


async def completed_card(page: Page, live: LiveServer, prompt: str) -> tuple[Locator, str]:
    card, task_id = await submitted(page, prompt)
    await live.driver.start(task_id)
    await live.driver.complete(task_id)
    await expect(card.get_by_test_id("status")).to_have_text("Completed")
    return card, task_id


async def task_json(live: LiveServer, task_id: str, user: str = "alice") -> dict[str, object]:
    r = await aget(f"{live.url}/v1/tasks/{task_id}",
                   headers={"Authorization": f"Bearer {live.keys[user]}"})
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


async def loaded(img: Locator) -> None:
    await expect(img).to_have_attribute("src", re.compile(r"token="))
    await img.page.wait_for_function("(el) => el.complete && el.naturalWidth > 0",
                                     arg=await img.element_handle(), timeout=15_000)


async def without_spritesheets(route: Route) -> None:
    """The task JSON of a server that sends no spritesheet (older than thumbnails)."""
    response = await route.fetch()
    body = await response.json()
    for task in body.get("data", [body]) if isinstance(body, dict) else []:
        if isinstance(task, dict):
            task.pop("spritesheet_url", None)
            task.pop("spritesheet", None)
    await route.fulfill(response=response, body=json.dumps(body))


async def test_without_a_spritesheet_the_thumbnail_is_the_poster(pages: Pages,
                                                                  live: LiveServer) -> None:
    page = await pages.open(None, label="no-sheet")
    await page.route(re.compile(r".*/v1/tasks(/[^/?]+)?(\?.*)?$"), without_spritesheets)
    from tests.e2e.conftest import sign_in

    await sign_in(page, live.keys["alice"])
    card, task_id = await completed_card(page, live, "a fox, posters only")
    thumb = card.get_by_test_id("thumb")
    await expect(thumb).to_be_visible()
    poster = thumb.get_by_test_id("thumb-poster")
    await loaded(poster)
    assert (await poster.get_attribute("src") or "").startswith(f"/v1/tasks/{task_id}/poster?")
    box = await thumb.bounding_box()
    assert box
    await page.mouse.move(box["x"] + box["width"] * 0.7, box["y"] + box["height"] / 2)
    await expect(thumb.get_by_test_id("thumb-sheet")).to_be_hidden()
    assert await thumb.get_attribute("data-tile") is None
    await expect(thumb).to_have_attribute("aria-label", "Play the video of “a fox, posters only”")
    # A click plays the video from its start.
    await thumb.click()
    await page.wait_for_function(
        "() => { const v = document.querySelector('[data-testid=\"video\"]');"
        " return v && !v.paused && v.currentTime > 0; }", timeout=20_000)


async def test_hovering_the_thumbnail_scrubs_through_the_spritesheet(pages: Pages,
                                                                      live: LiveServer) -> None:
    page = await pages.open("alice")
    card, task_id = await completed_card(page, live, "a fox to scrub through")
    got = await task_json(live, task_id)
    assert got.get("spritesheet_url"), "the task has no spritesheet (the API needs them)"
    sheet = got["spritesheet"]
    assert isinstance(sheet, dict)
    columns, rows, count = sheet["columns"], sheet["rows"], sheet["count"]
    assert count > 1
    thumb = card.get_by_test_id("thumb")
    await loaded(thumb.get_by_test_id("thumb-poster"))
    tiles = thumb.get_by_test_id("thumb-sheet")
    box = await thumb.bounding_box()
    assert box
    # The thumbnail has the tiles' shape.
    assert abs(box["width"] / box["height"] - sheet["tile_width"] / sheet["tile_height"]) < 0.05
    for i in sorted({0, count // 2, count - 1}):
        x = box["width"] * (i + 0.5) / count
        await page.mouse.move(box["x"] + x, box["y"] + box["height"] / 2)
        want = math.floor(x / box["width"] * count)
        await expect(thumb).to_have_attribute("data-tile", str(want))
        await expect(tiles).to_be_visible()
        style = await tiles.evaluate(
            "(el) => { const s = getComputedStyle(el);"
            " return [s.backgroundImage, s.backgroundSize, s.backgroundPosition]; }")
        col, row = i % columns, i // columns
        want_x = col / (columns - 1) * 100 if columns > 1 else 0
        want_y = row / (rows - 1) * 100 if rows > 1 else 0
        assert "token=" in style[0] and f"/v1/tasks/{task_id}/" in style[0], style
        assert style[1] == f"{columns * 100}% {rows * 100}%", style
        got_x, got_y = (float(v.rstrip("%")) for v in style[2].split())
        assert abs(got_x - want_x) < 0.01 and abs(got_y - want_y) < 0.01, style
    # Leaving it shows the poster again.
    await page.mouse.move(box["x"] + box["width"] + 200, box["y"])
    await expect(tiles).to_be_hidden()
    # From the keyboard: End picks the last tile, Enter plays the video from there.
    await thumb.focus()
    await page.keyboard.press("End")
    await expect(thumb).to_have_attribute("data-tile", str(count - 1))
    await page.keyboard.press("ArrowLeft")
    await expect(thumb).to_have_attribute("data-tile", str(count - 2))
    await page.keyboard.press("Enter")
    await page.wait_for_function(
        """(share) => { const v = document.querySelector('[data-testid="video"]');
                        return v && v.duration > 0
                            && v.currentTime >= share * v.duration - 0.1; }""",
        arg=(count - 2) / count, timeout=20_000)


async def test_a_finished_task_is_remixed_with_a_new_prompt(pages: Pages,
                                                            live: LiveServer) -> None:
    page = await pages.open("alice")
    card, task_id = await completed_card(page, live, "a red fox in snow")
    await expect(card.get_by_test_id("remix")).to_be_visible()
    await card.get_by_test_id("remix").click()
    dialog = page.get_by_test_id("remix-dialog")
    await expect(dialog).to_be_visible()
    prompt = dialog.get_by_test_id("remix-prompt")
    await expect(prompt).to_have_value("a red fox in snow")
    await expect(prompt).to_be_focused()
    await prompt.fill("a blue fox in snow")
    await page.keyboard.press("Tab")
    await page.keyboard.press("Tab")  # Cancel, then Generate: all reachable by keyboard
    await expect(dialog.get_by_test_id("remix-submit")).to_be_focused()
    await page.keyboard.press("Enter")
    await expect(dialog).to_be_hidden()
    await expect(page.get_by_test_id("task")).to_have_count(2)
    new = page.get_by_test_id("task").first
    await expect(new.get_by_test_id("task-prompt")).to_have_text("a blue fox in snow")
    await expect(new.get_by_test_id("status")).to_have_text("Queued")
    new_id = await task_id_of(new)
    assert new_id != task_id
    remixed = await task_json(live, new_id)
    assert (remixed["prompt"], remixed["model"]) == ("a blue fox in snow", "tiny-t2v")
    # The remix names its source, and the name leads to the source's card.
    await expect(new.get_by_test_id("remix-of")).to_have_text("Remix of “a red fox in snow”")
    await expect(card.get_by_test_id("remix-of")).to_be_hidden()
    await new.get_by_test_id("remix-of-link").click()
    await expect(card).to_be_focused()
    # A queued task has no remix; Escape closes the dialog without sending anything.
    await expect(new.get_by_test_id("remix")).to_be_hidden()
    await card.get_by_test_id("remix").click()
    await expect(dialog).to_be_visible()
    await page.keyboard.press("Escape")
    await expect(dialog).to_be_hidden()
    await expect(page.get_by_test_id("task")).to_have_count(2)


async def test_a_remix_over_the_queue_quota_is_refused_in_the_dialog(pages: Pages,
                                                                     live: LiveServer) -> None:
    from vidmaas.client import AsyncClient

    async with AsyncClient(live.url, live.keys["root"]) as admin:
        users = await admin.list_users()
        alice = next(u for u in users["data"] if u["name"] == "alice")
        await admin.update_user(alice["id"], {"quota_queued_tasks": 1})
    page = await pages.open("alice", locale="zh-CN")
    first, _ = await submitted(page, "被取消的狐狸")
    await first.get_by_test_id("cancel").click()
    await expect(first.get_by_test_id("status")).to_have_text("已取消")
    waiting, waiting_id = await submitted(page, "排队中的鲸鱼")  # the one alice may have waiting
    await first.get_by_test_id("remix").click()
    dialog = page.get_by_test_id("remix-dialog")
    await expect(dialog.get_by_test_id("remix-prompt")).to_have_value("被取消的狐狸")
    await expect(dialog).to_contain_text("微型 T2V（随机权重，CPU）")  # the model, in Chinese
    await dialog.get_by_test_id("remix-prompt").fill("")
    await dialog.get_by_test_id("remix-submit").click()
    await expect(dialog.get_by_test_id("remix-error")).to_have_text("请描述你想要的视频。")
    await dialog.get_by_test_id("remix-prompt").fill("再来一只狐狸")
    await dialog.get_by_test_id("remix-submit").click()
    error = dialog.get_by_test_id("remix-error")
    await expect(error).to_be_visible()
    await expect(error).to_contain_text("tasks waiting")  # the server's 429, as it said it
    await expect(dialog.get_by_test_id("remix-prompt")).to_have_value("再来一只狐狸")
    await expect(dialog.get_by_test_id("remix-prompt")).to_have_attribute("aria-invalid", "true")
    await expect(page.get_by_test_id("task")).to_have_count(2)
    # With the queue free again (the waiting task cancelled from the command line, say),
    # the same dialog goes through.
    async with AsyncClient(live.url, live.keys["alice"]) as c:
        await c.cancel(waiting_id)
    await expect(waiting.get_by_test_id("status")).to_have_text("已取消")
    await dialog.get_by_test_id("remix-submit").click()
    await expect(dialog).to_be_hidden()
    await expect(page.get_by_test_id("task")).to_have_count(3)
    await expect(page.get_by_test_id("task").first.get_by_test_id("task-prompt")).to_have_text(
        "再来一只狐狸")


async def test_finished_cards_fit_a_phone_screen(pages: Pages, live: LiveServer) -> None:
    page = await pages.open("alice", label="phone", viewport={"width": 360, "height": 740})
    card, _ = await completed_card(page, live, "a fox on a small screen " * 6)
    await loaded(card.get_by_test_id("thumb").get_by_test_id("thumb-poster"))
    await card.get_by_test_id("remix").click()
    dialog = page.get_by_test_id("remix-dialog")
    await expect(dialog).to_be_visible()
    width = await page.evaluate("document.documentElement.scrollWidth")
    assert width <= 360, f"the page scrolls sideways ({width}px)"
    for box in (await card.bounding_box(), await dialog.bounding_box(),
                await dialog.get_by_test_id("remix-submit").bounding_box()):
        assert box and box["x"] >= 0 and box["x"] + box["width"] <= 360, box
