"""A job whose work directory runs out of space fails as ``disk_full`` (exit 8, retryable
on a fresh work directory), frees what it wrote, and leaves the disk usable for the next
task.

Two real injectors, no patched writers:
- ``/dev/full`` (Linux's always-full device: every write to it fails with ``ENOSPC``)
  linked where a step writes (the frames, the video): the kernel's error reaches numpy's
  and FFmpeg's writers as on a full disk. It needs no privileges, so it runs everywhere.
- a small ``tmpfs`` as the work directory, where the bytes really run out (the input
  fetch, the frames), and a next task then runs on the same filesystem. Mounting needs
  root, so these skip where the tests cannot mount (most CI runners).
"""

from __future__ import annotations

import errno
import io
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.runtime.conftest import Job, job_env
from vidmaas.domain.events import Event, EventType
from vidmaas.domain.ids import new_task_id
from vidmaas.domain.jobs import ExitCode, exit_code_retryable
from vidmaas.errors import StorageError
from vidmaas.runtime.errors import DiskFull, InfraError, UploadFailed, classify

DEV_FULL = Path("/dev/full")


def _one_failed(job: Job) -> Event:
    terminal = [e for e in job.events() if e.type.terminal]
    assert [e.type for e in terminal] == [EventType.FAILED], terminal
    return terminal[0]


def _assert_disk_full_and_cleaned(job: Job, proc: subprocess.CompletedProcess[str]) -> None:
    assert proc.returncode == ExitCode.DISK_FULL, proc.stderr[-3000:]
    failed = _one_failed(job).data
    assert (failed["code"], failed["retryable"]) == ("disk_full", True)
    assert "no space left" in failed["message"].lower()
    assert not (job.work_dir / "output").exists()
    assert not (job.work_dir / "input").exists()
    assert job.object_keys() == []


@pytest.mark.skipif(not DEV_FULL.exists(), reason="no /dev/full on this system")
@pytest.mark.parametrize("written", [".frames.tmp.npy", "video.mp4"])
def test_a_write_that_finds_the_disk_full_fails_the_task_as_disk_full_and_frees_its_files(
        job: Job, written: str) -> None:
    out = job.work_dir / "output"
    out.mkdir(parents=True)
    (out / written).symlink_to(DEV_FULL)
    proc = job.run(job.command("run"))
    _assert_disk_full_and_cleaned(job, proc)
    assert (job.work_dir / ".vidmaas").is_dir()  # the small state the job's processes read


def test_disk_full_is_classified_whatever_wrapped_it() -> None:
    enospc = OSError(errno.ENOSPC, "No space left on device")
    assert isinstance(classify(enospc), DiskFull)
    assert isinstance(classify(OSError(errno.EDQUOT, "Disk quota exceeded")), DiskFull)
    for wrapper in (StorageError, UploadFailed, InfraError):
        try:
            try:
                raise enospc
            except OSError as e:
                raise wrapper("writing failed") from e
        except Exception as wrapped:
            err = classify(wrapped)
            assert (err.code, err.exit_code) == ("disk_full", ExitCode.DISK_FULL), wrapper
    assert exit_code_retryable(ExitCode.DISK_FULL)
    assert classify(OSError(errno.EACCES, "Permission denied")).code == "infra_error"


# ---------------------------------------------------------------- a real small filesystem


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs (root only: skipped where it cannot be mounted)."""
    mount = shutil.which("mount")
    point = tmp_path / "disk"
    point.mkdir()
    if os.geteuid() != 0 or mount is None:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run([mount, "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(point)],
                          capture_output=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode()[:200]}")
    try:
        yield point
    finally:
        subprocess.run(["umount", "-l", str(point)], check=False)


def _job_on(job: Job, work: Path, tiny_models: dict[str, Path]) -> Job:
    task_id = new_task_id()
    return Job(task_id=task_id, redis_url=job.redis_url, storage=job.storage, work_dir=work,
               env=job_env(task_id=task_id, redis_url=job.redis_url, storage=job.storage,
                           model_dir=tiny_models["t2v"], work_dir=work))


def _used_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def test_a_task_that_fills_the_disk_frees_it_and_the_next_task_on_it_completes(
        job: Job, small_disk: Path, tiny_models: dict[str, Path]) -> None:
    big = _job_on(job, small_disk / "a", tiny_models)
    # 256*256, 9 frames: 1.7 MiB of frames, more than the whole 1 MiB disk.
    proc = big.run(big.command("run", "--size", "256*256"))
    _assert_disk_full_and_cleaned(big, proc)
    assert _used_bytes(small_disk) < 256 * 1024, _used_bytes(small_disk)

    small = _job_on(job, small_disk / "b", tiny_models)
    proc = small.run(small.command("run"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [e.type for e in small.events() if e.type.terminal] == [EventType.COMPLETED]


def test_an_input_image_larger_than_the_free_space_fails_the_fetch_as_disk_full(
        job: Job, small_disk: Path, tiny_models: dict[str, Path]) -> None:
    target = _job_on(job, small_disk / "a", tiny_models)
    noise = np.random.default_rng(1).integers(0, 255, (700, 700, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, "PNG")  # noise does not compress: about 1.4 MiB
    assert len(buf.getvalue()) > 1024 * 1024
    key = f"inputs/{target.task_id}/image.png"
    target.put_object(key, buf.getvalue())
    proc = target.run(target.command("fetch-input", "--image", key))
    _assert_disk_full_and_cleaned(target, proc)
    assert _used_bytes(small_disk) < 256 * 1024
