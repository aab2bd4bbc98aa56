"""A random-weight diffusers checkpoint of any written-down architecture (the GPU check's).

Guarantees: ``write_random_checkpoint(arch, directory)`` builds every component of
``arch`` (``runtime.architectures``) with random weights directly on ``device`` (no
host-RAM copy of a multi-gigabyte model, no download), saves it with
``save_pretrained`` in the run dtypes (bf16 transformers and text encoder, fp32 VAE)
and frees the device again, so the checkpoint loads through the same
``from_pretrained`` path as a real ``*-Diffusers`` release. The tokenizer is ByT5's
(which needs no vocabulary file), so the text encoder's vocabulary may be that small.
``reduced`` makes a cheaper variant of an architecture (fewer layers, a smaller text
encoder) and says what it changed.
"""

from __future__ import annotations

import dataclasses
import gc
import importlib
from pathlib import Path
from typing import Any

from vidmaas.runtime.architectures import Architecture
from vidmaas.runtime.tiny import BYT5_VOCAB_SIZE


def reduced(arch: Architecture, *, layers: int | None = None,
            text_layers: int | None = None) -> tuple[Architecture, str]:
    """``arch`` with ``layers`` transformer blocks and a ``text_layers``-layer text encoder
    with ByT5's vocabulary; the model width, heads, VAE and everything else unchanged."""
    transformer = dict(arch.transformer)
    text = dict(arch.text_encoder)
    notes = []
    if layers is not None and layers < int(transformer["num_layers"]):
        notes.append(f"{layers} of {transformer['num_layers']} transformer blocks")
        transformer["num_layers"] = layers
    if text_layers is not None and text_layers < int(text["num_layers"]):
        notes.append(f"{text_layers} of {text['num_layers']} text-encoder layers")
        text["num_layers"] = text_layers
    if int(text["vocab_size"]) > BYT5_VOCAB_SIZE:
        text["vocab_size"] = BYT5_VOCAB_SIZE
        notes.append("a byte-level vocabulary")
    note = ", ".join(notes) or "full size"
    return dataclasses.replace(arch, transformer=transformer, text_encoder=text), note


def write_random_checkpoint(arch: Architecture, directory: Path, *, device: Any,
                            flow_shift: float, seed: int = 0) -> None:
    """Save a random-weight checkpoint of ``arch`` into ``directory``."""
    import torch

    diffusers: Any = importlib.import_module("diffusers")
    tf: Any = importlib.import_module("transformers")
    bf16 = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(seed)
    with torch.device(device):
        experts = [diffusers.WanTransformer3DModel.from_config(arch.transformer).to(bf16)
                   for _ in range(arch.experts)]
        vae = diffusers.AutoencoderKLWan.from_config(arch.vae)
        text = dict(arch.text_encoder)
        # Random UMT5 weights at the default scale overflow bf16 through 24 layers.
        text.setdefault("initializer_factor", 0.05)
        text_encoder = tf.UMT5EncoderModel(tf.UMT5Config(**text)).to(bf16).eval()
    scheduler = diffusers.UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000,
        flow_shift=flow_shift)
    pipe = diffusers.WanPipeline(
        tokenizer=tf.ByT5Tokenizer(), text_encoder=text_encoder, vae=vae, scheduler=scheduler,
        transformer=experts[0], transformer_2=experts[1] if len(experts) > 1 else None,
        boundary_ratio=arch.boundary_ratio, expand_timesteps=arch.expand_timesteps)
    directory.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(directory)
    del pipe, experts, vae, text_encoder
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
