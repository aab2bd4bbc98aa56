"""The warm-pool settings (DESIGN §12): which models keep workers, and their limits.

Guarantees: a model's worker counts are range-checked when the settings are built
(never negative; the dispatcher keeps a pool between them); a model not named in
``models`` runs one job per task; ``VIDMAAS_POOLS_ENABLED=false`` turns pools off as
a whole.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class PoolModelSettings(BaseModel):
    """One model's warm pool."""

    model_config = ConfigDict(use_attribute_docstrings=True, extra="forbid")

    min_workers: int = Field(default=0, ge=0)
    """Workers kept even when idle (0: the pool scales to zero)."""
    max_workers: int = Field(default=1, ge=0)
    """Most workers the pool grows to while tasks wait."""
    idle_s: float = Field(default=300.0, ge=0)
    """A worker idle this long is stopped while the pool is above its minimum."""


class PoolSettings(BaseModel):
    """Warm pools (DESIGN §12): long-lived workers that load a model once."""

    model_config = ConfigDict(use_attribute_docstrings=True)

    enabled: bool = True
    """Run pooled models' tasks on warm workers; false: every task gets a job of its own."""
    models: dict[str, PoolModelSettings] = Field(default_factory=dict)
    """Pooled models, as JSON: ``{"wan2.2-ti2v-5b": {"min_workers": 0, "max_workers": 2,
    "idle_s": 600}}``. A model not named here runs one job per task."""
    worker_lease_s: float = 30.0
    """A worker whose heartbeat has not renewed its lease for this long is lost: its task
    is retried elsewhere and it is replaced."""
    start_timeout_s: float = 900.0
    """How long a new worker may take to load its model before it is given up."""
    max_failed_starts: int = Field(default=3, ge=0)
    """After this many workers of a model in a row end before they are ready (a broken
    checkpoint, a missing model directory), the model is unavailable: its queued tasks
    fail (``model_unavailable``) instead of waiting for ever. A worker that becomes ready
    clears it; 0: never."""
    manage_interval_s: float = 1.0
    """Period of the pool manager's pass (it also wakes on queue changes)."""
    max_tasks_per_worker: int = 0
    """A worker exits (and is replaced) after this many tasks; 0: never for that."""
    max_failures: int = 3
    """A worker exits after this many failed tasks in a row."""
    max_rss_mib: int = 0
    """A worker exits after a task that left its resident memory above this; 0: no limit."""
    stop_grace_s: float = 30.0
    """Time a worker has to exit by itself when stopped, before it is killed."""
