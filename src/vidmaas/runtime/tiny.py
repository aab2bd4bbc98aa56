"""Tiny random-weight Wan checkpoints, generated locally (no download of any kind).

Guarantees:
- ``make_tiny(directory, layout)`` writes a complete diffusers checkpoint
  (``model_index.json`` and one folder per component, via ``save_pretrained``) that
  loads through the very same ``from_pretrained`` path as the real Wan2.2
  ``*-Diffusers`` releases.
- The weights are deterministic: the same layout always gives the same bytes of
  weights, so two runs with one seed give the same video on one machine.
- Layouts: ``t2v`` (Wan2.1/2.2 text-to-video, 16-channel VAE), ``ti2v`` (Wan2.2
  TI2V-5B: 48-channel residual VAE with patch size 2, ``expand_timesteps``),
  ``a14b`` (two experts: ``transformer_2`` and ``boundary_ratio``) and ``a14b-i2v``
  (the two-expert image-to-video layout, 36 input channels).
- Sizes: height and width multiples of 16 (32 for ``ti2v``), frames 4k+1; the
  rotary table covers at least 64 post-patch positions per axis.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

LAYOUTS = ("t2v", "ti2v", "a14b", "a14b-i2v")
A14B_BOUNDARY_RATIO = 0.875
_TEXT_DIM = 32
BYT5_VOCAB_SIZE = 384
"""``len(ByT5Tokenizer())``: 256 bytes, 3 special tokens and 125 extra ids."""


def transformer_config(layout: str) -> dict[str, Any]:
    """The tiny ``WanTransformer3DModel`` keyword arguments of ``layout``."""
    in_channels, out_channels = {"ti2v": (48, 48), "a14b-i2v": (36, 16)}.get(layout, (16, 16))
    return {"patch_size": [1, 2, 2], "num_attention_heads": 2, "attention_head_dim": 12,
            "in_channels": in_channels, "out_channels": out_channels, "text_dim": _TEXT_DIM,
            "freq_dim": 256, "ffn_dim": 32, "num_layers": 2, "cross_attn_norm": True,
            "qk_norm": "rms_norm_across_heads", "rope_max_seq_len": 64}


def vae_config(layout: str) -> dict[str, Any]:
    """The tiny ``AutoencoderKLWan`` keyword arguments of ``layout``."""
    if layout == "ti2v":
        return {"base_dim": 3, "z_dim": 48, "dim_mult": [1, 1, 1, 1], "num_res_blocks": 1,
                "temperal_downsample": [False, True, True], "in_channels": 12,
                "out_channels": 12, "is_residual": True, "patch_size": 2,
                "scale_factor_spatial": 16, "scale_factor_temporal": 4,
                "latents_mean": [0.0] * 48, "latents_std": [1.0] * 48}
    return {"base_dim": 3, "z_dim": 16, "dim_mult": [1, 1, 1, 1], "num_res_blocks": 1,
            "temperal_downsample": [False, True, True]}


def text_encoder_config() -> dict[str, Any]:
    """The tiny ``UMT5Config`` keyword arguments."""
    return {"vocab_size": BYT5_VOCAB_SIZE, "d_model": _TEXT_DIM, "d_kv": 8, "d_ff": 64,
            "num_layers": 1, "num_heads": 4, "relative_attention_num_buckets": 8}


def _lib(name: str) -> Any:
    """A library module, untyped (diffusers' and transformers' hints are partial)."""
    import importlib

    return importlib.import_module(name)


def _transformer(layout: str, *, seed: int) -> Any:
    import torch

    torch.manual_seed(seed)
    return _lib("diffusers").WanTransformer3DModel(**transformer_config(layout))


def _vae(layout: str) -> Any:
    import torch

    torch.manual_seed(1)
    return _lib("diffusers").AutoencoderKLWan(**vae_config(layout))


def _text_encoder() -> tuple[Any, Any]:
    import torch

    tf = _lib("transformers")
    tokenizer = tf.ByT5Tokenizer()
    if len(tokenizer) != BYT5_VOCAB_SIZE:
        raise RuntimeError(f"ByT5Tokenizer has {len(tokenizer)} tokens, not {BYT5_VOCAB_SIZE}")
    torch.manual_seed(2)
    config = tf.UMT5Config(**text_encoder_config())
    return tokenizer, tf.UMT5EncoderModel(config).eval()


def make_tiny(directory: Path, layout: str) -> None:
    """Write a tiny random-weight checkpoint of ``layout`` into ``directory``."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
    d = _lib("diffusers")
    WanPipeline, WanImageToVideoPipeline = d.WanPipeline, d.WanImageToVideoPipeline
    tokenizer, text_encoder = _text_encoder()
    scheduler = d.UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                          flow_shift=3.0)
    common: dict[str, Any] = {"tokenizer": tokenizer, "text_encoder": text_encoder,
                              "vae": _vae(layout), "scheduler": scheduler}
    pipe: Any
    if layout == "t2v":
        pipe = WanPipeline(**common, transformer=_transformer(layout, seed=3))
    elif layout == "ti2v":
        pipe = WanPipeline(**common, transformer=_transformer(layout, seed=3),
                           expand_timesteps=True)
    elif layout == "a14b":
        pipe = WanPipeline(**common, transformer=_transformer(layout, seed=3),
                           transformer_2=_transformer(layout, seed=4),
                           boundary_ratio=A14B_BOUNDARY_RATIO)
    else:
        pipe = WanImageToVideoPipeline(
            **common, transformer=_transformer(layout, seed=3),
            transformer_2=_transformer(layout, seed=4), boundary_ratio=A14B_BOUNDARY_RATIO)
    directory.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(directory)
