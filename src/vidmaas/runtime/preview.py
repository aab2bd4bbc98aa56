"""Live previews while a task denoises: a cheap picture of the latents, now and then.

Guarantees:
- ``project`` turns one latent frame ``(channels, h, w)`` into a uint8 RGB image
  ``(H, W, 3)`` whose longer side is at most ``max_side_px`` (latents are small: they are
  scaled up to it, a latent larger than it is scaled down). With a model's declared
  ``Projection`` (one ``(r, g, b)`` row per latent channel and a bias, as ComfyUI's
  ``latent_rgb_factors``) it is that linear map, ``[-1, 1]`` mapped to ``[0, 255]``.
  Without one it is the documented default: the channels averaged in three interleaved
  groups (``c % 3`` → R, G, B), centred per colour and scaled by 2.5 standard deviations
  of the whole image, so any latent layout shows its structure (not true colour).
- ``Throttle`` allows at most ``max_count`` previews per task, at least ``interval_s``
  apart; ``max_count`` 0 turns previews off.
- ``Previewer.offer`` is what the denoising thread calls after a step: when the throttle
  allows one, it copies the middle latent frame to the host (on CUDA asynchronously,
  into pinned memory, the copy ordered by a CUDA event) and hands it to one background
  thread; it never projects, encodes, uploads or publishes itself. The thread keeps only
  the newest frame not yet handled (an older one waiting is dropped), projects it,
  encodes a JPEG and hands the bytes to the sink (upload, then the ``preview`` event). A
  failing sink is logged and never stops the generation. ``close`` waits for the frame
  in hand, then stops the thread.
- Previews are made on rank 0 only: the engine calls the hook there alone.
"""

from __future__ import annotations

import io
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

log = logging.getLogger(__name__)

PREVIEW_CONTENT_TYPE = "image/jpeg"
MAX_SIDE_PX = 256
DEFAULT_INTERVAL_S = 2.0
DEFAULT_MAX_COUNT = 8
JPEG_QUALITY = 80
_SPREAD_STDS = 2.5


@dataclass(frozen=True, slots=True)
class Projection:
    """A linear map of the latent channels to RGB (one row per channel, then a bias)."""

    factors: tuple[tuple[float, float, float], ...]
    bias: tuple[float, float, float] = (0.0, 0.0, 0.0)

    @classmethod
    def of(cls, factors: Sequence[Sequence[float]],
           bias: Sequence[float] | None = None) -> Projection:
        if not factors or any(len(r) != 3 for r in factors):
            raise ValueError("preview factors must be one (r, g, b) row per latent channel")
        rows = tuple((float(r[0]), float(r[1]), float(r[2])) for r in factors)
        b = tuple(float(x) for x in (bias or (0.0, 0.0, 0.0)))
        if len(b) != 3:
            raise ValueError("the preview bias must be (r, g, b)")
        return cls(factors=rows, bias=(b[0], b[1], b[2]))


@dataclass(frozen=True, slots=True)
class Preview:
    """One encoded preview and what the ``preview`` event says of it."""

    data: bytes
    step: int
    total: int
    width: int
    height: int


def project(frame: Any, projection: Projection | None = None, *,
            max_side_px: int = MAX_SIDE_PX) -> Any:
    """uint8 ``(H, W, 3)`` RGB of one latent frame ``(channels, h, w)`` (numpy or torch)."""
    import numpy as np
    from PIL import Image

    if hasattr(frame, "detach"):  # a torch tensor, of any dtype and device
        frame = frame.detach().float().cpu().numpy()
    x = np.asarray(frame, dtype=np.float32)
    if x.ndim != 3 or min(x.shape) < 1:
        raise ValueError(f"a latent frame is (channels, h, w), not {x.shape}")
    channels = x.shape[0]
    if projection is not None and len(projection.factors) == channels:
        factors = np.asarray(projection.factors, dtype=np.float32)  # (C, 3)
        rgb = np.einsum("chw,ck->hwk", x, factors) + np.asarray(projection.bias, np.float32)
        unit = (rgb + 1.0) * 0.5
    else:
        if projection is not None:
            log.debug("preview factors have %d rows for %d channels: the default instead",
                      len(projection.factors), channels)
        groups = [x[i::3].mean(axis=0) if i < channels else x.mean(axis=0) for i in range(3)]
        rgb = np.stack(groups, axis=-1)
        rgb = rgb - rgb.mean(axis=(0, 1), keepdims=True)
        spread = float(rgb.std()) * _SPREAD_STDS
        unit = 0.5 + rgb / (2.0 * spread) if spread > 1e-6 else np.full_like(rgb, 0.5)
    pixels = (np.nan_to_num(unit, nan=0.5).clip(0.0, 1.0) * 255.0).round().astype(np.uint8)
    h, w = pixels.shape[:2]
    scale = max_side_px / max(h, w)
    size = (max(1, min(max_side_px, round(w * scale))),
            max(1, min(max_side_px, round(h * scale))))
    if size == (w, h):
        return pixels
    image = Image.fromarray(pixels, "RGB").resize(size, Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.uint8)


def encode_jpeg(pixels: Any, *, quality: int = JPEG_QUALITY) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(out, "JPEG", quality=quality)
    return out.getvalue()


