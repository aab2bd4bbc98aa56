"""A tiny stand-in for a pool worker (``vidmaas-job serve``), run by the local executor.

It speaks the worker's side of ``bus.pools`` (lease heartbeats, ready, fenced
assignments and events) and runs each assignment by its prompt: ``ok`` (started,
completed), ``slow`` (started, ``TEST_POOL_SLOW_S`` or one second, completed), ``sleep``
(started, heartbeats until the cancel flag is set, then cancelled), ``stubborn``
(started, never stops), ``die-once`` (the process kills itself on attempt 1, completes
on later attempts).
Run without ``serve`` it is a task's own job instead (started, completed). Every start
and every run is appended to ``TEST_POOL_LOG``: ``start <worker> <pid>``,
``run <worker> <task> <attempt>`` and ``job <task> <attempt>``.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from typing import Any

from vidmaas.bus.client import connect_sync
from vidmaas.bus.control import cancel_requested_sync
from vidmaas.bus.events import FenceLost, publish_fenced_sync, publish_sync
from vidmaas.bus.pools import WorkerLink, fence_value
from vidmaas.domain import events as ev


def _log(line: str) -> None:
    with open(os.environ["TEST_POOL_LOG"], "a") as f:
        f.write(line + "\n")


def job() -> int:
    """Run as a task's own job (a model without a pool): started, completed."""
    task = os.environ["VIDMAAS_TASK_ID"]
    redis = connect_sync(os.environ["VIDMAAS_REDIS_URL"])
    _log(f"job {task} {os.environ.get('VIDMAAS_ATTEMPT')}")
    publish_sync(redis, ev.started(task, world_size=1, host="job"))
    publish_sync(redis, _completed(task))
    return 0


def _completed(task: str) -> ev.Event:
    return ev.Event(task, ev.EventType.COMPLETED, {
        "video_key": f"outputs/{task}/video.mp4", "poster_key": f"outputs/{task}/poster.jpg",
        "width": 64, "height": 64, "num_frames": 5, "fps": 8, "duration_s": 0.6, "seed": 1,
        "timings": {}})


def _publish(client: Any, event: ev.Event, *, fence: str) -> None:
    """Fenced, retried while Redis lost the fence (as the runtime's reporter does)."""
    for _ in range(100):
        try:
            publish_fenced_sync(client, event, fence=fence)
            return
        except FenceLost:
            time.sleep(0.1)


def main() -> int:
    if sys.argv[1:2] != ["serve"]:
        return job()
    parser = argparse.ArgumentParser()
    parser.add_argument("cmd")
    parser.add_argument("--model", required=True)
    parser.add_argument("--lease-s", type=float, default=5.0)
    parser.add_argument("--max-tasks", type=int, default=0)
    args, _ = parser.parse_known_args()
    worker_id = os.environ["VIDMAAS_WORKER_ID"]
    redis = connect_sync(os.environ["VIDMAAS_REDIS_URL"])
    link = WorkerLink(redis, worker_id=worker_id, lease_s=args.lease_s, model=args.model)
    _log(f"start {worker_id} {os.getpid()}")

    def beat() -> None:
        while True:
            if link.heartbeat() is None:
                os._exit(0)  # retired: a replacement takes over
            time.sleep(args.lease_s / 4)

    threading.Thread(target=beat, daemon=True).start()
    time.sleep(0.2)  # "loading the model"
    if not link.ready():
        return 0
    done = 0
    while True:
        a = link.next_assignment(timeout_s=1.0)
        if a is None:
            continue
        if a.exit or a.task_id is None:
            return 0
        prompt = next(x.split("=", 1)[1] for x in a.args if x.startswith("--prompt="))
        task, fence = a.task_id, fence_value(worker_id, a.attempt)
        _log(f"run {worker_id} {task} {a.attempt}")
        _publish(redis, ev.started(task, world_size=1, host=worker_id), fence=fence)
        if prompt == "die-once" and a.attempt == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        if prompt in ("sleep", "stubborn"):
            while prompt == "stubborn" or cancel_requested_sync(redis, task) is None:
                _publish(redis, ev.heartbeat(task), fence=fence)
                time.sleep(0.05)
            _publish(redis, ev.cancelled(task, by="user"), fence=fence)
        else:
            if prompt == "slow":
                time.sleep(float(os.environ.get("TEST_POOL_SLOW_S", "1.0")))
            _publish(redis, _completed(task), fence=fence)
        done += 1
        if args.max_tasks and done >= args.max_tasks:
            return 0
        if not link.ready(finished_task=True):
            return 0


if __name__ == "__main__":
    sys.exit(main())
