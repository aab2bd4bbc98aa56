"""The model registry: what each model can do and what a job for it needs.

Guarantees:
- ``ModelRegistry.load`` accepts only a well-formed registry: every size is Wan's
  ``W*H`` with even sides, every frame count is 4k+1, the default values are among the
  allowed ones, and ids are unique; otherwise it raises ``InvalidRequest`` naming the
  model and the field.
- ``ModelSpec.resolve`` turns a request's optional parameters into concrete ones or
  raises ``InvalidRequest`` with the offending ``field``; nothing the model cannot do
  passes it.
- ``gpus_per_job`` (processes per node × nodes) is the capacity a job of the model holds;
  a model whose ``gpus_per_job`` exceeds the platform's GPU capacity is unavailable
  (``unavailable_reason``, error code ``model_unavailable``): none of its jobs could
  ever start. A capacity of 0 pauses admission instead (``never_fits``).
- Every value that shapes a generation (guidance, scheduler shift, default negative
  prompt, distribution strategy, VAE tiling, CPU offload, attention backend, compile,
  TF32) and the memory a job needs (``gpu_memory_gib`` per GPU, ``pod_memory_gib`` per
  pod) is declared here, and the strategy agrees with the GPU count: ``single`` on one
  GPU, ``cfg_parallel`` on exactly two with guidance above 1, ``ulysses`` on two or more.
  The job receives them as arguments (``domain.jobs.model_args``), never from a copy of
  this file.
- A model's name and description come per language (``display: {en: {name,
  description}, zh: {...}}``), English always; a registry of the older shape
  (``display_name``, ``description``) still loads, as English only. Either way
  ``display_name``/``description`` are the English texts; a client shows English for a
  language the registry lacks.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from vidmaas.errors import InvalidRequest

Pipeline = Literal["t2v", "i2v", "ti2v"]
Layout = Literal["t2v", "ti2v", "a14b", "a14b-i2v"]
Strategy = Literal["single", "cfg_parallel", "ulysses"]
"""How a job's ranks share one generation (``runtime.distributed``): one rank; two ranks
that each compute one branch of classifier-free guidance; or Ulysses context parallelism
(the sequence split over the ranks, CUDA only)."""
STRATEGIES: tuple[Strategy, ...] = ("single", "cfg_parallel", "ulysses")
MAX_SEED = 2**32 - 1
Language = Literal["en", "zh"]
"""The languages a model's display texts come in; English is the fallback."""


