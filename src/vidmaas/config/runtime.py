"""The job runtime's settings group (``Settings.runtime``): what the executors hand every
job as environment variables.

Guarantees: the defaults are the embedded defaults; ranges are checked when the settings
are built; every duration carries its unit in its name.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field


class RuntimeSettings(BaseModel):
    """Postprocess and reporting settings passed to the job runtime."""

    model_config = ConfigDict(use_attribute_docstrings=True)

    watermark_text: str = "AI generated · vidmaas"
    """Text watermark drawn on every frame; empty disables it."""
    watermark_logo_path: Path | None = None
    """A PNG logo watermark instead of (or besides) the text."""
    heartbeat_interval_s: float = 5.0
    """Period of heartbeat events while a job lives."""
    progress_min_interval_s: float = 0.2
    """Progress events closer together than this are coalesced."""
    collective_timeout_s: float = Field(default=600.0, gt=0)
    """Longest a collective (``all_gather``, ``broadcast``) of a job's ranks waits for its
    peers before it fails the job (600 s by default; ``VIDMAAS_COLLECTIVE_TIMEOUT_S``): a
    rank that stopped or deadlocked ends the job within this, and the task is retried.
    Keep it above the longest one rank may wait for another (the slowest step, the skew of
    loading the model on different ranks)."""
    preview_interval_s: float = Field(default=2.0, ge=0)
    """Least seconds between two live preview images of a denoising task."""
    preview_max: int = Field(default=8, ge=0, le=1000)
    """Most live preview images per task; 0 turns previews off."""
