"""The web page in a real browser: sign in, submit, live progress, playback, cancel,
failures, isolation between users, reloads, languages and a phone-sized screen."""

from __future__ import annotations

import base64
import re
from datetime import UTC, datetime, timedelta, timezone

import httpx
import pytest
from playwright.async_api import Locator, Page, expect

from tests.client.live import LiveServer, png
from tests.e2e.conftest import Pages

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


async def submit(page: Page, prompt: str, *, model: str = "tiny-t2v") -> Locator:
    """Submit from the form; the new task's card."""
    before = await page.get_by_test_id("task").count()
    if await page.get_by_test_id("model").input_value() != model:
        await page.get_by_test_id("model").select_option(model)
    await page.get_by_test_id("prompt").fill(prompt)
    await page.get_by_test_id("submit").click()
    await expect(page.get_by_test_id("task")).to_have_count(before + 1)
    card = page.get_by_test_id("task").first
    await expect(card.get_by_test_id("task-prompt")).to_have_text(prompt)
    return card


async def task_id_of(card: Locator) -> str:
    value = await card.get_attribute("data-task-id")
    assert value
    return value


async def drop_image(page: Page, data: bytes, name: str = "input.png") -> None:
    """Drop a file on the drop zone the way a drag from the desktop does."""
    await page.evaluate(
        """([b64, name]) => {
            const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
            const dt = new DataTransfer();
            dt.items.add(new File([bytes], name, { type: "image/png" }));
            const drop = document.querySelector('[data-testid="image-drop"]');
            const init = { dataTransfer: dt, bubbles: true, cancelable: true };
            drop.dispatchEvent(new DragEvent("dragover", init));
            drop.dispatchEvent(new DragEvent("drop", init));
        }""", [base64.b64encode(data).decode(), name])


async def test_a_newcomer_submits_with_an_image_watches_progress_and_plays_the_video(
        pages: Pages, live: LiveServer) -> None:
    page = await pages.open("alice")
    await expect(page.get_by_test_id("user-name")).to_have_text("alice")
    await expect(page.get_by_test_id("tasks-empty")).to_be_visible()
    # The image field appears only for a model that takes an image.
    await page.get_by_test_id("model").select_option("tiny-t2v")
    await expect(page.get_by_test_id("image-drop")).to_be_hidden()
    await page.get_by_test_id("model").select_option("tiny-ti2v")
    await expect(page.get_by_test_id("image-drop")).to_be_visible()
    await expect(page.get_by_test_id("size").locator("option")).to_have_text(
        ["64 × 64", "96 × 64", "64 × 96"])
    await drop_image(page, png(96, 64))
    await expect(page.get_by_test_id("image-preview")).to_be_visible()
    assert (await page.get_by_test_id("image-preview").get_attribute("src") or "").startswith(
        "blob:")
    await page.get_by_test_id("size").select_option("96*64")

    card = await submit(page, "a red fox running through snow", model="tiny-ti2v")
    task_id = await task_id_of(card)
    await expect(page.get_by_test_id("image-preview")).to_be_hidden()
    await expect(card.get_by_test_id("status")).to_have_text("Queued")
    await expect(card.get_by_test_id("queue-position")).to_have_text("#1 in queue")
    got = (await aget(f"{live.url}/v1/tasks/{task_id}", headers={
        "Authorization": f"Bearer {live.keys['alice']}"})).json()
    assert got["has_image"] and got["params"]["size"] == "96*64"

    drv = live.driver
    await drv.start(task_id)
    await drv.progress(task_id, percent=30.0, eta_s=75.0)
    bar = card.get_by_test_id("progress")
    await expect(bar).to_have_attribute("aria-valuenow", "30")
    await expect(card.get_by_test_id("status")).to_have_text("Running")
    await expect(card.get_by_test_id("stage")).to_have_text("Denoising")
    await expect(card.get_by_test_id("eta")).to_have_text("about 1:15 left")
    await page.screenshot(path=pages_artifact(pages, "running"))
    await drv.progress(task_id, percent=72.5, eta_s=9.0)
    await expect(bar).to_have_attribute("aria-valuenow", "73")
    await expect(card.get_by_test_id("percent")).to_have_text("73%")

    await drv.complete(task_id)
    await expect(card.get_by_test_id("status")).to_have_text("Completed")
    video = card.get_by_test_id("video")
    await expect(video).to_be_visible()
    await page.wait_for_function(
        """() => { const v = document.querySelector('[data-testid="video"]');
                   return v && v.readyState >= 2 && v.duration > 0; }""", timeout=20_000)
    assert await video.evaluate("v => v.videoWidth") == 64
    await video.evaluate("v => { v.muted = true; return v.play(); }")
    await page.wait_for_function(
        "() => document.querySelector('[data-testid=\"video\"]').currentTime > 0",
        timeout=20_000)
    assert "token=" in (await video.get_attribute("poster") or "")
    href = await card.get_by_test_id("download").get_attribute("href")
    assert href and href.startswith(f"/v1/tasks/{task_id}/video?token=")
    r = await aget(live.url + href)
    assert r.status_code == 200 and r.content[4:8] == b"ftyp"
    await expect(card.get_by_test_id("cancel")).to_be_hidden()


