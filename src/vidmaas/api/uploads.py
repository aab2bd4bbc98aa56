"""Input image checks: sniffed, bounded, re-encoded.

Guarantees: an upload is accepted only if its bytes start like PNG, JPEG or WebP
(the file name and declared content type are ignored), its dimensions are read from
the header and bounded before any pixel is decoded (decompression bombs are refused
without allocating them), it decodes completely (truncated files are refused), and
what is stored is a fresh PNG re-encoded from the pixels (metadata, trailing
payloads and polyglot tails do not survive).
"""

from __future__ import annotations

import io
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from vidmaas.errors import InvalidRequest, UnsupportedMedia

_FORMATS = {"PNG": "png", "JPEG": "jpeg", "WEBP": "webp"}


def sniff(data: bytes) -> str | None:
    """The image format by magic bytes, or None."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


@dataclass(frozen=True, slots=True)
class CleanImage:
    png: bytes
    width: int
    height: int
    source_format: str


def clean_image(data: bytes, *, max_pixels: int, max_side_px: int) -> CleanImage:
    """Validate an uploaded image and re-encode it as PNG (see module doc)."""
    fmt = sniff(data)
    if fmt is None:
        raise UnsupportedMedia("the image must be PNG, JPEG or WebP", field="image",
                               code="unsupported_image_type")
    try:
        with Image.open(io.BytesIO(data), formats=list(_FORMATS)) as img:
            if _FORMATS.get(img.format or "") != fmt:
                raise UnsupportedMedia("the image content does not match its format",
                                       field="image", code="unsupported_image_type")
            width, height = img.size
            if width < 1 or height < 1:
                raise InvalidRequest("the image is empty", field="image", code="invalid_image")
            if width > max_side_px or height > max_side_px or width * height > max_pixels:
                raise InvalidRequest(
                    f"the image is {width}×{height}; the limit is {max_side_px}px a side and "
                    f"{max_pixels} pixels", field="image", code="image_too_large")
            if getattr(img, "n_frames", 1) > 1:
                img.seek(0)
            img.load()
            rgb = img.convert("RGBA" if img.mode in ("RGBA", "LA", "P") else "RGB")
            out = io.BytesIO()
            rgb.save(out, format="PNG", optimize=False)
    except Image.DecompressionBombError as e:
        raise InvalidRequest("the image has too many pixels", field="image",
                             code="image_too_large") from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise InvalidRequest("the image could not be decoded (truncated or corrupt)",
                             field="image", code="invalid_image") from e
    return CleanImage(png=out.getvalue(), width=width, height=height, source_format=fmt)
