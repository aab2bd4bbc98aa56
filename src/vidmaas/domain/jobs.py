"""What a job is given: the runtime's arguments, environment names and exit codes (DESIGN §5).

Guarantees: the local and Kubernetes executors build a job's command line with
``job_args`` alone, so both run the runtime with exactly the same arguments; the
runtime's exit codes are spelled only here, and ``exit_code_retryable`` is the one
rule for which failures are retried.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from vidmaas.domain.models import ModelSpec


class ExitCode(enum.IntEnum):
    OK = 0
    INFRA_ERROR = 1
    """Anything unexpected: retried."""
    BAD_INPUT = 2
    """The request cannot succeed (bad image, bad parameters): never retried."""
    MODEL_ERROR = 3
    """The model directory is missing or unloadable: an operator error, not retried."""
    OUT_OF_MEMORY = 4
    """Retried: another node may have room."""
    CANCELLED = 5
    """Stopped on request: final."""
    UPLOAD_FAILED = 6
    """The object store failed: retried."""


def exit_code_retryable(code: int | None) -> bool:
    if code is None:
        return True
    if code in (ExitCode.BAD_INPUT, ExitCode.MODEL_ERROR, ExitCode.CANCELLED):
        return False
    return code != ExitCode.OK


# Environment variable names of the contract.
ENV_TASK_ID = "VIDMAAS_TASK_ID"
ENV_REDIS_URL = "VIDMAAS_REDIS_URL"
ENV_STORAGE_URL = "VIDMAAS_STORAGE_URL"
ENV_MODEL_DIR = "VIDMAAS_MODEL_DIR"
ENV_WORK_DIR = "VIDMAAS_WORK_DIR"
ENV_S3_ENDPOINT_URL = "VIDMAAS_STORAGE_S3_ENDPOINT_URL"
ENV_S3_REGION = "VIDMAAS_STORAGE_S3_REGION"
ENV_AWS_ACCESS_KEY_ID = "AWS_ACCESS_KEY_ID"
ENV_AWS_SECRET_ACCESS_KEY = "AWS_SECRET_ACCESS_KEY"
ENV_WATERMARK_TEXT = "VIDMAAS_WATERMARK_TEXT"
ENV_HEARTBEAT_INTERVAL_S = "VIDMAAS_HEARTBEAT_INTERVAL_S"
ENV_ATTEMPT = "VIDMAAS_ATTEMPT"


@dataclass(frozen=True, slots=True)
class JobSpec:
    """Everything an executor needs to start one task's job."""

    task_id: str
    job_name: str
    user_id: str
    model: ModelSpec
    prompt: str
    params: dict[str, Any]
    """Resolved parameters: size, num_frames, steps, seed, fps, …"""
    attempt: int
    input_key: str | None = None
    negative_prompt: str | None = None
    labels: dict[str, str] = field(default_factory=dict)

    @property
    def gpus(self) -> int:
        return self.model.gpus_per_job


def job_args(spec: JobSpec) -> list[str]:
    """The runtime's arguments, in the seed template's names."""
    p = spec.params
    # Free text is passed as --name=value: a prompt that starts with "-" (or is "--help")
    # must never be read as an option by the runtime's parser.
    args = [
        f"--prompt={spec.prompt}",
        "--size", str(p["size"]),
        "--frame-num", str(p["num_frames"]),
        "--sample-steps", str(p["steps"]),
        "--seed", str(p["seed"]),
        "--model", spec.model.id,
        "--fps", str(p.get("fps", spec.model.fps)),
    ]
    if spec.input_key:
        args += ["--image", spec.input_key]
    if spec.negative_prompt:
        args.append(f"--negative-prompt={spec.negative_prompt}")
    return args