async def aget(url: str, **kw: object) -> httpx.Response:
    """A GET from the test (asynchronous: the server runs in this event loop)."""
    async with httpx.AsyncClient() as c:
        return await c.get(url, **kw)  # type: ignore[arg-type]


def pages_artifact(pages: Pages, step: str) -> str:
    from tests.e2e.conftest import ARTIFACTS

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return str(ARTIFACTS / f"{pages.name}--{step}.png")


async def test_a_running_task_is_cancelled_from_its_card(pages: Pages,
                                                         live: LiveServer) -> None:
    page = await pages.open("alice")
    card = await submit(page, "cancel me")
    task_id = await task_id_of(card)
    await live.driver.start(task_id)
    await live.driver.progress(task_id, percent=20.0)
    await expect(card.get_by_test_id("progress")).to_have_attribute("aria-valuenow", "20")
    await card.get_by_test_id("cancel").click()
    await expect(card.get_by_test_id("status")).to_have_text("Cancelling")
    await expect(card.get_by_test_id("cancel")).to_be_hidden()
    await live.driver.cancelled(task_id)
    await expect(card.get_by_test_id("status")).to_have_text("Cancelled")
    await expect(card.get_by_test_id("progress")).to_be_hidden()


async def test_a_queued_task_is_cancelled_at_once(pages: Pages) -> None:
    page = await pages.open("alice")
    card = await submit(page, "never mind")
    await card.get_by_test_id("cancel").click()
    await expect(card.get_by_test_id("status")).to_have_text("Cancelled")


async def test_a_failed_task_shows_its_reason(pages: Pages, live: LiveServer) -> None:
    page = await pages.open("alice")
    card = await submit(page, "this one fails")
    task_id = await task_id_of(card)
    await live.driver.start(task_id)
    await live.driver.fail(task_id, code="out_of_memory", message="CUDA out of memory on rank 0")
    await expect(card.get_by_test_id("status")).to_have_text("Failed")
    await expect(card.get_by_test_id("error")).to_have_text(
        "Failed: CUDA out of memory on rank 0")
    await expect(card.get_by_test_id("cancel")).to_be_hidden()


async def test_errors_from_the_server_are_shown_next_to_the_field_they_name(
        pages: Pages) -> None:
    page = await pages.open("alice")
    await page.get_by_test_id("model").select_option("tiny-t2v")
    await page.get_by_test_id("prompt").fill("too many steps")
    await page.get_by_test_id("steps").fill("999")
    await page.get_by_test_id("submit").click()
    error = page.get_by_test_id("error-steps")
    await expect(error).to_be_visible()
    await expect(error).to_contain_text(re.compile("step", re.I))
    await expect(page.get_by_test_id("steps")).to_have_attribute("aria-invalid", "true")
    await expect(page.get_by_test_id("task")).to_have_count(0)
    # An empty prompt is caught before it is sent.
    await page.get_by_test_id("prompt").fill("")
    await page.get_by_test_id("submit").click()
    await expect(page.get_by_test_id("error-prompt")).to_have_text(
        "Describe the video you want.")


