"""Browser tests: Debian's Chromium driven by Playwright against a live API server.

The browser is the system's ``/usr/bin/chromium`` (``apt-get install chromium``), never
a downloaded one. Every test gets a fresh browser context, fails on any uncaught page
error or Content-Security-Policy violation, and saves a screenshot of each page it
used under ``test-artifacts/e2e/`` (also when it fails).
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from playwright.async_api import Browser, BrowserContext, Page, async_playwright

from tests.client.live import LiveServer, live_server
from vidmaas.config import StorageSettings

CHROMIUM = os.environ.get("VIDMAAS_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "e2e"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if shutil.which(CHROMIUM) is None:
        skip = pytest.mark.skip(reason=f"{CHROMIUM} is missing: apt-get install -y chromium")
        for item in items:
            if "e2e" in item.keywords:
                item.add_marker(skip)


@pytest.fixture
async def live(sqlite_url: str, redis_url: str, local_storage: StorageSettings,
               ) -> AsyncIterator[LiveServer]:
    async with live_server(db_url=sqlite_url, redis_url=redis_url,
                           storage=local_storage) as server:
        yield server


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as pw:
        b = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            await b.close()


@dataclass
class Pages:
    """Opens signed-in (or not) pages and checks them for errors at the end."""

    live: LiveServer
    browser: Browser
    name: str
    contexts: list[BrowserContext] = field(default_factory=list)
    pages: list[tuple[str, Page]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    async def open(self, user: str | None = "alice", *, label: str | None = None,
                   locale: str = "en-US", viewport: dict[str, int] | None = None,
                   timezone_id: str = "UTC", dark: bool = False) -> Page:
        ctx = await self.browser.new_context(
            locale=locale, timezone_id=timezone_id, color_scheme="dark" if dark else "light",
            viewport=viewport or {"width": 1280, "height": 900},  # type: ignore[arg-type]
            base_url=self.live.url, is_mobile=bool(viewport and viewport["width"] < 500),
            has_touch=bool(viewport and viewport["width"] < 500))
        self.contexts.append(ctx)
        page = await ctx.new_page()
        page.on("pageerror", lambda e: self.errors.append(f"page error: {e}"))
        page.on("console", lambda m: self.errors.append(f"console: {m.text}")
                if m.type == "error" and "Content-Security-Policy" in m.text else None)
        self.pages.append((label or user or "anonymous", page))
        await page.goto("/")
        await page.wait_for_selector("body[data-ready='1']")
        if user is not None:
            await sign_in(page, self.live.keys[user])
        return page

    async def close(self) -> None:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        for label, page in self.pages:
            if not page.is_closed():
                await page.screenshot(path=ARTIFACTS / f"{self.name}--{label}.png",
                                      full_page=True)
        for ctx in self.contexts:
            await ctx.close()


async def sign_in(page: Page, key: str) -> None:
    await page.get_by_test_id("api-key").fill(key)
    await page.get_by_test_id("sign-in").click()
    await page.get_by_test_id("submit").wait_for()


@pytest.fixture
async def pages(live: LiveServer, browser: Browser, request: pytest.FixtureRequest,
                ) -> AsyncIterator[Pages]:
    name = re.sub(r"[^A-Za-z0-9_]+", "_", request.node.name)[:120]
    p = Pages(live=live, browser=browser, name=name)
    try:
        yield p
    finally:
        await p.close()
    assert not p.errors, p.errors

