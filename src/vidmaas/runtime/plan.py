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
- What a placement costs is ``runtime.memory``'s: weight bytes from the real-size
  configurations on the meta device, activation estimates per phase.
- ``plan_model`` answers for a registry entry whether the peak fits its declared
  ``gpu_memory_gib`` per rank and the host RAM its ``pod_memory_gib`` per pod.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from vidmaas.domain.models import ModelSpec, Strategy, parse_size
from vidmaas.runtime.architectures import Architecture, architecture_for
from vidmaas.runtime.memory import GIB, Estimate, estimate

Evict = Literal["release", "host"]


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
