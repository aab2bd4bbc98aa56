"""The page lists a model too large for the platform's GPUs but does not offer it."""

from __future__ import annotations

import re

import pytest
from playwright.async_api import expect

from tests.e2e.conftest import Pages

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


async def test_a_model_too_large_for_the_platform_is_listed_but_cannot_be_chosen(
        pages: Pages) -> None:
    page = await pages.open("alice")  # the test platform has 1 GPU; A14B takes 8 a job
    a14b = page.locator('#f-model option[value="wan2.2-t2v-a14b"]')
    await expect(a14b).to_be_disabled()
    await expect(a14b).to_have_text(re.compile(r"\(unavailable\)$"))
    await expect(a14b).to_have_attribute("title", re.compile("needs 8 GPUs per job"))
    await expect(page.locator('#f-model option[value="tiny-t2v"]')).to_be_enabled()
    await expect(page.locator("#f-model")).to_have_value("tiny-t2v")
