"""What a job is given: the runtime's arguments, environment names and exit codes (DESIGN §5).

Guarantees: the local and Kubernetes executors build a job's command line with
``job_args`` alone, so both run the runtime with exactly the same arguments, and those
arguments carry every registry value that shapes the generation (``model_args``): the
runtime never reads a registry of its own. The runtime's exit codes are spelled only
here, and ``exit_code_retryable`` is the one rule for which failures are retried.

Out of memory: a job that ran out of memory under its model's plan exits
``OUT_OF_MEMORY`` (retried, and ``memory_saving_after`` says the retry must run the
memory-saving plan, ``--memory-saving``); one that ran out of memory under the
memory-saving plan exits ``OUT_OF_MEMORY_FINAL``: the same model at the same size would
fail the same way, so it is not retried.
"""

from __future__ import annotations

import enum
import json
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
    """Out of memory under the model's plan: retried once, with the memory-saving plan."""
    CANCELLED = 5
    """Stopped on request: final."""
    UPLOAD_FAILED = 6
    """The object store failed: retried."""
    OUT_OF_MEMORY_FINAL = 7
    """Out of memory under the memory-saving plan: deterministic, never retried."""
    DISK_FULL = 8
    """The job's work directory ran out of space (or quota): retried, on a fresh work
    directory (a new pod, or a new local job directory)."""


OUT_OF_MEMORY_CODE = "out_of_memory"
"""The ``failed`` event's code for both out-of-memory exits."""


def exit_code_retryable(code: int | None) -> bool:
    if code is None:
        return True
    if code in (ExitCode.BAD_INPUT, ExitCode.MODEL_ERROR, ExitCode.CANCELLED,
                ExitCode.OUT_OF_MEMORY_FINAL):
        return False
    return code != ExitCode.OK


def memory_saving_after(error_code: str | None) -> bool:
    """Whether the next attempt of a task whose last attempt failed with ``error_code``
    must run the memory-saving plan (``JobSpec.memory_saving``)."""
    return error_code == OUT_OF_MEMORY_CODE


def out_of_memory_exit(exit_code: int | None) -> bool | None:
    """For a job that exited without reporting why: whether ``exit_code`` is an
    out-of-memory exit that is final (True), one whose retry runs the memory-saving plan
    (False), or no out-of-memory exit at all (None)."""
    if exit_code == ExitCode.OUT_OF_MEMORY_FINAL:
        return True
    if exit_code == ExitCode.OUT_OF_MEMORY:
        return False
    return None


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
ENV_COLLECTIVE_TIMEOUT_S = "VIDMAAS_COLLECTIVE_TIMEOUT_S"
"""Seconds a collective (all_gather, broadcast, barrier) may wait for its peers before
the process group fails it (``runtime.distributed``)."""
DEFAULT_COLLECTIVE_TIMEOUT_S = 600.0
ENV_STORAGE_RETRY_ATTEMPTS = "VIDMAAS_STORAGE_RETRY_ATTEMPTS"
ENV_STORAGE_RETRY_TOTAL_S = "VIDMAAS_STORAGE_RETRY_TOTAL_S"
ENV_PREVIEW_INTERVAL_S = "VIDMAAS_PREVIEW_INTERVAL_S"
"""Least seconds between two live previews of a task (``runtime.preview``)."""
ENV_PREVIEW_MAX = "VIDMAAS_PREVIEW_MAX"
"""Most live previews per task; 0 turns them off."""


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
    memory_saving: bool = False
    """Run the memory-saving plan (an attempt after an out-of-memory failure)."""

    @property
    def gpus(self) -> int:
        return self.model.gpus_per_job


def job_args(spec: JobSpec) -> list[str]:
    """The runtime's arguments: the task's, in the seed template's names, then the model's
    (``model_args``). A task without a negative prompt gets the model's default."""
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
    negative = spec.negative_prompt or spec.model.negative_prompt
    if negative:
        args.append(f"--negative-prompt={negative}")
    args += model_args(spec.model)
    if spec.memory_saving:
        args.append("--memory-saving")
    return args


def model_args(model: ModelSpec) -> list[str]:
    """The registry values that shape a generation, as runtime arguments."""
    args = ["--guidance-scale", _number(model.guidance_scale),
            "--flow-shift", _number(model.flow_shift),
            "--strategy", model.strategy]
    if model.guidance_scale_2 is not None:
        args += ["--guidance-scale-2", _number(model.guidance_scale_2)]
    if model.attention_backend:
        args += ["--attention-backend", model.attention_backend]
    for flag, on in (("--vae-tiling", model.vae_tiling), ("--cpu-offload", model.cpu_offload),
                     ("--compile", model.compile), ("--tf32", model.tf32)):
        if on:
            args.append(flag)
    if model.preview_rgb_factors:
        rgb: dict[str, Any] = {"factors": [list(r) for r in model.preview_rgb_factors]}
        if model.preview_rgb_bias is not None:
            rgb["bias"] = list(model.preview_rgb_bias)
        args.append("--preview-rgb=" + json.dumps(rgb, separators=(",", ":")))
    return args


def _number(value: float) -> str:
    """``5.0`` → ``"5"``, ``3.5`` → ``"3.5"``: exact (``repr`` round-trips a float)."""
    return str(int(value)) if value.is_integer() else repr(value)
