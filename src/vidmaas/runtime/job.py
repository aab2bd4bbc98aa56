"""A job's inputs: its arguments (DESIGN §5), its environment and its work directory.

Guarantees:
- ``JobEnv.from_environ`` is the only place the runtime reads its environment, and
  only when a command runs (never at import time).
- ``add_job_args`` accepts exactly the arguments ``domain.jobs.job_args`` produces,
  so every executor's command line parses here; they carry everything that shapes the
  generation (guidance, shift, negative prompt, strategy, tiling, offload, speed options),
  so the runtime reads no model registry. Without them a run by hand gets the
  checkpoint's own defaults (guidance 5, its scheduler's shift, no negative prompt).
- ``WorkDir`` names every file the steps hand to each other (the fetched input, the
  generated frames and facts, the reporter's small state); each is written
  atomically, so a reader never sees half a file. ``discard_outputs`` frees what a
  failed task wrote (inputs, frames, video, partial files) and keeps the small state
  (the terminal-event marker, the exit code) that the job's other processes read.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from vidmaas.domain.jobs import (
    DEFAULT_COLLECTIVE_TIMEOUT_S,
    ENV_ATTEMPT,
    ENV_AWS_ACCESS_KEY_ID,
    ENV_AWS_SECRET_ACCESS_KEY,
    ENV_COLLECTIVE_TIMEOUT_S,
    ENV_HEARTBEAT_INTERVAL_S,
    ENV_MODEL_DIR,
    ENV_PREVIEW_INTERVAL_S,
    ENV_PREVIEW_MAX,
    ENV_REDIS_URL,
    ENV_S3_ENDPOINT_URL,
    ENV_S3_REGION,
    ENV_STORAGE_RETRY_ATTEMPTS,
    ENV_STORAGE_RETRY_TOTAL_S,
    ENV_STORAGE_URL,
    ENV_TASK_ID,
    ENV_WATERMARK_TEXT,
    ENV_WORK_DIR,
)
from vidmaas.domain.models import STRATEGIES, parse_size
from vidmaas.errors import InvalidRequest
from vidmaas.runtime.errors import BadInput

ENV_WATERMARK_LOGO = "VIDMAAS_WATERMARK_LOGO"
"""Optional path of a PNG logo drawn over the video's bottom-left corner."""
ENV_PROGRESS_INTERVAL_S = "VIDMAAS_PROGRESS_INTERVAL_S"
"""Least seconds between two ``progress`` events (stage ends always report)."""
ENV_FAULT = "VIDMAAS_TEST_FAULT"
"""Test-only fault injection, e.g. ``oom_at_step=1``, ``step_delay_s=0.3``, or
``hang_at_step=1,hang_rank=1`` (that rank stops after step 1 and never joins the next
collective; ``hang_attempt=1``: only in attempt 1)."""
DEFAULT_WATERMARK = "AI generated"
DEFAULT_HEARTBEAT_INTERVAL_S = 5.0
DEFAULT_PROGRESS_INTERVAL_S = 0.5
DEFAULT_STORAGE_RETRY_ATTEMPTS = 8
DEFAULT_STORAGE_RETRY_TOTAL_S = 120.0
DEFAULT_PREVIEW_INTERVAL_S = 2.0
DEFAULT_PREVIEW_MAX = 8


@dataclass(frozen=True, slots=True)
class Dist:
    """Where this process sits in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    under_torchrun: bool = False
    nnodes: int = 1
    nproc_per_node: int = 1
    node_rank: int = 0

    @property
    def is_reporter(self) -> bool:
        """Only rank 0 (the node of rank 0, outside torchrun) reports progress and outcomes."""
        return self.rank == 0 and self.node_rank == 0

    @property
    def reports_outcome(self) -> bool:
        """Any rank on the node of rank 0 may report the job's one terminal event."""
        return self.node_rank == 0

    @property
    def job_world_size(self) -> int:
        return self.world_size if self.under_torchrun else self.nnodes * self.nproc_per_node


