"""The generation engine: a Wan checkpoint loaded with diffusers, one video out (DESIGN §6).

Guarantees:
- ``load`` reads any Wan ``*-Diffusers`` layout (T2V, TI2V-5B, A14B, A14B I2V) and the
  tiny checkpoints through the same ``from_pretrained`` path; bf16 on CUDA (the VAE
  stays fp32), fp32 on CPU; the registry's CPU offload and VAE tiling are honoured.
  A missing or unloadable model directory is a ``ModelError``.
- ``Engine.generate`` runs text-to-video, or image-to-video when given an image
  (TI2V models switch to their image pipeline with ``expand_timesteps``); a model
  that cannot take (or needs) an image is a ``BadInput``. The seed fully determines
  the video on a given machine and world size.
- ``on_step`` is called after every denoising step on every rank; when it returns
  True on rank 0, every rank stops after that same step and ``Cancelled`` is raised.
- Frames come back as uint8 ``(frames, height, width, 3)``, decoded on rank 0 only.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vidmaas.domain.events import Stage
from vidmaas.runtime import distributed
from vidmaas.runtime.errors import BadInput, Cancelled, ModelError

log = logging.getLogger(__name__)

StepHook = Callable[[int, int], "str | None"]
"""(steps done, total) → who cancelled, or None to go on."""
StageHook = Callable[[Stage], None]


@dataclass(frozen=True, slots=True)
class Request:
    prompt: str
    width: int
    height: int
    num_frames: int
    steps: int
    seed: int
    negative_prompt: str | None = None
    image: Path | None = None
    guidance_scale: float = 5.0
    guidance_scale_2: float | None = None


@dataclass(frozen=True, slots=True)
class Options:
    cpu_offload: bool = False
    vae_tiling: bool = False


@dataclass(slots=True)
class Output:
    frames: Any
    """numpy uint8 (frames, height, width, 3) on rank 0; None on the other ranks."""
    timings: dict[str, float] = field(default_factory=dict)
    transformer_evaluations: int | None = None
    """Forward passes this rank computed under CFG-parallel (None otherwise)."""


def pick_device(local_rank: int) -> tuple[Any, Any]:
    """(device, dtype): bf16 on this rank's GPU if there is one, else fp32 on the CPU."""
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda", local_rank), torch.bfloat16
    return torch.device("cpu"), torch.float32


def read_model_index(model_dir: Path) -> dict[str, Any]:
    """The checkpoint's ``model_index.json``, or ``ModelError``."""
    path = model_dir / "model_index.json"
    if not model_dir.is_dir():
        raise ModelError(f"model directory {model_dir} does not exist", code="model_missing")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelError(f"{model_dir} is not a diffusers checkpoint: {e}",
                         code="model_missing") from e
    if not isinstance(data, dict):
        raise ModelError(f"{path} is not a JSON object")
    return data


def check_image_use(model_index: dict[str, Any], *, has_image: bool) -> None:
    """``BadInput`` if the checkpoint needs an image and has none, or takes none and has one.

    Decided from ``model_index.json`` alone, before anything heavy is loaded.
    """
    image_model = model_index.get("_class_name") == "WanImageToVideoPipeline"
    if image_model and not has_image:
        raise BadInput("this model turns an image into a video: it needs --image")
    if has_image and not image_model and not model_index.get("expand_timesteps"):
        raise BadInput("this model is text-to-video and takes no image")