class DisplayText(BaseModel):
    """A model's name and description in one language."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=200)
    description: str = Field(default="", max_length=2000)


def parse_size(size: str) -> tuple[int, int]:
    """``"1280*720"`` (Wan's notation; ``x`` also accepted) → (width, height)."""
    sep = "*" if "*" in size else "x"
    try:
        w_s, h_s = size.split(sep)
        width, height = int(w_s), int(h_s)
    except ValueError as e:
        raise InvalidRequest(f"size {size[:20]!r} is not W*H", field="size") from e
    if width <= 0 or height <= 0:
        raise InvalidRequest(f"size {size!r} must be positive", field="size")
    return width, height


def format_size(width: int, height: int) -> str:
    return f"{width}*{height}"


MODEL_UNAVAILABLE = "model_unavailable"
"""The error code of a task whose model needs more GPUs per job than the platform has."""


def never_fits(gpus: int, *, gpu_capacity: int) -> bool:
    """A job of ``gpus`` GPUs can never start on ``gpu_capacity`` GPUs in all. A capacity
    of 0 means admission is paused (an operator draining the platform), not that
    nothing fits: tasks are still accepted and wait."""
    return gpu_capacity > 0 and gpus > gpu_capacity


def unavailable_message(model_id: str, *, gpus: int, gpu_capacity: int) -> str:
    """What a refused (or failed) task of a model too large for the capacity is told."""
    return (f"model {model_id} needs {gpus} GPUs per job and this platform has "
            f"{gpu_capacity} GPUs in all, so none of its tasks can start; choose another "
            "model or ask the operator to add capacity")


class ModelSpec(BaseModel):
    """One registry entry."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(pattern=r"^[a-z0-9][a-z0-9.\-]{0,62}$")
    display_name: str
    """The English name (``display.en.name``)."""
    description: str = ""
    """The English description (``display.en.description``)."""
    display: dict[Language, DisplayText]
    """The name and description per language; ``en`` is always there."""
    pipeline: Pipeline
    layout: Layout
    """Checkpoint layout: which diffusers components the model directory holds."""
    sizes: list[str]
    default_size: str
    frame_counts: list[int]
    default_frames: int
    default_steps: int = Field(ge=1)
    max_steps: int = Field(ge=1)
    fps: int = Field(ge=1, le=120)
    guidance_scale: float = Field(default=5.0, ge=0, le=50)
    """Classifier-free guidance (of the high-noise expert for A14B); 1 or less turns it off."""
    guidance_scale_2: float | None = Field(default=None, ge=0, le=50)
    """Guidance of the low-noise expert (A14B)."""
    flow_shift: float = Field(gt=0, le=100)
    """The flow-matching scheduler's shift (Wan2.2's ``sample_shift``)."""
    negative_prompt: str = Field(default="", max_length=2000)
    """The negative prompt a task without one gets (Wan's ``sample_neg_prompt``)."""
    nproc_per_node: int = Field(ge=1, le=16)
    nnodes: int = Field(ge=1, le=64)
    strategy: Strategy
    """How the job's ranks share the generation; must match ``gpus_per_job``."""
    gpu_memory_gib: float = Field(gt=0, le=1024)
    """GPU memory one rank needs (GiB): what a vGPU slice must offer; ``vidmaas models
    plan`` checks it against the model's memory plan."""
    pod_memory_gib: float = Field(gt=0, le=8192)
    """Host memory one pod (one node's ranks) needs (GiB): the pod's memory request."""
    model_dir: str
    """Absolute path in the job (or relative to the configured model root)."""
    cpu_offload: bool = False
    """diffusers' model CPU offload (``single`` and ``cfg_parallel`` only)."""
    vae_tiling: bool = False
    """Decode the video tile by tile (less memory, slightly slower)."""
    attention_backend: str | None = Field(default=None, pattern=r"^[a-z0-9_]{1,40}$")
    """A diffusers attention backend (``flash``, ``_native_cudnn``, ``sage``, …); none: the
    default (PyTorch's scaled dot-product attention)."""
    compile: bool = False
    """``torch.compile`` the transformer's repeated blocks (slower first step, faster after)."""
    tf32: bool = False
    """TF32 matmuls and convolutions for the fp32 VAE on CUDA."""
    step_s: float | None = Field(default=None, gt=0, le=3600)
    """Seconds one denoising step takes on this model's GPUs (a typical task): the
    watchdog's stall rule expects a step within ``dispatcher.stall_factor`` times this.
    None: learnt from the model's recent run times."""
    preview_rgb_factors: list[tuple[float, float, float]] | None = None
    """Live previews: one ``(r, g, b)`` row per latent channel of a linear map of the
    latents to RGB (as ComfyUI's ``latent_rgb_factors``); none: the runtime's normalised
    projection of the channels (``runtime.preview``), which shows structure, not colour."""
    preview_rgb_bias: tuple[float, float, float] | None = None
    """Added to ``preview_rgb_factors``' result (needs the factors)."""
    image: Literal["none", "optional", "required"] = "none"
    tiny: bool = False
    """A random-weight test model that the project generates itself."""
    runtime_image: str | None = None
    """Container image override for this model's jobs."""

    @model_validator(mode="before")
    @classmethod
    def _display_texts(cls, data: Any) -> Any:
        """``display`` per language, or the older ``display_name``/``description`` (as
        English): one of the two shapes, and the English texts in both fields."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        display = data.get("display")
        if display is None:
            if "display_name" in data:  # the older shape: English only
                data["display"] = {"en": {"name": data["display_name"],
                                          "description": data.get("description", "")}}
            return data  # without either, the error names display_name
        if "display_name" in data or "description" in data:
            raise ValueError("give display (per language) or display_name and description, "
                             "not both")
        english = display.get("en") if isinstance(display, dict) else None
        if not isinstance(english, dict):
            raise ValueError("display needs en, the language the others fall back to")
        data["display_name"] = english.get("name")
        data["description"] = english.get("description", "")
        return data

    @model_validator(mode="after")
    def _check(self) -> ModelSpec:
        if not self.sizes:
            raise ValueError("sizes must not be empty")
        for size in self.sizes:
            w, h = parse_size(size)
            if w % 2 or h % 2:
                raise ValueError(f"size {size} must have even sides (H.264)")
        if self.default_size not in self.sizes:
            raise ValueError("default_size must be one of sizes")
        for n in self.frame_counts:
            if n < 1 or (n - 1) % 4:
                raise ValueError(f"frame count {n} is not 4k+1")
        if self.default_frames not in self.frame_counts:
            raise ValueError("default_frames must be one of frame_counts")
        if self.default_steps > self.max_steps:
            raise ValueError("default_steps exceeds max_steps")
        if self.preview_rgb_bias is not None and not self.preview_rgb_factors:
            raise ValueError("preview_rgb_bias needs preview_rgb_factors")
        if self.preview_rgb_factors is not None and not self.preview_rgb_factors:
            raise ValueError("preview_rgb_factors must not be empty")
        if self.pipeline == "i2v" and self.image == "none":
            raise ValueError("an i2v model must take an image")
        if self.pipeline == "t2v" and self.image != "none":
            raise ValueError("a t2v model takes no image")
        self._check_strategy()
        return self

    def _check_strategy(self) -> None:
        gpus = self.nproc_per_node * self.nnodes
        if self.strategy == "single" and gpus != 1:
            raise ValueError(f"strategy single runs on 1 GPU, not {gpus}")
        if self.strategy == "cfg_parallel":
            if gpus != 2:
                raise ValueError(f"strategy cfg_parallel runs on exactly 2 GPUs, not {gpus}")
            scales = [self.guidance_scale, self.guidance_scale_2 or self.guidance_scale]
            if min(scales) <= 1.0:
                raise ValueError("strategy cfg_parallel needs guidance_scale above 1")
        if self.strategy == "ulysses" and gpus < 2:
            raise ValueError("strategy ulysses needs 2 or more GPUs")
        if self.cpu_offload and self.strategy == "ulysses":
            raise ValueError("cpu_offload works with strategy single or cfg_parallel only")

    @property
    def gpus_per_job(self) -> int:
        return self.nproc_per_node * self.nnodes

    @property
    def world_size(self) -> int:
        return self.gpus_per_job

    def unavailable_reason(self, *, gpu_capacity: int) -> str | None:
        """Why no job of this model can ever start on ``gpu_capacity`` GPUs in all, or None
        when one can (a job never holds fewer GPUs than ``gpus_per_job``)."""
        if not never_fits(self.gpus_per_job, gpu_capacity=gpu_capacity):
            return None
        return unavailable_message(self.id, gpus=self.gpus_per_job, gpu_capacity=gpu_capacity)

    def resolve(
        self,
        *,
        size: str | None,
        num_frames: int | None,
        steps: int | None,
        seed: int | None,
        has_image: bool,
    ) -> ResolvedParams:
        """Concrete parameters for a request, or ``InvalidRequest`` naming the field."""
        if size is None:
            size = self.default_size
        else:
            w, h = parse_size(size)
            size = format_size(w, h)
            if size not in self.sizes:
                raise InvalidRequest(
                    f"model {self.id} supports sizes {', '.join(self.sizes)}; not {size}",
                    field="size", code="unsupported_size")
        frames = self.default_frames if num_frames is None else num_frames
        if frames not in self.frame_counts:
            raise InvalidRequest(
                f"model {self.id} supports num_frames "
                f"{', '.join(map(str, self.frame_counts))}; not {frames}",
                field="num_frames", code="unsupported_num_frames")
        n_steps = self.default_steps if steps is None else steps
        if not 1 <= n_steps <= self.max_steps:
            raise InvalidRequest(f"steps must be within 1..{self.max_steps} for model {self.id}",
                                 field="steps", code="unsupported_steps")
        if seed is None:
            seed = secrets.randbelow(MAX_SEED + 1)
        elif not 0 <= seed <= MAX_SEED:
            raise InvalidRequest(f"seed must be within 0..{MAX_SEED}", field="seed")
        if has_image and self.image == "none":
            raise InvalidRequest(f"model {self.id} is text-to-video and takes no image",
                                 field="image", code="image_not_supported")
        if not has_image and self.image == "required":
            raise InvalidRequest(f"model {self.id} needs an input image", field="image",
                                 code="image_required")
        width, height = parse_size(size)
        return ResolvedParams(size=size, width=width, height=height, num_frames=frames,
                              steps=n_steps, seed=seed, fps=self.fps)

    def public(self) -> dict[str, Any]:
        """What ``GET /v1/models`` shows (no filesystem paths)."""
        return {
            "id": self.id, "display_name": self.display_name, "description": self.description,
            "pipeline": self.pipeline, "sizes": list(self.sizes), "default_size": self.default_size,
            "frame_counts": list(self.frame_counts), "default_frames": self.default_frames,
            "default_steps": self.default_steps, "max_steps": self.max_steps, "fps": self.fps,
            "image": self.image, "gpus_per_job": self.gpus_per_job, "nnodes": self.nnodes,
            "nproc_per_node": self.nproc_per_node, "tiny": self.tiny,
            "display": {lang: text.model_dump() for lang, text in self.display.items()},
        }


@dataclass(frozen=True, slots=True)
class ResolvedParams:
    size: str
    width: int
    height: int
    num_frames: int
    steps: int
    seed: int
    fps: int

    def as_dict(self) -> dict[str, Any]:
        return {"size": self.size, "width": self.width, "height": self.height,
                "num_frames": self.num_frames, "steps": self.steps, "seed": self.seed,
                "fps": self.fps}


class _RegistryFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    models: list[ModelSpec]


class ModelRegistry(Mapping[str, ModelSpec]):
    """Models by id, in the file's order."""

    def __init__(self, models: list[ModelSpec]) -> None:
        self._models: dict[str, ModelSpec] = {}
        for m in models:
            if m.id in self._models:
                raise InvalidRequest(f"model {m.id} is listed twice", field="models")
            self._models[m.id] = m

    @classmethod
    def load(cls, path: Path | None = None) -> ModelRegistry:
        """The operator's registry file, or the one shipped with the project."""
        if path is None:
            text = resources.files("vidmaas").joinpath("models.yaml").read_text(encoding="utf-8")
        else:
            text = path.read_text(encoding="utf-8")
        return cls.parse(text)

    @classmethod
    def parse(cls, text: str) -> ModelRegistry:
        try:
            raw = yaml.safe_load(text)
            return cls(_RegistryFile.model_validate(raw).models)
        except (yaml.YAMLError, ValidationError) as e:
            raise InvalidRequest(f"invalid model registry: {e}", field="models") from e

    def __getitem__(self, model_id: str) -> ModelSpec:
        return self._models[model_id]

    def __iter__(self) -> Iterator[str]:
        return iter(self._models)

    def __len__(self) -> int:
        return len(self._models)

    def get_or_raise(self, model_id: str) -> ModelSpec:
        try:
            return self._models[model_id]
        except KeyError:
            raise InvalidRequest(
                f"unknown model {model_id[:80]!r}; known: {', '.join(self._models)}",
                field="model", code="unknown_model") from None

    @property
    def default(self) -> ModelSpec:
        return next(iter(self._models.values()))
