"""The admin page in a real browser: only for admins; the queue, what runs, usage, users
and keys; Chinese and English, the keyboard, a phone-sized screen."""

from __future__ import annotations

import httpx
import pytest
from playwright.async_api import Page, expect

from tests.client.live import LiveServer
from tests.e2e.conftest import Pages

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


async def api(live: LiveServer, method: str, path: str, *, user: str = "alice",
              key: str | None = None, **kw: object) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key or live.keys[user]}"}
    async with httpx.AsyncClient(base_url=live.url) as c:
        return await c.request(method, path, headers=headers, **kw)  # type: ignore[arg-type]


async def submit(live: LiveServer, user: str, prompt: str) -> str:
    r = await api(live, "POST", "/v1/tasks", user=user, json={"prompt": prompt,
                                                              "model": "tiny-t2v"})
    assert r.status_code == 202, r.text
    return str(r.json()["id"])


async def open_admin(pages: Pages, **kw: object) -> Page:
    page = await pages.open("root", **kw)  # type: ignore[arg-type]
    await page.get_by_test_id("nav-admin").click()
    await expect(page.get_by_test_id("admin")).to_be_visible()
    return page


async def test_only_admins_get_the_admin_page(pages: Pages, live: LiveServer) -> None:
    page = await pages.open("alice")
    await expect(page.get_by_test_id("nav-admin")).to_be_hidden()
    await expect(page.get_by_test_id("admin")).to_be_hidden()
    loaded = await page.evaluate(
        "performance.getEntriesByType('resource').map((e) => e.name)")
    assert not any(u.endswith("/static/admin.js") for u in loaded)
    admin = await pages.open("root", label="root")
    await expect(admin.get_by_test_id("nav-admin")).to_be_visible()
    await expect(admin.get_by_test_id("nav-tasks")).to_have_attribute("aria-pressed", "true")
    await admin.get_by_test_id("nav-admin").click()
    await expect(admin.get_by_test_id("nav-admin")).to_have_attribute("aria-pressed", "true")
    await expect(admin.get_by_test_id("submit")).to_be_hidden()
    await admin.get_by_test_id("nav-tasks").click()
    await expect(admin.get_by_test_id("submit")).to_be_visible()
    # Signing out removes the admin page; a plain user signing in next does not get it.
    await admin.get_by_test_id("sign-out").click()
    await expect(admin.get_by_test_id("nav-admin")).to_be_hidden()


async def test_the_queue_and_what_runs_are_shown_by_model_and_user_with_start_estimates(
        pages: Pages, live: LiveServer) -> None:
    running = await submit(live, "bob", "bob's running")
    await live.driver.start(running)
    await live.driver.progress(running, percent=40.0)
    waiting = [await submit(live, "alice", "a1"), await submit(live, "alice", "a2"),
               await submit(live, "bob", "b1")]
    page = await open_admin(pages)
    rows = page.get_by_test_id("queued-row")
    await expect(rows).to_have_count(3)
    assert sorted([await r.get_attribute("data-task-id") for r in await rows.all()]) \
        == sorted(waiting)
    await expect(rows.first).to_contain_text("starts in about")
    # (The test driver moves tasks without leasing GPUs: none are in use.)
    await expect(page.get_by_test_id("admin-capacity")).to_have_text(
        "0 of 1 GPUs in use · 3 waiting")
    model = page.locator('[data-testid="model-row"][data-model="tiny-t2v"]')
    await expect(model).to_contain_text("3")
    await expect(page.locator('[data-testid="user-queue-row"][data-user="alice"]')) \
        .to_contain_text("2")
    run = page.get_by_test_id("running-row")
    await expect(run).to_have_count(1)
    await expect(run).to_contain_text("bob")
    await expect(run).to_contain_text("Running · Denoising")
    await expect(run.get_by_role("progressbar")).to_have_attribute("aria-valuenow", "40")
    # The page follows the queue: once the running task ends and the next starts.
    await live.driver.complete(running)
    await live.driver.start(waiting[0])
    await page.get_by_test_id("admin-refresh").click()
    await expect(rows).to_have_count(2)
    await expect(page.get_by_test_id("running-row")).to_contain_text("alice")
    # Usage of the day: bob's finished task.
    await page.get_by_test_id("usage-show").click()
    await expect(page.locator('[data-testid="usage-row"][data-user="bob"]')).to_contain_text(
        "1")


