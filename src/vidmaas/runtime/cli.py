"""``vidmaas-job``: the job runtime's command line (DESIGN §5).

Guarantees:
- ``vidmaas-job --help`` imports neither torch nor diffusers, and nothing reads the
  environment before a command runs.
- Every command ends in exactly one exit code from ``domain.jobs.ExitCode``; for the
  job a failure is also exactly one ``failed`` event (``cancelled`` for a cancel),
  sent by the first rank on node 0 to fail, with the code and ``retryable`` flag
  that ``runtime.errors`` chooses. SIGTERM (the executor's hard stop) ends the job
  the same way: ``cancelled`` if a cancel was requested, otherwise a retryable
  ``failed``. A full disk (``disk_full``) first frees the work directory's inputs and
  outputs (``WorkDir.discard_outputs``), so the event can be written and the next task
  finds the space.
- ``serve`` is a warm-pool worker instead of one task (``runtime.serve``, DESIGN §12).
- Logs go to stderr, one line per state change, each with the task id.
- ``main`` ends the process without the interpreter's slow teardown of torch once
  the command has finished everything it does.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import traceback
from collections.abc import Callable, Sequence
from types import FrameType
from typing import TYPE_CHECKING

from vidmaas.domain.jobs import ExitCode
from vidmaas.runtime.errors import Cancelled, DiskFull, JobError, Terminated, classify
from vidmaas.runtime.job import JobArgParser, JobArgs, JobEnv, WorkDir, add_job_args

if TYPE_CHECKING:
    from vidmaas.runtime import steps
    from vidmaas.runtime.reporter import Reporter

log = logging.getLogger("vidmaas.runtime")

COMMANDS: dict[str, str] = {
    "fetch-input": "download the input image (--image KEY) into VIDMAAS_WORK_DIR",
    "generate": "generate the frames (run under torchrun; rank 0 reports progress)",
    "postprocess": "watermark, encode H.264, poster, spritesheet, upload, report completed "
                   "(node rank 0)",
    "run": "fetch-input, then generate (under torchrun if the job has several processes), "
           "then postprocess",
}
SERVE = "serve"


def build_parser() -> argparse.ArgumentParser:
    parser = JobArgParser(
        prog="vidmaas-job",
        description="The vidmaas job runtime: one video generation task inside its job. "
                    "Configured by VIDMAAS_* environment variables (see docs/runtime.md).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_ in COMMANDS.items():
        add_job_args(sub.add_parser(name, help=help_, description=help_))
    from vidmaas.runtime.serve import HELP, add_serve_args

    add_serve_args(sub.add_parser(SERVE, help=HELP, description=HELP))
    return parser


def _on_sigterm(_signum: int, _frame: FrameType | None) -> None:
    raise Terminated("the job was stopped (SIGTERM)")


def execute(argv: Sequence[str] | None = None) -> int:
    """Run one command; its exit code."""
    from vidmaas.runtime import steps
    from vidmaas.runtime.reporter import Reporter

    raw = list(sys.argv[1:] if argv is None else argv)
    ns = build_parser().parse_args(raw)
    env = JobEnv.from_environ(os.environ)
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr,
        format=f"%(asctime)s %(levelname)s rank={env.dist.rank} %(name)s %(message)s")
    if ns.command == SERVE:
        from vidmaas.runtime.serve import serve

        return serve(ns, raw[raw.index(SERVE) + 1:])
    reporter = Reporter(task_id=env.task_id, redis_url=env.redis_url,
                        work_dir=WorkDir(env.work_dir), reports=env.dist.is_reporter,
                        reports_outcome=env.dist.reports_outcome,
                        heartbeat_interval_s=env.heartbeat_interval_s,
                        progress_interval_s=env.progress_interval_s)
    step: Callable[[steps.Context], None] = {
        "fetch-input": steps.fetch_input, "generate": steps.generate,
        "postprocess": steps.postprocess_step, "run": steps.run}[ns.command]
    code = _run(ns, env, reporter, step)
    if code != ExitCode.OK:
        WorkDir(env.work_dir).record_exit_code(code)
    return code


def _run(ns: argparse.Namespace, env: JobEnv, reporter: Reporter,
         step: Callable[[steps.Context], None]) -> int:
    from vidmaas.runtime import steps

    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    log.info("task_id=%s %s starting (rank %d of %d)", env.task_id, ns.command,
             env.dist.rank, env.dist.world_size)
    try:
        with reporter.heartbeats():
            args = JobArgs.from_namespace(ns)
            step(steps.Context(env=env, args=args, reporter=reporter))
        log.info("task_id=%s %s done", env.task_id, ns.command)
        return ExitCode.OK
    except steps.StepExited as e:
        return e.code
    except Cancelled as e:
        reporter.cancelled(by=e.by)
        return ExitCode.CANCELLED
    except (Exception, KeyboardInterrupt) as e:  # the one place every failure ends up
        err: JobError = classify(e) if isinstance(e, Exception) else Terminated("interrupted")
        if isinstance(err, Terminated):
            by = reporter.cancel_requested()
            if by is not None:
                reporter.cancelled(by=by)
                return ExitCode.CANCELLED
        if isinstance(err, DiskFull):
            WorkDir(env.work_dir).discard_outputs()
        if err.exit_code == ExitCode.INFRA_ERROR and not isinstance(err, Terminated):
            log.error("task_id=%s %s", env.task_id, "".join(traceback.format_exception(e)))
        reporter.failed(code=err.code, message=err.message, retryable=err.retryable)
        return err.exit_code
    finally:
        signal.signal(signal.SIGTERM, previous)
        reporter.close()


def main(argv: Sequence[str] | None = None) -> None:
    """The ``vidmaas-job`` console script; ends the process with the command's exit code."""
    code = int(execute(argv))
    if "torch" not in sys.modules:
        sys.exit(code)
    # The interpreter's teardown of torch and diffusers takes seconds (as long as the
    # whole generation of a small video). By now every event is sent, every file is
    # written and closed and the process group is gone, so only the logs need flushing.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
