"""Warm pools against a job per task, end to end through the API, in the same run.

Starts ``vidmaas up`` twice, one after the other, on the same tiny random-weight
checkpoint: with its default warm pool for the tiny models, then with
``VIDMAAS_POOLS_ENABLED=false`` (every task a ``vidmaas-job run`` process of its own).
Each time, N tasks are submitted back to back through ``POST /v1/tasks`` (the next one
as soon as the previous one has completed) and each is timed from the submit to the API
answering ``completed`` (polled every 20 ms). Then the bare pipeline call (diffusers,
in this process, after a warm-up, same size, frames and steps) is timed, so the
per-task overhead of each path is its latency minus the bare call.

Prints per-task p50/p99 latency, throughput (tasks per minute), the first pooled task
(it starts the worker) apart, the ratio warm p50 / cold p50, and where a warm task's
time goes (p50 of each phase, from the task's own timestamps: submit → row created →
dispatched → started on the worker → finished → the API answering ``completed``).

    python bench/warm.py [--tasks 6] [--steps 4] [--short] [--pooled-only]
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx

from bench import machine, pct

TASK_TIMEOUT_S = 120.0


PHASES = ("submit→created", "created→dispatched", "dispatched→started", "started→finished",
          "finished→answered")
"""Where a task's latency goes, from the row's timestamps (same clock as the client)."""


def _stamp(value: str | None) -> float:
    if value is None:
        return math.nan  # not recorded (a move the row skipped)
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def p50_ms(values: list[float]) -> str:
    known = [v for v in values if not math.isnan(v)]
    return f"{pct(known, 50) * 1000:.0f} ms" if known else "n/a"


def phases_of(task: dict[str, str | None], *, submitted: float, answered: float) -> list[float]:
    """Seconds of each of ``PHASES`` for one completed task."""
    marks = [submitted, *(_stamp(task[k]) for k in ("created_at", "dispatched_at",
                                                     "started_at", "finished_at")), answered]
    return [b - a for a, b in itertools.pairwise(marks)]


def run_tasks(url: str, auth: dict[str, str], *, n: int, steps: int,
              phases: list[list[float]] | None = None) -> tuple[list[float], float]:
    """(submit→completed seconds of each task, wall seconds of them all); each task's
    ``PHASES`` appended to ``phases``."""
    latencies: list[float] = []
    started = time.perf_counter()
    with httpx.Client(timeout=30) as client:
        for i in range(n):
            t = time.perf_counter()
            submitted = time.time()
            r = client.post(f"{url}/v1/tasks", headers=auth,
                            json={"prompt": f"a paper boat, take {i}", "model": "tiny-t2v",
                                  "steps": steps})
            r.raise_for_status()
            task_id = r.json()["id"]
            deadline = t + TASK_TIMEOUT_S
            while True:
                body = client.get(f"{url}/v1/tasks/{task_id}", headers=auth).json()
                status = body["status"]
                if status == "completed":
                    if phases is not None:
                        phases.append(phases_of(body, submitted=submitted,
                                                answered=time.time()))
                    break
                if status in ("failed", "cancelled") or time.perf_counter() > deadline:
                    raise SystemExit(f"task {task_id} ended {status}")
                time.sleep(0.02)
            latencies.append(time.perf_counter() - t)
    return latencies, time.perf_counter() - started


def one_instance(tmp: Path, models: Path, name: str, env: dict[str, str], *, n: int,
                 steps: int, phases: list[list[float]] | None = None,
                 ) -> tuple[list[float], float]:
    from tests.support.embedded import start_up, stop_up

    data_dir = tmp / name
    shutil.copytree(models, data_dir / "models")
    up = start_up(data_dir, env_extra=env)
    try:
        return run_tasks(up.url, up.auth, n=n, steps=steps, phases=phases)
    finally:
        stop_up(up)


def bare_call_s(model_dir: Path, *, steps: int, repeat: int = 5) -> float:
    import torch
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)

    def call() -> float:
        t = time.perf_counter()
        pipe(prompt="a paper boat", height=64, width=64, num_frames=9, num_inference_steps=steps,
             generator=torch.Generator().manual_seed(1), output_type="np")
        return time.perf_counter() - t

    call()
    return statistics.median(call() for _ in range(repeat))


def show(label: str, latencies: list[float], wall_s: float, bare_s: float) -> None:
    p50, p99 = pct(latencies, 50), pct(latencies, 99)
    print(f"{label:28s} p50 {p50:6.2f} s  p99 {p99:6.2f} s  "
          f"throughput {len(latencies) / wall_s * 60:6.1f} tasks/min  "
          f"overhead over the bare call (p50) {p50 - bare_s:6.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=6, help="tasks per configuration")
    parser.add_argument("--steps", type=int, default=4, help="denoising steps per task")
    parser.add_argument("--short", action="store_true", help="3 tasks per configuration")
    parser.add_argument("--pooled-only", action="store_true",
                        help="skip the job-per-task configuration (the warm path alone)")
    opts = parser.parse_args()
    if opts.short:
        opts.tasks = min(opts.tasks, 3)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from vidmaas.runtime.tiny import make_tiny

    with tempfile.TemporaryDirectory(prefix="vidmaas-bench-warm-") as tmp_s:
        tmp = Path(tmp_s)
        models = tmp / "models"
        make_tiny(models / "tiny-t2v", "t2v")
        make_tiny(models / "tiny-ti2v", "ti2v")
        base = {"VIDMAAS_GPU_CAPACITY": "1"}
        phases: list[list[float]] = []
        warm, warm_wall = one_instance(tmp, models, "pooled", {**base, "VIDMAAS_POOLS_ENABLED":
                                                              "true"}, n=opts.tasks,
                                       steps=opts.steps, phases=phases)
        cold = None if opts.pooled_only else one_instance(
            tmp, models, "jobs", {**base, "VIDMAAS_POOLS_ENABLED": "false"}, n=opts.tasks,
            steps=opts.steps)
        bare_s = bare_call_s(models / "tiny-t2v", steps=opts.steps)

    print(machine())
    print(f"vidmaas up, tiny-t2v 64*64, 9 frames, {opts.steps} steps; {opts.tasks} tasks "
          "back to back per configuration; latency = submit to the API answering completed")
    print(f"bare pipeline call (in process, warm)    {bare_s:6.3f} s")
    if cold is not None:
        show("job per task (pools off)", *cold, bare_s)
    show("warm pool, all tasks", warm, warm_wall, bare_s)
    show("warm pool, after the first", warm[1:], warm_wall - warm[0], bare_s)
    print(f"first pooled task (starts the worker)    {warm[0]:6.2f} s")
    print("warm tasks after the first, p50 of each phase: " + ", ".join(
        f"{name} {p50_ms([p[i] for p in phases[1:]])}"
        for i, name in enumerate(PHASES)))
    if cold is not None:
        print(f"warm p50 / cold p50: {pct(warm, 50) / pct(cold[0], 50):.3f}  (goal <= 0.25)")
    print(f"warm overhead p50: {pct(warm[1:], 50) - bare_s:.2f} s (goal <= 0.5 s)")


if __name__ == "__main__":
    main()
