"""Memory plans: where each component of a model lives, phase by phase, and what that costs.

Guarantees:
- ``placement`` is the one policy the engine follows (``runtime.engine``), decided from
  the strategy, the world size and the job's flags alone (no torch): only the active
  A14B expert on the device (swapped at the boundary, as Wan's
  ``_prepare_model_for_timestep`` does), the text encoder off the device once the
  prompts are encoded, the transformers off before the VAE decodes, weights loaded
  straight onto the rank's device. "Off the device" means released (a per-task job needs
  nothing twice) or kept in host RAM (``keep_loaded``, for an engine that generates
  again). The memory-saving plan adds VAE tiling, loads the transformers only once the
  text encoder is gone, and uses diffusers' model CPU offload on a single rank.
- ``weight_bytes`` counts the parameters and buffers of the real-size components built on
  the meta device (nothing is allocated or downloaded) in the run dtype: bf16 for the
  transformers (their ``_keep_in_fp32_modules`` in fp32, as diffusers loads them) and the
  text encoder, fp32 for the VAE.
- ``estimate`` adds, per phase, an activation estimate for the given size and frames.
  It is an estimate, not a measurement: the formulas (``dit_activation_bytes``,
  ``vae_decode_bytes``) count the tensors alive at the widest point of one transformer
  block and of one causal VAE chunk; a fragmentation margin and a fixed CUDA overhead
  (context, NCCL, workspaces) are added to the peak. ``scripts/gpu-check.sh`` prints the
  estimate beside the measured peak of the full-size TI2V-5B.
- ``plan_model`` answers for a registry entry whether the peak fits its declared
  ``gpu_memory_gib`` per rank and the host RAM its ``pod_memory_gib`` per pod.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from vidmaas.domain.models import ModelSpec, Strategy, parse_size
from vidmaas.runtime.architectures import Architecture, architecture_for

GIB = 2**30
Evict = Literal["release", "host"]

CUDA_OVERHEAD_BYTES = 2 * GIB
"""CUDA context, cuBLAS/cuDNN workspaces and NCCL buffers: GPU memory torch does not count."""
FRAGMENTATION = 0.10
"""Margin for the caching allocator's fragmentation, on top of the counted bytes."""
RUNTIME_HOST_BYTES = 3 * GIB
"""Host RAM of one rank's process before any weight: Python, torch, the CUDA libraries."""
PARENT_HOST_BYTES = GIB // 2
"""The pod's ``vidmaas-job run`` process around ``torchrun``."""
BF16, FP32 = 2, 4


@dataclass(frozen=True, slots=True)
class Placement:
    """Where each component lives while one generation runs on one rank."""

    strategy: Strategy
    world_size: int
    memory_saving: bool = False
    cpu_offload: bool = False
    """diffusers' model CPU offload: everything in host RAM, each component moved onto the
    device for its own forward pass (the engine's placement steps are then not used)."""
    vae_tiling: bool = False
    expert_swap: bool = True
    """Only the expert whose timesteps are running lives on the device."""
    sequential_load: bool = False
    """The transformers load only after the text encoder has left the device."""
    evict: Evict = "release"
    experts: int = 1

    @property
    def sequence_ranks(self) -> int:
        """Ranks the transformer's sequence is split over (Ulysses)."""
        return self.world_size if self.strategy == "ulysses" else 1

    @property
    def sharding(self) -> str:
        if self.strategy == "single":
            return "one rank: nothing is sharded"
        if self.strategy == "cfg_parallel":
            return ("weights replicated on both ranks; each rank computes one branch of "
                    "classifier-free guidance")
        return (f"weights replicated; the sequence (activations, attention) split over "
                f"{self.world_size} ranks by Ulysses (diffusers has no tensor-parallel plan "
                "for Wan, and FSDP is not applied: it would gather every expert each step)")

    def describe(self) -> str:
        parts = [f"{self.strategy}×{self.world_size}"]
        if self.cpu_offload:
            parts.append("model CPU offload")
        else:
            off = "released" if self.evict == "release" else "moved to host RAM"
            if self.experts > 1:
                parts.append("one expert on the device, swapped at the boundary"
                             if self.expert_swap else "both experts on the device")
            parts.append(f"text encoder {off} after encoding")
            if self.sequential_load:
                parts.append("transformers loaded after the text encoder is gone")
        parts.append(f"VAE tiling {'on' if self.vae_tiling else 'off'}")
        if self.memory_saving:
            parts.append("memory-saving plan")
        return ", ".join(parts)

    def as_dict(self) -> dict[str, Any]:
        return {"strategy": self.strategy, "world_size": self.world_size,
                "memory_saving": self.memory_saving, "cpu_offload": self.cpu_offload,
                "vae_tiling": self.vae_tiling, "expert_swap": self.expert_swap,
                "sequential_load": self.sequential_load, "evict": self.evict,
                "experts": self.experts, "sharding": self.sharding}


