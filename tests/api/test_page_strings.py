"""The page's strings (``static/i18n.js``): one definition per key and language, and
both languages with the same keys. A key written twice silently keeps only the last
one in a JavaScript object literal, which is how a card once showed "starts in about "
with its number missing."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import vidmaas

STRINGS = Path(vidmaas.__file__).parent / "api" / "static" / "i18n.js"


def _languages() -> dict[str, list[str]]:
    text = STRINGS.read_text(encoding="utf-8")
    body = text[text.index("const STRINGS = {"):text.index("\n};")]
    langs: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in body.splitlines():
        if m := re.fullmatch(r"  (\w+): \{", line):
            current = langs.setdefault(m.group(1), [])
        elif (m := re.match(r"    (\"[^\"]+\"|[\w.]+):", line)) and current is not None:
            current.append(m.group(1).strip('"'))
    return langs


def test_every_language_defines_each_string_once() -> None:
    langs = _languages()
    assert set(langs) == {"en", "zh"}
    for lang, keys in langs.items():
        assert len(keys) > 50, f"{lang}: the parser found too few keys"
        twice = sorted(k for k, n in Counter(keys).items() if n > 1)
        assert twice == [], f"{lang} defines these keys more than once: {twice}"


def test_both_languages_have_the_same_strings() -> None:
    langs = _languages()
    assert set(langs["en"]) ^ set(langs["zh"]) == set()