async def test_a_wrong_key_is_refused_and_signing_out_forgets_the_key(pages: Pages,
                                                                     live: LiveServer) -> None:
    page = await pages.open(None, label="signin")
    await page.get_by_test_id("api-key").fill("vk_wrong")
    await page.get_by_test_id("sign-in").click()
    await expect(page.get_by_test_id("signin-error")).to_have_text(
        "This API key was not accepted.")
    await page.get_by_test_id("api-key").fill(live.keys["bob"])
    await page.get_by_test_id("sign-in").click()
    await expect(page.get_by_test_id("user-name")).to_have_text("bob")
    await page.reload()
    await expect(page.get_by_test_id("user-name")).to_have_text("bob")  # remembered
    await page.get_by_test_id("sign-out").click()
    await expect(page.get_by_test_id("signin")).to_be_visible()
    await page.reload()
    await expect(page.get_by_test_id("signin")).to_be_visible()


async def test_two_users_never_see_each_others_tasks(pages: Pages) -> None:
    alice = await pages.open("alice")
    bob = await pages.open("bob")
    await submit(alice, "alice's secret fox")
    await submit(bob, "bob's whale")
    await bob.reload()
    await alice.reload()
    await expect(alice.get_by_test_id("task-prompt")).to_have_text(["alice's secret fox"])
    await expect(bob.get_by_test_id("task-prompt")).to_have_text(["bob's whale"])


async def test_a_reload_mid_run_resumes_where_the_task_was(pages: Pages,
                                                           live: LiveServer) -> None:
    page = await pages.open("alice")
    card = await submit(page, "long running")
    task_id = await task_id_of(card)
    await live.driver.start(task_id)
    await live.driver.progress(task_id, percent=40.0)
    await expect(card.get_by_test_id("percent")).to_have_text("40%")
    await page.reload()
    card = page.get_by_test_id("task").first
    await expect(card.get_by_test_id("percent")).to_have_text("40%")
    await expect(card.get_by_test_id("stage")).to_have_text("Denoising")
    await live.driver.progress(task_id, percent=65.0)
    await expect(card.get_by_test_id("percent")).to_have_text("65%")
    await expect(page.get_by_test_id("connection")).to_have_text("Live")


async def test_without_the_event_stream_the_page_polls_and_still_shows_progress(
        pages: Pages, live: LiveServer) -> None:
    page = await pages.open(None, label="no-stream")
    # Every WebSocket is refused, as behind a proxy that does not pass them.
    await page.route_web_socket(re.compile(".*"), lambda ws: ws.close(code=1011))
    await page.reload()
    await page.wait_for_selector("body[data-ready='1']")
    from tests.e2e.conftest import sign_in

    await sign_in(page, live.keys["alice"])
    card = await submit(page, "polled")
    task_id = await task_id_of(card)
    await live.driver.start(task_id)
    await live.driver.progress(task_id, percent=55.0)
    await expect(card.get_by_test_id("percent")).to_have_text("55%", timeout=10_000)
    await live.driver.complete(task_id)
    await expect(card.get_by_test_id("status")).to_have_text("Completed", timeout=10_000)
    await expect(card.get_by_test_id("video")).to_be_visible()


async def test_the_page_speaks_chinese_or_english_and_remembers_the_choice(
        pages: Pages, live: LiveServer) -> None:
    page = await pages.open("alice", locale="zh-CN", timezone_id="Asia/Shanghai")
    await expect(page.get_by_test_id("submit")).to_have_text("生成")
    assert await page.evaluate("document.documentElement.lang") == "zh-CN"
    card = await submit(page, "狐狸")
    await expect(card.get_by_test_id("status")).to_have_text("排队中")
    # Times are shown in the browser's time zone (UTC+8 here).
    created = datetime.fromisoformat(
        (await aget(f"{live.url}/v1/tasks/{await task_id_of(card)}",
                    headers={"Authorization": f"Bearer {live.keys['alice']}"})).json()[
            "created_at"]).replace(tzinfo=UTC)
    local = created.astimezone(timezone(timedelta(hours=8)))
    await expect(card.get_by_test_id("created")).to_contain_text(local.strftime("%H:%M"))
    await expect(card.get_by_test_id("queue-position")).to_have_text("排队第 1 位")
    await page.get_by_test_id("lang").click()
    await expect(page.get_by_test_id("submit")).to_have_text("Generate")
    await expect(card.get_by_test_id("status")).to_have_text("Queued")
    await page.reload()
    await expect(page.get_by_test_id("submit")).to_have_text("Generate")
    await page.get_by_test_id("lang").click()
    await expect(page.get_by_test_id("submit")).to_have_text("生成")


