"""Reading back what the runtime delivered: decode videos with PyAV, find the watermark."""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import av
import numpy as np

from vidmaas.runtime.postprocess import watermark_box


@dataclass
class Decoded:
    codec: str
    pix_fmt: str
    width: int
    height: int
    fps: float
    frames: Any
    """uint8 (frames, height, width, 3)."""


def decode_mp4(data: bytes) -> Decoded:
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        return Decoded(codec=stream.codec_context.name, pix_fmt=str(stream.codec_context.pix_fmt),
                       width=stream.codec_context.width, height=stream.codec_context.height,
                       fps=float(stream.average_rate or 0), frames=np.stack(frames))


def assert_watermarked(original: Any, delivered: Any, *, text: str) -> None:
    """The mark changed the pixels inside its box and (beyond codec noise) nowhere else."""
    _, height, width, _ = original.shape
    box = watermark_box(text, width=width, height=height)
    assert box is not None
    diff = np.abs(original.astype(np.int16) - delivered.astype(np.int16)).mean(axis=-1)
    inside = np.zeros(diff.shape, dtype=bool)
    inside[:, box.top:box.bottom, box.left:box.right] = True
    assert diff[inside].mean() > 25, f"no watermark in its box ({diff[inside].mean():.1f})"
    assert diff[~inside].mean() < 10, f"pixels changed outside the box ({diff[~inside].mean():.1f})"
    # The badge darkens its box and the text is bright inside it.
    region = delivered[:, box.top:box.bottom, box.left:box.right].mean(axis=-1)
    assert (region > 170).mean() > 0.03, "no bright text pixels in the badge"
