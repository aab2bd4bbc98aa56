"""Running `vidmaas up` as a subprocess in tests, as a newcomer would."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from tests.support.services import free_port

START_TIMEOUT_S = 90.0
JOB_TIMEOUT_S = 100.0


@dataclass
class Up:
    proc: subprocess.Popen[str]
    url: str
    key: str
    data_dir: Path
    output: list[str]

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}


def start_up(data_dir: Path, *, env_extra: dict[str, str] | None = None) -> Up:
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env_extra or {})}
    proc = subprocess.Popen(
        [sys.executable, "-m", "vidmaas.cli", "up", "--data-dir", str(data_dir),
         "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=env)
    assert proc.stdout is not None
    output: list[str] = []
    deadline = time.monotonic() + START_TIMEOUT_S
    url = key = None
    while time.monotonic() < deadline and (url is None or key is None):
        line = proc.stdout.readline()
        if not line:
            if proc.poll() is not None:
                raise AssertionError("vidmaas up exited:\n" + "".join(output))
            continue
        output.append(line)
        if m := re.search(r"vidmaas is up: (http://\S+)", line):
            url = m.group(1).rstrip("/")
        if m := re.search(r"admin API key: (vmk_\S+)", line):
            key = m.group(1)
    assert url and key, "vidmaas up did not announce itself:\n" + "".join(output)
    # Keep draining its output so it never blocks on a full pipe.
    def drain() -> None:
        for line in proc.stdout:  # type: ignore[union-attr]
            output.append(line)

    threading.Thread(target=drain, daemon=True).start()
    return Up(proc=proc, url=url, key=key, data_dir=data_dir, output=output)


def stop_up(up: Up) -> None:
    up.proc.send_signal(signal.SIGINT)
    try:
        up.proc.wait(60)
    except subprocess.TimeoutExpired as e:
        up.proc.kill()
        up.proc.wait()
        raise AssertionError("vidmaas up did not stop on Ctrl-C:\n"
                             + "".join(up.output[-40:])) from e


def left_behind(data_dir: Path) -> list[str]:
    """Processes whose command line or environment mentions the data directory."""
    marker = str(data_dir)
    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            cmd = " ".join(p.info["cmdline"] or [])
            env = p.environ() if marker not in cmd else {}
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        if marker in cmd or any(marker in v for v in env.values()):
            found.append(f"{p.info['pid']}: {cmd[:120]}")
    return found
