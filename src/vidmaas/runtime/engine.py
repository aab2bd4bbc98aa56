"""The generation engine: a Wan checkpoint loaded with diffusers, one video out (DESIGN §6).

Guarantees:
- ``load`` reads any Wan ``*-Diffusers`` layout (T2V, TI2V-5B, A14B, A14B I2V) and the
  tiny checkpoints the same way: each component straight onto the rank's device, bf16
  on CUDA (the VAE fp32), fp32 on the CPU. A missing or unloadable model directory is a
  ``ModelError``.
- The engine follows its memory plan (``runtime.plan.Placement``): the text encoder
  leaves the device once the prompts are encoded; of the A14B experts only the one whose
  timesteps are running is on the device, the other arriving at the boundary (as Wan's
  ``_prepare_model_for_timestep`` swaps them) — the swap changes nothing in the output;
  the transformers leave before the VAE decodes; with ``sequential_load`` they load only
  after the text encoder has gone. Under diffusers' model CPU offload the offload hooks
  place everything instead, and decoding follows the VAE's execution device.
- ``flow_shift`` is set on the scheduler; the negative prompt is the request's (the
  executors fill in the model's default).
- ``Engine.generate`` runs text-to-video, or image-to-video when given an image (TI2V
  models switch to their image pipeline with ``expand_timesteps``); the image decides
  the aspect ratio and the request's width × height the area (``runtime.images``); a
  model that cannot take (or needs) an image is a ``BadInput``. The seed fully
  determines the video on a given machine and world size.
- ``on_step`` is called after every denoising step on every rank; when it returns
  True on rank 0, every rank stops after that same step and ``Cancelled`` is raised.
  ``on_latents`` (live previews) is called after every step on rank 0 only, with the
  latents as the step left them.
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
from vidmaas.runtime import distributed, speed
from vidmaas.runtime.errors import BadInput, Cancelled, ModelError
from vidmaas.runtime.images import fit_image
from vidmaas.runtime.plan import Placement, placement
from vidmaas.runtime.residency import HEAVY, Components, Move

log = logging.getLogger(__name__)

StepHook = Callable[[int, int], "str | None"]
"""(steps done, total) → who cancelled, or None to go on."""
StageHook = Callable[[Stage], None]
LatentHook = Callable[[Any, int, int], None]
"""(latents after the step, steps done, total): rank 0's look at the denoising latents
(``runtime.preview``); it must return at once and must not change them."""
EXPERTS = ("transformer", "transformer_2")


@dataclass(frozen=True, slots=True)
class Request:
    prompt: str
    width: int
    height: int
    """For image-to-video, width × height is the area; the image gives the aspect ratio."""
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
    flow_shift: float | None = None
    """The scheduler's shift; None keeps the checkpoint's."""
    memory_saving: bool = False
    expert_swap: bool = True
    keep_loaded: bool = False
    """Keep what leaves the device in host RAM (to generate again) instead of releasing it."""
    attention_backend: str | None = None
    compile: bool = False
    tf32: bool = False


@dataclass(slots=True)
class Output:
    frames: Any
    """numpy uint8 (frames, height, width, 3) on rank 0; None on the other ranks."""
    width: int = 0
    height: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    transformer_evaluations: int | None = None
    """Forward passes this rank computed under CFG-parallel (None otherwise)."""
    moves: list[Move] = field(default_factory=list)
    """The components' moves during this generation (``residency.Components.moves``)."""


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

    def __init__(self, pipe: Any, *, components: Components, plan: distributed.Plan,
                 placement: Placement, options: Options) -> None:
        self.pipe = pipe
        self.components = components
        self.device = components.device
        self.dtype = components.dtype
        self.plan = plan
        self.placement = placement
        self.options = options

    @classmethod
    def load(cls, model_dir: Path, *, plan: distributed.Plan, local_rank: int,
             options: Options = Options()) -> Engine:
        index = read_model_index(model_dir)
        device, dtype = pick_device(local_rank)
        components = Components(model_dir, index, device=device, dtype=dtype,
                                evict="host" if options.keep_loaded else "release")
        p = placement(strategy=plan.strategy, world_size=plan.world_size,
                      memory_saving=options.memory_saving, cpu_offload=options.cpu_offload,
                      vae_tiling=options.vae_tiling, expert_swap=options.expert_swap,
                      keep_loaded=options.keep_loaded, cuda=device.type == "cuda",
                      experts=sum(components.has(e) for e in EXPERTS))
        speed.check_attention_backend(options.attention_backend)
        if options.tf32 and device.type == "cuda":
            speed.enable_tf32()
        to_device = not p.cpu_offload
        for name in ("vae", "text_encoder"):
            components.load(name, to_device=to_device)
        if p.cpu_offload or not p.sequential_load:
            for name in EXPERTS[:1] if p.expert_swap and not p.cpu_offload else EXPERTS:
                if components.has(name):
                    components.load(name, to_device=to_device)
        pipe = _build_pipeline(components, index)
        components.attach(pipe)
        _set_flow_shift(pipe, options.flow_shift)
        if p.vae_tiling:
            pipe.vae.enable_tiling()
        if p.cpu_offload:
            pipe.enable_model_cpu_offload(gpu_id=local_rank)
        pipe.set_progress_bar_config(disable=True)
        log.info("loaded %s on %s: %s", model_dir.name, device, p.describe())
        return cls(pipe, components=components, plan=plan, placement=p, options=options)

    # ------------------------------------------------------------ pipelines and experts

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

    def experts_by_step(self, pipe: Any, steps: int) -> list[str]:
        """Which expert denoises each step: ``transformer`` at or above the boundary
        timestep (``boundary_ratio`` × training timesteps), ``transformer_2`` below."""
        ratio = pipe.config.boundary_ratio
        if ratio is None or not self.components.has("transformer_2"):
            return ["transformer"] * steps
        pipe.scheduler.set_timesteps(steps, device=self.device)
        boundary = ratio * pipe.scheduler.config.num_train_timesteps
        return ["transformer" if float(t) >= boundary else "transformer_2"
                for t in pipe.scheduler.timesteps]

    def _activate(self, name: str, negative_embeds: Any,
                  splitters: dict[int, distributed.CfgParallel]) -> None:
        """``name`` on the device and ready to run under the plan."""
        module = self.components.get(name) if self.placement.cpu_offload else \
            self.components.ensure(name)
        if not getattr(module, "_vidmaas_prepared", False):  # a module read again is new
            speed.prepare_transformer(module, attention_backend=self.options.attention_backend,
                                      compile=self.options.compile)
            module._vidmaas_prepared = True
        splitter = distributed.prepare(self.plan, module)
        if splitter is not None and id(splitter) not in splitters:
            splitter.start(negative_embeds)
            splitters[id(splitter)] = splitter

    # ------------------------------------------------------------ generation

    def generate(self, req: Request, *, on_step: StepHook | None = None,
                 on_stage: StageHook | None = None,
                 on_latents: LatentHook | None = None) -> Output:
        import torch

        timings: dict[str, float] = {}
        components, p = self.components, self.placement
        first_move = len(components.moves)
        pipe = self._pipeline_for(req.image)
        components.attach(pipe)
        width, height, picture = req.width, req.height, None
        if req.image is not None:
            multiple = pipe.vae_scale_factor_spatial * int(self._patch_size()[1])
            picture = fit_image(req.image, area=req.width * req.height, multiple=multiple)
            width, height = picture.size
        cfg = req.guidance_scale > 1.0
        try:
            if on_stage:
                on_stage(Stage.ENCODE_PROMPT)
            t = time.perf_counter()
            components.when = "encode_prompt"
            if not p.cpu_offload:
                components.ensure("text_encoder")
            with torch.no_grad():
                prompt_embeds, negative_embeds = pipe.encode_prompt(
                    prompt=req.prompt, negative_prompt=req.negative_prompt or "",
                    do_classifier_free_guidance=cfg, num_videos_per_prompt=1,
                    max_sequence_length=512, device=self.device)
            if not p.cpu_offload:
                components.evict("text_encoder")
            timings["encode_prompt_s"] = time.perf_counter() - t

            experts = self.experts_by_step(pipe, req.steps)
            splitters: dict[int, distributed.CfgParallel] = {}
            load_before = components.load_s
            for name in dict.fromkeys(experts[:1] if p.expert_swap else experts):
                self._activate(name, negative_embeds, splitters)
            timings["load_transformer_s"] = components.load_s - load_before

            if on_stage:
                on_stage(Stage.DENOISE)
            cancelled_by: list[str] = []

            look = on_latents if self.plan.rank == 0 else None

            def step_end(pl: Any, i: int, _t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
                if look is not None:
                    look(kwargs.get("latents"), i + 1, req.steps)
                by = on_step(i + 1, req.steps) if on_step else None
                if distributed.agree_on_cancel(self.plan, by is not None, device=self.device):
                    cancelled_by.append(by or "user")
                    pl._interrupt = True
                    return kwargs
                if not p.cpu_offload:
                    self._after_step(i, experts, negative_embeds, splitters)
                return kwargs

            extra: dict[str, Any] = {}
            if picture is not None:
                extra["image"] = picture
            if req.guidance_scale_2 is not None and pipe.config.boundary_ratio is not None:
                extra["guidance_scale_2"] = req.guidance_scale_2
            t = time.perf_counter()
            latents = pipe(
                prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_embeds,
                height=height, width=width, num_frames=req.num_frames,
                num_inference_steps=req.steps, guidance_scale=req.guidance_scale,
                generator=torch.Generator(device="cpu").manual_seed(req.seed),
                output_type="latent", return_dict=False, callback_on_step_end=step_end,
                **extra)[0]
            timings["denoise_s"] = time.perf_counter() - t
            if cancelled_by:
                raise Cancelled(cancelled_by[0])
            evaluations = sum(s.evaluations for s in splitters.values()) if splitters \
                else None
            out = Output(frames=None, width=width, height=height, timings=timings,
                         transformer_evaluations=evaluations)
            if self.plan.rank == 0:
                if on_stage:
                    on_stage(Stage.DECODE)
                components.when = "decode"
                t = time.perf_counter()
                out.frames = self.decode(latents)
                timings["decode_s"] = time.perf_counter() - t
            out.moves = components.moves[first_move:]
            return out
        finally:
            components.when = "idle"
            if pipe is not self.pipe:
                components.detach(pipe)

    def _after_step(self, i: int, experts: list[str], negative_embeds: Any,
                    splitters: dict[int, distributed.CfgParallel]) -> None:
        """Swap experts at the boundary; after the last step, take the transformers off."""
        components = self.components
        current = experts[i]
        following = experts[i + 1] if i + 1 < len(experts) else None
        components.when = f"step {i + 1}"
        if following is None:
            for name in EXPERTS:
                components.evict(name)
        elif following != current and self.placement.expert_swap:
            components.evict(current)
            self._activate(following, negative_embeds, splitters)

    def _patch_size(self) -> tuple[int, int, int]:
        index = self.components.model_dir / "transformer" / "config.json"
        try:
            patch = json.loads(index.read_text("utf-8")).get("patch_size", [1, 2, 2])
        except (OSError, ValueError):
            patch = [1, 2, 2]
        return int(patch[0]), int(patch[1]), int(patch[2])

    def decode(self, latents: Any) -> Any:
        """Latents → uint8 (frames, height, width, 3), converted on the VAE's device."""
        import torch

        vae = self.pipe.vae
        with torch.no_grad():
            latents = latents.to(execution_device(vae), dtype=vae.dtype)
            # The very arithmetic of diffusers' WanPipeline decode, so the frames are the
            # bare pipeline's to the bit.
            z = vae.config.z_dim
            mean = torch.tensor(vae.config.latents_mean).view(1, z, 1, 1, 1).to(latents)
            inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, z, 1, 1, 1).to(
                latents)
            video = vae.decode(latents / inv_std + mean, return_dict=False)[0]
            # (1, C, F, H, W) in [-1, 1] → (F, H, W, C) uint8, as diffusers' postprocess
            # computes it, but on the device: only the bytes cross to the host.
            video = ((video[0] * 0.5 + 0.5).clamp(0, 1) * 255.0).round()
            frames = video.permute(1, 2, 3, 0).to(torch.uint8).cpu().numpy()
        return frames