async def test_the_page_fits_a_phone_screen_in_dark_mode(pages: Pages, live: LiveServer) -> None:
    page = await pages.open("alice", label="phone", viewport={"width": 390, "height": 844},
                            dark=True)
    card = await submit(page, "a fox on a phone")
    task_id = await task_id_of(card)
    await live.driver.start(task_id)
    await live.driver.progress(task_id, percent=50.0)
    await expect(card.get_by_test_id("percent")).to_have_text("50%")
    width = await page.evaluate("document.documentElement.scrollWidth")
    assert width <= 390, f"the page scrolls sideways ({width}px)"
    box = await page.get_by_test_id("submit").bounding_box()
    assert box and box["width"] > 300  # full-width button
    task_box = await card.bounding_box()
    assert task_box and task_box["x"] >= 0 and task_box["x"] + task_box["width"] <= 390
    background = await page.evaluate("getComputedStyle(document.body).backgroundColor")
    assert background == "rgb(17, 19, 21)"  # the dark palette
    # Every form control has a label a screen reader can announce.
    unlabeled = await page.evaluate("""() => [...document.querySelectorAll(
        'input:not([type=file]), select, textarea, button')].filter((el) =>
        !(el.labels && el.labels.length) && !el.getAttribute('aria-label')
        && !el.textContent.trim()).map((el) => el.id || el.outerHTML.slice(0, 60))""")
    assert unlabeled == []


async def test_the_page_is_served_with_a_strict_policy_and_loads_nothing_external(
        pages: Pages, live: LiveServer) -> None:
    r = await aget(live.url + "/")
    csp = r.headers["content-security-policy"]
    assert r.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in csp and "script-src 'self'" in csp
    assert f"ws://127.0.0.1:{live.url.rsplit(':', 1)[1]}" in csp
    assert r.headers["cache-control"] == "no-store"
    js = await aget(live.url + "/static/app.js")
    assert js.headers["content-type"].startswith("text/javascript")
    again = await aget(live.url + "/static/app.js", headers={"If-None-Match": js.headers["etag"]})
    assert again.status_code == 304
    assert (await aget(live.url + "/static/..%2Fapp.py")).status_code == 404
    page = await pages.open(None, label="requests")
    requested: list[str] = []
    page.on("request", lambda req: requested.append(req.url))
    await page.reload()
    await page.wait_for_selector("body[data-ready='1']")
    assert requested and all(u.startswith(live.url) or u.startswith("data:")
                             for u in requested), requested


async def test_a_video_appears_even_when_the_end_is_streamed_before_it_is_recorded(
        pages: Pages, live: LiveServer) -> None:
    page = await pages.open("alice")
    card = await submit(page, "racy")
    task_id = await task_id_of(card)
    await live.driver.start(task_id)
    await live.driver.progress(task_id, percent=90.0)
    await expect(card.get_by_test_id("percent")).to_have_text("90%")
    await live.driver.complete(task_id, recorded_after_s=2.0)
    await expect(card.get_by_test_id("status")).to_have_text("Completed")
    await expect(card.get_by_test_id("video")).to_be_visible(timeout=15_000)
    await expect(card.get_by_test_id("status")).to_have_text("Completed")


async def test_a_retried_attempt_shows_why_and_the_task_runs_again(pages: Pages,
                                                                  live: LiveServer) -> None:
    page = await pages.open("alice")
    card = await submit(page, "flaky node")
    task_id = await task_id_of(card)
    await live.driver.start(task_id)
    await live.driver.progress(task_id, percent=25.0)
    await expect(card.get_by_test_id("percent")).to_have_text("25%")
    await live.driver.retry(task_id, code="node_lost", message="the node went away")
    await expect(card.get_by_test_id("status")).to_have_text("Queued")
    await expect(card.get_by_test_id("error")).to_contain_text("retrying")
    await expect(card.get_by_test_id("percent")).to_have_text("0%")
    await live.driver.start(task_id)
    await live.driver.progress(task_id, percent=10.0)
    await expect(card.get_by_test_id("status")).to_have_text("Running")
    await expect(card.get_by_test_id("percent")).to_have_text("10%")
    await expect(card.get_by_test_id("error")).to_be_hidden()


