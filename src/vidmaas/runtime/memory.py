"""What a placement costs: weight bytes from the real configurations on the meta device,
and activation estimates per phase of one generation.

Guarantees:
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
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from vidmaas.runtime.architectures import Architecture

if TYPE_CHECKING:
    from vidmaas.runtime.plan import Placement

GIB = 2**30
CUDA_OVERHEAD_BYTES = 2 * GIB
"""CUDA context, cuBLAS/cuDNN workspaces and NCCL buffers: GPU memory torch does not count."""
FRAGMENTATION = 0.10
"""Margin for the caching allocator's fragmentation, on top of the counted bytes."""
RUNTIME_HOST_BYTES = 3 * GIB
"""Host RAM of one rank's process before any weight: Python, torch, the CUDA libraries."""
PARENT_HOST_BYTES = GIB // 2
"""The pod's ``vidmaas-job run`` process around ``torchrun``."""
BF16, FP32 = 2, 4


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


# ---------------------------------------------------------------- per phase

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


