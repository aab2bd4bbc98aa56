"""The whole job as a process, against the real Redis and the real S3 (SeaweedFS)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from tests.runtime.conftest import TORCHRUN, VIDMAAS_JOB, Job
from tests.runtime.media import assert_watermarked, decode_mp4
from vidmaas.domain.events import EventType, Stage
from vidmaas.domain.jobs import ExitCode


def _stages(job: Job) -> list[str]:
    return [e.data["stage"] for e in job.of_type(EventType.STAGE)]


def _percents(job: Job) -> list[float]:
    return [float(e.data["percent"]) for e in job.of_type(EventType.PROGRESS)]


def test_run_uploads_a_watermarked_h264_video_and_reports_completed(job: Job) -> None:
    proc = job.run(job.command("run"))
    assert proc.returncode == 0, proc.stderr[-3000:]

    events = job.events()
    types = [e.type for e in events]
    assert types[0] is EventType.STARTED
    assert events[0].data["world_size"] == 1
    assert types.count(EventType.COMPLETED) == 1 and types[-1] is EventType.COMPLETED
    assert EventType.FAILED not in types
    assert EventType.HEARTBEAT in types
    assert _stages(job) == [Stage.LOAD_MODEL, Stage.ENCODE_PROMPT, Stage.DENOISE, Stage.DECODE,
                            Stage.POSTPROCESS, Stage.UPLOAD]
    percents = _percents(job)
    assert percents == sorted(percents) and percents[-1] == 100
    denoise = [e.data for e in job.of_type(EventType.PROGRESS) if e.data["stage"] == "denoise"]
    assert [d["step"] for d in denoise][-3:] == [1, 2, 3]
    assert all(e.data["eta_s"] is None or e.data["eta_s"] >= 0
               for e in job.of_type(EventType.PROGRESS))

    done = events[-1].data
    assert done["video_key"] == f"outputs/{job.task_id}/video.mp4"
    assert done["poster_key"] == f"outputs/{job.task_id}/poster.jpg"
    assert (done["width"], done["height"], done["num_frames"], done["fps"], done["seed"]) == \
        (64, 64, 9, 8, 7)
    assert done["duration_s"] == pytest.approx(9 / 8)
    assert {"load_model_s", "denoise_s", "decode_s", "postprocess_s", "upload_s"} \
        <= done["timings"].keys()

    data = job.get_object(done["video_key"])
    assert data.index(b"moov") < data.index(b"mdat"), "not +faststart"
    video = decode_mp4(data)
    assert (video.codec, video.pix_fmt) == ("h264", "yuv420p")
    assert (video.width, video.height, len(video.frames), video.fps) == (64, 64, 9, 8)
    original = np.load(job.work_dir / "output" / "frames.npy")
    assert_watermarked(original, video.frames, text="AI generated")

    poster = Image.open(io.BytesIO(job.get_object(done["poster_key"])))
    assert (poster.format, poster.size) == ("JPEG", (64, 64))

    # Nine 64×64 frames: one tile each, five to a row, from the watermarked video.
    assert done["spritesheet_key"] == f"outputs/{job.task_id}/spritesheet.jpg"
    assert done["spritesheet"] == {"columns": 5, "rows": 2, "count": 9, "tile_width": 64,
                                   "tile_height": 64}
    sheet = Image.open(io.BytesIO(job.get_object(done["spritesheet_key"])))
    assert (sheet.format, sheet.size) == ("JPEG", (5 * 64, 2 * 64))
    last = np.asarray(sheet.convert("RGB"))[64:128, 192:256].astype(int)
    assert np.abs(last - video.frames[8].astype(int)).mean() < 8


@pytest.mark.parametrize(("layout", "model", "image", "size", "expected"), [
    # The size is an area; the image decides the aspect ratio, rounded to the VAE × patch
    # multiple: 32 for TI2V, 16 for A14B.
    ("ti2v", "tiny-ti2v", (80, 48), "64*64", (64, 64)),
    ("a14b-i2v", "wan2.2-i2v-a14b", (80, 48), "64*64", (80, 48)),
    ("a14b-i2v", "wan2.2-i2v-a14b", (150, 100), "64*96", (96, 64)),
])
def test_run_with_an_image_fetches_it_and_drives_the_image_pipeline(
        job: Job, tiny_models: dict[str, object], layout: str, model: str,
        image: tuple[int, int], size: str, expected: tuple[int, int]) -> None:
    buf = io.BytesIO()
    Image.new("RGB", image, (220, 40, 40)).save(buf, "PNG")
    key = f"inputs/{job.task_id}/image.png"
    job.put_object(key, buf.getvalue())

    # One rank here, whatever the registry's strategy for the real model.
    proc = job.run(job.command("run", "--image", key, "--size", size, "--strategy", "single",
                               model=model),
                   extra_env={"VIDMAAS_MODEL_DIR": str(tiny_models[layout])})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (job.work_dir / "input" / "image.png").is_file()
    assert _stages(job)[0] == Stage.FETCH_INPUT
    done = job.of_type(EventType.COMPLETED)
    assert len(done) == 1
    assert (done[0].data["width"], done[0].data["height"]) == expected
    video = decode_mp4(job.get_object(done[0].data["video_key"]))
    assert (video.codec, len(video.frames), video.width, video.height) == \
        ("h264", 9, *expected)


def test_run_sh_chains_fetch_generate_under_torchrun_and_postprocess(job: Job) -> None:
    from importlib import resources

    script = resources.files("vidmaas.runtime").joinpath("run.sh")
    proc = job.run(["sh", str(script), "--prompt", "a boat", "--model", "tiny-t2v",
                    "--size", "64*64", "--frame-num", "5", "--sample-steps", "2", "--seed", "1"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    types = [e.type for e in job.events()]
    assert types.count(EventType.STARTED) == 1 and types.count(EventType.COMPLETED) == 1
    assert len(decode_mp4(job.get_object(f"outputs/{job.task_id}/video.mp4")).frames) == 5


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["t2v", "ti2v", "a14b"])
def test_torchrun_two_ranks_run_each_layout_cfg_parallel_end_to_end(
        job: Job, tiny_models: dict[str, object], layout: str) -> None:
    args = []
    if layout == "ti2v":
        buf = io.BytesIO()
        Image.new("RGB", (64, 64), (20, 200, 40)).save(buf, "JPEG")
        key = f"inputs/{job.task_id}/image.jpg"
        job.put_object(key, buf.getvalue())
        args = ["--image", key]
    model = {"t2v": "tiny-t2v", "ti2v": "tiny-ti2v", "a14b": "wan2.2-t2v-a14b"}[layout]
    cmd = [TORCHRUN, "--standalone", "--nproc-per-node", "2", VIDMAAS_JOB,
           *job.command("run", *args, "--strategy", "cfg_parallel", model=model)[1:]]
    proc = job.run(cmd, extra_env={"VIDMAAS_MODEL_DIR": str(tiny_models[layout])})
    assert proc.returncode == 0, proc.stderr[-3000:]

    events = job.events()
    types = [e.type for e in events]
    assert types.count(EventType.STARTED) == 1 and events[0].data["world_size"] == 2
    assert types.count(EventType.COMPLETED) == 1 and EventType.FAILED not in types
    percents = _percents(job)
    assert percents == sorted(percents) and percents[-1] == 100
    # Only rank 0 reports: each denoising step is reported once.
    steps = [e.data["step"] for e in job.of_type(EventType.PROGRESS)
             if e.data["stage"] == "denoise" and e.data["step"] > 0]
    assert steps == [1, 2, 3]
    video = decode_mp4(job.get_object(f"outputs/{job.task_id}/video.mp4"))
    assert (video.codec, len(video.frames), video.width, video.height) == ("h264", 9, 64, 64)
    assert video.fps == (16 if layout == "a14b" else 8)


@pytest.mark.slow
def test_run_launches_torchrun_itself_when_the_job_has_two_processes_per_node(job: Job) -> None:
    proc = job.run(job.command("run", "--strategy", "cfg_parallel"),
                   extra_env={"PET_NPROC_PER_NODE": "2", "PET_NNODES": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    types = [e.type for e in job.events()]
    assert types.count(EventType.STARTED) == 1 and types.count(EventType.COMPLETED) == 1
    assert job.events()[0].data["world_size"] == 2
    assert job.object_keys() == [f"outputs/{job.task_id}/poster.jpg",
                                 f"outputs/{job.task_id}/spritesheet.jpg",
                                 f"outputs/{job.task_id}/video.mp4"]


def test_exit_codes_are_the_domain_exit_codes() -> None:
    from vidmaas.runtime.errors import BadInput, ModelError, OutOfMemory, UploadFailed

    assert (BadInput("x").exit_code, ModelError("x").exit_code, OutOfMemory("x").exit_code,
            UploadFailed("x").exit_code) == (ExitCode.BAD_INPUT, ExitCode.MODEL_ERROR,
                                             ExitCode.OUT_OF_MEMORY, ExitCode.UPLOAD_FAILED)


def test_an_image_to_video_model_without_an_image_fails_as_bad_input(
        job: Job, tiny_models: dict[str, object]) -> None:
    proc = job.run(job.command("run", model="wan2.2-i2v-a14b"),
                   extra_env={"VIDMAAS_MODEL_DIR": str(tiny_models["a14b-i2v"])})
    assert proc.returncode == ExitCode.BAD_INPUT, proc.stderr[-2000:]
    failed = job.of_type(EventType.FAILED)
    assert len(failed) == 1 and "needs --image" in failed[0].data["message"]


def test_the_job_reads_no_model_registry_only_its_arguments(job: Job, tmp_path: object) -> None:
    from pathlib import Path

    broken = Path(str(tmp_path)) / "models.yaml"
    broken.write_text("models: [{id: broken")  # a registry that cannot be read
    proc = job.run(job.command("generate", "--flow-shift", "7", "--guidance-scale", "3"),
                   extra_env={"VIDMAAS_MODELS_PATH": str(broken)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json

    facts = json.loads((job.work_dir / "output" / "result.json").read_text())
    assert facts["plan"] == "single×1, text encoder released after encoding, VAE tiling off"
    assert facts["moves"][-1] == ["step 3", "release", "transformer"]
