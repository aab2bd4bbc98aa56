"""A tiny stand-in for the job runtime, run by the local executor in tests.

It takes the runtime's arguments (``job_args``); the prompt says what to do:
``ok`` (report started and completed, exit 0), ``fail3`` (print to stderr, exit 3
without a terminal event), ``sleep`` (report started, run until SIGTERM, then report
cancelled and exit 5), ``stubborn`` (ignore SIGTERM, run until killed). Every start
is appended to the file named by ``TEST_LAUNCH_LOG`` (task id and attempt), and the
environment is written to ``env.json`` in the work directory.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time

from vidmaas.bus.client import connect_sync
from vidmaas.bus.events import publish_sync
from vidmaas.domain import events as ev


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompt", required=True)
    args, _ = parser.parse_known_args()
    mode = args.prompt
    stop: list[int] = []
    if mode == "sleep":
        signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    elif mode == "stubborn":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    task_id = os.environ["VIDMAAS_TASK_ID"]
    with open(os.environ["TEST_LAUNCH_LOG"], "a") as f:
        f.write(f"{task_id} {os.environ.get('VIDMAAS_ATTEMPT')} {os.getpid()}\n")
    with open("env.json", "w") as f:
        json.dump(dict(os.environ), f)
    redis = connect_sync(os.environ["VIDMAAS_REDIS_URL"])
    if mode == "fail3":
        print("boom: the double failed on purpose", file=sys.stderr)
        return 3
    publish_sync(redis, ev.started(task_id, world_size=1, host="double"))
    if mode == "ok":
        publish_sync(redis, ev.Event(task_id, ev.EventType.COMPLETED, {
            "video_key": f"outputs/{task_id}/video.mp4",
            "poster_key": f"outputs/{task_id}/poster.jpg", "width": 64, "height": 64,
            "num_frames": 5, "fps": 8, "duration_s": 0.6, "seed": 1, "timings": {}}))
        return 0
    deadline = time.monotonic() + 60
    while not stop and time.monotonic() < deadline:
        time.sleep(0.02)
    publish_sync(redis, ev.cancelled(task_id, by="user"))
    return 5


if __name__ == "__main__":
    sys.exit(main())