def execution_device(module: Any) -> Any:
    """Where ``module``'s inputs must be for its forward pass: under CPU offload the weights
    wait on the host until the hook moves them, so it is the hook's device, not theirs
    (diffusers' ``get_module_execution_device``, as ``_execution_device`` does)."""
    import importlib

    utils: Any = importlib.import_module("diffusers.utils.torch_utils")
    return utils.get_module_execution_device(module)


def _build_pipeline(components: Components, index: dict[str, Any]) -> Any:
    """The checkpoint's pipeline class around the heavy components loaded so far (None for
    those not loaded yet); the light ones (tokenizer, scheduler) are read here."""
    import inspect

    cls = getattr(_diffusers(), str(index.get("_class_name", "WanPipeline")))
    kwargs: dict[str, Any] = {}
    for name in inspect.signature(cls.__init__).parameters:
        if components.has(name):
            kwargs[name] = components.get(name) if name in HEAVY else components.load(name)
        elif name in index and not isinstance(index[name], list):
            kwargs[name] = index[name]  # boundary_ratio, expand_timesteps
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ModelError(f"cannot build {cls.__name__} from {components.model_dir}: {e}") from e


def _set_flow_shift(pipe: Any, shift: float | None) -> None:
    """Put ``shift`` on the scheduler (UniPC's ``flow_shift``, flow-match Euler's ``shift``)."""
    if shift is None:
        return
    config = pipe.scheduler.config
    key = "flow_shift" if "flow_shift" in config else "shift" if "shift" in config else None
    if key is None:
        raise ModelError(f"the scheduler {type(pipe.scheduler).__name__} has no shift to set")
    pipe.scheduler = type(pipe.scheduler).from_config(config, **{key: shift})


def _diffusers() -> Any:
    """diffusers, untyped (its hints are partial)."""
    import importlib

    return importlib.import_module("diffusers")


def import_libraries() -> None:
    """Import torch and diffusers now (seconds), so model loading is timed on its own."""
    import importlib

    importlib.import_module("torch")
    importlib.import_module("diffusers")
    for name in ("WanPipeline", "WanImageToVideoPipeline", "AutoencoderKLWan"):
        getattr(importlib.import_module("diffusers"), name)