class Throttle:
    """At most ``max_count`` previews, at least ``interval_s`` apart (thread-unsafe: one
    caller, the denoising thread)."""

    def __init__(self, *, interval_s: float = DEFAULT_INTERVAL_S,
                 max_count: int = DEFAULT_MAX_COUNT,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.interval_s = max(0.0, interval_s)
        self.max_count = max(0, max_count)
        self.clock = clock
        self.count = 0
        self._last: float | None = None

    @property
    def enabled(self) -> bool:
        return self.max_count > 0

    def due(self) -> bool:
        """Whether a preview may be taken now; if so it is counted."""
        if self.count >= self.max_count:
            return False
        now = self.clock()
        if self._last is not None and now - self._last < self.interval_s:
            return False
        self._last = now
        self.count += 1
        return True


Sink = Callable[[Preview], None]
"""Stores one preview and announces it (upload, then the ``preview`` event)."""


@dataclass(slots=True)
class _Pending:
    frame: Any
    ready: Any
    """A CUDA event the host copy waits on, or None."""
    step: int
    total: int


class Previewer:
    """Takes previews off the denoising thread; see the module docstring."""

    def __init__(self, *, throttle: Throttle, sink: Sink,
                 projection: Projection | None = None, max_side_px: int = MAX_SIDE_PX,
                 name: str = "preview") -> None:
        self.throttle = throttle
        self.sink = sink
        self.projection = projection
        self.max_side_px = max_side_px
        self.sent = 0
        self.failed = 0
        self._cond = threading.Condition()
        self._pending: _Pending | None = None
        self._busy = False
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def offer(self, latents: Any, step: int, total: int) -> None:
        """After a denoising step: maybe hand the middle frame of ``latents``
        (``(1, channels, frames, h, w)``) to the background thread."""
        if self._closed or latents is None or getattr(latents, "ndim", 0) != 5 \
                or not self.throttle.due():
            return
        frame, ready = _host_copy(latents[0, :, latents.shape[2] // 2])
        with self._cond:
            self._pending = _Pending(frame=frame, ready=ready, step=step, total=total)
            self._cond.notify()

    def close(self, *, timeout_s: float = 10.0) -> None:
        """Finish the frame in hand (and one waiting), then stop the thread."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout=timeout_s)

    def __enter__(self) -> Previewer:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._pending is None and not self._closed:
                    self._cond.wait()
                job, self._pending = self._pending, None
                if job is None:
                    return
            try:
                if job.ready is not None:
                    job.ready.synchronize()
                pixels = project(job.frame, self.projection, max_side_px=self.max_side_px)
                preview = Preview(data=encode_jpeg(pixels), step=job.step, total=job.total,
                                  width=int(pixels.shape[1]), height=int(pixels.shape[0]))
                self.sink(preview)
                self.sent += 1
            except Exception as e:  # a preview is a courtesy: never the task's failure
                self.failed += 1
                log.warning("preview of step %d/%d dropped: %s", job.step, job.total, e)


def _host_copy(frame: Any) -> tuple[Any, Any]:
    """(a float32 host copy of ``frame``, the CUDA event it is ready at, or None)."""
    import torch

    if frame.device.type == "cuda":
        src = frame.detach().to(torch.float32)
        host = torch.empty(src.shape, dtype=torch.float32, pin_memory=True)
        host.copy_(src, non_blocking=True)
        ready = torch.cuda.Event()  # type: ignore[no-untyped-call]
        ready.record()
        return host, ready
    return frame.detach().to(torch.float32, copy=True), None


class Announcer(Protocol):
    """What publishes the ``preview`` event (``runtime.reporter.Reporter``)."""

    def preview(self, *, key: str, step: int, total: int, width: int,
                height: int) -> bool: ...


class Store(Protocol):
    """What opens the object store (``runtime.postprocess.StoreConfig``)."""

    def open(self) -> Any: ...


def store_sink(*, task_id: str, store: Store, announcer: Announcer) -> Sink:
    """Upload each preview to the task's ``preview.jpg`` (overwriting the last), then
    announce it. The store is opened once, in the preview thread."""
    import asyncio

    from vidmaas.storage.base import preview_key

    key = preview_key(task_id)
    opened: list[Any] = []

    def sink(p: Preview) -> None:
        if not opened:
            opened.append(store.open())
        asyncio.run(opened[0].put_bytes(key, p.data, content_type=PREVIEW_CONTENT_TYPE))
        announcer.preview(key=key, step=p.step, total=p.total, width=p.width,
                          height=p.height)

    return sink


def parse_projection(text: str | None) -> Projection | None:
    """The ``--preview-rgb`` argument (``{"factors": [[r, g, b], …], "bias": [r, g, b]}``,
    from the model registry) as a ``Projection``; None for none. ``ValueError`` if bad."""
    import json

    if not text:
        return None
    data = json.loads(text)  # a JSONDecodeError is a ValueError
    if not isinstance(data, dict) or not isinstance(data.get("factors"), list):
        raise ValueError("--preview-rgb must be a JSON object with factors")
    try:
        return Projection.of(data["factors"], data.get("bias"))
    except TypeError as e:  # a row or the bias that is not a list
        raise ValueError(f"--preview-rgb is not a list of (r, g, b) rows: {e}") from e
