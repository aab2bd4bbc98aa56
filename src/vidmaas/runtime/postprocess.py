"""From frames to a delivered video: watermark, H.264 MP4, JPEG poster and sprite, upload.

Guarantees:
- ``watermark`` draws the same mark on every frame and only inside
  ``watermark_box``: the text (white on a half-dark badge, bottom-right) and an
  optional PNG logo (bottom-left, its own alpha); an empty text and no logo leave
  the frames untouched.
- ``encode_mp4`` writes H.264 ``yuv420p`` with ``+faststart`` (the index first, so a
  browser plays while it downloads) at the given fps; odd sides are cropped by one
  pixel, since H.264 4:2:0 needs even ones.
- ``write_spritesheet`` writes one JPEG grid of up to ``SPRITE_TILES`` evenly spaced frames
  (the first and the last among them), ``SPRITE_COLUMNS`` to a row (fewer when there are
  fewer frames), rows as needed, each tile the frame scaled so its longer side is at most
  ``SPRITE_TILE_SIDE`` (aspect kept, never enlarged); the image is exactly
  ``columns·tile_width`` × ``rows·tile_height``, unused tiles of the last row black. It
  returns that layout (``columns``, ``rows``, ``count``, ``tile_width``, ``tile_height``).
- ``upload`` puts the video, the poster and the spritesheet under ``outputs/{task_id}/``
  and returns only once the store holds all of them whole (``storage.retry.upload_verified``:
  size and MD5), riding out an outage within the store's retry policy; any store failure
  left is an ``UploadFailed`` (retryable), so a half-uploaded video is never reported.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vidmaas.runtime.errors import InfraError, UploadFailed

VIDEO_NAME = "video.mp4"
POSTER_NAME = "poster.jpg"
SPRITESHEET_NAME = "spritesheet.jpg"
SPRITE_TILES = 25
SPRITE_COLUMNS = 5
SPRITE_TILE_SIDE = 160
_BADGE_ALPHA = 150


@dataclass(frozen=True, slots=True)
class Box:
    left: int
    top: int
    right: int
    bottom: int


def _font(height: int) -> Any:
    from PIL import ImageFont

    return ImageFont.load_default(size=max(8, height // 12))


def watermark_box(text: str, *, width: int, height: int) -> Box | None:
    """Where the text badge goes in a ``width``×``height`` frame (None: no text)."""
    if not text:
        return None
    from PIL import Image, ImageDraw

    font = _font(height)
    left, top, right, bottom = ImageDraw.Draw(Image.new("RGB", (1, 1))).textbbox(
        (0, 0), text, font=font)
    pad = max(1, height // 64)
    margin = max(1, height // 32)
    w = min(width - 2 * margin, int(right - left) + 2 * pad)
    h = min(height - 2 * margin, int(bottom - top) + 2 * pad)
    return Box(int(width - margin - w), int(height - margin - h), width - margin,
               height - margin)


def _overlay(text: str, logo: Path | None, *, width: int, height: int) -> Any:
    """An RGBA layer holding the whole mark, or None."""
    from PIL import Image, ImageDraw

    box = watermark_box(text, width=width, height=height)
    if box is None and logo is None:
        return None
    layer = Image.new("RGBA", (width, height), (0, 0, 0, 0))
    if box is not None:
        draw = ImageDraw.Draw(layer)
        draw.rectangle((box.left, box.top, box.right - 1, box.bottom - 1),
                       fill=(0, 0, 0, _BADGE_ALPHA))
        font = _font(height)
        left, top, _, _ = draw.textbbox((0, 0), text, font=font)
        pad = max(1, height // 64)
        draw.text((box.left + pad - left, box.top + pad - top), text, font=font,
                  fill=(255, 255, 255, 255))
    if logo is not None:
        try:
            with Image.open(logo) as img:
                mark = img.convert("RGBA")
        except (OSError, ValueError) as e:
            raise InfraError(f"cannot read the watermark logo {logo.name}: {e}",
                             code="watermark_logo") from e
        side = max(8, width // 6)
        mark.thumbnail((side, side))
        margin = max(1, height // 32)
        layer.alpha_composite(mark, (margin, height - margin - mark.height))
    return layer


def watermark(frames: Any, *, text: str, logo: Path | None = None) -> Any:
    """``frames`` (uint8 F×H×W×3) with the mark drawn on each."""
    import numpy as np
    from PIL import Image

    _, height, width, _ = frames.shape
    layer = _overlay(text, logo, width=width, height=height)
    if layer is None:
        return frames
    out = np.empty_like(frames)
    for i, frame in enumerate(frames):
        base = Image.fromarray(frame, "RGB").convert("RGBA")
        out[i] = np.asarray(Image.alpha_composite(base, layer).convert("RGB"))
    return out


def even_crop(frames: Any) -> Any:
    """``frames`` (N, H, W, 3) cut to an even height and width, as H.264 4:2:0 needs (a
    view: no copy)."""
    _, height, width, _ = frames.shape
    return frames[:, : height - height % 2, : width - width % 2]


def encode_mp4(frames: Any, path: Path, *, fps: int, crf: int = 18) -> None:
    """Write ``frames`` as an H.264 yuv420p MP4 with ``+faststart``."""
    import av

    frames = even_crop(frames)
    count = frames.shape[0]
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w", format="mp4",
                 options={"movflags": "+faststart"}) as container:
        stream = container.add_stream("libx264", rate=fps,
                                      options={"crf": str(crf), "preset": "veryfast"})
        stream.width = frames.shape[2]
        stream.height = frames.shape[1]
        stream.pix_fmt = "yuv420p"
        for i in range(count):
            frame = av.VideoFrame.from_ndarray(frames[i], format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


def write_poster(frames: Any, path: Path) -> None:
    """The middle frame as a JPEG."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(frames[len(frames) // 2], "RGB").save(path, "JPEG", quality=88)


