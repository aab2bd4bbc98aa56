"""The local executor: each job is a process group on this machine (DESIGN §5).

Guarantees:
- A job runs as a pod would: in a fresh work directory under ``local.work_root``,
  with the environment of DESIGN §5 (task id, Redis and storage URLs, storage
  credentials, model and work directories, the collective timeout
  (``runtime.collective_timeout_s``), and the variables the Training Operator
  injects, ``PET_NPROC_PER_NODE`` from the registry), as ``vidmaas-job run
  <job_args(spec)>`` (the pod's entry; the runtime runs ``torchrun`` for its
  generate step when the job has several processes), or a given program for tests,
  in its own session and process group, stdout and stderr in ``job.log``.
- State survives the dispatcher: the work directory holds ``job.json`` (attempt, pid,
  process start time) and, once the job ends, ``exit_code`` (written by a small
  ``sh`` wrapper that is the group leader; ``workdir`` keeps these files). So a
  restarted dispatcher finds a job still running, ``status`` answers after a
  restart, and a job ended while no dispatcher ran reports its exit code.
- ``launch`` is idempotent by (job name, attempt): the same attempt again answers with
  the existing job, running or ended; a new attempt replaces an ended job's directory,
  and stops a leftover of an earlier attempt first. Launches of one job name are
  serialised across processes by a lock file.
- GPUs: each job gets ``CUDA_VISIBLE_DEVICES`` of its own, ``spec.gpus`` ids that no
  other live job of the work root holds (from the dispatcher's own
  ``CUDA_VISIBLE_DEVICES``, else ``0 … gpu_capacity-1``), recorded in ``job.json``.
- ``cancel`` sends SIGTERM to the group and SIGKILL after ``grace_s``; SIGKILL reaches
  every process the job started, torchrun's ranks in their own sessions included
  (``workdir.kill_tree``).
- ``updates`` yields a ``JobStatus`` when a job's process ends: its exit code, whether
  that is retryable (``exit_code_retryable``) and the tail of its log.
- ``close`` stops watching; it never kills jobs.
- Pool workers (``start_worker``) are process groups of the same kind, named by their
  worker id, running ``vidmaas-job serve <worker_args>`` with the job environment less
  the per-task variables; ``list_jobs`` never lists them, ``list_workers`` only them.
- Without ``keep_work_dirs``, an ended job's directory is emptied except for its
  markers and log.

One machine: dispatchers on several machines must not share a work root.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vidmaas.config import Settings
from vidmaas.dispatcher.executors import workdir
from vidmaas.dispatcher.executors.base import JobState, JobStatus, WorkerSpec
from vidmaas.domain import jobs
from vidmaas.domain.ids import is_worker_id, task_id_from_job_name
from vidmaas.domain.jobs import JobSpec, job_args
from vidmaas.domain.models import ModelSpec
from vidmaas.domain.workers import ENV_WORKER_ID
from vidmaas.logs import TaskLog

log = logging.getLogger(__name__)
tlog = TaskLog(log)

ADOPTED_POLL_S = 0.2
"""How often a job started by an earlier dispatcher process is checked for its end."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True, slots=True)
class _Start:
    """One process group to start: a task's job or a pool worker."""

    name: str
    attempt: int
    command: list[str]
    env: dict[str, str]
    """Besides the work-directory variable, set at start."""
    gpus: int
    task_id: str | None


@dataclass(slots=True)
class _Job:
    name: str
    attempt: int
    pid: int
    start_time: str | None
    proc: asyncio.subprocess.Process | None
    watcher: asyncio.Task[None] | None = None
    superseded: bool = False