def placement(*, strategy: Strategy, world_size: int, memory_saving: bool = False,
              cpu_offload: bool = False, vae_tiling: bool = False, expert_swap: bool = True,
              keep_loaded: bool = False, cuda: bool = True, experts: int = 1) -> Placement:
    """The placement for a job: the model's flags, tightened by ``memory_saving``."""
    if memory_saving:
        vae_tiling = True
        cpu_offload = cpu_offload or strategy == "single"
    # Offload hooks and Ulysses' hooks do not compose; on a CPU there is nothing to offload.
    cpu_offload = cpu_offload and strategy != "ulysses" and cuda
    return Placement(strategy=strategy, world_size=world_size, memory_saving=memory_saving,
                     cpu_offload=cpu_offload, vae_tiling=vae_tiling, expert_swap=expert_swap,
                     sequential_load=memory_saving and not cpu_offload,
                     evict="host" if keep_loaded else "release", experts=experts)


# ---------------------------------------------------------------- weights (meta device)

@dataclass(frozen=True, slots=True)
class Weights:
    text_encoder_bytes: int
    expert_bytes: int
    """One transformer (each A14B expert is one)."""
    experts: int
    vae_bytes: int
    largest_tensor_bytes: int
    """The biggest single tensor: what loading stages in host RAM at once."""

    @property
    def total_bytes(self) -> int:
        return self.text_encoder_bytes + self.expert_bytes * self.experts + self.vae_bytes


def _module_bytes(module: Any, *, dtype_bytes: int,
                  keep_fp32: tuple[str, ...] = ()) -> tuple[int, int]:
    """(bytes, largest tensor bytes) of ``module``'s parameters (in the run dtype, or fp32
    under a ``keep_fp32`` module) and buffers (as they are)."""
    sizes = []
    for name, param in module.named_parameters():
        fp32 = not param.is_floating_point() or any(k in name.split(".") for k in keep_fp32)
        sizes.append(param.numel() * (FP32 if fp32 else dtype_bytes))
    sizes += [buf.numel() * buf.element_size() for _, buf in module.named_buffers()]
    return sum(sizes), max(sizes, default=0)


@functools.lru_cache(maxsize=32)
def _component_bytes(kind: str, config_json: str) -> tuple[int, int]:
    import importlib

    import torch

    config = json.loads(config_json)
    accelerate: Any = importlib.import_module("accelerate")
    if kind == "transformer":
        cls = importlib.import_module("diffusers").WanTransformer3DModel
        with accelerate.init_empty_weights():
            module = cls.from_config(config)
        return _module_bytes(module, dtype_bytes=BF16,
                             keep_fp32=tuple(cls._keep_in_fp32_modules or ()))
    if kind == "vae":
        cls = importlib.import_module("diffusers").AutoencoderKLWan
        with accelerate.init_empty_weights():
            module = cls.from_config(config)
        return _module_bytes(module, dtype_bytes=FP32)
    tf: Any = importlib.import_module("transformers")
    with torch.device("meta"):
        module = tf.UMT5EncoderModel(tf.UMT5Config(**config))
    return _module_bytes(module, dtype_bytes=BF16)


def weight_bytes(arch: Architecture) -> Weights:
    """The bytes of each component of ``arch`` in the run dtype (built on the meta device)."""
    def key(config: dict[str, Any]) -> str:
        return json.dumps(config, sort_keys=True)

    te, te_max = _component_bytes("text_encoder", key(arch.text_encoder))
    tr, tr_max = _component_bytes("transformer", key(arch.transformer))
    vae, vae_max = _component_bytes("vae", key(arch.vae))
    return Weights(text_encoder_bytes=te, expert_bytes=tr, experts=arch.experts, vae_bytes=vae,
                   largest_tensor_bytes=max(te_max, tr_max, vae_max))


