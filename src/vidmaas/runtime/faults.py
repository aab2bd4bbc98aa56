"""Test-only fault injection into the denoising loop (``VIDMAAS_TEST_FAULT``).

Guarantees: with no fault configured, ``step_hook``'s hook does nothing. Configured
(``JobEnv.fault``, ``key=value`` pairs), it runs after each denoising step, on every
rank, and may:
- ``step_delay_s=S``: sleep ``S`` seconds (a slow step);
- ``oom_at_step=N``: raise ``torch.OutOfMemoryError`` from step ``N`` on;
- ``hang_at_step=N,hang_rank=R[,hang_attempt=A]``: make rank ``R`` (default 1) stop
  after step ``N`` (in attempt ``A`` only, if given) for ``HANG_S``: it never joins the
  next collective, so its peers wait there, as in a deadlock.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from vidmaas.runtime.job import JobEnv

log = logging.getLogger(__name__)

HANG_S = 300.0
"""How long a rank told to hang sleeps: longer than any test waits."""


def step_hook(env: JobEnv) -> Callable[[int], None]:
    """The hook to call with each finished step's number."""
    fault = env.fault
    oom_at = int(fault["oom_at_step"]) if "oom_at_step" in fault else None
    delay_s = float(fault.get("step_delay_s", "0") or 0)
    hang_at = int(fault["hang_at_step"]) if "hang_at_step" in fault else None
    hangs = hang_at is not None and env.dist.rank == int(fault.get("hang_rank", "1")) \
        and env.attempt == int(fault.get("hang_attempt", str(env.attempt)))

    def hook(step: int) -> None:
        if delay_s:
            time.sleep(delay_s)
        if hangs and hang_at is not None and step >= hang_at:
            log.warning("task_id=%s rank %d hangs at step %d (VIDMAAS_TEST_FAULT)",
                        env.task_id, env.dist.rank, step)
            time.sleep(HANG_S)
        if oom_at is not None and step >= oom_at:
            import torch

            raise torch.OutOfMemoryError(
                f"CUDA out of memory (injected by VIDMAAS_TEST_FAULT at step {step})")

    return hook
