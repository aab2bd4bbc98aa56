"""What a warm-pool worker is given (DESIGN §12): the ``serve`` arguments and environment.

Guarantees: the local and Kubernetes executors build a worker's command line with
``worker_args`` alone, as they build a job's with ``domain.jobs.job_args``; a worker
gets the job environment of DESIGN §5 except the per-task variables (task id,
attempt), which arrive with each assignment, plus ``VIDMAAS_WORKER_ID``.
"""

from __future__ import annotations

from dataclasses import dataclass

from vidmaas.domain.jobs import model_args
from vidmaas.domain.models import ModelSpec

ENV_WORKER_ID = "VIDMAAS_WORKER_ID"


@dataclass(frozen=True, slots=True)
class WorkerLimits:
    """When a worker exits to be replaced (0: never for that reason)."""

    lease_s: float = 30.0
    max_tasks: int = 0
    max_failures: int = 3
    max_rss_mib: int = 0


def worker_args(model: ModelSpec, limits: WorkerLimits) -> list[str]:
    """The runtime's ``serve`` arguments for one worker of ``model``: its limits, then the
    registry values it loads the model with (``model_args``: strategy, offload, tiling…)."""
    return ["--model", model.id, "--lease-s", f"{limits.lease_s:g}",
            "--max-tasks", str(limits.max_tasks), "--max-failures", str(limits.max_failures),
            "--max-rss-mib", str(limits.max_rss_mib), *model_args(model)]
