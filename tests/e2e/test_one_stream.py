"""The page on one stream, in a real browser: one WebSocket carries every card, tasks
created elsewhere appear, every card resumes after the network drops (no event missed
or repeated, progress never backwards), and queued cards show their place and, when
the stream carries one, the estimated start."""

from __future__ import annotations

import json
import re
from typing import Any

import httpx
import pytest
from playwright.async_api import Page, WebSocket, WebSocketRoute, expect

from tests.client.live import LiveServer
from tests.e2e.conftest import Pages, sign_in
from vidmaas.domain import events as ev

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

# Records, in the page, every message its WebSockets deliver and every progress value
# its cards show, so a test can check what the page got rather than what was sent.
RECORDER = """
(() => {
  window.__frames = [];
  window.__shown = [];
  const Native = window.WebSocket;
  window.WebSocket = class extends Native {
    constructor(...args) {
      super(...args);
      const n = window.__sockets = (window.__sockets || 0) + 1;
      this.addEventListener("message", (e) => window.__frames.push([n, e.data]));
    }
  };
  new MutationObserver((records) => {
    for (const r of records) {
      const card = r.target.closest && r.target.closest("[data-task-id]");
      if (card) window.__shown.push([card.dataset.taskId,
                                     Number(r.target.getAttribute("aria-valuenow"))]);
    }
  }).observe(document, { subtree: true, attributes: true, attributeFilter: ["aria-valuenow"] });
})();
"""


async def create(live: LiveServer, prompt: str, *, user: str = "alice") -> str:
    """A task created over the API (as another tab or the CLI would)."""
    async with httpx.AsyncClient(base_url=live.url) as c:
        r = await c.post("/v1/tasks", json={"prompt": prompt, "model": "tiny-t2v"},
                         headers={"Authorization": f"Bearer {live.keys[user]}"})
    assert r.status_code == 202, r.text
    return str(r.json()["id"])


def card_of(page: Page, task_id: str) -> Any:
    return page.locator(f'[data-testid="task"][data-task-id="{task_id}"]')


async def open_counting_sockets(pages: Pages, live: LiveServer, *, label: str,
                                ) -> tuple[Page, list[WebSocket]]:
    """A signed-in page, with every WebSocket it opens counted from the start."""
    page = await pages.open(None, label=label)
    sockets: list[WebSocket] = []

    def opened(ws: WebSocket) -> None:  # Playwright wants a Python function here
        sockets.append(ws)

    page.on("websocket", opened)
    await page.context.add_init_script(RECORDER)
    await page.reload()
    await page.wait_for_selector("body[data-ready='1']")
    await sign_in(page, live.keys["alice"])
    return page, sockets


async def frames(page: Page) -> list[tuple[int, dict[str, Any]]]:
    """(socket number, message) of every message the page's sockets delivered."""
    raw = await page.evaluate("window.__frames")
    return [(n, json.loads(data)) for n, data in raw]


async def test_one_socket_carries_every_card_and_several_live_tasks_progress_on_their_own(
        pages: Pages, live: LiveServer) -> None:
    tasks = [await create(live, f"fox {i}") for i in range(3)]
    page, sockets = await open_counting_sockets(pages, live, label="one-socket")
    await expect(page.get_by_test_id("task")).to_have_count(3)
    await expect(page.get_by_test_id("connection")).to_have_text("Live")
    for i, task_id in enumerate(tasks):
        await live.driver.start(task_id)
        await live.driver.progress(task_id, percent=10.0 * (i + 1), eta_s=30.0 + i)
    for i, task_id in enumerate(tasks):
        card = card_of(page, task_id)
        await expect(card.get_by_test_id("percent")).to_have_text(f"{10 * (i + 1)}%")
        await expect(card.get_by_test_id("status")).to_have_text("Running")
    for step in (40, 60):
        for task_id in tasks:
            await live.driver.progress(task_id, percent=float(step + tasks.index(task_id)))
    await live.driver.complete(tasks[0])
    await expect(card_of(page, tasks[0]).get_by_test_id("video")).to_be_visible()
    await expect(card_of(page, tasks[1]).get_by_test_id("percent")).to_have_text("61%")
    await expect(card_of(page, tasks[2]).get_by_test_id("percent")).to_have_text("62%")
    assert [s.url.split("?")[0] for s in sockets] == [live.url.replace("http", "ws")
                                                      + "/v1/events"]


async def test_a_task_created_elsewhere_while_the_page_is_open_appears_and_goes_live(
        pages: Pages, live: LiveServer) -> None:
    page, sockets = await open_counting_sockets(pages, live, label="created-elsewhere")
    await expect(page.get_by_test_id("tasks-empty")).to_be_visible()
    await expect(page.get_by_test_id("connection")).to_have_text("Live")
    task_id = await create(live, "made by the CLI")
    card = card_of(page, task_id)
    # Long before the page's half-minute list refresh.
    await expect(card.get_by_test_id("task-prompt")).to_have_text("made by the CLI",
                                                                   timeout=5_000)
    await expect(card.get_by_test_id("status")).to_have_text("Queued")
    await create(live, "someone else's", user="bob")
    await live.driver.start(task_id)
    await live.driver.progress(task_id, percent=35.0)
    await expect(card.get_by_test_id("percent")).to_have_text("35%")
    await expect(page.get_by_test_id("task")).to_have_count(1)
    assert len(sockets) == 1