def num_attention_heads(model_dir: Path) -> int:
    try:
        config = json.loads((model_dir / "transformer" / "config.json").read_text("utf-8"))
        return int(config["num_attention_heads"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelError(f"cannot read the transformer config of {model_dir}: {e}") from e


class Engine:
    """One loaded pipeline on one rank."""

    def __init__(self, pipe: Any, *, device: Any, dtype: Any, plan: distributed.Plan) -> None:
        self.pipe = pipe
        self.device = device
        self.dtype = dtype
        self.plan = plan

    @classmethod
    def load(cls, model_dir: Path, *, plan: distributed.Plan, local_rank: int,
             options: Options = Options()) -> Engine:
        read_model_index(model_dir)
        import torch

        diffusers = _diffusers()
        device, dtype = pick_device(local_rank)
        try:
            key = _dtype_keyword()
            vae = diffusers.AutoencoderKLWan.from_pretrained(
                model_dir, subfolder="vae", **{key: torch.float32})
            pipe = diffusers.DiffusionPipeline.from_pretrained(model_dir, vae=vae, **{key: dtype})
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise ModelError(f"cannot load the model in {model_dir}: {e}") from e
        if options.vae_tiling:
            pipe.vae.enable_tiling()
        if options.cpu_offload and device.type == "cuda" and plan.strategy == "single":
            pipe.enable_model_cpu_offload(gpu_id=local_rank)
        else:
            pipe.to(device)
        pipe.set_progress_bar_config(disable=True)
        return cls(pipe, device=device, dtype=dtype, plan=plan)

    def _pipeline_for(self, image: Path | None) -> Any:
        WanImageToVideoPipeline = _diffusers().WanImageToVideoPipeline
        pipe = self.pipe
        is_i2v = isinstance(pipe, WanImageToVideoPipeline)
        if image is None:
            if is_i2v:
                raise BadInput("this model turns an image into a video: it needs --image")
            return pipe
        if is_i2v:
            return pipe
        if not pipe.config.expand_timesteps:
            raise BadInput("this model is text-to-video and takes no image")
        i2v = WanImageToVideoPipeline(
            tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder, vae=pipe.vae,
            scheduler=pipe.scheduler, transformer=pipe.transformer,
            transformer_2=pipe.transformer_2, boundary_ratio=pipe.config.boundary_ratio,
            expand_timesteps=True)
        i2v.set_progress_bar_config(disable=True)
        return i2v

    def generate(self, req: Request, *, on_step: StepHook | None = None,
                 on_stage: StageHook | None = None) -> Output:
        import torch

        timings: dict[str, float] = {}
        pipe = self._pipeline_for(req.image)
        picture = load_image(req.image, width=req.width, height=req.height) \
            if req.image is not None else None
        cfg = req.guidance_scale > 1.0

        if on_stage:
            on_stage(Stage.ENCODE_PROMPT)
        t = time.perf_counter()
        with torch.no_grad():
            prompt_embeds, negative_embeds = pipe.encode_prompt(
                prompt=req.prompt, negative_prompt=req.negative_prompt or "",
                do_classifier_free_guidance=cfg, num_videos_per_prompt=1,
                max_sequence_length=512, device=self.device)
        timings["encode_prompt_s"] = time.perf_counter() - t
        splitters = distributed.apply(self.plan, pipe, negative_embeds=negative_embeds)

        if on_stage:
            on_stage(Stage.DENOISE)
        cancelled_by: list[str] = []

        def step_end(p: Any, i: int, _t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
            by = on_step(i + 1, req.steps) if on_step else None
            if distributed.agree_on_cancel(self.plan, by is not None, device=self.device):
                cancelled_by.append(by or "user")
                p._interrupt = True
            return kwargs

        extra: dict[str, Any] = {}
        if picture is not None:
            extra["image"] = picture
        if req.guidance_scale_2 is not None and pipe.config.boundary_ratio is not None:
            extra["guidance_scale_2"] = req.guidance_scale_2
        t = time.perf_counter()
        latents = pipe(
            prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_embeds,
            height=req.height, width=req.width, num_frames=req.num_frames,
            num_inference_steps=req.steps, guidance_scale=req.guidance_scale,
            generator=torch.Generator(device="cpu").manual_seed(req.seed),
            output_type="latent", return_dict=False, callback_on_step_end=step_end,
            **extra)[0]
        timings["denoise_s"] = time.perf_counter() - t
        if cancelled_by:
            raise Cancelled(cancelled_by[0])
        evaluations = sum(s.evaluations for s in splitters) if splitters else None
        if self.plan.rank != 0:
            return Output(frames=None, timings=timings, transformer_evaluations=evaluations)

        if on_stage:
            on_stage(Stage.DECODE)
        t = time.perf_counter()
        frames = self.decode(latents)
        timings["decode_s"] = time.perf_counter() - t
        return Output(frames=frames, timings=timings, transformer_evaluations=evaluations)

    def decode(self, latents: Any) -> Any:
        """Latents → uint8 (frames, height, width, 3)."""
        import numpy as np
        import torch

        vae = self.pipe.vae
        with torch.no_grad():
            latents = latents.to(next(vae.parameters()).device, dtype=vae.dtype)
            z = vae.config.z_dim
            mean = torch.tensor(vae.config.latents_mean).view(1, z, 1, 1, 1).to(latents)
            std = torch.tensor(vae.config.latents_std).view(1, z, 1, 1, 1).to(latents)
            video = vae.decode(latents * std + mean, return_dict=False)[0]
            video = self.pipe.video_processor.postprocess_video(video, output_type="np")
        frames = np.asarray(video[0], dtype=np.float32)
        return (frames * 255.0).round().clip(0, 255).astype(np.uint8)


def _diffusers() -> Any:
    """diffusers, untyped (its hints are partial)."""
    import importlib

    return importlib.import_module("diffusers")


def _dtype_keyword() -> str:
    """``dtype`` where diffusers has it (≥ 0.42), else the older ``torch_dtype``."""
    import importlib

    try:
        utils = importlib.import_module("diffusers.utils.deprecation_utils")
    except ImportError:
        return "torch_dtype"
    return "dtype" if hasattr(utils, "_resolve_dtype") else "torch_dtype"


def import_libraries() -> None:
    """Import torch and diffusers now (seconds), so model loading is timed on its own."""
    import importlib

    importlib.import_module("torch")
    importlib.import_module("diffusers")
    for name in ("WanPipeline", "WanImageToVideoPipeline", "AutoencoderKLWan"):
        getattr(importlib.import_module("diffusers"), name)


def load_image(path: Path, *, width: int, height: int) -> Any:
    """The input image as RGB, scaled and centre-cropped to cover ``width``×``height``."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()
            rgb = img.convert("RGB")
    except FileNotFoundError as e:
        raise BadInput(f"the input image was not fetched ({path.name})",
                       code="input_missing") from e
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise BadInput(f"the input image cannot be read: {e}", code="bad_image") from e
    return ImageOps.fit(rgb, (width, height), method=Image.Resampling.LANCZOS)