@dataclass(frozen=True, slots=True)
class JobEnv:
    task_id: str
    redis_url: str | None
    storage_url: str | None
    model_dir: Path | None
    work_dir: Path
    s3_endpoint_url: str | None
    s3_region: str
    access_key_id: str | None
    secret_access_key: str | None
    watermark_text: str
    watermark_logo: Path | None
    heartbeat_interval_s: float
    progress_interval_s: float
    collective_timeout_s: float
    """How long a collective waits for its peers before it fails (``init_process_group``)."""
    attempt: int
    storage_retry_attempts: int
    """Calls at most for one fetch or upload while the store is down."""
    storage_retry_total_s: float
    """No new fetch or upload attempt starts later than this after the first."""
    fault: Mapping[str, str]
    dist: Dist
    host: str
    preview_interval_s: float = DEFAULT_PREVIEW_INTERVAL_S
    """Least seconds between two live previews (``VIDMAAS_PREVIEW_INTERVAL_S``)."""
    preview_max: int = DEFAULT_PREVIEW_MAX
    """Most live previews per task; 0: none (``VIDMAAS_PREVIEW_MAX``)."""

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> JobEnv:
        def opt(name: str) -> str | None:
            value = environ.get(name, "").strip()
            return value or None

        def num(name: str, default: float) -> float:
            raw = opt(name)
            try:
                return default if raw is None else max(0.0, float(raw))
            except ValueError:
                return default

        def integer(name: str, default: int) -> int:
            raw = opt(name)
            try:
                return default if raw is None else int(raw)
            except ValueError:
                return default

        under_torchrun = "LOCAL_RANK" in environ
        dist = Dist(
            rank=integer("RANK", 0) if under_torchrun else 0,
            world_size=integer("WORLD_SIZE", 1) if under_torchrun else 1,
            local_rank=integer("LOCAL_RANK", 0),
            under_torchrun=under_torchrun,
            nnodes=integer("PET_NNODES", 1),
            nproc_per_node=integer("PET_NPROC_PER_NODE", 1),
            node_rank=integer("GROUP_RANK" if under_torchrun else "PET_NODE_RANK", 0),
        )
        fault: dict[str, str] = {}
        for part in (opt(ENV_FAULT) or "").split(","):
            key, _, value = part.partition("=")
            if key.strip():
                fault[key.strip()] = value.strip()
        model_dir = opt(ENV_MODEL_DIR)
        logo = opt(ENV_WATERMARK_LOGO)
        return cls(
            task_id=opt(ENV_TASK_ID) or "",
            redis_url=opt(ENV_REDIS_URL),
            storage_url=opt(ENV_STORAGE_URL),
            model_dir=Path(model_dir) if model_dir else None,
            work_dir=Path(opt(ENV_WORK_DIR) or "."),
            s3_endpoint_url=opt(ENV_S3_ENDPOINT_URL),
            s3_region=opt(ENV_S3_REGION) or "us-east-1",
            access_key_id=opt(ENV_AWS_ACCESS_KEY_ID),
            secret_access_key=opt(ENV_AWS_SECRET_ACCESS_KEY),
            watermark_text=environ.get(ENV_WATERMARK_TEXT, DEFAULT_WATERMARK),
            watermark_logo=Path(logo) if logo else None,
            heartbeat_interval_s=num(ENV_HEARTBEAT_INTERVAL_S, DEFAULT_HEARTBEAT_INTERVAL_S),
            progress_interval_s=num(ENV_PROGRESS_INTERVAL_S, DEFAULT_PROGRESS_INTERVAL_S),
            collective_timeout_s=num(ENV_COLLECTIVE_TIMEOUT_S, DEFAULT_COLLECTIVE_TIMEOUT_S)
            or DEFAULT_COLLECTIVE_TIMEOUT_S,
            attempt=integer(ENV_ATTEMPT, 1),
            storage_retry_attempts=max(1, integer(ENV_STORAGE_RETRY_ATTEMPTS,
                                                  DEFAULT_STORAGE_RETRY_ATTEMPTS)),
            storage_retry_total_s=num(ENV_STORAGE_RETRY_TOTAL_S, DEFAULT_STORAGE_RETRY_TOTAL_S),
            fault=fault,
            dist=dist,
            host=socket.gethostname(),
            preview_interval_s=num(ENV_PREVIEW_INTERVAL_S, DEFAULT_PREVIEW_INTERVAL_S),
            preview_max=max(0, integer(ENV_PREVIEW_MAX, DEFAULT_PREVIEW_MAX)),
        )


STRATEGY_CHOICES = ("auto", *STRATEGIES)
DEFAULT_GUIDANCE = 5.0


