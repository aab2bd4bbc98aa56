"""The stall rule: how long a running job may go without reporting a denoising step.

A job's heartbeats come from a thread of its parent process (``vidmaas-job run``), so a
rank deadlocked in a collective keeps the job beating; only its steps stop. The watchdog
therefore also watches the steps (``dispatcher.watchdog``).

Guarantees:
- ``expected_step_s`` is the registry's ``step_s`` when the model declares one, else the
  model's moving-average run time (``TaskQueue.model_run_s``) over the task's steps, else
  None (nothing known yet). The learnt figure overestimates a step (a run includes
  loading and decoding), which errs on the side of patience.
- ``stall_limit_s`` is ``factor`` × the expected step time, never below ``floor_s`` (the
  floor alone when nothing is known), or None when ``factor`` is 0 (the rule is off).
"""

from __future__ import annotations

STALLED_CODE = "stalled"
"""The error code of a task stopped by the stall rule (retried within the attempt limit)."""


def expected_step_s(*, declared_s: float | None, run_s: float | None,
                    steps: int) -> float | None:
    """Seconds one denoising step of a task of ``steps`` steps is expected to take."""
    if declared_s is not None and declared_s > 0:
        return declared_s
    if run_s is not None and run_s > 0 and steps >= 1:
        return run_s / steps
    return None


def stall_limit_s(*, step_s: float | None, factor: float, floor_s: float) -> float | None:
    """Longest a running task may go between two reported steps; None: no limit."""
    if factor <= 0:
        return None
    return floor_s if step_s is None else max(floor_s, factor * step_s)