async def test_a_dropped_stream_is_polled_over_and_resumed_from_the_last_event(
        pages: Pages, live: LiveServer) -> None:
    import json

    from playwright.async_api import WebSocketRoute

    from tests.e2e.conftest import sign_in
    from vidmaas.bus import keys

    page = await pages.open(None, label="dropped")
    sockets: list[WebSocketRoute] = []
    resumes: list[dict[str, str]] = []  # the resume list each socket sent
    refusing = False

    async def proxy(ws: WebSocketRoute) -> None:
        if refusing:
            await ws.close(code=1011)
            return
        server = ws.connect_to_server()
        sockets.append(ws)

        def forward(message: str | bytes) -> None:
            if isinstance(message, str) and len(resumes) < len(sockets):
                resumes.append(json.loads(message)["after"])
            server.send(message)

        ws.on_message(forward)

    await page.route_web_socket(re.compile(r".*/v1/events.*"), proxy)
    await sign_in(page, live.keys["alice"])
    card = await submit(page, "through a flaky network")
    task_id = await task_id_of(card)
    await live.driver.start(task_id)
    await live.driver.progress(task_id, percent=20.0)
    await expect(card.get_by_test_id("percent")).to_have_text("20%")
    await expect(page.get_by_test_id("connection")).to_have_text("Live")
    [(last_id, _)] = await live.driver.svc.redis.xrevrange(keys.task_events(task_id), count=1)
    first_count = len(sockets)
    refusing = True  # the connection drops, and reconnecting fails for a while
    await sockets[-1].close(code=1011)
    await expect(page.get_by_test_id("connection")).not_to_have_text("Live")
    await live.driver.progress(task_id, percent=45.0)
    # Polled meanwhile.
    await expect(card.get_by_test_id("percent")).to_have_text("45%", timeout=10_000)
    await expect(page.get_by_test_id("connection")).to_have_text("Updating every 2 s")
    refusing = False
    await expect(page.get_by_test_id("connection")).to_have_text("Live", timeout=20_000)
    assert len(sockets) == first_count + 1
    # The new socket resumed the card from the last event it had seen.
    assert resumes[-1] == {task_id: last_id}
    await live.driver.progress(task_id, percent=80.0)
    await expect(card.get_by_test_id("percent")).to_have_text("80%")


async def test_older_tasks_load_on_demand_newest_first(pages: Pages, live: LiveServer) -> None:
    from vidmaas.client import AsyncClient

    async with AsyncClient(live.url, live.keys["alice"]) as c:
        for i in range(22):
            await c.submit(f"task {i:02d}")
    page = await pages.open("alice")
    prompts = page.get_by_test_id("task-prompt")
    await expect(prompts).to_have_count(20)
    await expect(prompts.first).to_have_text("task 21")
    await page.get_by_test_id("more").click()
    await expect(prompts).to_have_count(22)
    await expect(prompts.last).to_have_text("task 00")
    await expect(page.get_by_test_id("more")).to_be_hidden()


async def test_model_names_and_descriptions_follow_the_pages_language(pages: Pages) -> None:
    page = await pages.open("alice")
    model = page.get_by_test_id("model")
    await model.select_option("tiny-ti2v")
    chosen = model.locator("option:checked")
    await expect(chosen).to_have_text("Tiny TI2V (random weights, CPU, optional image)")
    await expect(page.get_by_test_id("model-description")).to_have_text(
        "A tiny random-weight Wan2.2 TI2V-layout checkpoint generated locally.")
    await page.get_by_test_id("lang").click()
    await expect(chosen).to_have_text("微型 TI2V（随机权重，CPU，图片可选）")
    await expect(page.get_by_test_id("model-description")).to_have_text(
        "在本地生成的随机权重微型检查点，结构与 Wan2.2 TI2V 相同。")
    assert await model.input_value() == "tiny-ti2v"  # the choice stays
    t2v = model.locator('option[value="tiny-t2v"]')
    await expect(t2v).to_have_text("微型 T2V（随机权重，CPU）")
    await page.reload()  # the language is remembered, and the list comes back in it
    await expect(t2v).to_have_text("微型 T2V（随机权重，CPU）")
    await page.get_by_test_id("lang").click()
    await expect(t2v).to_have_text("Tiny T2V (random weights, CPU)")
