"""Speed options the field uses, all off by default: the attention backend, ``torch.compile``
of the transformer, TF32 for the fp32 VAE.

Guarantees:
- ``check_attention_backend`` refuses, before any weight is loaded, a backend name that
  diffusers does not know (``ModelError`` listing the known ones).
- ``prepare_transformer`` sets the backend on every attention processor of one
  transformer (diffusers' ``set_attention_backend``) and, with ``compile``, compiles its
  repeated blocks (diffusers' regional ``compile_repeated_blocks``: each
  ``WanTransformerBlock`` is compiled once and reused, so compiling costs seconds, not
  minutes). It runs before the transformer's distribution hooks are installed, because
  diffusers checks the backend when context parallelism is enabled.
- ``enable_tf32`` lets fp32 matmuls and cuDNN convolutions use TF32 (the VAE runs in
  fp32); it changes process-wide flags, so the engine calls it on CUDA only.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

from vidmaas.runtime.errors import ModelError

log = logging.getLogger(__name__)

def attention_backends() -> list[str]:
    """The backend names this diffusers knows."""
    dispatch: Any = importlib.import_module("diffusers.models.attention_dispatch")
    return sorted(b.value for b in dispatch.AttentionBackendName)


def check_attention_backend(name: str | None) -> None:
    if name is None:
        return
    known = attention_backends()
    if name not in known:
        raise ModelError(f"unknown attention backend {name[:40]!r}; diffusers knows "
                         f"{', '.join(known)}", code="bad_option")


def prepare_transformer(module: Any, *, attention_backend: str | None, compile: bool,
                        backend: str = "inductor") -> None:
    """Apply the speed options to one transformer (once per module)."""
    if attention_backend:
        try:
            module.set_attention_backend(attention_backend)
        except (ValueError, RuntimeError, ImportError) as e:
            raise ModelError(f"attention backend {attention_backend} is not usable here: {e}",
                             code="bad_option") from e
    if compile:
        kwargs: dict[str, Any] = {"backend": backend}
        if getattr(module, "_repeated_blocks", None):
            module.compile_repeated_blocks(**kwargs)
        else:
            module.compile(**kwargs)


def compiled_blocks(module: Any) -> int:
    """How many submodules of ``module`` are compiled (``nn.Module.compile``)."""
    return sum(getattr(m, "_compiled_call_impl", None) is not None for m in module.modules())


def enable_tf32() -> None:
    import torch

    backends: Any = torch.backends
    if hasattr(backends.cuda.matmul, "fp32_precision"):
        backends.cuda.matmul.fp32_precision = "tf32"
        backends.cudnn.conv.fp32_precision = "tf32"
    else:  # before torch 2.9
        backends.cuda.matmul.allow_tf32 = True
        backends.cudnn.allow_tf32 = True
    log.info("TF32 on for fp32 matmuls and convolutions")


def tf32_enabled() -> bool:
    import torch

    backends: Any = torch.backends
    if hasattr(backends.cuda.matmul, "fp32_precision"):
        return bool(backends.cuda.matmul.fp32_precision == "tf32"
                    and backends.cudnn.conv.fp32_precision == "tf32")
    return bool(backends.cuda.matmul.allow_tf32 and backends.cudnn.allow_tf32)
