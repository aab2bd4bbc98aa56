"""``vidmaas-job serve``: the command line of a warm-pool worker (DESIGN §12).

Guarantees: ``add_serve_args`` accepts exactly what ``domain.workers.worker_args``
produces; ``serve`` needs ``VIDMAAS_WORKER_ID`` and a Redis URL, starts ``torchrun``
itself when the worker has several processes (as ``run`` does for a job; the executor
stops the whole process group), and otherwise runs ``runtime.worker.Worker`` on this
rank until it is drained, stopped or reaches a limit.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
from collections.abc import Sequence

from vidmaas.domain.jobs import ExitCode
from vidmaas.domain.workers import ENV_WORKER_ID, WorkerLimits
from vidmaas.runtime.errors import Terminated
from vidmaas.runtime.job import JobEnv, add_generation_args

log = logging.getLogger("vidmaas.runtime.serve")

HELP = "run as a warm-pool worker of one model: load it once, run assigned tasks"


def add_serve_args(parser: argparse.ArgumentParser) -> None:
    """``serve``'s arguments: exactly what ``domain.workers.worker_args`` produces."""
    defaults = WorkerLimits()
    parser.add_argument("--model", required=True, help="model id in the registry")
    parser.add_argument("--lease-s", type=float, default=defaults.lease_s,
                        help="the worker's lease in Redis, renewed every quarter of it")
    parser.add_argument("--max-tasks", type=int, default=0,
                        help="exit (to be replaced) after this many tasks; 0: never")
    parser.add_argument("--max-failures", type=int, default=defaults.max_failures,
                        help="exit after this many failed tasks in a row; 0: never")
    parser.add_argument("--max-rss-mib", type=int, default=0,
                        help="exit after a task that left the resident memory above this")
    add_generation_args(parser)


def serve(ns: argparse.Namespace, raw_args: Sequence[str]) -> int:
    """Run the worker until it is drained, stopped or reaches a limit; its exit code."""
    env = JobEnv.from_environ(os.environ)
    worker_id = os.environ.get(ENV_WORKER_ID, "").strip()
    if not worker_id or not env.redis_url:
        log.error("serve needs %s and VIDMAAS_REDIS_URL", ENV_WORKER_ID)
        return ExitCode.INFRA_ERROR
    if env.dist.job_world_size > 1 and not env.dist.under_torchrun:
        return _torchrun_serve(env, raw_args)
    limits = WorkerLimits(lease_s=ns.lease_s, max_tasks=ns.max_tasks,
                          max_failures=ns.max_failures, max_rss_mib=ns.max_rss_mib)
    from vidmaas.runtime.worker import Worker

    return Worker(env=env, ns=ns, worker_id=worker_id, limits=limits).run()


def _torchrun_serve(env: JobEnv, raw_args: Sequence[str]) -> int:
    from vidmaas.runtime.steps import torchrun_prefix

    cmd = [*torchrun_prefix(env), "-m", "vidmaas.runtime.cli", "serve", *raw_args]
    log.info("worker: starting %s", " ".join(cmd[:12]))
    proc = subprocess.Popen(cmd)
    try:
        return proc.wait()
    except (Terminated, KeyboardInterrupt):
        return proc.wait()  # the executor signals the whole group: torchrun stops them
    finally:
        if proc.poll() is None:
            proc.kill()