class LocalExecutor:
    """Jobs as process groups under ``settings.local.work_root`` (see the module doc)."""

    name = "local"

    def __init__(self, *, settings: Settings, program: Sequence[str] | None = None,
                 extra_env: dict[str, str] | None = None) -> None:
        """``program``: run ``program + job_args(spec)`` directly instead of torchrun
        (tests run a small double of the runtime this way)."""
        self.settings = settings
        self.cfg = settings.local
        self.program = list(program) if program is not None else None
        self.extra_env = dict(extra_env or {})
        self.root = self.cfg.work_root.resolve()
        self._jobs: dict[str, _Job] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._timers: set[asyncio.Task[None]] = set()
        self._updates: asyncio.Queue[JobStatus] = asyncio.Queue()
        self._adopted = False

    # ------------------------------------------------------------------ command, env

    def command(self, spec: JobSpec) -> list[str]:
        """What a pod's container runs: ``vidmaas-job run <job_args>``. The runtime starts
        ``torchrun --nproc-per-node N … generate`` itself when the job has several
        processes (from ``PET_NPROC_PER_NODE``), as it does in a pod."""
        if self.program is not None:
            return [*self.program, *job_args(spec)]
        return [sys.executable, "-m", "vidmaas.runtime.cli", "run", *job_args(spec)]

    def worker_command(self, spec: WorkerSpec) -> list[str]:
        """What a pool worker runs: ``vidmaas-job serve <worker_args>``."""
        if self.program is not None:
            return [*self.program, "serve", *spec.args]
        return [sys.executable, "-m", "vidmaas.runtime.cli", "serve", *spec.args]

    def environment(self, spec: JobSpec, work_dir: Path) -> dict[str, str]:
        env = self._environment(spec.model, work_dir)
        env.update({jobs.ENV_TASK_ID: spec.task_id, jobs.ENV_ATTEMPT: str(spec.attempt)})
        return env

    def worker_environment(self, spec: WorkerSpec, work_dir: Path) -> dict[str, str]:
        env = self._environment(spec.model, work_dir)
        env[ENV_WORKER_ID] = spec.worker_id
        return env

    def _environment(self, model: ModelSpec, work_dir: Path) -> dict[str, str]:
        s = self.settings
        env = {k: v for k, v in os.environ.items() if not k.startswith("VIDMAAS_")}
        storage_url = s.storage.url
        if storage_url.startswith("file://") and not storage_url.startswith("file:///"):
            storage_url = Path(storage_url[len("file://"):]).resolve().as_uri()
        model_dir = Path(model.model_dir)
        if not model_dir.is_absolute() and s.model_root is not None:
            model_dir = s.model_root / model_dir
        nproc = model.nproc_per_node
        env.update({
            jobs.ENV_REDIS_URL: s.redis.url,
            jobs.ENV_STORAGE_URL: storage_url,
            jobs.ENV_MODEL_DIR: str(model_dir.resolve()),
            jobs.ENV_WORK_DIR: str(work_dir),
            jobs.ENV_S3_REGION: s.storage.s3_region,
            jobs.ENV_STORAGE_RETRY_ATTEMPTS: str(s.storage.retry_attempts),
            jobs.ENV_STORAGE_RETRY_TOTAL_S: str(s.storage.retry_total_s),
            jobs.ENV_WATERMARK_TEXT: s.runtime.watermark_text,
            jobs.ENV_HEARTBEAT_INTERVAL_S: str(s.runtime.heartbeat_interval_s),
            jobs.ENV_COLLECTIVE_TIMEOUT_S: str(s.runtime.collective_timeout_s),
            jobs.ENV_PREVIEW_INTERVAL_S: str(s.runtime.preview_interval_s),
            jobs.ENV_PREVIEW_MAX: str(s.runtime.preview_max),
            "OMP_NUM_THREADS": env.get("OMP_NUM_THREADS", "1"),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(_free_port()),
            "WORLD_SIZE": str(nproc),
            "RANK": "0",
            "PET_NNODES": "1",
            "PET_NPROC_PER_NODE": str(nproc),
            "PET_NODE_RANK": "0",
            "PYTHONUNBUFFERED": "1",
        })
        if s.storage.s3_endpoint_url:
            env[jobs.ENV_S3_ENDPOINT_URL] = s.storage.s3_endpoint_url
        if s.storage.s3_access_key_id is not None:
            env[jobs.ENV_AWS_ACCESS_KEY_ID] = s.storage.s3_access_key_id.get_secret_value()
        if s.storage.s3_secret_access_key is not None:
            env[jobs.ENV_AWS_SECRET_ACCESS_KEY] = \
                s.storage.s3_secret_access_key.get_secret_value()
        env.update(self.extra_env)
        return env

    # ------------------------------------------------------------------ on-disk state

    def work_dir(self, job_name: str) -> Path:
        if task_id_from_job_name(job_name) is None and not is_worker_id(job_name):
            raise ValueError(f"not a job name or worker id: {job_name[:80]!r}")
        return self.root / job_name

    def _ended(self, job_name: str, work_dir: Path, code: int | None) -> JobStatus:
        return workdir.ended(job_name, work_dir, code, log_tail_bytes=self.cfg.log_tail_bytes)

    def _status_from_disk(self, job_name: str) -> JobStatus:
        return workdir.status_from_disk(job_name, self.work_dir(job_name),
                                        log_tail_bytes=self.cfg.log_tail_bytes)

    # ------------------------------------------------------------------ launch

    async def launch(self, spec: JobSpec) -> str:
        await self._start(_Start(name=spec.job_name, attempt=spec.attempt,
                                 command=self.command(spec),
                                 env=self.environment(spec, self.work_dir(spec.job_name)),
                                 gpus=spec.gpus, task_id=spec.task_id))
        return spec.job_name

    async def start_worker(self, spec: WorkerSpec) -> None:
        """Start a pool worker (idempotent: a worker of that id, live or ended, is kept)."""
        await self._start(_Start(name=spec.worker_id, attempt=1,
                                 command=self.worker_command(spec),
                                 env=self.worker_environment(spec,
                                                             self.work_dir(spec.worker_id)),
                                 gpus=spec.gpus, task_id=None))

    async def _start(self, start: _Start) -> None:
        await self._adopt_once()
        lock = self._locks.setdefault(start.name, asyncio.Lock())
        async with lock:
            fd = await asyncio.to_thread(workdir.lock_file, self.root, start.name)
            try:
                await self._launch_locked(start)
            finally:
                os.close(fd)  # releases the flock

    def _free_devices(self, n: int, job_name: str) -> list[str]:
        """``n`` GPU ids no live job of this work root holds. The pool is the dispatcher's
        own ``CUDA_VISIBLE_DEVICES`` if set, else ``0 … gpu_capacity-1``."""
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        pool = [d.strip() for d in visible.split(",") if d.strip()] if visible else \
            [str(i) for i in range(max(self.settings.gpu_capacity, 1))]
        held = {d for name, marker in workdir.scan(self.root)
                if name != job_name and workdir.alive(marker)
                for d in marker.get("devices") or []}
        chosen = [d for d in pool if d not in held][:n]
        if len(chosen) < n:
            tlog.warning(task_id_from_job_name(job_name),
                         "job %s: only %d free GPUs of %d needed; sharing", job_name, len(chosen),
                         n)
            chosen += [d for d in pool if d not in chosen][: n - len(chosen)]
        return chosen

    async def _launch_locked(self, spec: _Start) -> None:
        name = spec.name
        work_dir = self.work_dir(name)
        marker = await asyncio.to_thread(workdir.read_marker, work_dir)
        if marker is not None:
            alive = workdir.alive(marker)
            if marker.get("attempt") == spec.attempt:
                if alive:
                    self._watch_adopted(name, marker)
                else:
                    tlog.info(spec.task_id, "job %s attempt %d already ran; not starting it again",
                              name, spec.attempt)
                    await self._updates.put(await asyncio.to_thread(
                        self._ended, name, work_dir, workdir.exit_code(work_dir)))
                return
            if alive:
                tlog.warning(spec.task_id, "job %s: stopping a leftover of attempt %s", name,
                             marker.get("attempt"))
                job = self._jobs.get(name)
                if job is not None:
                    job.superseded = True
                await self._kill_and_wait(marker)
        await asyncio.to_thread(workdir.fresh_dir, work_dir)
        await asyncio.to_thread(workdir.write_marker, work_dir,
                                {"job_name": name, "attempt": spec.attempt, "pid": None})
        cmd = ["/bin/sh", "-c", workdir.WRAPPER, "vidmaas-job", *spec.command]
        env = dict(spec.env)
        # Devices are chosen and recorded under one machine-wide lock, so that two
        # launches (in any dispatcher process on this machine) never pick the same GPU.
        devices_fd = await asyncio.to_thread(workdir.lock_file, self.root, "devices")
        try:
            devices = await asyncio.to_thread(self._free_devices, spec.gpus, name)
            env["CUDA_VISIBLE_DEVICES"] = ",".join(devices)
            log_f = await asyncio.to_thread((work_dir / workdir.LOG_FILE).open, "ab")
            try:
                proc = await asyncio.create_subprocess_exec(
                    *cmd, cwd=work_dir, env=env, stdin=asyncio.subprocess.DEVNULL,
                    stdout=log_f, stderr=asyncio.subprocess.STDOUT, start_new_session=True)
            finally:
                log_f.close()
            start_time = workdir.proc_start_time(proc.pid)
            await asyncio.to_thread(workdir.write_marker, work_dir, {
                "job_name": name, "attempt": spec.attempt, "pid": proc.pid,
                "start_time": start_time, "task_id": spec.task_id, "devices": devices})
        finally:
            os.close(devices_fd)
        job = _Job(name=name, attempt=spec.attempt, pid=proc.pid, start_time=start_time,
                   proc=proc)
        job.watcher = asyncio.create_task(self._watch_child(job), name=f"local-job-{name}")
        self._jobs[name] = job
        tlog.info(spec.task_id, "job %s started: pid %d, attempt %d, %s", name, proc.pid,
                  spec.attempt, work_dir)

    async def _kill_and_wait(self, marker: dict[str, Any]) -> None:
        pid = int(marker["pid"])
        await asyncio.to_thread(workdir.kill_tree, pid)
        for _ in range(100):
            if not workdir.alive(marker):
                return
            await asyncio.sleep(0.02)

    # ------------------------------------------------------------------ watching

    async def _watch_child(self, job: _Job) -> None:
        assert job.proc is not None
        await job.proc.wait()
        await self._finish(job)

    async def _watch_adopted_loop(self, job: _Job) -> None:
        # Not our child: no wait() to block on, so poll its /proc entry.
        marker = {"pid": job.pid, "start_time": job.start_time}
        while True:
            if not workdir.alive(marker):
                break
            await asyncio.sleep(ADOPTED_POLL_S)
        await self._finish(job)

    def _watch_adopted(self, name: str, marker: dict[str, Any]) -> None:
        if name in self._jobs and self._jobs[name].pid == marker.get("pid"):
            return
        job = _Job(name=name, attempt=int(marker.get("attempt") or 0), pid=int(marker["pid"]),
                   start_time=marker.get("start_time"), proc=None)
        job.watcher = asyncio.create_task(self._watch_adopted_loop(job),
                                          name=f"local-job-{name}")
        self._jobs[name] = job
        tlog.info(task_id_from_job_name(name),
                  "job %s: watching pid %d started by an earlier dispatcher", name, job.pid)

    async def _finish(self, job: _Job) -> None:
        work_dir = self.work_dir(job.name)
        code = await asyncio.to_thread(workdir.exit_code, work_dir)
        if code is None and job.proc is not None and job.proc.returncode is not None:
            code = job.proc.returncode  # killed with the shell: -signal
        status = await asyncio.to_thread(self._ended, job.name, work_dir, code)
        if not self.cfg.keep_work_dirs:
            await asyncio.to_thread(workdir.prune, work_dir)
        if job.superseded:
            return
        tlog.info(task_id_from_job_name(job.name), "job %s ended: %s (exit code %s)", job.name,
                  status.state.value, code)
        await self._updates.put(status)

    async def _adopt_once(self) -> None:
        """Watch the live jobs an earlier dispatcher process started (once per executor)."""
        if self._adopted:
            return
        self._adopted = True
        for name, marker in await asyncio.to_thread(workdir.scan, self.root):
            if workdir.alive(marker):
                self._watch_adopted(name, marker)

    # ------------------------------------------------------------------ the protocol

    async def status(self, job_name: str) -> JobStatus:
        job = self._jobs.get(job_name)
        if job is not None and job.proc is not None and job.proc.returncode is None:
            return JobStatus(job_name, JobState.RUNNING)
        return await asyncio.to_thread(self._status_from_disk, job_name)

    async def cancel(self, job_name: str, *, grace_s: float) -> None:
        marker = await asyncio.to_thread(workdir.read_marker, self.work_dir(job_name))
        if marker is None or not workdir.alive(marker):
            return
        pgid = int(marker["pid"])
        sig = signal.SIGKILL if grace_s <= 0 else signal.SIGTERM
        tlog.info(task_id_from_job_name(job_name), "job %s: sending %s to process group %d",
                  job_name, sig.name, pgid)
        if sig is signal.SIGKILL:
            await asyncio.to_thread(workdir.kill_tree, pgid)
        else:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, sig)
        if grace_s > 0:
            timer = asyncio.create_task(self._kill_after(job_name, marker, grace_s),
                                        name=f"local-kill-{job_name}")
            self._timers.add(timer)
            timer.add_done_callback(self._timers.discard)

    async def _kill_after(self, job_name: str, marker: dict[str, Any], grace_s: float) -> None:
        deadline = asyncio.get_running_loop().time() + grace_s
        while asyncio.get_running_loop().time() < deadline:
            if not workdir.alive(marker):
                return
            await asyncio.sleep(min(0.1, grace_s))
        if workdir.alive(marker):
            tlog.warning(task_id_from_job_name(job_name),
                         "job %s: still alive %.0fs after SIGTERM; SIGKILL", job_name, grace_s)
            await asyncio.to_thread(workdir.kill_tree, int(marker["pid"]))

    async def list_jobs(self) -> list[str]:
        return [name for name, marker in await asyncio.to_thread(workdir.scan, self.root)
                if workdir.alive(marker) and task_id_from_job_name(name) is not None]

    async def list_workers(self) -> list[str]:
        return [name for name, marker in await asyncio.to_thread(workdir.scan, self.root)
                if workdir.alive(marker) and is_worker_id(name)]

    async def worker_status(self, worker_id: str) -> JobStatus:
        return await self.status(worker_id)

    async def stop_worker(self, worker_id: str, *, grace_s: float) -> None:
        await self.cancel(worker_id, grace_s=grace_s)

    async def updates(self) -> AsyncIterator[JobStatus]:
        await self._adopt_once()
        while True:
            yield await self._updates.get()

    async def close(self) -> None:
        tasks = [j.watcher for j in self._jobs.values() if j.watcher is not None]
        tasks += list(self._timers)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