def sprite_layout(count: int, *, width: int, height: int) -> dict[str, int]:
    """The spritesheet grid of a ``count``-frame ``width``×``height`` video."""
    tiles = max(1, min(SPRITE_TILES, count))
    columns = min(SPRITE_COLUMNS, tiles)
    scale = min(1.0, SPRITE_TILE_SIDE / max(width, height, 1))
    return {"columns": columns, "rows": -(-tiles // columns), "count": tiles,
            "tile_width": max(1, round(width * scale)),
            "tile_height": max(1, round(height * scale))}


def write_spritesheet(frames: Any, path: Path) -> dict[str, int]:
    """A JPEG grid of evenly spaced ``frames`` (as the video shows them); its layout."""
    import numpy as np
    from PIL import Image

    frames = even_crop(frames)  # the video's crop
    count = frames.shape[0]
    layout = sprite_layout(count, width=frames.shape[2], height=frames.shape[1])
    tw, th, columns = layout["tile_width"], layout["tile_height"], layout["columns"]
    sheet = Image.new("RGB", (columns * tw, layout["rows"] * th))
    picks = np.linspace(0, count - 1, layout["count"]).round().astype(int)
    for i, index in enumerate(picks):
        tile = Image.fromarray(np.ascontiguousarray(frames[index]), "RGB")
        if tile.size != (tw, th):
            tile = tile.resize((tw, th), Image.Resampling.LANCZOS, reducing_gap=3.0)
        sheet.paste(tile, ((i % columns) * tw, (i // columns) * th))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path, "JPEG", quality=85)
    return layout


@dataclass(frozen=True, slots=True)
class StoreConfig:
    url: str
    endpoint_url: str | None = None
    region: str = "us-east-1"
    access_key_id: str | None = None
    secret_access_key: str | None = None
    retry_attempts: int = 8
    retry_total_s: float = 120.0

    def policy(self) -> Any:
        """The ``storage.retry.RetryPolicy`` of this job's fetches and uploads."""
        from vidmaas.storage.retry import RetryPolicy

        return RetryPolicy(attempts=self.retry_attempts, total_s=self.retry_total_s)

    def open(self) -> Any:
        from vidmaas.storage import open_store

        return open_store(self.url, endpoint_url=self.endpoint_url, region=self.region,
                          access_key_id=self.access_key_id,
                          secret_access_key=self.secret_access_key)


def upload(store: StoreConfig, *, task_id: str, video: Path, poster: Path,
           spritesheet: Path) -> dict[str, str]:
    """Put the video, the poster and the spritesheet; their keys (``video_key``,
    ``poster_key``, ``spritesheet_key``). ``UploadFailed`` on any store error."""
    from vidmaas.errors import VidmaasError
    from vidmaas.storage.base import output_key
    from vidmaas.storage.retry import upload_verified

    keys = {"poster_key": output_key(task_id, POSTER_NAME),
            "spritesheet_key": output_key(task_id, SPRITESHEET_NAME),
            "video_key": output_key(task_id, VIDEO_NAME)}
    files = ((keys["poster_key"], poster, "image/jpeg"),
             (keys["spritesheet_key"], spritesheet, "image/jpeg"),
             (keys["video_key"], video, "video/mp4"))  # the video last
    policy = store.policy()

    async def put() -> None:
        s = store.open()
        for key, path, kind in files:
            await upload_verified(s, key, path, content_type=kind, policy=policy,
                                  context=f"task_id={task_id}")

    try:
        asyncio.run(put())
    except (VidmaasError, OSError) as e:
        raise UploadFailed(f"upload to {store.url} failed (retried within {policy.attempts} "
                           f"attempts, {policy.total_s:g} s): {e}") from e
    except Exception as e:  # boto3's S3UploadFailedError escapes the store's wrapping
        raise UploadFailed(f"upload to {store.url} failed: {type(e).__name__}: {e}") from e
    return keys
