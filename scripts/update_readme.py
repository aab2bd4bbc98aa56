"""Rewrites the README's configuration reference from the settings' docstrings."""

from __future__ import annotations

import re
from pathlib import Path

from vidmaas.config import settings_reference

START, END = "<!-- settings-reference:start -->", "<!-- settings-reference:end -->"


def render(readme: str) -> str:
    pattern = re.compile(re.escape(START) + r".*?" + re.escape(END), re.S)
    return pattern.sub(lambda _: f"{START}\n{settings_reference()}{END}", readme)


if __name__ == "__main__":
    path = Path(__file__).resolve().parents[1] / "README.md"
    path.write_text(render(path.read_text(encoding="utf-8")), encoding="utf-8")
