"""Every way a job ends badly ends in one clear event and its own exit code, never a hang."""

from __future__ import annotations

import threading
import time

import pytest

from tests.runtime.conftest import FlakyProxy, Job
from vidmaas.domain.events import Event, EventType
from vidmaas.domain.jobs import ExitCode


def _one_failed(job: Job) -> Event:
    events = job.events()
    terminal = [e for e in events if e.type.terminal]
    assert len(terminal) == 1, [e.type.value for e in events]
    assert terminal[0].type is EventType.FAILED
    return terminal[0]


def test_unreadable_input_image_fails_as_bad_input_without_retry(job: Job) -> None:
    key = f"inputs/{job.task_id}/image.png"
    job.put_object(key, b"\x89PNG\r\n\x1a\n this is not really a png")
    proc = job.run(job.command("run", "--image", key))
    assert proc.returncode == ExitCode.BAD_INPUT, proc.stderr[-2000:]
    failed = _one_failed(job)
    assert failed.data["code"] == "bad_image" and failed.data["retryable"] is False
    assert not (job.work_dir / "input" / "image.png").exists()


def test_missing_input_object_fails_as_bad_input(job: Job) -> None:
    proc = job.run(job.command("fetch-input", "--image", f"inputs/{job.task_id}/gone.png"))
    assert proc.returncode == ExitCode.BAD_INPUT, proc.stderr[-2000:]
    assert _one_failed(job).data["code"] == "input_missing"


def test_missing_model_dir_fails_as_model_error_before_loading_anything(job: Job) -> None:
    proc = job.run(job.command("run"),
                   extra_env={"VIDMAAS_MODEL_DIR": str(job.work_dir / "no-such-model")})
    assert proc.returncode == ExitCode.MODEL_ERROR, proc.stderr[-2000:]
    failed = _one_failed(job)
    assert (failed.data["code"], failed.data["retryable"]) == ("model_missing", False)
    assert EventType.STAGE not in [e.type for e in job.events()]


def test_out_of_memory_fails_retryable_once_naming_the_model_size_frames_and_plan(
        job: Job) -> None:
    proc = job.run(job.command("run"), extra_env={"VIDMAAS_TEST_FAULT": "oom_at_step=2"})
    assert proc.returncode == ExitCode.OUT_OF_MEMORY, proc.stderr[-2000:]
    failed = _one_failed(job)
    assert (failed.data["code"], failed.data["retryable"]) == ("out_of_memory", True)
    message = failed.data["message"]
    for part in ("model tiny-t2v", "64*64", "9 frames", "plan single×1",
                 "text encoder released after encoding", "estimated peak",
                 "retried once with the memory-saving plan (--memory-saving)"):
        assert part in message, message
    assert job.object_keys() == []


def test_out_of_memory_under_the_memory_saving_plan_is_final(job: Job) -> None:
    proc = job.run(job.command("run", "--memory-saving"),
                   extra_env={"VIDMAAS_TEST_FAULT": "oom_at_step=2"})
    assert proc.returncode == ExitCode.OUT_OF_MEMORY_FINAL, proc.stderr[-2000:]
    failed = _one_failed(job)
    assert (failed.data["code"], failed.data["retryable"]) == ("out_of_memory", False)
    assert "memory-saving plan" in failed.data["message"]
    assert "not retried" in failed.data["message"]
    assert "VAE tiling on" in failed.data["message"]
    assert job.object_keys() == []


def test_failed_upload_ends_in_one_failed_event_and_a_retryable_exit(job: Job) -> None:
    proc = job.run(job.command("run"), extra_env={"AWS_SECRET_ACCESS_KEY": "wrong-secret"})
    assert proc.returncode == ExitCode.UPLOAD_FAILED, proc.stderr[-2000:]
    failed = _one_failed(job)
    assert (failed.data["code"], failed.data["retryable"]) == ("upload_failed", True)
    percents = [e.data["percent"] for e in job.of_type(EventType.PROGRESS)]
    assert max(percents) < 100


def test_a_world_size_the_model_cannot_use_fails_at_once(job: Job) -> None:
    from tests.runtime.conftest import TORCHRUN, VIDMAAS_JOB

    started = time.monotonic()
    proc = job.run([TORCHRUN, "--standalone", "--nproc-per-node", "3", VIDMAAS_JOB,
                    *job.command("generate")[1:]])
    assert proc.returncode != 0
    assert time.monotonic() - started < 60
    failed = _one_failed(job)
    assert failed.data["code"] == "unsupported_world_size"
    assert "world size 3" in failed.data["message"]