# ---------------------------------------------------------------- activations (estimates)

def latent_shape(arch: Architecture, *, width: int, height: int,
                 frames: int) -> tuple[int, int, int]:
    """(latent frames, latent height, latent width)."""
    s = arch.vae_scale_spatial
    return (frames - 1) // arch.vae_scale_temporal + 1, height // s, width // s


def dit_tokens(arch: Architecture, *, width: int, height: int, frames: int) -> int:
    f, h, w = latent_shape(arch, width=width, height=height, frames=frames)
    pf, ph, pw = (int(x) for x in arch.transformer.get("patch_size", [1, 2, 2]))
    return (f // pf) * (h // ph) * (w // pw)


def dit_activation_bytes(arch: Architecture, *, width: int, height: int, frames: int,
                         sequence_ranks: int = 1) -> int:
    """One transformer forward on one rank: per token of this rank's share, the FFN's hidden
    layer twice in bf16 (projection, GELU) and about a dozen model-width tensors (residual,
    its fp32 copy, norm, q/k/v, rotary copies, attention and cross-attention outputs); plus
    the latents and the scheduler's history in fp32."""
    t = arch.transformer
    dim = int(t["num_attention_heads"]) * int(t["attention_head_dim"])
    tokens = math.ceil(dit_tokens(arch, width=width, height=height, frames=frames)
                       / sequence_ranks)
    f, h, w = latent_shape(arch, width=width, height=height, frames=frames)
    latents = int(t.get("in_channels", 16)) * f * h * w * FP32 * 6
    return tokens * (2 * int(t["ffn_dim"]) * BF16 + 24 * dim) + latents


def text_encoder_activation_bytes(arch: Architecture) -> int:
    """One prompt through the encoder: hidden and FFN tensors and fp32 attention scores."""
    c = arch.text_encoder
    n = arch.text_len
    return n * (2 * int(c["d_ff"]) + 8 * int(c["d_model"])) * BF16 + \
        int(c["num_heads"]) * n * n * FP32 * 2


def vae_decode_bytes(arch: Architecture, *, width: int, height: int, frames: int,
                     tiling: bool) -> int:
    """Decoding one causal chunk (4 output frames) at a time: at each decoder stage the
    feature caches (2 frames per causal convolution) and the live tensors of the chunk, in
    fp32; plus the decoded video, gathered in fp32 on the device. With tiling the stages run
    on one 256×256 tile at a time (diffusers' default tile)."""
    v = arch.vae
    patch = int(v.get("patch_size") or 1)
    base = int(v.get("decoder_base_dim") or v.get("base_dim", 96))
    mult = list(v.get("dim_mult", [1, 2, 4, 4]))
    convs = 2 * (int(v.get("num_res_blocks", 2)) + 1)
    area = (min(width, 256) * min(height, 256)) if tiling else width * height
    stages = 0
    for level, m in enumerate(mult):
        pixels = area // (patch * 2**level) ** 2
        stages += pixels * base * int(m) * FP32 * (2 * convs + 4 * 4)
    video = frames * width * height * 3 * FP32 * 2
    return stages + video


# ---------------------------------------------------------------- the plan

@dataclass(frozen=True, slots=True)
class Phase:
    name: str
    on_device: tuple[str, ...]
    weights_bytes: int
    activation_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.activation_bytes

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "on_device": list(self.on_device),
                "weights_bytes": self.weights_bytes, "activation_bytes": self.activation_bytes}


@dataclass(frozen=True, slots=True)
class Estimate:
    placement: Placement
    weights: Weights
    phases: tuple[Phase, ...]
    gpu_peak_bytes: int
    """Rank 0's peak: the largest phase, plus the fragmentation margin and CUDA overhead."""
    host_rank_bytes: int
    """Host RAM of rank 0 (the rank that also holds the decoded frames)."""
    host_pod_bytes: int
    """Host RAM of one pod: its ranks and the parent ``vidmaas-job run``."""


