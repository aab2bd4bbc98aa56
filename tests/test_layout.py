"""The layout DESIGN §10 promises: small modules, and every part a newcomer looks for is a
file of its name."""

from __future__ import annotations

from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "vidmaas"
MAX_MODULE_LINES = 450


def test_no_module_is_over_the_size_a_reader_takes_in_at_once() -> None:
    big = {str(p.relative_to(SRC)): n for p in SRC.rglob("*.py")
           if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES}
    assert big == {}, f"split these modules (over {MAX_MODULE_LINES} lines): {big}"


@pytest.mark.parametrize("part", [
    "dispatcher/admission.py", "dispatcher/outcomes.py", "dispatcher/watchdog.py",
    "dispatcher/reconciler.py", "dispatcher/service.py", "dispatcher/executors/local.py",
    "dispatcher/executors/kubernetes/executor.py", "api/streams/hub.py",
    "api/streams/connection.py", "relay/apply.py", "relay/service.py", "bus/consumer.py",
    "bus/queue.py", "db/tasks.py", "db/webhooks.py", "runtime/reporter.py",
])
def test_every_part_named_in_the_design_is_a_file_of_that_name(part: str) -> None:
    assert (SRC / part).is_file()