def test_cancel_mid_run_stops_within_one_step_and_uploads_nothing(job: Job) -> None:
    proc = job.start(job.command("run", "--sample-steps", "12"),
                     extra_env={"VIDMAAS_TEST_FAULT": "step_delay_s=0.3"})
    events = job.wait_for(lambda es: any(e.type is EventType.PROGRESS
                                         and e.data["stage"] == "denoise"
                                         and e.data["step"] >= 2 for e in es))
    seen = max(e.data["step"] for e in events if e.type is EventType.PROGRESS
               and e.data["stage"] == "denoise")
    job.set_cancel_flag(by="user")
    assert proc.wait(60) == ExitCode.CANCELLED

    events = job.events()
    terminal = [e for e in events if e.type.terminal]
    assert [(e.type, e.data.get("by")) for e in terminal] == [(EventType.CANCELLED, "user")]
    last = max(e.data["step"] for e in events if e.type is EventType.PROGRESS
               and e.data["stage"] == "denoise")
    assert last <= seen + 2 < 12  # the step running when the flag was set, then one check
    assert "postprocess" not in [e.data.get("stage") for e in events]
    assert job.object_keys() == []


def test_cancelled_before_start_stops_before_loading_the_model(job: Job) -> None:
    job.set_cancel_flag(by="admin")
    proc = job.run(job.command("run"))
    assert proc.returncode == ExitCode.CANCELLED, proc.stderr[-2000:]
    types = [e.type for e in job.events()]
    assert types == [EventType.STARTED, EventType.CANCELLED]


def test_sigterm_from_the_executor_ends_in_one_failed_event(job: Job) -> None:
    proc = job.start(job.command("run", "--sample-steps", "40"),
                     extra_env={"VIDMAAS_TEST_FAULT": "step_delay_s=0.3"})
    job.wait_for(lambda es: any(e.type is EventType.PROGRESS and e.data["stage"] == "denoise"
                                for e in es))
    proc.terminate()
    assert proc.wait(30) == ExitCode.INFRA_ERROR
    failed = _one_failed(job)
    assert (failed.data["code"], failed.data["retryable"]) == ("terminated", True)


def test_a_redis_blip_mid_run_does_not_kill_the_job(
        job: Job, flaky_redis_url: tuple[str, FlakyProxy]) -> None:
    url, proxy = flaky_redis_url
    proc = job.start(job.command("run", "--sample-steps", "10"),
                     extra_env={"VIDMAAS_REDIS_URL": url,
                                "VIDMAAS_TEST_FAULT": "step_delay_s=0.3"})
    job.wait_for(lambda es: any(e.type is EventType.PROGRESS and e.data["stage"] == "denoise"
                                for e in es))
    proxy.cut()
    restore = threading.Timer(2.0, proxy.restore)
    restore.start()
    try:
        assert proc.wait(90) == ExitCode.OK
    finally:
        restore.cancel()
    assert proc.stderr is not None
    log = proc.stderr.read().decode()
    assert "redis error" in log or "cannot read the cancel flag" in log, "the blip was not felt"
    events = job.events()
    types = [e.type for e in events]
    assert types.count(EventType.COMPLETED) == 1 and EventType.FAILED not in types
    percents = [e.data["percent"] for e in events if e.type is EventType.PROGRESS]
    assert percents == sorted(percents) and percents[-1] == 100
    assert job.object_keys() == [f"outputs/{job.task_id}/poster.jpg",
                                 f"outputs/{job.task_id}/spritesheet.jpg",
                                 f"outputs/{job.task_id}/video.mp4"]


@pytest.mark.parametrize("size", ["64x", "65*64"])
def test_impossible_arguments_fail_as_bad_input(job: Job, size: str) -> None:
    proc = job.run(job.command("run", "--size", size))
    assert proc.returncode == ExitCode.BAD_INPUT
    assert _one_failed(job).data["code"] == "bad_input"


def test_an_image_given_to_a_text_to_video_model_fails_as_bad_input_before_loading(
        job: Job) -> None:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(buf, "PNG")
    key = f"inputs/{job.task_id}/image.png"
    job.put_object(key, buf.getvalue())
    proc = job.run(job.command("run", "--image", key))
    assert proc.returncode == ExitCode.BAD_INPUT, proc.stderr[-2000:]
    assert "takes no image" in _one_failed(job).data["message"]
    assert "load_model" not in [e.data.get("stage") for e in job.events()]


@pytest.mark.slow
def test_a_failure_under_the_torchrun_it_launched_is_reported_once_with_the_childs_exit_code(
        job: Job) -> None:
    proc = job.run(job.command("run", "--strategy", "cfg_parallel"),
                   extra_env={"PET_NPROC_PER_NODE": "2", "VIDMAAS_TEST_FAULT": "oom_at_step=1"})
    assert proc.returncode == ExitCode.OUT_OF_MEMORY, proc.stderr[-2000:]
    failed = _one_failed(job)
    assert (failed.data["code"], failed.data["retryable"]) == ("out_of_memory", True)
    assert job.object_keys() == []
