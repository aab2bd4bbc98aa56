"""The README tells the truth: its commands and its configuration reference."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _load_updater() -> object:
    path = ROOT / "scripts/update_readme.py"
    spec = importlib.util.spec_from_file_location("update_readme", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_configuration_reference_matches_the_settings() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    updater = _load_updater()
    assert updater.render(readme) == readme, "run: python scripts/update_readme.py"  # type: ignore[attr-defined]
    for var in ("VIDMAAS_DATABASE_URL", "VIDMAAS_REDIS_URL", "VIDMAAS_STORAGE_URL",
                "VIDMAAS_EXECUTOR", "VIDMAAS_GPU_CAPACITY"):
        assert f"`{var}`" in readme


def test_the_readme_names_the_command_ci_runs() -> None:
    ci = (ROOT / ".ci/run").read_text()
    command = [line for line in ci.splitlines() if re.match(r"^(bash|\./|make|python|sh) ", line)]
    assert command, ".ci/run runs no command"
    assert command[-1] in (ROOT / "README.md").read_text(encoding="utf-8")
