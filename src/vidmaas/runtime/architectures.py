"""The component configurations of the Wan2.2 checkpoints, written down (no download).

Guarantees:
- ``ARCHITECTURES`` holds, for each shipped model family, the keyword arguments that
  build its diffusers ``WanTransformer3DModel`` (one per expert), ``AutoencoderKLWan``
  and transformers ``UMT5Config`` at full size, plus the pipeline facts that shape memory
  (experts, ``boundary_ratio``, ``expand_timesteps``). They are the size-relevant fields
  of the ``transformer/config.json``, ``vae/config.json`` and ``text_encoder/config.json``
  of the releases named in each entry; values left out are the classes' defaults, which
  the releases use too.
- The tiny layouts (``runtime.tiny``) are here under ``tiny-<layout>``, from the very
  dictionaries ``make_tiny`` builds its checkpoints with.
- ``from_model_dir`` reads the same facts from a checkpoint directory (its
  ``model_index.json`` and component ``config.json`` files), so a plan can be made for
  any diffusers Wan checkpoint on disk.
- ``architecture_for`` maps a registry entry to its written-down architecture (or None).

Importing this module imports neither torch nor diffusers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vidmaas.domain.models import ModelSpec
from vidmaas.runtime import tiny


@dataclass(frozen=True, slots=True)
class Architecture:
    name: str
    source: str
    """Which release (or file) the configuration describes."""
    transformer: dict[str, Any]
    """``WanTransformer3DModel`` keyword arguments (each expert has the same)."""
    experts: int
    """1, or 2 for the A14B mixture of experts (``transformer`` + ``transformer_2``)."""
    vae: dict[str, Any]
    """``AutoencoderKLWan`` keyword arguments."""
    text_encoder: dict[str, Any]
    """``UMT5Config`` keyword arguments."""
    boundary_ratio: float | None = None
    expand_timesteps: bool = False
    text_len: int = 512
    """Tokens the prompt is padded to (Wan's ``text_len``)."""

    @property
    def vae_scale_spatial(self) -> int:
        return int(self.vae.get("scale_factor_spatial") or 8)

    @property
    def vae_scale_temporal(self) -> int:
        return int(self.vae.get("scale_factor_temporal") or 4)

    @property
    def size_multiple(self) -> int:
        """Height and width must be multiples of this: VAE stride × patch (16 or 32)."""
        return self.vae_scale_spatial * int(self.transformer.get("patch_size", [1, 2, 2])[1])


# The Wan2.1 VAE (A14B) is AutoencoderKLWan's default configuration; the Wan2.2 VAE
# (TI2V-5B) is diffusers' `vae22_diffusers_config` (scripts/convert_wan_to_diffusers.py).
_WAN21_VAE: dict[str, Any] = {"base_dim": 96, "z_dim": 16, "dim_mult": [1, 2, 4, 4],
                              "num_res_blocks": 2, "temperal_downsample": [False, True, True]}
_WAN22_VAE: dict[str, Any] = {
    "base_dim": 160, "decoder_base_dim": 256, "z_dim": 48, "dim_mult": [1, 2, 4, 4],
    "num_res_blocks": 2, "temperal_downsample": [False, True, True], "is_residual": True,
    "in_channels": 12, "out_channels": 12, "patch_size": 2, "scale_factor_spatial": 16,
    "scale_factor_temporal": 4}
# google/umt5-xxl, which every Wan2.2 *-Diffusers release ships as its text_encoder.
_UMT5_XXL: dict[str, Any] = {
    "vocab_size": 256384, "d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 24,
    "num_heads": 64, "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128, "feed_forward_proj": "gated-gelu",
    "layer_norm_epsilon": 1e-6, "tie_word_embeddings": False}


def _wan_transformer(*, dim_heads: int, ffn_dim: int, layers: int, in_channels: int,
                     out_channels: int) -> dict[str, Any]:
    # Wan2.2 wan/configs: dim = heads × 128, ffn_dim, num_layers, patch (1, 2, 2),
    # freq_dim 256, qk_norm, cross_attn_norm, eps 1e-6; text_dim is UMT5-XXL's d_model.
    return {"patch_size": [1, 2, 2], "num_attention_heads": dim_heads,
            "attention_head_dim": 128, "in_channels": in_channels,
            "out_channels": out_channels, "text_dim": 4096, "freq_dim": 256,
            "ffn_dim": ffn_dim, "num_layers": layers, "cross_attn_norm": True,
            "qk_norm": "rms_norm_across_heads", "eps": 1e-6, "rope_max_seq_len": 1024}


def _tiny(layout: str) -> Architecture:
    return Architecture(
        name=f"tiny-{layout}", source=f"vidmaas.runtime.tiny layout {layout}",
        transformer=tiny.transformer_config(layout),
        experts=2 if layout.startswith("a14b") else 1, vae=tiny.vae_config(layout),
        text_encoder=tiny.text_encoder_config(),
        boundary_ratio=tiny.A14B_BOUNDARY_RATIO if layout.startswith("a14b") else None,
        expand_timesteps=layout == "ti2v")


ARCHITECTURES: dict[str, Architecture] = {
    "wan2.2-ti2v-5b": Architecture(
        name="wan2.2-ti2v-5b", source="Wan-AI/Wan2.2-TI2V-5B-Diffusers",
        transformer=_wan_transformer(dim_heads=24, ffn_dim=14336, layers=30, in_channels=48,
                                     out_channels=48),
        experts=1, vae=_WAN22_VAE, text_encoder=_UMT5_XXL, expand_timesteps=True),
    "wan2.2-t2v-a14b": Architecture(
        name="wan2.2-t2v-a14b", source="Wan-AI/Wan2.2-T2V-A14B-Diffusers",
        transformer=_wan_transformer(dim_heads=40, ffn_dim=13824, layers=40, in_channels=16,
                                     out_channels=16),
        experts=2, vae=_WAN21_VAE, text_encoder=_UMT5_XXL, boundary_ratio=0.875),
    "wan2.2-i2v-a14b": Architecture(
        name="wan2.2-i2v-a14b", source="Wan-AI/Wan2.2-I2V-A14B-Diffusers",
        transformer=_wan_transformer(dim_heads=40, ffn_dim=13824, layers=40, in_channels=36,
                                     out_channels=16),
        experts=2, vae=_WAN21_VAE, text_encoder=_UMT5_XXL, boundary_ratio=0.9),
    **{f"tiny-{layout}": _tiny(layout) for layout in tiny.LAYOUTS},
}

_REAL_BY_LAYOUT = {"ti2v": "wan2.2-ti2v-5b", "a14b": "wan2.2-t2v-a14b",
                   "a14b-i2v": "wan2.2-i2v-a14b"}


def architecture_for(spec: ModelSpec) -> Architecture | None:
    """The written-down architecture of a registry entry: its tiny layout, or the Wan2.2
    release of its layout (a plain ``t2v`` layout that is not tiny has none)."""
    if spec.tiny:
        return ARCHITECTURES[f"tiny-{spec.layout}"]
    name = _REAL_BY_LAYOUT.get(spec.layout)
    return ARCHITECTURES[name] if name else None


_META_KEYS = ("_class_name", "_diffusers_version", "_name_or_path", "architectures",
              "transformers_version", "torch_dtype", "dtype", "model_type")


def _read(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"{path} is not a JSON object")
    return {k: v for k, v in data.items() if k not in _META_KEYS}


def from_model_dir(model_dir: Path) -> Architecture:
    """The architecture of the diffusers checkpoint in ``model_dir``."""
    index = json.loads((model_dir / "model_index.json").read_text(encoding="utf-8"))
    second = index.get("transformer_2") or [None, None]
    return Architecture(
        name=model_dir.name, source=str(model_dir),
        transformer=_read(model_dir / "transformer" / "config.json"),
        experts=2 if second[0] is not None else 1,
        vae=_read(model_dir / "vae" / "config.json"),
        text_encoder=_read(model_dir / "text_encoder" / "config.json"),
        boundary_ratio=index.get("boundary_ratio"),
        expand_timesteps=bool(index.get("expand_timesteps")))