async def test_after_the_network_drops_every_card_resumes_with_no_missed_or_repeated_event(
        pages: Pages, live: LiveServer) -> None:
    tasks = [await create(live, f"through a tunnel {i}") for i in range(3)]
    page, sockets = await open_counting_sockets(pages, live, label="offline")
    for task_id in tasks:
        await live.driver.start(task_id)
    published: dict[str, list[float]] = {t: [] for t in tasks}

    async def progress(task_id: str, percent: float) -> None:
        await live.driver.progress(task_id, percent=percent)
        published[task_id].append(percent)

    for task_id in tasks:
        await expect(card_of(page, task_id).get_by_test_id("status")).to_have_text("Running")
    for k, task_id in enumerate(tasks):
        await progress(task_id, 10.0 + k)
        await progress(task_id, 20.0 + k)
    await expect(card_of(page, tasks[2]).get_by_test_id("percent")).to_have_text("22%")

    await page.context.set_offline(True)
    await expect(page.get_by_test_id("connection")).to_have_text("Reconnecting…")
    # Away: every task moves on, one of them to its end, and a new task is created.
    for step in (30.0, 40.0, 50.0):
        for k, task_id in enumerate(tasks):
            await progress(task_id, step + k)
    await live.driver.complete(tasks[0])
    created = await create(live, "created while away")
    await page.context.set_offline(False)

    await expect(page.get_by_test_id("connection")).to_have_text("Live", timeout=15_000)
    await expect(card_of(page, tasks[0]).get_by_test_id("status")).to_have_text("Completed")
    await expect(card_of(page, tasks[0]).get_by_test_id("video")).to_be_visible()
    await expect(card_of(page, tasks[1]).get_by_test_id("percent")).to_have_text("51%")
    await expect(card_of(page, tasks[2]).get_by_test_id("percent")).to_have_text("52%")
    await expect(card_of(page, created).get_by_test_id("status")).to_have_text("Queued")
    for k, task_id in enumerate(tasks[1:], start=1):
        await progress(task_id, 60.0 + k)
    await expect(card_of(page, tasks[2]).get_by_test_id("percent")).to_have_text("62%")
    await expect(card_of(page, tasks[1]).get_by_test_id("percent")).to_have_text("61%")

    got = await frames(page)
    assert {n for n, _ in got} == {1, 2}  # one socket before the drop, one after
    assert len(sockets) == 2
    for task_id in tasks:
        mine = [m for _, m in got if m.get("task_id") == task_id]
        ids = [m["id"] for m in mine if "id" in m and m["type"] != "snapshot"]
        assert len(ids) == len(set(ids)), "an event was delivered twice"
        shown = [m["data"]["percent"] for m in mine if m["type"] == "progress"]
        assert shown == published[task_id], "an event was missed"
    finished = [m["type"] for _, m in got if m.get("task_id") == tasks[0]]
    assert finished[-2:] == ["completed", "end"]
    # The resumed socket started each card from where it was: a snapshot, then events.
    resumed = [m for n, m in got if n == 2 and m.get("task_id") == tasks[1]]
    assert resumed[0]["type"] == "snapshot"
    # Progress on every card only ever went up.
    seen: dict[str, list[float]] = {}
    for task_id, value in await page.evaluate("window.__shown"):
        seen.setdefault(task_id, []).append(value)
    for task_id in tasks:
        assert seen[task_id] == sorted(seen[task_id]), seen[task_id]


async def test_a_queued_card_shows_its_place_and_the_estimated_start_when_the_stream_has_one(
        pages: Pages, live: LiveServer) -> None:
    page = await pages.open(None, label="queue")
    routes: list[WebSocketRoute] = []

    def proxy(ws: WebSocketRoute) -> None:
        ws.connect_to_server()
        routes.append(ws)

    await page.route_web_socket(re.compile(r".*/v1/events.*"), proxy)
    await sign_in(page, live.keys["alice"])
    first, second = await create(live, "first in line"), await create(live, "second")
    card = card_of(page, second)
    await expect(card.get_by_test_id("queue-position")).to_have_text("#2 in queue")
    # The server's own estimate, pushed with the position.
    await expect(card.get_by_test_id("starts-in")).to_have_text(
        re.compile(r"^starts in about \d+ min$"))
    async with httpx.AsyncClient(base_url=live.url) as c:
        r = await c.post(f"/v1/tasks/{first}/cancel",
                         headers={"Authorization": f"Bearer {live.keys['alice']}"})
        assert r.status_code == 200
    await expect(card.get_by_test_id("queue-position")).to_have_text("#1 in queue")
    # A position push that carries an estimated start, as the stream may send one.
    push = {**ev.position_push(second, position=1)}
    push["data"] = {**push["data"], "starts_in_s": 250}
    routes[-1].send(json.dumps(push))
    await expect(card.get_by_test_id("starts-in")).to_have_text("starts in about 4 min")
    await page.get_by_test_id("lang").click()
    await expect(card.get_by_test_id("starts-in")).to_have_text("约 4 分钟后开始")
    await expect(card.get_by_test_id("queue-position")).to_have_text("排队第 1 位")
    await live.driver.start(second)
    await expect(card.get_by_test_id("starts-in")).to_be_hidden()
    await expect(card.get_by_test_id("queue-position")).to_be_hidden()
