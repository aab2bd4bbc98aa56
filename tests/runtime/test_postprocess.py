"""Watermark, H.264 encoding and the poster, on frames made in the test."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
from PIL import Image

from tests.runtime.media import assert_watermarked, decode_mp4
from vidmaas.runtime import postprocess


def _frames(count: int = 9, height: int = 64, width: int = 96) -> np.ndarray:
    ramp = np.linspace(40, 200, width, dtype=np.float32)[None, None, :, None]
    frames = np.broadcast_to(ramp, (count, height, width, 3)).copy()
    frames[..., 1] += np.arange(count, dtype=np.float32)[:, None, None] * 3
    return frames.clip(0, 255).astype(np.uint8)


def test_the_watermark_changes_pixels_only_inside_its_box() -> None:
    frames = _frames()
    marked = postprocess.watermark(frames, text="AI generated")
    box = postprocess.watermark_box("AI generated", width=96, height=64)
    assert box is not None and box.right <= 96 and box.bottom <= 64
    changed = np.any(frames != marked, axis=(0, 3))
    rows, cols = np.nonzero(changed)
    assert rows.min() >= box.top and rows.max() < box.bottom
    assert cols.min() >= box.left and cols.max() < box.right
    assert_watermarked(frames, marked, text="AI generated")


def test_no_text_and_no_logo_leave_the_frames_untouched() -> None:
    frames = _frames()
    assert postprocess.watermark(frames, text="") is frames


def test_a_logo_is_drawn_bottom_left_with_its_own_alpha(tmp_path: Path) -> None:
    logo = tmp_path / "logo.png"
    Image.new("RGBA", (32, 32), (255, 0, 0, 255)).save(logo)
    marked = postprocess.watermark(_frames(), text="", logo=logo)
    corner = marked[0, -10:-4, 4:10]
    assert (corner[..., 0] > 240).all() and (corner[..., 1] < 20).all()
    assert np.array_equal(marked[0, :8, -8:], _frames()[0, :8, -8:])


def test_the_mp4_is_h264_yuv420p_faststart_at_the_given_fps(tmp_path: Path) -> None:
    path = tmp_path / "v.mp4"
    postprocess.encode_mp4(_frames(), path, fps=12)
    data = path.read_bytes()
    assert data.index(b"moov") < data.index(b"mdat")
    video = decode_mp4(data)
    assert (video.codec, video.pix_fmt, video.width, video.height, video.fps) == \
        ("h264", "yuv420p", 96, 64, 12)
    assert len(video.frames) == 9
    assert np.abs(video.frames.astype(int) - _frames().astype(int)).mean() < 3


def test_odd_sides_are_cropped_to_even_ones_for_h264(tmp_path: Path) -> None:
    path = tmp_path / "v.mp4"
    postprocess.encode_mp4(_frames(height=33, width=47), path, fps=8)
    video = decode_mp4(path.read_bytes())
    assert (video.width, video.height) == (46, 32)


def test_the_poster_is_the_middle_frame_as_jpeg(tmp_path: Path) -> None:
    frames = _frames()
    path = tmp_path / "p.jpg"
    postprocess.write_poster(frames, path)
    img = Image.open(path)
    assert (img.format, img.size) == ("JPEG", (96, 64))
    assert np.abs(np.asarray(img).astype(int) - frames[4].astype(int)).mean() < 4


def _distinct_frames(count: int, height: int, width: int) -> np.ndarray:
    """Frames that differ from each other: frame i is a gradient at brightness 8·i."""
    ramp = np.linspace(0, 40, width, dtype=np.float32)[None, None, :, None]
    level = np.arange(count, dtype=np.float32)[:, None, None, None] * 8
    frames = np.broadcast_to(ramp + level, (count, height, width, 3)).copy()
    frames[..., 2] = 255 - frames[..., 2]
    return frames.clip(0, 255).astype(np.uint8)


def _tiles(sheet: Image.Image, layout: dict[str, int]) -> list[np.ndarray]:
    tw, th, columns = layout["tile_width"], layout["tile_height"], layout["columns"]
    pixels = np.asarray(sheet).astype(int)
    return [pixels[(i // columns) * th:(i // columns + 1) * th,
                   (i % columns) * tw:(i % columns + 1) * tw] for i in range(layout["count"])]


def test_the_spritesheet_is_a_five_column_grid_of_25_evenly_spaced_scaled_frames(
        tmp_path: Path) -> None:
    frames = _distinct_frames(30, 90, 320)
    path = tmp_path / "s.jpg"
    layout = postprocess.write_spritesheet(frames, path)
    assert layout == {"columns": 5, "rows": 5, "count": 25, "tile_width": 160,
                      "tile_height": 45}
    sheet = Image.open(path)
    assert sheet.format == "JPEG"
    assert sheet.size == (layout["columns"] * layout["tile_width"],
                          layout["rows"] * layout["tile_height"])
    tiles = _tiles(sheet.convert("RGB"), layout)
    picks = np.linspace(0, 29, 25).round().astype(int)
    assert picks[0] == 0 and picks[-1] == 29
    for tile, index in zip(tiles, picks, strict=True):
        expected = np.asarray(Image.fromarray(frames[index]).resize((160, 45))).astype(int)
        assert np.abs(tile - expected).mean() < 4, index
    means = [tile[..., 0].mean() for tile in tiles]  # real frames, in order, none blank
    assert all(b - a > 3 for a, b in itertools.pairwise(means)), means


def test_a_short_video_has_one_tile_per_frame_never_enlarged_and_cropped_as_encoded(
        tmp_path: Path) -> None:
    frames = _distinct_frames(7, 49, 65)  # odd sides: the video is 64×48
    path = tmp_path / "s.jpg"
    layout = postprocess.write_spritesheet(frames, path)
    assert layout == {"columns": 5, "rows": 2, "count": 7, "tile_width": 64,
                      "tile_height": 48}
    sheet = Image.open(path).convert("RGB")
    assert sheet.size == (5 * 64, 2 * 48)
    tiles = _tiles(sheet, layout)
    for i, tile in enumerate(tiles):
        assert np.abs(tile - frames[i, :48, :64].astype(int)).mean() < 4, i
    assert len({round(float(t.mean())) for t in tiles}) == 7
    assert postprocess.sprite_layout(2, width=64, height=64)["columns"] == 2
    assert postprocess.sprite_layout(9, width=480, height=832) == {
        "columns": 5, "rows": 2, "count": 9, "tile_width": 92, "tile_height": 160}
