"""Live previews: the latent-to-RGB projection, the throttle, the background thread, and a
real tiny-model job that publishes them (against the real Redis and S3)."""

from __future__ import annotations

import io
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

from tests.runtime.conftest import Job
from vidmaas.domain import events as ev
from vidmaas.domain.events import EventType
from vidmaas.domain.ids import new_task_id
from vidmaas.domain.jobs import model_args
from vidmaas.domain.models import ModelRegistry
from vidmaas.runtime import preview
from vidmaas.runtime.preview import Preview, Previewer, Projection, Throttle, project

# ---------------------------------------------------------------- projection


@pytest.mark.parametrize(("channels", "h", "w", "size"), [
    (16, 8, 8, (256, 256)),      # a tiny A14B-layout latent: scaled up
    (48, 44, 80, (256, 141)),    # TI2V-5B at 1280*704: the longer side is 256
    (16, 90, 160, (256, 144)),   # A14B at 1280*720
    (16, 600, 300, (128, 256)),  # larger than the bound: scaled down
])
def test_a_latent_frame_projects_to_a_uint8_rgb_image_at_most_256_px(
        channels: int, h: int, w: int, size: tuple[int, int]) -> None:
    frame = torch.randn(channels, h, w, generator=torch.Generator().manual_seed(1))
    pixels = project(frame)
    assert pixels.dtype == np.uint8
    assert pixels.shape == (size[1], size[0], 3)
    assert max(pixels.shape[:2]) <= preview.MAX_SIDE_PX
    assert pixels.std() > 10, "the default projection shows the latent's structure"


def test_a_bfloat16_frame_projects_like_its_float32_values() -> None:
    frame = torch.randn(48, 8, 12, generator=torch.Generator().manual_seed(4))
    half = frame.to(torch.bfloat16)
    assert np.array_equal(project(half), project(half.float().numpy()))


def test_the_default_projection_of_a_constant_latent_is_mid_grey() -> None:
    pixels = project(np.full((16, 4, 6), 3.0, dtype=np.float32), max_side_px=12)
    assert pixels.shape == (8, 12, 3)
    assert set(np.unique(pixels)) == {128}


def test_declared_factors_are_a_linear_map_with_a_bias() -> None:
    # Two channels: the first drives red, the second blue; the bias lifts green.
    projection = Projection.of([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]], [0.0, 0.5, 0.0])
    frame = np.zeros((2, 2, 2), dtype=np.float32)
    frame[0] = 1.0   # red at +1 → 255
    frame[1] = -1.0  # blue at -1 → 0
    pixels = project(frame, projection, max_side_px=2)
    assert pixels.tolist() == [[[255, 191, 0]] * 2] * 2


def test_factors_for_another_channel_count_fall_back_to_the_default() -> None:
    projection = Projection.of([[1.0, 0.0, 0.0]] * 48)
    frame = torch.randn(16, 8, 8, generator=torch.Generator().manual_seed(2))
    assert np.array_equal(project(frame, projection), project(frame))


def test_the_registry_factors_reach_the_job_as_an_argument_the_runtime_reads() -> None:
    base = ModelRegistry.load()["tiny-t2v"]
    spec = base.model_copy(update={"preview_rgb_factors": [(0.1, 0.2, 0.3)] * 16,
                                   "preview_rgb_bias": (0.0, -0.1, 0.1)})
    args = [a for a in model_args(spec) if a.startswith("--preview-rgb=")]
    assert len(args) == 1
    projection = preview.parse_projection(args[0].removeprefix("--preview-rgb="))
    assert projection == Projection(factors=((0.1, 0.2, 0.3),) * 16, bias=(0.0, -0.1, 0.1))
    assert not any(a.startswith("--preview-rgb") for a in model_args(base))
    with pytest.raises(ValueError):
        preview.parse_projection('{"factors": [[1, 2]]}')


# ---------------------------------------------------------------- throttle


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_throttle_allows_one_preview_per_interval_and_at_most_k_per_task() -> None:
    clock = Clock()
    throttle = Throttle(interval_s=2.0, max_count=3, clock=clock)
    allowed = []
    for _ in range(20):  # a step every 0.5 s for 10 s
        allowed.append(throttle.due())
        clock.now += 0.5
    assert [i for i, ok in enumerate(allowed) if ok] == [0, 4, 8]
    assert throttle.count == 3


def test_a_zero_interval_allows_every_step_up_to_the_limit_and_zero_turns_it_off() -> None:
    every = Throttle(interval_s=0, max_count=2)
    assert [every.due() for _ in range(4)] == [True, True, False, False]
    off = Throttle(interval_s=0, max_count=0)
    assert not off.enabled and not off.due()


# ---------------------------------------------------------------- the background thread