def estimate(arch: Architecture, p: Placement, *, width: int, height: int, frames: int,
             image: bool, nproc_per_node: int) -> Estimate:
    """The memory ``p`` needs for one ``width``×``height``, ``frames`` generation."""
    w = weight_bytes(arch)
    te, ex, vae = w.text_encoder_bytes, w.expert_bytes, w.vae_bytes
    dit = dit_activation_bytes(arch, width=width, height=height, frames=frames,
                               sequence_ranks=p.sequence_ranks)
    decode = vae_decode_bytes(arch, width=width, height=height, frames=frames,
                              tiling=p.vae_tiling)
    experts = ["transformer", "transformer_2"][:arch.experts]
    phases: list[Phase] = []
    if p.cpu_offload:
        phases.append(Phase("encode_prompt", ("text_encoder",), te,
                            text_encoder_activation_bytes(arch)))
        if image:
            phases.append(Phase("encode_image", ("vae",), vae, _encode_image_bytes(
                arch, width=width, height=height, frames=frames, tiling=p.vae_tiling)))
        phases += [Phase(f"denoise:{e}", (e,), ex, dit) for e in experts]
    else:
        first = [] if p.sequential_load else (experts[:1] if p.expert_swap else experts)
        phases.append(Phase("encode_prompt", ("text_encoder", "vae", *first),
                            te + vae + ex * len(first), text_encoder_activation_bytes(arch)))
        resident = experts[:1] if p.expert_swap else experts
        if image:
            phases.append(Phase("encode_image", ("vae", *resident), vae + ex * len(resident),
                                _encode_image_bytes(arch, width=width, height=height,
                                                    frames=frames, tiling=p.vae_tiling)))
        for e in experts:
            on = (e,) if p.expert_swap else tuple(experts)
            phases.append(Phase(f"denoise:{e}", ("vae", *on), vae + ex * len(on), dit))
    phases.append(Phase("decode", ("vae",), vae, decode))
    peak = max(ph.total_bytes for ph in phases)
    gpu_peak = int(peak * (1 + FRAGMENTATION)) + CUDA_OVERHEAD_BYTES

    held = 0
    if p.cpu_offload:
        held = w.total_bytes
    elif p.evict == "host":
        held = te + ex * (arch.experts - 1 if p.expert_swap else 0)
    frames_bytes = frames * width * height * 3
    rank = RUNTIME_HOST_BYTES + w.largest_tensor_bytes + held
    rank0 = rank + frames_bytes
    pod = rank0 + (nproc_per_node - 1) * rank + PARENT_HOST_BYTES + 2 * frames_bytes
    return Estimate(placement=p, weights=w, phases=tuple(phases), gpu_peak_bytes=gpu_peak,
                    host_rank_bytes=rank0, host_pod_bytes=pod)


def _encode_image_bytes(arch: Architecture, *, width: int, height: int, frames: int,
                        tiling: bool) -> int:
    # A14B image-to-video encodes the image followed by blank frames (the whole clip) and
    # the encoder mirrors the decoder; TI2V encodes the first frame only.
    n = 1 if arch.expand_timesteps else frames
    return vae_decode_bytes(arch, width=width, height=height, frames=n, tiling=tiling)


@dataclass(frozen=True, slots=True)
class ModelPlan:
    """One registry entry's plan at its default size and frames, against its declaration."""

    model: str
    architecture: str | None
    source: str | None
    width: int
    height: int
    frames: int
    placement: Placement
    estimate: Estimate | None
    gpu_declared_bytes: int
    pod_declared_bytes: int
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def fits_gpu(self) -> bool | None:
        if self.estimate is None:
            return None
        return self.estimate.gpu_peak_bytes <= self.gpu_declared_bytes

    @property
    def fits_pod(self) -> bool | None:
        if self.estimate is None:
            return None
        return self.estimate.host_pod_bytes <= self.pod_declared_bytes

    @property
    def fits(self) -> bool | None:
        if self.estimate is None:
            return None
        return bool(self.fits_gpu and self.fits_pod)

    def as_dict(self) -> dict[str, Any]:
        e = self.estimate
        return {
            "model": self.model, "architecture": self.architecture, "source": self.source,
            "size": f"{self.width}*{self.height}", "frames": self.frames,
            "placement": self.placement.as_dict(), "plan": self.placement.describe(),
            "gpu_peak_bytes": e.gpu_peak_bytes if e else None,
            "gpu_declared_bytes": self.gpu_declared_bytes, "fits_gpu": self.fits_gpu,
            "host_rank_bytes": e.host_rank_bytes if e else None,
            "host_pod_bytes": e.host_pod_bytes if e else None,
            "pod_declared_bytes": self.pod_declared_bytes, "fits_pod": self.fits_pod,
            "weights": {"text_encoder_bytes": e.weights.text_encoder_bytes,
                        "expert_bytes": e.weights.expert_bytes, "experts": e.weights.experts,
                        "vae_bytes": e.weights.vae_bytes} if e else None,
            "phases": [ph.as_dict() for ph in e.phases] if e else [],
            "note": self.note}


