"""Where a pipeline's heavy components live: loaded onto the device, kept in host RAM, or not
loaded at all, and the moves between those places that the memory plan asks for.

Guarantees:
- ``Components.load`` reads one component of a diffusers checkpoint straight onto the
  rank's device (``device_map``, ``low_cpu_mem_usage``): no rank stages a whole copy of a
  model in host RAM first. bf16 on CUDA except the VAE (fp32); fp32 on the CPU.
- ``ensure(name)`` leaves the component on the device (loading it, or moving it back from
  host RAM); ``evict(name)`` takes it off: released (``evict="release"``: the module is
  dropped and its memory returned) or moved to host RAM (``evict="host"``). Every
  pipeline registered with ``attach`` sees the change at once (its attribute is set, or
  set to None), so a pipeline's denoising loop picks up an expert loaded mid-run.
- ``moves`` records every move in order as ``(when, action, component)``, so a test (or a
  log) can tell exactly which component was where at each step.
"""

from __future__ import annotations

import gc
import importlib
import logging
import time
from pathlib import Path
from typing import Any, Literal

from vidmaas.runtime.errors import ModelError

log = logging.getLogger(__name__)

HEAVY = ("text_encoder", "transformer", "transformer_2", "vae")
Move = tuple[str, str, str]
"""(when: a phase name or ``step N``, action: load|to_device|to_host|release, component)."""


def _lib(name: str) -> Any:
    return importlib.import_module(name)


def dtype_keyword(library: str) -> str:
    """The dtype keyword of ``library``'s ``from_pretrained``: ``dtype`` where it has it
    (diffusers ≥ 0.42, transformers ≥ 4.56), else the older ``torch_dtype``."""
    if library == "diffusers":
        try:
            utils = importlib.import_module("diffusers.utils.deprecation_utils")
        except ImportError:
            return "torch_dtype"
        return "dtype" if hasattr(utils, "_resolve_dtype") else "torch_dtype"
    version = str(getattr(_lib(library), "__version__", "0"))
    major_minor = tuple(int(x) for x in version.split(".")[:2] if x.isdigit())
    return "dtype" if major_minor >= (4, 56) else "torch_dtype"


class Components:
    """One checkpoint's components on one rank."""

    def __init__(self, model_dir: Path, index: dict[str, Any], *, device: Any, dtype: Any,
                 evict: Literal["release", "host"]) -> None:
        self.model_dir = model_dir
        self.index = index
        self.device = device
        self.dtype = dtype
        self.evict_to = evict
        self.modules: dict[str, Any] = {}
        self.moves: list[Move] = []
        self.when = "load"
        self.load_s = 0.0
        self._pipelines: list[Any] = []

    # ------------------------------------------------------------ what the checkpoint has

    def spec(self, name: str) -> tuple[str, str] | None:
        entry = self.index.get(name)
        if isinstance(entry, list) and len(entry) == 2 and entry[0] and entry[1]:
            return str(entry[0]), str(entry[1])
        return None

    def has(self, name: str) -> bool:
        return self.spec(name) is not None

    def names(self) -> list[str]:
        return [k for k in self.index if not k.startswith("_") and self.has(k)]

    # ------------------------------------------------------------ loading

    def load(self, name: str, *, to_device: bool = True) -> Any:
        """Read ``name`` from the checkpoint (onto the device unless ``to_device`` is False)."""
        spec = self.spec(name)
        if spec is None:
            raise ModelError(f"{self.model_dir} has no {name}")
        library, class_name = spec
        t = time.perf_counter()
        try:
            cls = getattr(_lib(library), class_name)
            if name not in HEAVY:  # tokenizer, scheduler
                module = cls.from_pretrained(self.model_dir, subfolder=name)
            else:
                module = self._load_heavy(cls, library, name, to_device=to_device)
        except (OSError, ValueError, KeyError, TypeError, AttributeError, ImportError) as e:
            raise ModelError(f"cannot load {name} of {self.model_dir}: {e}") from e
        self.load_s += time.perf_counter() - t
        if name in HEAVY:
            self._set(name, module)
            self.moves.append((self.when, "load", name))
        return module

    def _load_heavy(self, cls: Any, library: str, name: str, *, to_device: bool) -> Any:
        import torch

        dtype = torch.float32 if name == "vae" else self.dtype
        kwargs: dict[str, Any] = {dtype_keyword(library): dtype}
        on_accelerator = to_device and self.device.type != "cpu"
        if on_accelerator:
            kwargs["device_map"] = {"": self.device}
        if library == "diffusers":
            kwargs["low_cpu_mem_usage"] = True
            return cls.from_pretrained(self.model_dir, subfolder=name, **kwargs)
        return cls.from_pretrained(self.model_dir / name, **kwargs).eval()

    # ------------------------------------------------------------ placement

    def attach(self, pipe: Any) -> None:
        """Keep ``pipe``'s component attributes in step with this placement."""
        if all(p is not pipe for p in self._pipelines):
            self._pipelines.append(pipe)

    def detach(self, pipe: Any) -> None:
        self._pipelines = [p for p in self._pipelines if p is not pipe]

    def _set(self, name: str, module: Any) -> None:
        if module is None:
            self.modules.pop(name, None)
        else:
            self.modules[name] = module
        for pipe in self._pipelines:
            setattr(pipe, name, module)

    def get(self, name: str) -> Any:
        return self.modules.get(name)

    def on_device(self, name: str) -> bool:
        module = self.modules.get(name)
        return module is not None and _device_of(module) == self.device

    def ensure(self, name: str) -> Any:
        """``name`` on the device: loaded, or moved back from host RAM."""
        module = self.modules.get(name)
        if module is None:
            return self.load(name)
        if _device_of(module) != self.device:
            module.to(self.device)
            self.moves.append((self.when, "to_device", name))
        return module

    def evict(self, name: str) -> None:
        """Take ``name`` off the device (released, or into host RAM); nothing if absent."""
        module = self.modules.get(name)
        if module is None:
            return
        if self.evict_to == "host":
            if self.device.type != "cpu":
                module.to("cpu")
            self.moves.append((self.when, "to_host", name))
        else:
            self._set(name, None)
            del module
            self.moves.append((self.when, "release", name))
            gc.collect()
        _empty_cache(self.device)


def _device_of(module: Any) -> Any:
    for tensor in module.parameters():
        return tensor.device
    return None


def _empty_cache(device: Any) -> None:
    if device.type == "cuda":
        import torch

        torch.cuda.empty_cache()