@dataclass(frozen=True, slots=True)
class JobArgs:
    prompt: str
    width: int
    height: int
    frame_num: int
    sample_steps: int
    seed: int
    model: str
    fps: int | None
    image: str | None
    negative_prompt: str | None
    guidance_scale: float = DEFAULT_GUIDANCE
    guidance_scale_2: float | None = None
    flow_shift: float | None = None
    strategy: str = "auto"
    vae_tiling: bool = False
    cpu_offload: bool = False
    memory_saving: bool = False
    attention_backend: str | None = None
    compile: bool = False
    tf32: bool = False
    preview_rgb: str | None = None
    """The model's preview projection as JSON (``runtime.preview.parse_projection``)."""

    @classmethod
    def from_namespace(cls, ns: argparse.Namespace) -> JobArgs:
        try:
            width, height = parse_size(ns.size)
        except InvalidRequest as e:
            raise BadInput(e.message) from e
        if ns.frame_num < 1 or (ns.frame_num - 1) % 4:
            raise BadInput(f"--frame-num must be 4k+1, not {ns.frame_num}")
        if ns.sample_steps < 1:
            raise BadInput("--sample-steps must be at least 1")
        if width % 2 or height % 2:
            raise BadInput(f"--size {ns.size} must have even sides (H.264)")
        if not 0 <= ns.seed <= 2**32 - 1:
            raise BadInput("--seed must be within 0..2**32-1")
        for name in ("guidance_scale", "guidance_scale_2", "flow_shift"):
            value = getattr(ns, name)
            if value is not None and not 0 <= value <= 100:
                raise BadInput(f"--{name.replace('_', '-')} must be within 0..100")
        return cls(prompt=ns.prompt, width=width, height=height, frame_num=ns.frame_num,
                   sample_steps=ns.sample_steps, seed=ns.seed, model=ns.model, fps=ns.fps,
                   image=ns.image or None, negative_prompt=ns.negative_prompt or None,
                   guidance_scale=ns.guidance_scale, guidance_scale_2=ns.guidance_scale_2,
                   flow_shift=ns.flow_shift, strategy=ns.strategy, vae_tiling=ns.vae_tiling,
                   cpu_offload=ns.cpu_offload, memory_saving=ns.memory_saving,
                   attention_backend=ns.attention_backend or None, compile=ns.compile,
                   tf32=ns.tf32, preview_rgb=ns.preview_rgb or None)


