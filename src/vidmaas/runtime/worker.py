"""A warm-pool worker (``vidmaas-job serve``) that loads one model once (DESIGN §12).

A worker is started like a job (the environment of DESIGN §5, less the task's id and
attempt, plus ``VIDMAAS_WORKER_ID``), under ``torchrun`` when it has several processes
(it starts ``torchrun`` itself, as ``run`` does). Guarantees:

- Every rank loads the pipeline once, with the model's memory plan (``--strategy``,
  offload, tiling from ``worker_args``), keeping in host RAM what the plan takes off the
  device (``Options.keep_loaded``) so the next task finds it; the process group is
  joined once for the worker's life.
- Rank 0 alone talks to Redis (``bus.pools.WorkerLink``): a daemon thread renews the
  lease every quarter of ``--lease-s`` from the start, through model loading and
  generation; it says ``ready`` once the model is loaded and after every task; a worker
  the dispatcher retired (its lease lost) exits at once; after Redis lost its data the
  heartbeat registers it again (``bus.pools``), so it is used again without reloading.
- Tasks run one at a time. Rank 0 takes the assignment (only one whose fence is this
  worker's), publishes ``started`` (with the worker id and pid), checks the cancel flag
  and fetches the input, then hands the assignment to the other ranks
  (``broadcast_object_list``; none with one rank; an empty message every idle poll keeps
  them from timing out); every rank generates; rank 0 postprocesses, uploads and
  publishes the same events as a job — every one through the task's fence, so a worker
  that lost the task can never publish for a newer attempt.
- Cancel is the job's: the flag, read by rank 0 between steps, stops every rank at the
  same step; the task ends ``cancelled`` and the worker takes the next one.
- Between tasks the task's work directory is removed, the collector run (cheaply: what
  the load made is frozen out of its scans) and the CUDA cache emptied. A failed task
  is one ``failed`` event (``runtime.errors``'s code and retry rule), and the worker
  goes on — except with several ranks, where a failure during generation leaves the
  gang in an unknown state: the worker exits to be replaced.
- The worker exits by itself — after ``leave``, so that nothing is retried for it — after
  ``--max-failures`` failed tasks in a row, a task that left its resident memory above
  ``--max-rss-mib``, or ``--max-tasks`` tasks (0: no limit for that); it exits 0 when
  drained or on SIGTERM (a task running then ends ``failed``, retryable, or
  ``cancelled`` if a cancel was asked).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import importlib
import logging
import os
import shutil
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, NoReturn

from vidmaas.domain.jobs import ExitCode
from vidmaas.domain.workers import WorkerLimits
from vidmaas.runtime.errors import BadInput, Cancelled, JobError, ModelError, Terminated, classify
from vidmaas.runtime.job import JobArgParser, JobArgs, JobEnv, WorkDir, add_job_args
from vidmaas.runtime.reporter import SUPERSEDED, Reporter

if TYPE_CHECKING:
    from vidmaas.bus.pools import Assignment, WorkerLink
    from vidmaas.runtime.engine import Engine, Options
    from vidmaas.runtime.steps import Context

log = logging.getLogger("vidmaas.runtime.worker")

IDLE_POLL_S = 2.0
"""How long rank 0 waits on its inbox before telling the other ranks "nothing yet"."""
class _TaskArgParser(JobArgParser):
    """Parses an assignment's arguments; a bad one is the task's ``BadInput``."""

    def error(self, message: str) -> NoReturn:
        raise BadInput(f"bad task arguments: {message[:300]}")


def _task_parser() -> _TaskArgParser:
    parser = _TaskArgParser(prog="vidmaas-job serve (task)", add_help=False)
    add_job_args(parser)
    return parser


def rss_mib() -> float:
    """This process's resident memory now, in MiB."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _on_sigterm(_signum: int, _frame: FrameType | None) -> None:
    raise Terminated("the worker was stopped (SIGTERM)")


@dataclass(slots=True)
class _Task:
    assignment: Assignment
    ctx: Context