async def test_an_admin_creates_a_user_sets_quotas_and_manages_keys(
        pages: Pages, live: LiveServer) -> None:
    page = await open_admin(pages)
    await page.get_by_test_id("new-user-name").fill("hana")
    await page.get_by_test_id("new-user-create").click()
    secret_box = page.get_by_test_id("secret")
    await expect(secret_box).to_be_visible()
    secret = (await page.get_by_test_id("secret-value").text_content() or "").strip()
    assert secret.startswith("vmk_")
    assert (await api(live, "GET", "/v1/me", key=secret)).json()["name"] == "hana"
    await page.get_by_test_id("secret-hide").click()
    await expect(secret_box).to_be_hidden()
    assert secret not in await page.content()

    row = page.locator('[data-testid="user-row"][data-user="hana"]')
    await row.get_by_test_id("user-edit").click()
    form = page.get_by_test_id("edit-form")
    await form.get_by_test_id("edit-weight").fill("500")
    await form.get_by_test_id("edit-save").click()
    await expect(form.get_by_test_id("edit-error")).to_contain_text("weight")
    await expect(form.get_by_test_id("edit-weight")).to_have_attribute("aria-invalid", "true")
    await form.get_by_test_id("edit-weight").fill("2")
    await form.get_by_test_id("edit-max-priority").select_option("high")
    await form.get_by_test_id("edit-quota-gpu_seconds_day").fill("600")
    await form.get_by_test_id("edit-save").click()
    await expect(form).to_be_hidden()
    await expect(row).to_contain_text("High")
    await expect(row).to_contain_text("GPU-s/day 600")
    me = (await api(live, "GET", "/v1/me", key=secret)).json()
    assert (me["weight"], me["max_priority"], me["limits"]["gpu_seconds_day"]) == (
        2.0, "high", 600)

    await row.get_by_test_id("user-keys").click()
    keys = page.get_by_test_id("key-row")
    await expect(keys).to_have_count(1)
    await page.get_by_test_id("key-new-name").fill("ci")
    await page.get_by_test_id("key-create").click()
    await expect(keys).to_have_count(2)
    second = (await page.get_by_test_id("secret-value").text_content() or "").strip()
    assert second.startswith("vmk_") and second != secret
    await expect(keys.nth(1)).to_contain_text("ci")
    await expect(keys.first).to_contain_text("Active")
    await keys.first.get_by_test_id("key-revoke").click()
    await expect(keys.first).to_contain_text("Revoked")
    assert (await api(live, "GET", "/v1/me", key=secret)).status_code == 401
    assert (await api(live, "GET", "/v1/me", key=second)).status_code == 200
    await row.get_by_test_id("user-disable").click()
    await expect(row).to_contain_text("Disabled")
    assert (await api(live, "GET", "/v1/me", key=second)).status_code == 401
    await row.get_by_test_id("user-enable").click()
    await expect(row).to_contain_text("Active")


async def test_the_admin_page_speaks_chinese_works_by_keyboard_and_fits_a_phone(
        pages: Pages, live: LiveServer) -> None:
    await submit(live, "alice", "排队的任务")
    page = await pages.open("root", locale="zh-CN", label="phone-zh",
                            viewport={"width": 390, "height": 844})
    nav = page.get_by_test_id("nav-admin")
    await expect(nav).to_have_text("管理")
    await nav.focus()
    await page.keyboard.press("Enter")
    await expect(page.get_by_test_id("admin")).to_be_visible()
    await expect(page.locator("#a-queue-title")).to_have_text("队列")
    await expect(page.get_by_test_id("queued-row")).to_contain_text("马上开始")  # nothing runs
    await expect(page.locator('[data-testid="user-row"][data-user="alice"]')).to_contain_text(
        "普通")
    width = await page.evaluate("document.documentElement.scrollWidth")
    assert width <= 390, f"the admin page scrolls sideways ({width}px)"
    await page.get_by_test_id("lang").click()
    await expect(page.locator("#a-queue-title")).to_have_text("Queue")
    await expect(page.locator('[data-testid="user-row"][data-user="alice"]')).to_contain_text(
        "Normal")
    # Every control of the admin page has a name a screen reader can announce.
    await page.locator('[data-testid="user-row"][data-user="alice"]').get_by_test_id(
        "user-edit").click()
    unlabeled = await page.evaluate("""() => [...document.querySelectorAll(
        '#admin-view input, #admin-view select, #admin-view button')].filter((el) =>
        !(el.labels && el.labels.length) && !el.getAttribute('aria-label')
        && !el.textContent.trim()).map((el) => el.id || el.outerHTML.slice(0, 80))""")
    assert unlabeled == []


async def test_a_queued_task_shows_about_when_it_starts_once_the_stream_says(
        pages: Pages, live: LiveServer) -> None:
    from vidmaas.domain.events import Event, EventType

    page = await pages.open("alice", label="alice-eta")
    task_id = await submit(live, "alice", "waiting for a GPU")
    card = page.locator(f'[data-task-id="{task_id}"]')
    await page.reload()
    await page.wait_for_selector("body[data-ready='1']")
    await expect(card.get_by_test_id("queue-position")).to_have_text("#1 in queue")
    await expect(page.get_by_test_id("connection")).to_have_text("Live")  # the stream is open
    await live.driver.svc.lifecycle.publish(
        Event(task_id, EventType.QUEUED, {"position": 2, "starts_in_s": 185.0}))
    await expect(card.get_by_test_id("queue-position")).to_have_text("#2 in queue")
    await expect(card.get_by_test_id("starts-in")).to_have_text("starts in about 3 min")