class _FreeText(argparse.Action):
    """Stores free text exactly as given. argparse (3.11) drops a value that is exactly
    ``--`` even in ``--prompt=--``; such a value arrives here as an empty list."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        setattr(namespace, self.dest, "--" if values == [] else values)


class JobArgParser(argparse.ArgumentParser):
    """An argument parser that keeps a free-text value of exactly ``--``."""

    def _get_values(self, action: argparse.Action, arg_strings: list[str]) -> Any:
        if isinstance(action, _FreeText) and arg_strings == ["--"]:
            return "--"
        return super()._get_values(action, arg_strings)


def add_job_args(parser: argparse.ArgumentParser) -> None:
    """The job's arguments, in the seed template's names (see ``domain.jobs.job_args``).

    Free text must come as ``--prompt=VALUE`` (what ``job_args`` writes), so a prompt
    that starts with ``-`` is never read as an option."""
    parser.add_argument("--prompt", required=True, action=_FreeText,
                        help="what to generate, as typed")
    parser.add_argument("--size", default="64*64", help="W*H in pixels (Wan's notation)")
    parser.add_argument("--frame-num", type=int, default=9, help="frames, 4k+1")
    parser.add_argument("--sample-steps", type=int, default=4, help="denoising steps")
    parser.add_argument("--seed", type=int, default=0, help="0..2**32-1")
    parser.add_argument("--model", default="", help="model id in the registry")
    parser.add_argument("--fps", type=int, default=None,
                        help="frames per second of the video (default: the model's)")
    parser.add_argument("--image", default=None,
                        help="object key of the input image in the store (image-to-video)")
    parser.add_argument("--negative-prompt", default=None, action=_FreeText,
                        help="what to steer away from (the executors pass the model's "
                             "default when the task has none)")
    add_generation_args(parser)


def add_generation_args(parser: argparse.ArgumentParser) -> None:
    """The registry's values that shape a generation (``domain.jobs.model_args``): a job
    takes them with its task, a pool worker (``serve``) to load its model once."""
    gen = parser.add_argument_group("generation (from the model registry)")
    gen.add_argument("--guidance-scale", type=float, default=DEFAULT_GUIDANCE,
                     help="classifier-free guidance (the high-noise expert's for A14B)")
    gen.add_argument("--guidance-scale-2", type=float, default=None,
                     help="guidance of the low-noise expert (A14B); default: --guidance-scale")
    gen.add_argument("--flow-shift", type=float, default=None,
                     help="the scheduler's shift (Wan's sample_shift); default: the "
                          "checkpoint's scheduler config")
    gen.add_argument("--strategy", choices=STRATEGY_CHOICES, default="auto",
                     help="how the ranks share the work; auto: from the world size")
    flag = argparse.BooleanOptionalAction
    gen.add_argument("--vae-tiling", action=flag, default=False, help="decode tile by tile")
    gen.add_argument("--cpu-offload", action=flag, default=False,
                     help="diffusers' model CPU offload (single and cfg_parallel)")
    gen.add_argument("--memory-saving", action=flag, default=False,
                     help="the memory-saving plan (a retry after running out of memory)")
    gen.add_argument("--attention-backend", default=None,
                     help="a diffusers attention backend (flash, _native_cudnn, sage, …)")
    gen.add_argument("--compile", action=flag, default=False,
                     help="torch.compile the transformer's repeated blocks")
    gen.add_argument("--tf32", action=flag, default=False,
                     help="TF32 matmuls and convolutions (the fp32 VAE) on CUDA")
    gen.add_argument("--preview-rgb", default=None,
                     help='live previews\' latent-to-RGB map, JSON {"factors": [[r, g, b], '
                          '...], "bias": [r, g, b]} (default: a normalised projection)')


def cli_args(args: JobArgs) -> list[str]:
    """``args`` back as a command line (to hand them to ``torchrun … generate``)."""
    # Free text as --name=value: a prompt starting with "-" must stay a value.
    out = [f"--prompt={args.prompt}", "--size", f"{args.width}*{args.height}",
           "--frame-num", str(args.frame_num), "--sample-steps", str(args.sample_steps),
           "--seed", str(args.seed), "--model", args.model]
    if args.fps is not None:
        out += ["--fps", str(args.fps)]
    if args.image:
        out += ["--image", args.image]
    if args.negative_prompt:
        out.append(f"--negative-prompt={args.negative_prompt}")
    out += ["--guidance-scale", repr(args.guidance_scale), "--strategy", args.strategy]
    if args.guidance_scale_2 is not None:
        out += ["--guidance-scale-2", repr(args.guidance_scale_2)]
    if args.flow_shift is not None:
        out += ["--flow-shift", repr(args.flow_shift)]
    if args.attention_backend:
        out += ["--attention-backend", args.attention_backend]
    for name, on in (("--vae-tiling", args.vae_tiling), ("--cpu-offload", args.cpu_offload),
                     ("--memory-saving", args.memory_saving), ("--compile", args.compile),
                     ("--tf32", args.tf32)):
        if on:
            out.append(name)
    if args.preview_rgb:
        out.append(f"--preview-rgb={args.preview_rgb}")
    return out


class WorkDir:
    """The files the steps leave for each other under ``VIDMAAS_WORK_DIR``."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def input_image(self, key: str) -> Path:
        suffix = PurePosixPath(key).suffix.lower()
        if not suffix or len(suffix) > 6 or not suffix[1:].isalnum():
            suffix = ".img"
        return self.root / "input" / f"image{suffix}"

    @property
    def frames(self) -> Path:
        return self.root / "output" / "frames.npy"

    @property
    def result(self) -> Path:
        return self.root / "output" / "result.json"

    @property
    def video(self) -> Path:
        return self.root / "output" / "video.mp4"

    @property
    def poster(self) -> Path:
        return self.root / "output" / "poster.jpg"

    @property
    def spritesheet(self) -> Path:
        return self.root / "output" / "spritesheet.jpg"

    @property
    def state(self) -> Path:
        return self.root / ".vidmaas"

    def discard_outputs(self) -> None:
        """Remove the fetched input, the frames, the video, the poster, the spritesheet and
        any partial file (after a failure, above all a full disk: the next task needs the
        space)."""
        import shutil

        for sub in ("input", "output"):  # every large or partial file lives in these
            shutil.rmtree(self.root / sub, ignore_errors=True)

    def marker(self, name: str) -> Path:
        return self.state / name

    def record_exit_code(self, code: int) -> None:
        """Keep the first failing process's exit code (torchrun answers 1 for any)."""
        path = self.marker("exit_code")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except OSError:
            return
        try:
            with os.fdopen(fd, "w") as f:
                f.write(str(code))
        except OSError:  # a full disk: the empty file reads as no code, as if none
            path.unlink(missing_ok=True)

    def recorded_exit_code(self) -> int | None:
        try:
            return int(self.marker("exit_code").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def write_json(self, path: Path, data: Mapping[str, Any]) -> None:
        atomic_write(path, json.dumps(dict(data)).encode())

    def read_json(self, path: Path) -> dict[str, Any]:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise ValueError(f"{path.name} is not a JSON object")
        return data


def atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