class Worker:
    """One rank of a pool worker (see the module docstring)."""

    def __init__(self, *, env: JobEnv, ns: argparse.Namespace, worker_id: str,
                 limits: WorkerLimits) -> None:
        self.env = env
        self.ns = ns
        self.worker_id = worker_id
        self.limits = limits
        self.rank0 = env.dist.rank == 0
        self.world_size = env.dist.world_size if env.dist.under_torchrun else 1
        self.client: Any = None
        self.link: WorkerLink | None = None
        self.engine: Engine | None = None
        self.tasks_done = 0
        self.failures_in_a_row = 0
        self._finished_task = False
        self._leaving: str | None = None
        """Why rank 0 decided to exit after the task that just ended."""

    # ------------------------------------------------------------------ the life

    def run(self) -> int:
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
        try:
            if self.rank0:
                self._connect()
            try:
                self._load()
            except Terminated:
                raise
            except Exception as e:
                err = classify(e)
                # Still ``starting`` in Redis: the dispatcher holds its next start back.
                log.error("worker %s: cannot load %s: %s", self.worker_id, self.ns.model,
                          err.message)
                return err.exit_code
            if self.rank0:
                assert self.link is not None
                if not self.link.ready():
                    log.info("worker %s: drained before it was ready", self.worker_id)
                    return ExitCode.OK
                log.info("worker %s: ready (%s loaded, pid %d)", self.worker_id,
                         self.ns.model, os.getpid())
            while True:
                task = self._next()
                if isinstance(task, _Task):
                    self._run(task)
                elif task == "exit":
                    return ExitCode.OK
        except (Terminated, KeyboardInterrupt):
            log.info("worker %s: stopped", self.worker_id)
            self._leave()
            return ExitCode.OK
        finally:
            signal.signal(signal.SIGTERM, previous)
            if self.client is not None:
                self.client.close()

    def _connect(self) -> None:
        from vidmaas.bus.client import connect_sync
        from vidmaas.bus.pools import WorkerLink

        assert self.env.redis_url is not None
        self.client = connect_sync(self.env.redis_url)
        self.link = WorkerLink(self.client, worker_id=self.worker_id, lease_s=self.limits.lease_s,
                               model=self.ns.model, gpus=max(1, self.env.dist.job_world_size))
        threading.Thread(target=self._beat, name=f"lease-{self.worker_id}", daemon=True).start()

    def _beat(self) -> None:
        from redis.exceptions import RedisError

        assert self.link is not None
        every_s = max(0.1, self.limits.lease_s / 4)
        while True:
            try:
                state = self.link.heartbeat()
            except RedisError as e:
                log.warning("worker %s: cannot renew the lease: %s", self.worker_id, e)
            else:
                if state is None:
                    # Retired (lease lost, Redis emptied): its task, if any, is another
                    # worker's now. Gone at once, so the gang cannot linger half-alive.
                    log.warning("worker %s: retired by the dispatcher; exiting", self.worker_id)
                    logging.shutdown()
                    os._exit(ExitCode.OK)
            time.sleep(every_s)

    def _leave(self) -> None:
        if self.link is None:
            return
        with contextlib.suppress(Exception):
            self.link.leave(finished_task=self._finished_task)

    def _options(self, args: JobArgs | argparse.Namespace) -> Options:
        from vidmaas.runtime.engine import Options

        return Options(cpu_offload=args.cpu_offload, vae_tiling=args.vae_tiling,
                       flow_shift=args.flow_shift, memory_saving=args.memory_saving,
                       attention_backend=args.attention_backend or None,
                       compile=args.compile, tf32=args.tf32, keep_loaded=True)

    def _load(self, options: Options | None = None) -> None:
        """Load the model (again, with other options, for a task that needs them)."""
        from vidmaas.runtime import distributed
        from vidmaas.runtime.engine import (
            Engine,
            import_libraries,
            num_attention_heads,
            read_model_index,
        )

        env, ns = self.env, self.ns
        if env.model_dir is None:
            raise ModelError("VIDMAAS_MODEL_DIR is not set", code="model_missing")
        read_model_index(env.model_dir)  # a missing model fails before seconds of imports
        t = time.perf_counter()
        import torch

        cuda = torch.cuda.is_available()
        guidance = max(ns.guidance_scale, ns.guidance_scale_2 or 0.0) > 1.0
        p = distributed.plan(world_size=self.world_size, rank=env.dist.rank, cuda=cuda,
                             guidance=guidance, num_heads=num_attention_heads(env.model_dir),
                             model=ns.model, strategy=ns.strategy)
        import_libraries()
        if self.engine is None:
            distributed.init_process_group(p, cuda=cuda, local_rank=env.dist.local_rank,
                                           timeout_s=env.collective_timeout_s)
        self.engine = None
        gc.unfreeze()  # a reload: what the old pipeline held may be collected now
        self._release()
        self.engine = Engine.load(env.model_dir, plan=p, local_rank=env.dist.local_rank,
                                  options=options or self._options(ns))
        if self.rank0:  # what postprocess needs, so the first task does not pay for it
            for name in ("av", "PIL.ImageDraw", "vidmaas.storage"):
                with contextlib.suppress(ImportError):
                    importlib.import_module(name)
        # What lives as long as the worker leaves the collector's sight: the collection
        # after each task scans only what it made (else ~0.4 s before it is ready again).
        gc.collect()
        gc.freeze()
        log.info("worker %s: %s loaded in %.1fs (%s)", self.worker_id, ns.model,
                 time.perf_counter() - t, self.engine.placement.describe())

    # ------------------------------------------------------------------ assignments

    def _next(self) -> _Task | str | None:
        """The next task on every rank; ``exit``; or None (nothing yet, or a task that
        ended before generation)."""
        from vidmaas.bus.pools import Assignment

        message: str | None = None
        task: _Task | None = None
        if self.rank0:
            from redis.exceptions import RedisError

            try:
                message, task = self._take()
            except RedisError as e:  # a blip: the lease thread keeps trying meanwhile
                log.warning("worker %s: redis error while idle: %s", self.worker_id, e)
                time.sleep(1.0)
        if self.world_size > 1:
            import torch.distributed as dist

            box: list[Any] = [message]
            dist.broadcast_object_list(box, src=0)
            message = box[0]
        if message is None:
            return None
        if message == "exit":
            return "exit"
        if task is None:  # another rank: the same arguments parse the same way
            a = Assignment.decode(message)
            task = _Task(a, self._context(a, self._parse(a)))
        return task

    def _take(self) -> tuple[str | None, _Task | None]:
        """Rank 0: wait for an assignment and do what comes before the generation."""
        assert self.link is not None
        if self._leaving is not None:
            log.info("worker %s: exiting to be replaced: %s", self.worker_id, self._leaving)
            self._leave()
            return "exit", None
        if self._finished_task:
            if not self.link.ready(finished_task=True):
                log.info("worker %s: drained; exiting", self.worker_id)
                return "exit", None
            self._finished_task = False
        a = self.link.next_assignment(timeout_s=IDLE_POLL_S)
        if a is None:
            return None, None
        if a.exit or a.task_id is None:
            log.info("worker %s: drained; exiting", self.worker_id)
            return "exit", None
        self._finished_task = True
        log.info("task_id=%s on worker %s (attempt %d)", a.task_id, self.worker_id, a.attempt)
        ctx: Context | None = None
        try:
            args = self._parse(a)
            ctx = self._context(a, args)
            ctx.reporter.started(world_size=self.world_size, host=self.env.host,
                                 worker=self.worker_id)
            ctx.check_cancel()
            self._before_generate(ctx)
        except Exception as e:
            self._ended(a, ctx, e)
            return None, None
        return a.encode(), _Task(a, ctx)

    def _parse(self, a: Assignment) -> JobArgs:
        return JobArgs.from_namespace(_task_parser().parse_args(a.args))

    def _context(self, a: Assignment, args: JobArgs) -> Context:
        from vidmaas.bus.pools import fence_value
        from vidmaas.runtime.steps import Context

        assert a.task_id is not None
        work = self.env.work_dir / "tasks" / f"{a.task_id}-{a.attempt}"
        if self.env.dist.local_rank == 0:
            shutil.rmtree(work, ignore_errors=True)
        env = dataclasses.replace(self.env, task_id=a.task_id, attempt=a.attempt,
                                  work_dir=work)
        reporter = Reporter(task_id=a.task_id, redis_url=self.env.redis_url,
                            work_dir=WorkDir(work), reports=self.rank0,
                            reports_outcome=self.rank0,
                            heartbeat_interval_s=self.env.heartbeat_interval_s,
                            progress_interval_s=self.env.progress_interval_s,
                            fence=fence_value(self.worker_id, a.attempt), client=self.client)
        return Context(env=env, args=args, reporter=reporter)

    def _before_generate(self, ctx: Context) -> None:
        from vidmaas.runtime import steps
        from vidmaas.runtime.engine import check_image_use, read_model_index

        assert ctx.env.model_dir is not None
        check_image_use(read_model_index(ctx.env.model_dir), has_image=bool(ctx.args.image))
        steps.fetch_input(ctx)

    # ------------------------------------------------------------------ one task

    def _run(self, task: _Task) -> None:
        from vidmaas.runtime import steps

        ctx, a = task.ctx, task.assignment
        error: BaseException | None = None
        try:
            with ctx.reporter.heartbeats():
                wanted = self._options(ctx.args)
                assert self.engine is not None
                if wanted != self.engine.options:
                    log.info("task_id=%s needs other load options; loading again", a.task_id)
                    self._load(wanted)
                if self.env.dist.node_rank != 0 and self.env.dist.local_rank == 0:
                    steps.fetch_input(ctx)  # another node's disk
                t = time.perf_counter()
                steps.generate_with(ctx, self.engine, timings={})
                if self.rank0:
                    steps.postprocess_step(ctx)
                    log.info("task_id=%s done on worker %s in %.2fs", a.task_id,
                             self.worker_id, time.perf_counter() - t)
        except BaseException as e:  # every way a task ends but success; see _ended
            error = e
        finally:
            self._ended(a, ctx, error)

    def _ended(self, a: Assignment, ctx: Context | None, error: BaseException | None) -> None:
        """Report how the task ended (rank 0), count it, free what it held, and decide
        whether the worker must go."""
        fatal = False
        stop: BaseException | None = None
        if error is None:
            self.failures_in_a_row = 0
        elif isinstance(error, Cancelled):
            if ctx is not None and error.by != SUPERSEDED:
                ctx.reporter.cancelled(by=error.by)
        else:
            self.failures_in_a_row += 1
            if isinstance(error, (Terminated, KeyboardInterrupt)):
                stop = error
            err: JobError = classify(error) if isinstance(error, Exception) else \
                Terminated("interrupted")
            by = ctx.reporter.cancel_requested() if stop is not None and ctx else None
            if ctx is None:
                if self.rank0:
                    self._fail_unparsed(a, err)
            elif by is not None and by != SUPERSEDED:
                ctx.reporter.cancelled(by=by)  # stopped while a cancel was asked
            else:
                if err.exit_code == ExitCode.INFRA_ERROR and stop is None:
                    log.error("task_id=%s failed on worker %s", a.task_id, self.worker_id,
                              exc_info=error)
                ctx.reporter.failed(code=err.code, message=err.message,
                                    retryable=err.retryable)
            # Several ranks: a failure mid-generation may leave the others in a collective.
            fatal = self.world_size > 1 and not isinstance(error, BadInput)
        if ctx is not None:
            ctx.reporter.close()
            if self.env.dist.local_rank == 0:
                shutil.rmtree(ctx.env.work_dir, ignore_errors=True)
        self._release()
        self.tasks_done += 1
        if stop is not None:
            raise stop
        if self.rank0:
            self._leaving = self._limit_reached(fatal=fatal)
        elif fatal:
            raise SystemExit(ExitCode.INFRA_ERROR)

    def _fail_unparsed(self, a: Assignment, err: JobError) -> None:
        """A task whose arguments do not parse: its ``failed`` event, fenced all the same."""
        from vidmaas.bus.events import publish_fenced_sync
        from vidmaas.bus.pools import fence_value
        from vidmaas.domain import events as ev

        assert a.task_id is not None
        log.error("task_id=%s failed code=%s: %s", a.task_id, err.code, err.message)
        with contextlib.suppress(Exception):
            publish_fenced_sync(self.client, ev.failed(a.task_id, code=err.code,
                                                       message=err.message,
                                                       retryable=err.retryable),
                                fence=fence_value(self.worker_id, a.attempt))

    def _release(self) -> None:
        """Give back what the last task allocated (the loaded model stays)."""
        gc.collect()
        if self.engine is not None:
            self.engine.components.moves.clear()
        with contextlib.suppress(Exception):
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def _limit_reached(self, *, fatal: bool) -> str | None:
        lim = self.limits
        if self.engine is None:
            return "the model could not be loaded again for a task's options"
        if fatal:
            return "a task failed mid-generation with several ranks"
        if lim.max_failures and self.failures_in_a_row >= lim.max_failures:
            return f"{self.failures_in_a_row} failed tasks in a row"
        if lim.max_tasks and self.tasks_done >= lim.max_tasks:
            return f"{self.tasks_done} tasks done"
        rss = rss_mib()
        if lim.max_rss_mib and rss > lim.max_rss_mib:
            return f"resident memory {rss:.0f} MiB is above {lim.max_rss_mib} MiB"
        return None
