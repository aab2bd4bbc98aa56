"""``python -m bench all [--short]`` runs every benchmark; ``python -m bench NAME`` one.

Each script runs as its own process (its figures are printed as it goes); ``--short``
is passed to scripts whose parser accepts it, and a script without it runs in full
(the summary says so). The summary lists each script's exit status and wall time.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ORDER = ("runtime_overhead", "preview", "dispatch", "events", "relay", "submit", "positions",
         "scale", "eta", "warm", "assign")


def scripts() -> list[str]:
    """Benchmark scripts present here: the known order first, then any others."""
    found = {p.stem for p in HERE.glob("*.py") if not p.stem.startswith("_")}
    return [n for n in ORDER if n in found] + sorted(found - set(ORDER))


def accepts_short(name: str) -> bool:
    """Whether the script's own ``--help`` lists ``--short``."""
    try:
        out = subprocess.run([sys.executable, str(HERE / f"{name}.py"), "--help"],
                             capture_output=True, text=True, timeout=120, check=False)
    except subprocess.TimeoutExpired:
        return False
    return "--short" in out.stdout


def run_one(name: str, *, short: bool) -> tuple[int, float, str]:
    """(exit status, seconds, note) after running ``bench/NAME.py`` with its output shown."""
    note = ""
    args = [sys.executable, str(HERE / f"{name}.py")]
    if short:
        if accepts_short(name):
            args.append("--short")
        else:
            note = "no --short option: ran in full"
    print(f"\n==== {name} {' '.join(args[2:])}".rstrip(), flush=True)
    started = time.monotonic()
    rc = subprocess.call(args, cwd=HERE.parent)
    return rc, time.monotonic() - started, note


def main() -> int:
    names = scripts()
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("which", choices=["all", *names], help="a benchmark, or all of them")
    parser.add_argument("--short", action="store_true", help="quick versions (a few minutes)")
    args = parser.parse_args()
    chosen = names if args.which == "all" else [args.which]
    results = [(n, *run_one(n, short=args.short)) for n in chosen]
    print("\n==== summary")
    for name, rc, took, note in results:
        status = "ok" if rc == 0 else f"FAILED (exit {rc})"
        print(f"{name:<18} {status:<18} {took:7.1f} s  {note}".rstrip())
    return 0 if all(rc == 0 for _, rc, _, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main())
