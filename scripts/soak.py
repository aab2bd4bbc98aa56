"""The long crash-and-restart soak (the short one runs in the test suite).

Runs ``vidmaas api``, ``vidmaas dispatcher`` ×2 and ``vidmaas relay`` ×2 as separate
processes on a fresh PostgreSQL database and an append-only Redis (``appendfsync
everysec``), with the local executor and the tiny models (made with ``vidmaas models
make-tiny``), submits a few hundred tasks from several users while a chaos loop
SIGKILLs and restarts the roles, restarts Redis and kills job processes, and, if asked,
restarts PostgreSQL, stops the object store and kills warm pool workers. Then it
checks that nothing was lost, doubled, applied twice, run twice at once or run over
capacity, that the outbox drained, and that every completed task's video is in the
store and decodes. Prints the counts; exits 1 on any violation. Bounded: chaos stops
after ``--chaos-s``, draining after ``--drain-s``.

    .venv/bin/python scripts/soak.py [--tasks 300] [--users 5] [--capacity 2]
                                     [--dispatchers 2] [--relays 2]
                                     [--chaos-s 900] [--interval-s 4 10]
                                     [--submit-s 600] [--drain-s 900] [--seed 1]
                                     [--redis-kill graceful|hard] [--pg-restart]
                                     [--s3-outage] [--s3] [--pools on|off]
                                     [--pool-min 1] [--keep]

``--redis-kill hard``: the Redis action is a SIGKILL (default ``graceful``: SIGTERM,
Redis writes its append-only file). ``--pg-restart``: run on a private PostgreSQL
cluster (``initdb`` in the work directory, a free port, trust authentication) and add
its restart to the chaos, ``pg_ctl restart -m fast`` and every second time ``-m
immediate``. ``--s3-outage``: store objects in a private SeaweedFS (``weed mini``) and
add stopping it for a few seconds to the chaos; ``--s3`` uses that store without the
outages. ``--pools on``: tiny-t2v is served by warm pool workers (``vidmaas-job
serve``, DESIGN §12; between ``--pool-min`` and ``--capacity`` workers, idle ones
stopped after 20 s) and every third task asks for tiny-ti2v, which keeps one job per
task, so workers and jobs share the capacity; the chaos also SIGKILLs worker process
groups (a busy one when there is one), counted as ``worker`` kills (default ``off``:
every task is a job). ``--keep`` keeps the work directory.

Needs redis-server; PostgreSQL on 127.0.0.1:5432 (or VIDMAAS_TEST_PG_URL) unless
``--pg-restart`` (then the server binaries, ``initdb`` and ``pg_ctl``); ``weed`` for
``--s3``/``--s3-outage``.
"""

from __future__ import annotations

# A command-line script: its output is its report.
# ruff: noqa: T201
import argparse
import contextlib
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support.services import fresh_postgres, postgres_reachable
from tests.support.soak import SoakConfig, run_soak


def _stop_on_sigterm(_signum: int, _frame: object) -> None:
    raise SystemExit(143)  # unwinds through run_soak's cleanup: no process is left behind


def main() -> int:
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=300)
    parser.add_argument("--users", type=int, default=5)
    parser.add_argument("--capacity", type=int, default=2)
    parser.add_argument("--dispatchers", type=int, default=2)
    parser.add_argument("--relays", type=int, default=2)
    parser.add_argument("--chaos-s", type=float, default=900.0,
                        help="how long the random chaos lasts")
    parser.add_argument("--interval-s", type=float, nargs=2, default=(4.0, 10.0),
                        metavar=("MIN", "MAX"), help="pause between chaos actions")
    parser.add_argument("--submit-s", type=float, default=600.0,
                        help="submissions are spread over this long")
    parser.add_argument("--drain-s", type=float, default=900.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--redis-kill", choices=("graceful", "hard"), default="graceful",
                        help="how the chaos stops Redis (SIGTERM or SIGKILL)")
    parser.add_argument("--pg-restart", action="store_true",
                        help="run on a private PostgreSQL and restart it in the chaos")
    parser.add_argument("--s3-outage", action="store_true",
                        help="store objects in a private SeaweedFS and stop it in the chaos")
    parser.add_argument("--s3", action="store_true",
                        help="store objects in a private SeaweedFS (no outages)")
    parser.add_argument("--pools", choices=("on", "off"), default="off",
                        help="serve tiny-t2v by warm pool workers and kill them in the chaos")
    parser.add_argument("--pool-min", type=int, default=1,
                        help="with --pools on: workers kept even when idle")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()
    if not args.pg_restart and not postgres_reachable():
        print("PostgreSQL is not reachable on 127.0.0.1:5432", file=sys.stderr)
        return 2
    cfg = SoakConfig(tasks=args.tasks, users=args.users, capacity=args.capacity,
                     dispatchers=args.dispatchers, relays=args.relays,
                     chaos_duration_s=args.chaos_s, chaos_interval_s=tuple(args.interval_s),
                     submit_spread_s=args.submit_s, drain_timeout_s=args.drain_s,
                     seed=args.seed, redis_kill=args.redis_kill, pg_restart=args.pg_restart,
                     s3_outage=args.s3_outage, s3=args.s3, pools=args.pools == "on",
                     pool_min_workers=args.pool_min)
    work = Path(tempfile.mkdtemp(prefix="vidmaas-soak-"))
    models = work / "models"
    vidmaas = Path(sys.executable).parent / "vidmaas"
    for name, layout in (("tiny-t2v", "t2v"), ("tiny-ti2v", "ti2v")):
        subprocess.run([str(vidmaas), "models", "make-tiny", str(models / name),
                        "--layout", layout], check=True)
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        pg_url = None if args.pg_restart else stack.enter_context(fresh_postgres())
        report = run_soak(cfg, work=work, pg_url=pg_url, model_root=models,
                          log=lambda m: print(m, flush=True))
    print(f"\nsoak finished in {time.monotonic() - started:.0f} s (work directory {work})")
    print(report.summary())
    if not args.keep:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