def plan_model(spec: ModelSpec, *, memory_saving: bool = False,
               arch: Architecture | None = None) -> ModelPlan:
    """``spec``'s plan for its heaviest request: its largest size and frame count (the
    defaults of the shipped models)."""
    arch = arch or architecture_for(spec)
    sizes = [parse_size(s) for s in spec.sizes]
    width, height = max(sizes, key=lambda wh: wh[0] * wh[1])
    frames = max(spec.frame_counts)
    p = placement(strategy=spec.strategy, world_size=spec.gpus_per_job,
                  memory_saving=memory_saving, cpu_offload=spec.cpu_offload,
                  vae_tiling=spec.vae_tiling, experts=arch.experts if arch else 1)
    est = None if arch is None else estimate(
        arch, p, width=width, height=height, frames=frames, image=spec.image != "none",
        nproc_per_node=spec.nproc_per_node)
    return ModelPlan(
        model=spec.id, architecture=arch.name if arch else None,
        source=arch.source if arch else None, width=width, height=height, frames=frames,
        placement=p, estimate=est, gpu_declared_bytes=int(spec.gpu_memory_gib * GIB),
        pod_declared_bytes=int(spec.pod_memory_gib * GIB),
        note="" if arch else f"no written-down architecture for layout {spec.layout}")


def plan_registry(models: Iterable[ModelSpec]) -> list[tuple[ModelPlan, ModelPlan]]:
    """(default plan, memory-saving plan) of every model."""
    return [(plan_model(m), plan_model(m, memory_saving=True)) for m in models]


def gib(n: int | None) -> str:
    """``n`` bytes for people: GiB, or MiB below a tenth of one."""
    if n is None:
        return "?"
    return f"{n / GIB:.1f} GiB" if n >= GIB // 10 else f"{n / 2**20:.1f} MiB"


def _yes(ok: bool | None) -> str:
    return {True: "yes", False: "NO", None: "?"}[ok]


def format_plans(plans: list[tuple[ModelPlan, ModelPlan]]) -> str:
    """The table ``vidmaas models plan`` prints, then one paragraph per model."""
    head = ("model", "plan", "GPU peak/rank", "declared", "fits", "host/rank", "host/pod",
            "declared", "fits")
    rows = [head]
    for pair in plans:
        for label, mp in zip(("default", "memory-saving"), pair, strict=True):
            e = mp.estimate
            rows.append((mp.model, label, gib(e.gpu_peak_bytes if e else None),
                         gib(mp.gpu_declared_bytes), _yes(mp.fits_gpu),
                         gib(e.host_rank_bytes if e else None),
                         gib(e.host_pod_bytes if e else None), gib(mp.pod_declared_bytes),
                         _yes(mp.fits_pod)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w)
                       for i, (c, w) in enumerate(zip(r, widths, strict=True))).rstrip()
             for r in rows]
    lines.append("")
    for default, saving in plans:
        e = default.estimate
        lines.append(f"{default.model}: {default.width}*{default.height}, {default.frames} "
                     f"frames; {default.source or default.note}")
        lines.append(f"  default: {default.placement.describe()}")
        lines.append(f"  memory-saving: {saving.placement.describe()}")
        lines.append(f"  sharding: {default.placement.sharding}")
        if e is not None:
            w = e.weights
            phases = "; ".join(f"{ph.name} {gib(ph.total_bytes)}" for ph in e.phases)
            lines.append(f"  weights: text encoder {gib(w.text_encoder_bytes)}, "
                         f"{w.experts} × transformer {gib(w.expert_bytes)}, "
                         f"VAE {gib(w.vae_bytes)}; phases (rank 0): {phases}")
    return "\n".join(lines) + "\n"