def test_the_denoising_thread_only_hands_over_a_copy_the_preview_thread_does_the_rest(
        ) -> None:
    entered, release = threading.Event(), threading.Event()
    seen: list[tuple[Preview, str]] = []

    def slow_sink(p: Preview) -> None:
        entered.set()
        release.wait(10)
        seen.append((p, threading.current_thread().name))

    latents = torch.randn(1, 16, 3, 4, 4, generator=torch.Generator().manual_seed(3))
    expected = preview.encode_jpeg(project(latents[0, :, 1].clone()))
    previewer = Previewer(throttle=Throttle(interval_s=0, max_count=8), sink=slow_sink,
                          name="preview-test")
    t = time.perf_counter()
    previewer.offer(latents, 1, 4)
    assert entered.wait(10)
    latents.mul_(0)  # the next step changes the latents in place: the preview must not see it
    previewer.offer(latents, 2, 4)
    previewer.offer(latents, 3, 4)
    assert time.perf_counter() - t < 5, "offer waited for the sink"
    assert not seen, "the sink ran on the denoising thread"
    release.set()
    previewer.close()
    first, thread = seen[0]
    assert thread == "preview-test"
    assert (first.step, first.total, first.width, first.height) == (1, 4, 256, 256)
    assert first.data == expected
    assert Image.open(io.BytesIO(first.data)).format == "JPEG"
    # The newest frame waiting replaces an older one: step 2 was superseded by step 3.
    assert [p.step for p, _ in seen] == [1, 3]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_the_frame_is_copied_asynchronously_as_the_step_left_it() -> None:
    latents = torch.randn(1, 48, 5, 44, 80, device="cuda", dtype=torch.bfloat16)
    expected = latents[0, :, 2].float().cpu()
    host, ready = preview._host_copy(latents[0, :, 2])
    latents.zero_()  # the next step: queued on the stream after the copy
    ready.synchronize()
    assert host.device.type == "cpu" and host.is_pinned() and host.dtype == torch.float32
    assert torch.equal(host, expected)


def test_a_failing_sink_never_reaches_the_denoising_thread() -> None:
    def broken(_: Preview) -> None:
        raise OSError("the store is down")

    previewer = Previewer(throttle=Throttle(interval_s=0, max_count=2), sink=broken)
    latents = torch.randn(1, 16, 1, 4, 4)
    previewer.offer(latents, 1, 2)
    previewer.close()
    previewer.offer(latents, 2, 2)  # after close: ignored
    assert (previewer.sent, previewer.failed) == (0, 1)


# ---------------------------------------------------------------- the event


def test_a_preview_event_round_trips_and_a_malformed_one_is_refused() -> None:
    task_id = new_task_id()
    event = ev.preview(task_id, key=f"outputs/{task_id}/preview.jpg", step=2, total=6,
                       width=256, height=144)
    assert ev.decode(ev.encode(event)) == event
    for bad in ({"key": "", "step": 1, "total": 2, "width": 1, "height": 1},
                {"key": "k", "step": "1", "total": 2, "width": 1, "height": 1},
                {"key": "k", "step": 1, "total": 2, "width": True, "height": 1},
                {"key": "k", "step": 1, "total": 2, "width": 1}):
        with pytest.raises(ev.MalformedEvent):
            ev.validate_data(EventType.PREVIEW, bad)


# ---------------------------------------------------------------- a real job


@pytest.mark.parametrize("model", ["tiny-t2v", "tiny-ti2v"])
def test_a_real_job_publishes_previews_whose_objects_decode_as_images(
        job: Job, tiny_models: dict[str, object], model: str) -> None:
    layout = "t2v" if model == "tiny-t2v" else "ti2v"
    job.env["VIDMAAS_MODEL_DIR"] = str(tiny_models[layout])
    proc = job.run(job.command("run", "--sample-steps", "6", model=model),
                   extra_env={"VIDMAAS_PREVIEW_MAX": "3", "VIDMAAS_PREVIEW_INTERVAL_S": "0"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    events = job.events()
    types = [e.type for e in events]
    previews = [e for e in events if e.type is EventType.PREVIEW]
    assert 1 <= len(previews) <= 3
    assert types.index(EventType.PREVIEW) < types.index(EventType.COMPLETED)
    steps = [int(e.data["step"]) for e in previews]
    assert steps == sorted(set(steps)) and steps[0] == 1
    key = f"outputs/{job.task_id}/preview.jpg"
    assert {e.data["key"] for e in previews} == {key}
    assert all(e.data["total"] == 6 for e in previews)
    image = Image.open(io.BytesIO(job.get_object(key)))
    assert image.format == "JPEG" and image.mode == "RGB"
    assert image.size == (previews[-1].data["width"], previews[-1].data["height"])
    assert max(image.size) <= 256
    assert key in job.object_keys()
