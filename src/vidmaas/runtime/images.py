"""The input image of an image-to-video task, sized the way Wan2.2 sizes it.

Guarantees: ``output_size`` follows Wan2.2's ``best_output_size`` (wan/utils/utils.py):
the request's width × height is an area, the image's aspect ratio is kept, and both
sides are multiples of ``multiple`` (the VAE stride × the patch: 16 for A14B, 32 for
TI2V-5B), never exceeding the area; of rounding the width first or the height first,
the one closer to the image's ratio wins. ``fit_image`` scales the image to cover that
size and centre-crops only the rounding remainder (a few pixels), so nothing of the
picture is lost to a different aspect ratio. An unreadable image is ``BadInput``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vidmaas.runtime.errors import BadInput


def output_size(width: int, height: int, *, area: int, multiple: int) -> tuple[int, int]:
    """(width, height) of the video for an image of ``width``×``height`` at ``area``."""
    ratio = width / height
    ow = (area * ratio) ** 0.5
    oh = area / ow
    candidates = []
    w1 = max(multiple, int(ow // multiple * multiple))
    h1 = max(multiple, int(area / w1 // multiple * multiple))
    candidates.append((w1, h1))
    h2 = max(multiple, int(oh // multiple * multiple))
    w2 = max(multiple, int(area / h2 // multiple * multiple))
    candidates.append((w2, h2))

    def distortion(wh: tuple[int, int]) -> float:
        r = wh[0] / wh[1]
        return max(ratio / r, r / ratio)

    return min(candidates, key=distortion)


def fit_image(path: Path, *, area: int, multiple: int) -> Any:
    """The input image as RGB at ``output_size``: scaled to cover it, centre-cropped."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()
            rgb = img.convert("RGB")
    except FileNotFoundError as e:
        raise BadInput(f"the input image was not fetched ({path.name})",
                       code="input_missing") from e
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise BadInput(f"the input image cannot be read: {e}", code="bad_image") from e
    ow, oh = output_size(rgb.width, rgb.height, area=area, multiple=multiple)
    scale = max(ow / rgb.width, oh / rgb.height)
    resized = rgb.resize((max(ow, round(rgb.width * scale)), max(oh, round(rgb.height * scale))),
                         Image.Resampling.LANCZOS)
    left, top = (resized.width - ow) // 2, (resized.height - oh) // 2
    return resized.crop((left, top, left + ow, top + oh))
