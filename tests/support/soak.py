"""The crash-and-restart soak: the roles as separate processes under a chaos loop.

``run_soak(config, ...)`` starts Redis (append-only, ``appendfsync everysec``, the
production setting), ``vidmaas api``, ``vidmaas dispatcher`` ×N and ``vidmaas relay`` ×M
on a PostgreSQL database, all on 127.0.0.1, with the local executor running the tiny
model. Several users submit tasks (each with an ``Idempotency-Key``, retried until
accepted, so a create lost to a crash is retried and never doubled) while a chaos loop
SIGKILLs and restarts roles, stops Redis (SIGTERM, or SIGKILL with ``redis_kill="hard"``)
and starts it again on its files, and SIGKILLs job process groups (found by
``VIDMAAS_TASK_ID`` in their environment). With ``pools`` the soak's model is served by
warm pool workers (DESIGN §12: ``vidmaas-job serve`` process groups of the local
executor, between ``pool_min_workers`` and ``capacity`` of them), every third task asks
for ``job_model`` instead, which keeps one job per task, so workers and jobs share the
capacity, and the chaos also SIGKILLs worker process groups (found by
``VIDMAAS_WORKER_ID``; a busy one when there is one). With ``pg_restart`` the database is a private
PostgreSQL cluster, restarted by ``pg_ctl restart -m fast`` and every second time ``-m
immediate``; with ``s3_outage`` objects live in a private SeaweedFS that is stopped for
a few seconds and started again. One action runs at a time. A sampler watches, several
times a second, the capacity leases in Redis and the job and worker processes alive. After the
chaos the system is given time to drain (every task terminal, the outbox empty), then
stopped.

The report counts each kind of kill and checks the promises of DESIGN §2 and §4:
- nothing accepted is lost: every accepted id exists, one task per idempotency key;
- every task is terminal, or queued and really in the queue;
- no task ran two jobs at the same time (never two live job process groups for one
  task; at most one ``started`` event per ``dispatched`` attempt in its stream);
- capacity was never exceeded: the sum of leases never passes it, nor the number of
  live job and worker groups holding a lease plus the jobs that outlived theirs by over
  15 s (a job exits a moment after its terminal event frees its capacity) and the
  workers that did by over ``WORKER_UNLEASED_GRACE_S`` (a retired worker is killed a
  moment after its GPUs are freed; an unregistered one is stopped after a lease time);
- with pools, no task is busy on two workers at once, nor on a worker while a job of
  it holds a lease (the registry in Redis);
- events applied once per task stream: no event id twice, no attempt ``dispatched``
  twice, at most one final ``completed``/``cancelled``/non-retryable ``failed``, and the
  usage table records exactly one task end per finished task (a terminal event applied
  twice would count twice);
- the outbox drained to zero;
- every completed task's video is in the store (read back from it, S3 included) and
  decodes with PyAV (all frames), and its poster is there.

Used by ``tests/soak/test_soak_short.py`` (short) and ``scripts/soak.py`` (long). Every
stage is bounded in time; the run stops by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

from tests.support.services import (
    PrivatePostgres,
    PrivateSeaweedFS,
    free_port,
    private_postgres,
    private_seaweedfs,
    redis_server_binary,
    wait_port,
)

TERMINAL = {"completed", "failed", "cancelled"}
JOB_ENV = "VIDMAAS_TASK_ID"
WORKER_ENV = "VIDMAAS_WORKER_ID"
UNLEASED_GRACE_S = 15.0
"""How long a job may outlive its task's lease (exiting after its terminal event)."""
POOL_WORKER_LEASE_S = 10.0
"""The pool workers' lease in the soak (``VIDMAAS_POOLS_WORKER_LEASE_S``)."""
POOL_STOP_GRACE_S = 3.0
WORKER_UNLEASED_GRACE_S = POOL_WORKER_LEASE_S + POOL_STOP_GRACE_S + UNLEASED_GRACE_S
"""How long a worker process may outlive its GPU lease: a process with no registration
is stopped once it stayed so a whole lease time, then given the stop grace."""
ROLE_ACTIONS = ("api", "dispatcher", "relay", "redis", "job")
POOL_ACTIONS = ("worker",)
"""Actions with ``pools``: SIGKILL a pool worker's process group."""
FAULT_ACTIONS = ("redis-hard", "redis-graceful", "pg", "s3")
"""Explicit-schedule actions besides ``ROLE_ACTIONS`` (``redis`` follows ``redis_kill``;
``pg`` needs ``pg_restart``, ``s3`` needs ``s3_outage``)."""


@dataclass
class SoakConfig:
    tasks: int = 300
    users: int = 5
    capacity: int = 2
    dispatchers: int = 2
    relays: int = 2
    chaos: list[str] | None = None
    """An explicit schedule of actions (from ``ROLE_ACTIONS``); None draws at random."""
    chaos_duration_s: float = 600.0
    """Random chaos stops after this long (an explicit schedule stops when done)."""
    chaos_interval_s: tuple[float, float] = (3.0, 8.0)
    submit_spread_s: float = 60.0
    """Submissions are spread over this long."""
    drain_timeout_s: float = 600.0
    max_attempts: int = 4
    seed: int = 1
    model: str = "tiny-t2v"
    redis_kill: str = "graceful"
    """How the ``redis`` action stops Redis: ``graceful`` (SIGTERM: it writes its
    append-only file) or ``hard`` (SIGKILL, with ``appendfsync everysec``: the last
    second of writes may be lost)."""
    pg_restart: bool = False
    """Run on a private PostgreSQL cluster and restart it (``pg``): ``pg_ctl restart``
    with ``-m fast``, every second time ``-m immediate`` (a crash and recovery)."""
    s3_outage: bool = False
    """Store objects in a private SeaweedFS and stop it for a few seconds (``s3``)."""
    s3: bool = False
    """Store objects in a private SeaweedFS (implied by ``s3_outage``); else a directory."""
    s3_outage_s: tuple[float, float] = (2.0, 6.0)
    """How long an S3 outage lasts."""
    pools: bool = False
    """Serve ``model`` by warm pool workers (between ``pool_min_workers`` and ``capacity``)
    and add killing them (``worker``) to the chaos; off: every task is a job."""
    pool_min_workers: int = 1
    pool_idle_s: float = 20.0
    """An idle worker above the minimum is stopped after this long."""
    job_model: str | None = "tiny-ti2v"
    """With ``pools``, every ``job_every``-th task asks for this unpooled model (one job
    per task), so jobs and workers share the capacity; None: every task asks for
    ``model``."""
    job_every: int = 3
    target_wait_s: float = 5.0
    """The ``job`` and ``worker`` actions wait up to this long for a job, or a busy
    worker, to kill (then kill an idle worker, or count the action as ``none running``)."""

    def actions(self) -> tuple[str, ...]:
        """What random chaos draws from."""
        extra = (("pg",) if self.pg_restart else ()) + (("s3",) if self.s3_outage else ())
        return ROLE_ACTIONS + (POOL_ACTIONS if self.pools else ()) + extra

    def task_model(self, i: int) -> str:
        """The model task ``i`` asks for."""
        if self.pools and self.job_model is not None and i % self.job_every == \
                self.job_every - 1:
            return self.job_model
        return self.model

    def pool_env(self) -> dict[str, str]:
        """The roles' pool settings."""
        if not self.pools:
            return {"VIDMAAS_POOLS_ENABLED": "false"}
        return {
            "VIDMAAS_POOLS_ENABLED": "true",
            "VIDMAAS_POOLS_MODELS": json.dumps({self.model: {
                "min_workers": self.pool_min_workers, "max_workers": self.capacity,
                "idle_s": self.pool_idle_s}}),
            "VIDMAAS_POOLS_WORKER_LEASE_S": str(POOL_WORKER_LEASE_S),
            "VIDMAAS_POOLS_STOP_GRACE_S": str(POOL_STOP_GRACE_S),
            "VIDMAAS_POOLS_START_TIMEOUT_S": "180",
            "VIDMAAS_POOLS_MANAGE_INTERVAL_S": "1",
        }


@dataclass
class SoakReport:
    accepted: int = 0
    submitted: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    kills: Counter[str] = field(default_factory=Counter)
    videos_decoded: int = 0
    frames_decoded: int = 0
    max_leases: int = 0
    max_live_jobs: int = 0
    max_unleased_s: float = 0.0
    jobs_seen: int = 0
    workers_seen: int = 0
    """Pool worker process groups seen (with ``pools``)."""
    max_live_workers: int = 0
    max_worker_unleased_s: float = 0.0
    """Longest a live worker group was seen without its GPU lease."""
    max_busy_workers: int = 0
    samples: int = 0
    attempts: Counter[int] = field(default_factory=Counter)
    legitimately_queued: int = 0
    streams_checked: int = 0
    events_checked: int = 0
    duplicate_events: int = 0
    """Events found twice in one task stream (a dispatch of one attempt, a completion…)."""
    outbox_left: int = -1
    """Outbox rows still waiting when the roles stopped (must be 0; -1: not read)."""
    usage_task_ends: int = 0
    """Task ends recorded in the usage table (one per terminal task: applied once)."""
    violations: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    _violation_counts: Counter[str] = field(default_factory=Counter)

    @property
    def ok(self) -> bool:
        return not self.violations

    def violate(self, kind: str, detail: str) -> None:
        """Record a violation; repeated samples of one kind count instead of repeating."""
        self._violation_counts[kind] += 1
        if self._violation_counts[kind] == 1:
            self.violations.append(detail)

    def summary(self) -> str:
        lines = [
            f"submitted {self.submitted}, accepted {self.accepted}",
            "statuses: " + ", ".join(f"{k} {v}" for k, v in sorted(self.statuses.items())),
            f"still queued (in the queue): {self.legitimately_queued}",
            "attempts per task: " + ", ".join(f"{k}: {v}" for k, v in
                                               sorted(self.attempts.items())),
            "kills/restarts: " + ", ".join(f"{k} {v}" for k, v in sorted(self.kills.items())),
            f"videos decoded: {self.videos_decoded} ({self.frames_decoded} frames)",
            f"events: {self.events_checked} in {self.streams_checked} task streams, "
            f"{self.duplicate_events} applied or published twice; usage records "
            f"{self.usage_task_ends} task ends; outbox left {self.outbox_left}",
            f"capacity: max leases {self.max_leases}, max live job groups "
            f"{self.max_live_jobs} over {self.samples} samples; {self.jobs_seen} job "
            f"process groups seen; longest a job outlived its lease "
            f"{self.max_unleased_s:.1f} s",
            f"pool workers: {self.workers_seen} process groups seen, at most "
            f"{self.max_live_workers} live and {self.max_busy_workers} busy at once; "
            f"longest a worker was seen without its lease {self.max_worker_unleased_s:.1f} s",
            "timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in self.timings.items()),
        ]
        if self.violations:
            lines.append(f"VIOLATIONS ({len(self.violations)} kinds, "
                         f"{sum(self._violation_counts.values())} observations):")
            lines += [f"  - {v}" for v in self.violations[:50]]
        else:
            lines.append("no violations")
        return "\n".join(lines)


def _bin(name: str) -> str:
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


# ---------------------------------------------------------------- processes


class Cluster:
    """Redis and the roles as child processes that can be killed and started again."""

    def __init__(self, *, work: Path, pg_url: str, model_root: Path, cfg: SoakConfig,
                 pg: PrivatePostgres | None = None, weed: PrivateSeaweedFS | None = None,
                 ) -> None:
        self.work = work
        self.cfg = cfg
        self.pg = pg
        """The private PostgreSQL the ``pg`` action restarts (None: a shared server)."""
        self.weed = weed
        """The private SeaweedFS holding the objects (None: a directory)."""
        self.s3_prefix = f"soak-{cfg.seed}"
        self.redis_port = free_port()
        self.api_port = free_port()
        self.redis_url = f"redis://127.0.0.1:{self.redis_port}/0"
        self.base_url = f"http://127.0.0.1:{self.api_port}"
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.logs = work / "logs"
        self.job_root = work / "jobs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.env = {
            **os.environ,
            "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""),
            "VIDMAAS_DATABASE_URL": pg_url,
            "VIDMAAS_DATABASE_POOL_SIZE": "5",
            "VIDMAAS_REDIS_URL": self.redis_url,
            "VIDMAAS_STORAGE_URL": (work / "objects").as_uri(),
            "VIDMAAS_EXECUTOR": "local",
            "VIDMAAS_GPU_CAPACITY": str(cfg.capacity),
            "VIDMAAS_MODEL_ROOT": str(model_root),
            "VIDMAAS_DEFAULT_MODEL": cfg.model,
            "VIDMAAS_LOCAL_WORK_ROOT": str(self.job_root),
            "VIDMAAS_API_MAX_QUEUED_PER_USER": "100000",
            "VIDMAAS_DISPATCHER_PER_USER_RUNNING_CAP": str(cfg.capacity),
            "VIDMAAS_DISPATCHER_MAX_ATTEMPTS": str(cfg.max_attempts),
            "VIDMAAS_DISPATCHER_RETRY_BACKOFF_S": "0.5",
            "VIDMAAS_DISPATCHER_RECONCILE_INTERVAL_S": "2",
            "VIDMAAS_DISPATCHER_CLAIM_LEASE_S": "6",
            "VIDMAAS_DISPATCHER_HEARTBEAT_TIMEOUT_S": "30",
            "VIDMAAS_DISPATCHER_DISPATCHING_TIMEOUT_S": "30",
            "VIDMAAS_DISPATCHER_CANCEL_GRACE_S": "3",
            "VIDMAAS_RUNTIME_HEARTBEAT_INTERVAL_S": "2",
            "VIDMAAS_LOG_LEVEL": "INFO",
            "OMP_NUM_THREADS": "1",
            **cfg.pool_env(),
        }
        if weed is not None:
            server = weed.server
            self.env.update({
                "VIDMAAS_STORAGE_URL": f"s3://{server.bucket}/{self.s3_prefix}",
                "VIDMAAS_STORAGE_S3_ENDPOINT_URL": server.endpoint_url,
                "VIDMAAS_STORAGE_S3_ACCESS_KEY_ID": server.access_key,
                "VIDMAAS_STORAGE_S3_SECRET_ACCESS_KEY": server.secret_key,
                "VIDMAAS_STORAGE_REDIRECT_DOWNLOADS": "false",
                # A job outlasts an outage of a few seconds and its restart.
                "VIDMAAS_STORAGE_RETRY_ATTEMPTS": "12",
                "VIDMAAS_STORAGE_RETRY_TOTAL_S": "60",
            })

    # -- Redis

    def start_redis(self) -> None:
        binary = redis_server_binary()
        if binary is None:
            raise RuntimeError("redis-server is not installed")
        data = self.work / "redis"
        data.mkdir(exist_ok=True)
        log = (self.logs / "redis.log").open("ab")
        proc = subprocess.Popen(
            [binary, "--port", str(self.redis_port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "yes", "--appendfsync", "everysec", "--dir", str(data),
             "--protected-mode", "no", "--loglevel", "warning"],
            stdout=log, stderr=subprocess.STDOUT)
        self.procs["redis"] = proc
        wait_port(self.redis_port, proc=proc)

    def restart_redis(self) -> None:
        """Stop Redis (it writes its append-only file) and start it on the same port."""
        proc = self.procs["redis"]
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        time.sleep(0.5)
        self.start_redis()

    def kill_redis(self, down_s: float) -> None:
        """SIGKILL Redis (what ``appendfsync everysec`` had not synced is lost), leave it
        down ``down_s`` and start it on the same port and files."""
        proc = self.procs["redis"]
        proc.kill()
        proc.wait()
        time.sleep(down_s)
        self.start_redis()

    def restart_postgres(self, mode: str) -> None:
        """``pg_ctl restart -m mode`` of the private PostgreSQL (same port and data)."""
        assert self.pg is not None, "the pg action needs SoakConfig.pg_restart"
        self.pg.restart(mode=mode)

    def s3_outage(self, down_s: float) -> None:
        """Stop the private SeaweedFS, leave it down ``down_s``, start it again."""
        assert self.weed is not None, "the s3 action needs SoakConfig.s3_outage"
        self.weed.stop()
        time.sleep(down_s)
        self.weed.start()

    def read_object(self, key: str) -> bytes:
        """An object's bytes from the store the roles use (raises if it is missing)."""
        if self.weed is None:
            return (self.work / "objects" / key).read_bytes()
        client: Any = self.weed.server.client()
        return bytes(client.get_object(Bucket=self.weed.server.bucket,
                                       Key=f"{self.s3_prefix}/{key}")["Body"].read())

    # -- roles

    def start_role(self, name: str) -> None:
        role = name.split("-", maxsplit=1)[0]
        args = [_bin("vidmaas"), role]
        if role == "api":
            args += ["--host", "127.0.0.1", "--port", str(self.api_port)]
        log = (self.logs / f"{name}.log").open("ab")
        # Each dispatcher/relay serves its probes on a port of its own, on 127.0.0.1.
        env = {**self.env, "VIDMAAS_METRICS_HOST": "127.0.0.1",
               "VIDMAAS_METRICS_PORT": str(free_port())}
        self.procs[name] = subprocess.Popen(args, env=env, stdout=log,
                                            stderr=subprocess.STDOUT)

    def role_names(self) -> list[str]:
        return (["api"] + [f"dispatcher-{i}" for i in range(self.cfg.dispatchers)]
                + [f"relay-{i}" for i in range(self.cfg.relays)])

    def start_all(self) -> None:
        self.start_redis()
        for name in self.role_names():
            self.start_role(name)
        self.wait_api()

    def wait_api(self, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.base_url + "/healthz", timeout=2).status_code == 200:
                    return
            time.sleep(0.2)
        raise RuntimeError("the API did not come up:\n" + self.tail("api"))

    def kill_role(self, name: str) -> None:
        proc = self.procs.get(name)
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()

    def ensure_running(self) -> None:
        """Start any service or role that is not running (after the chaos)."""
        if self.pg is not None and not self.pg.running:
            self.pg.start()
        if self.weed is not None and self.weed.proc is None:
            self.weed.start()
        if self.procs["redis"].poll() is not None:
            self.start_redis()
        for name in self.role_names():
            proc = self.procs.get(name)
            if proc is None or proc.poll() is not None:
                self.start_role(name)
        self.wait_api()

    def stop_all(self) -> None:
        self.stop_roles()
        self.stop_redis()

    def stop_roles(self) -> None:
        """Stop the roles and kill any job left; Redis stays up for the final checks."""
        for name in reversed(list(self.procs)):
            if name == "redis":
                continue
            proc = self.procs[name]
            if proc.poll() is None:
                proc.terminate()
        for name, proc in self.procs.items():
            if name == "redis":
                continue
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        groups = {g for _, g, _ in job_processes(self.job_root)} | \
            {g for _, g in worker_processes(self.job_root)}
        for pgid in groups:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)

    def stop_redis(self) -> None:
        redis = self.procs.get("redis")
        if redis is not None and redis.poll() is None:
            redis.terminate()
            try:
                redis.wait(20)
            except subprocess.TimeoutExpired:
                redis.kill()
                redis.wait()

    def tail(self, name: str, chars: int = 3000) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""


def job_processes(work_root: Path) -> list[tuple[str, int, str]]:
    """(task id, process group, attempt) of every live job process whose work directory
    is under ``work_root`` (this soak's jobs only, never another run's)."""
    return _jobs_of(_our_processes(work_root))


def worker_processes(work_root: Path) -> list[tuple[str, int]]:
    """(worker id, process group) of every live pool worker process whose work directory
    is under ``work_root``."""
    return _workers_of(_our_processes(work_root))


def _jobs_of(procs: list[tuple[int, dict[str, str]]]) -> list[tuple[str, int, str]]:
    return [(task_id, pgid, env.get("VIDMAAS_ATTEMPT", "?")) for pgid, env in procs
            if (task_id := env.get(JOB_ENV))]


def _workers_of(procs: list[tuple[int, dict[str, str]]]) -> list[tuple[str, int]]:
    return [(worker_id, pgid) for pgid, env in procs
            if (worker_id := env.get(WORKER_ENV)) and not env.get(JOB_ENV)]


def _our_processes(work_root: Path) -> list[tuple[int, dict[str, str]]]:
    """(process group, environment) of every live process of ours whose work directory
    is under ``work_root``."""
    out = []
    me = os.getuid()
    root = str(work_root) + os.sep
    for proc in psutil.process_iter(["pid", "uids", "status"]):
        try:
            if proc.info["uids"] is None or proc.info["uids"].real != me:
                continue
            if proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            env = proc.environ()
            if env.get("VIDMAAS_WORK_DIR", "").startswith(root):
                out.append((os.getpgid(proc.pid), env))
        except (psutil.Error, ProcessLookupError, PermissionError):
            continue
    return out


# ---------------------------------------------------------------- watchers


class Sampler(threading.Thread):
    """Samples capacity leases, live job and worker groups and the pool registry until
    stopped."""

    def __init__(self, cluster: Cluster, report: SoakReport, capacity: int) -> None:
        super().__init__(name="soak-sampler", daemon=True)
        self.cluster = cluster
        self.report = report
        self.capacity = capacity
        self.stop_event = threading.Event()
        self.groups_seen: set[int] = set()
        self.worker_groups_seen: set[int] = set()
        self.unleased: dict[tuple[str, int], float] = {}
        """(task, group) of live jobs whose task holds no lease → first seen so."""
        self.unleased_workers: dict[tuple[str, int], float] = {}
        """(worker, group) of live workers holding no lease → first seen so."""
        self.lock = threading.Lock()

    def run(self) -> None:
        import redis

        from vidmaas.bus import keys

        client = redis.Redis.from_url(self.cluster.redis_url, socket_timeout=1,
                                      socket_connect_timeout=1)
        try:
            while not self.stop_event.wait(0.25):
                self.sample(client, keys.CAPACITY_LEASES)
        finally:
            client.close()

    def sample(self, client: Any, leases_key: str) -> None:
        from vidmaas.bus import keys

        report = self.report
        try:
            leased = {(k.decode() if isinstance(k, bytes) else k): int(v)
                      for k, v in client.hgetall(leases_key).items()}
            registry = {(k.decode() if isinstance(k, bytes) else k):
                        (v.decode() if isinstance(v, bytes) else v)
                        for k, v in client.hgetall(keys.POOL_WORKERS).items()}
        except Exception:
            leased = registry = None  # Redis is restarting
        ours = _our_processes(self.cluster.job_root)
        procs = _jobs_of(ours)
        workers = set(_workers_of(ours))
        by_task: dict[str, set[int]] = defaultdict(set)
        for task_id, pgid, _attempt in procs:
            by_task[task_id].add(pgid)
        groups = {(t, g) for t, g, _ in procs}
        now = time.monotonic()
        with self.lock:
            report.samples += 1
            self.groups_seen |= {g for _, g in groups}
            self.worker_groups_seen |= {g for _, g in workers}
            report.jobs_seen = len(self.groups_seen)
            report.workers_seen = len(self.worker_groups_seen)
            report.max_live_jobs = max(report.max_live_jobs, len(groups))
            report.max_live_workers = max(report.max_live_workers, len(workers))
            if leased is not None:
                self._check_capacity(leased, groups, workers, by_task, now)
            if registry is not None and leased is not None:
                self._check_registry(registry, leased, by_task)
            for task_id, pgids in by_task.items():
                if len(pgids) > 1:
                    report.violate(f"twice {task_id}", f"task {task_id} ran {len(pgids)} jobs "
                                   f"at once (process groups {sorted(pgids)})")

    def _check_capacity(self, leased: dict[str, int], groups: set[tuple[str, int]],
                        workers: set[tuple[str, int]], by_task: dict[str, set[int]],
                        now: float) -> None:
        from vidmaas.bus.pools import lease_member

        report = self.report
        leases = sum(leased.values())
        report.max_leases = max(report.max_leases, leases)
        if leases > self.capacity:
            report.violate("leases", f"leases sum to {leases} > capacity {self.capacity}")
        # A job whose task holds no lease may be finishing (its terminal event freed the
        # capacity; the process is exiting); a worker without one is being killed or
        # stopped. Past a grace period it is a process running outside capacity.
        lingering = _lingering(self.unleased, groups, lambda k: k[0] in leased, now,
                               UNLEASED_GRACE_S)
        lingering_workers = _lingering(self.unleased_workers, workers,
                                       lambda k: lease_member(k[0]) in leased, now,
                                       WORKER_UNLEASED_GRACE_S)
        if self.unleased:
            report.max_unleased_s = max(report.max_unleased_s,
                                        now - min(self.unleased.values()))
        if self.unleased_workers:
            report.max_worker_unleased_s = max(report.max_worker_unleased_s,
                                               now - min(self.unleased_workers.values()))
        counted = (sum(leased[k[0]] for k in groups if k[0] in leased) + len(lingering)
                   + sum(leased[lease_member(w)] for w, _ in workers
                         if lease_member(w) in leased) + len(lingering_workers))
        if counted > self.capacity:
            report.violate("jobs", f"{counted} GPUs held or outlived by live jobs and workers "
                           f"> capacity {self.capacity}: jobs {dict(by_task)}, workers "
                           f"{sorted(workers)}")
        for key in lingering:
            report.violate(f"unleased {key}", f"job group {key[1]} of task {key[0]} "
                           f"ran over {UNLEASED_GRACE_S:.0f} s without a lease")
        for key in lingering_workers:
            report.violate(f"unleased worker {key}", f"worker group {key[1]} ({key[0]}) "
                           f"ran over {WORKER_UNLEASED_GRACE_S:.0f} s without a lease")

    def _check_registry(self, registry: dict[str, str], leased: dict[str, int],
                        by_task: dict[str, set[int]]) -> None:
        """No task busy on two workers, nor on a worker and in a leased job."""
        report = self.report
        busy: dict[str, list[str]] = defaultdict(list)
        for worker_id, raw in registry.items():
            fields = raw.split("|")
            if len(fields) > 4 and fields[2] == "busy" and fields[4]:
                busy[fields[4]].append(worker_id)
        report.max_busy_workers = max(report.max_busy_workers,
                                      sum(len(v) for v in busy.values()))
        for task_id, on in busy.items():
            if len(on) > 1:
                report.violate(f"twice {task_id}", f"task {task_id} is busy on "
                               f"{len(on)} workers at once ({sorted(on)})")
            if task_id in by_task and task_id in leased:
                report.violate(f"twice {task_id}", f"task {task_id} is busy on worker "
                               f"{on[0]} while its job holds a lease")


def _lingering(since: dict[tuple[str, int], float], live: set[tuple[str, int]],
               holds: Any, now: float, grace_s: float) -> list[tuple[str, int]]:
    """Track the live groups that hold no lease in ``since`` (group → first seen so);
    those past ``grace_s``."""
    for key in list(since):
        if key not in live or holds(key):
            del since[key]
    for key in live:
        if not holds(key):
            since.setdefault(key, now)
    return [k for k, t in since.items() if now - t > grace_s]


class Submitter(threading.Thread):
    """Creates ``tasks`` tasks, each with its own Idempotency-Key, retried until accepted."""

    def __init__(self, cluster: Cluster, keys: list[str], cfg: SoakConfig,
                 deadline: float) -> None:
        super().__init__(name="soak-submitter", daemon=True)
        self.cluster = cluster
        self.keys = keys
        self.cfg = cfg
        self.deadline = deadline
        self.accepted: dict[str, str] = {}
        """idempotency key → task id"""
        self.gave_up: list[str] = []
        self.retries = 0

    def run(self) -> None:
        gap = self.cfg.submit_spread_s / max(1, self.cfg.tasks)
        with httpx.Client(base_url=self.cluster.base_url, timeout=10) as client:
            for i in range(self.cfg.tasks):
                user_key = self.keys[i % len(self.keys)]
                ikey = f"soak-{self.cfg.seed}-{i}"
                while time.monotonic() < self.deadline:
                    try:
                        r = client.post("/v1/tasks", json={
                            "prompt": f"soak task {i}: a kite over a hill", "model":
                            self.cfg.task_model(i), "seed": i},
                            headers={"Authorization": f"Bearer {user_key}",
                                     "Idempotency-Key": ikey})
                        if r.status_code == 202:
                            self.accepted[ikey] = r.json()["id"]
                            break
                    except httpx.HTTPError:
                        pass
                    self.retries += 1
                    time.sleep(0.3)
                else:
                    self.gave_up.append(ikey)
                time.sleep(gap)


# ---------------------------------------------------------------- chaos


def chaos(cluster: Cluster, cfg: SoakConfig, report: SoakReport, rng: random.Random,
          log: Any) -> None:
    """Run the chaos schedule (or random chaos for ``chaos_duration_s``)."""
    started = time.monotonic()
    schedule = list(cfg.chaos) if cfg.chaos is not None else None
    while True:
        if schedule is not None:
            if not schedule:
                return
            action = schedule.pop(0)
        else:
            if time.monotonic() - started > cfg.chaos_duration_s:
                return
            action = rng.choice(cfg.actions())
        time.sleep(rng.uniform(*cfg.chaos_interval_s))
        try:
            _act(cluster, cfg, report, rng, log, action)
        except Exception as e:  # a service that would not come back: say so, go on
            log(f"chaos: {action} failed: {e!r}")
            report.violate(f"chaos {action}", f"the chaos action {action} failed: {e!r}")


def _act(cluster: Cluster, cfg: SoakConfig, report: SoakReport, rng: random.Random,
         log: Any, action: str) -> None:
    """One chaos action."""
    if action == "redis":
        action = f"redis-{cfg.redis_kill}"
    if action == "redis-graceful":
        log("chaos: restarting Redis")
        cluster.restart_redis()
        report.kills["redis restart"] += 1
    elif action == "redis-hard":
        down = rng.uniform(0.2, 2.0)
        log(f"chaos: SIGKILL Redis, down {down:.1f} s")
        cluster.kill_redis(down)
        report.kills["redis hard kill"] += 1
    elif action == "pg":
        done = report.kills["pg restart fast"] + report.kills["pg restart immediate"]
        mode = "immediate" if done % 2 else "fast"
        log(f"chaos: pg_ctl restart -m {mode}")
        t0 = time.monotonic()
        cluster.restart_postgres(mode)
        log(f"chaos: PostgreSQL back after {time.monotonic() - t0:.1f} s")
        report.kills[f"pg restart {mode}"] += 1
    elif action == "s3":
        down = rng.uniform(*cfg.s3_outage_s)
        log(f"chaos: SeaweedFS stopped for {down:.1f} s")
        t0 = time.monotonic()
        cluster.s3_outage(down)
        log(f"chaos: SeaweedFS back after {time.monotonic() - t0:.1f} s")
        report.kills["s3 outage"] += 1
    elif action == "job":
        groups = _wait_for(lambda: sorted({(t, g) for t, g, _ in
                                           job_processes(cluster.job_root)}),
                           cfg.target_wait_s)
        if not groups:
            log("chaos: no job to kill")
            report.kills["job (none running)"] += 1
            return
        task_id, pgid = rng.choice(groups)
        log(f"chaos: SIGKILL job group {pgid} of task {task_id}")
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
        report.kills["job"] += 1
    elif action == "worker":
        _kill_worker(cluster, cfg, report, rng, log)
    else:
        names = [n for n in cluster.role_names() if n.split("-")[0] == action]
        name = rng.choice(names)
        log(f"chaos: SIGKILL {name}")
        cluster.kill_role(name)
        report.kills[action] += 1
        time.sleep(rng.uniform(0.2, 2.0))
        cluster.start_role(name)


def _wait_for(find: Any, timeout_s: float) -> Any:
    """``find()`` until it answers something (polled; at most ``timeout_s``)."""
    deadline = time.monotonic() + timeout_s
    while not (found := find()) and time.monotonic() < deadline:
        time.sleep(0.2)
    return found


def _busy_workers(cluster: Cluster) -> set[str]:
    """The workers the registry says are busy (empty while Redis is away)."""
    import redis

    from vidmaas.bus import keys

    with contextlib.suppress(Exception):
        client = redis.Redis.from_url(cluster.redis_url, socket_timeout=1,
                                      socket_connect_timeout=1, decode_responses=True)
        try:
            return {w for w, raw in client.hgetall(keys.POOL_WORKERS).items()
                    if raw.split("|")[2:3] == ["busy"]}
        finally:
            client.close()
    return set()


def _kill_worker(cluster: Cluster, cfg: SoakConfig, report: SoakReport, rng: random.Random,
                 log: Any) -> None:
    """SIGKILL a pool worker's process group: a busy one (mid-task) if one is busy within
    ``cfg.target_wait_s``, else any."""
    busy: set[str] = set()

    def busy_groups() -> list[tuple[str, int]]:
        nonlocal busy
        busy = _busy_workers(cluster)
        return [g for g in sorted(set(worker_processes(cluster.job_root))) if g[0] in busy]

    chosen = _wait_for(busy_groups, cfg.target_wait_s) or \
        sorted(set(worker_processes(cluster.job_root)))
    if not chosen:
        log("chaos: no pool worker to kill")
        report.kills["worker (none running)"] += 1
        return
    worker_id, pgid = rng.choice(chosen)
    state = "busy" if worker_id in busy else "not busy"
    log(f"chaos: SIGKILL pool worker group {pgid} ({worker_id}, {state})")
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)
    report.kills["worker"] += 1
    if worker_id in busy:
        report.kills["worker (busy)"] += 1


# ---------------------------------------------------------------- final checks


async def make_users(db_url: str, n: int) -> list[str]:
    from vidmaas.db import users
    from vidmaas.db.engine import make_engine, make_sessionmaker

    engine = make_engine(db_url)
    try:
        async with make_sessionmaker(engine)() as s:
            out = []
            for i in range(n):
                u = await users.create_user(session=s, name=f"soak-user-{i}")
                out.append(await users.create_key(session=s, user_id=u.id))
            return out
    finally:
        await engine.dispose()


async def _all_tasks(db_url: str) -> list[Any]:
    from sqlalchemy import select

    from vidmaas.db.engine import make_engine, make_sessionmaker
    from vidmaas.db.models import Task

    engine = make_engine(db_url)
    try:
        async with make_sessionmaker(engine)() as s:
            return list((await s.execute(select(Task))).scalars())
    finally:
        await engine.dispose()


async def outbox_count(db_url: str) -> int:
    from vidmaas.db import outbox
    from vidmaas.db.engine import make_engine, make_sessionmaker

    engine = make_engine(db_url)
    try:
        async with make_sessionmaker(engine)() as s:
            return int(await outbox.count(s))
    finally:
        await engine.dispose()


async def usage_task_ends(db_url: str) -> dict[str, int]:
    """user id → task ends the usage table recorded."""
    from sqlalchemy import func, select

    from vidmaas.db.engine import make_engine, make_sessionmaker
    from vidmaas.db.models import UsageDaily

    engine = make_engine(db_url)
    try:
        async with make_sessionmaker(engine)() as s:
            rows = await s.execute(select(UsageDaily.user_id, func.sum(UsageDaily.tasks))
                                   .group_by(UsageDaily.user_id))
            return {user: int(n or 0) for user, n in rows}
    finally:
        await engine.dispose()


def _drain(cluster: Cluster, db_url: str, timeout_s: float, log: Any) -> list[Any]:
    """Wait until every task is terminal and the outbox is empty (or the time is up)."""
    deadline = time.monotonic() + timeout_s
    while True:
        tasks = asyncio.run(_all_tasks(db_url))
        open_ = [t for t in tasks if t.status not in TERMINAL]
        waiting = asyncio.run(outbox_count(db_url)) if not open_ else 0
        if (not open_ and not waiting) or time.monotonic() > deadline:
            return tasks
        if open_:
            log(f"draining: {len(open_)} tasks not finished "
                f"({dict(Counter(t.status for t in open_))})")
        else:
            log(f"draining: {waiting} outbox events not yet published")
        time.sleep(3)


def check_stream(report: SoakReport, task_id: str, events: list[tuple[str, Any]]) -> None:
    """One task stream: no event written or applied twice (DESIGN §4's exactly once)."""
    report.streams_checked += 1
    report.events_checked += len(events)
    ids = [eid for eid, _ in events]
    if len(set(ids)) != len(ids):
        report.duplicate_events += len(ids) - len(set(ids))
        report.violations.append(f"task {task_id}: an event id repeats in its stream")
    dispatched: Counter[Any] = Counter()
    ends: Counter[str] = Counter()
    started = 0
    for _eid, event in events:
        kind = event.type.value
        if kind == "dispatched":
            started = 0
            dispatched[event.data.get("attempt")] += 1
        elif kind == "started":
            started += 1
            if started > 1:
                report.violations.append(f"task {task_id}: two started events in one attempt")
        elif kind in ("completed", "cancelled") or (
                kind == "failed" and not event.data.get("retryable")):
            ends[kind] += 1
    for attempt, n in dispatched.items():
        if n > 1:
            report.duplicate_events += n - 1
            report.violations.append(f"task {task_id}: attempt {attempt} dispatched {n} "
                                     "times in its stream (an outbox event published twice)")
    for kind, n in ends.items():
        if n > 1:
            report.duplicate_events += n - 1
            report.violations.append(f"task {task_id}: {n} final {kind} events")


def _check(cluster: Cluster, report: SoakReport, tasks: list[Any],
           submitter: Submitter, db_url: str) -> None:
    import av
    import redis

    from vidmaas.bus import keys
    from vidmaas.bus.events import parse_entries

    by_id = {t.id: t for t in tasks}
    report.accepted = len(submitter.accepted)
    for ikey in submitter.gave_up:
        report.violations.append(f"create {ikey} was never accepted (the API stayed down?)")
    for ikey, task_id in submitter.accepted.items():
        if task_id not in by_id:
            report.violations.append(f"accepted task {task_id} ({ikey}) is lost")
    per_key = Counter(t.idempotency_key for t in tasks)
    for ikey, n in per_key.items():
        if n > 1:
            report.violations.append(f"idempotency key {ikey} made {n} tasks")
    if len(tasks) != len(set(submitter.accepted.values())):
        report.violations.append(f"{len(tasks)} tasks in the database for "
                                 f"{len(submitter.accepted)} accepted creates")
    report.statuses = Counter(t.status for t in tasks)
    client = redis.Redis.from_url(cluster.redis_url)
    try:
        for t in tasks:
            report.attempts[int(t.attempts)] += 1
            if t.status == "queued":
                queued = client.zscore(keys.user_queue(t.user_id), t.id) is not None \
                    or client.zscore(keys.QUEUE_DELAYED, t.id) is not None \
                    or client.zscore(keys.QUEUE_CLAIMS, t.id) is not None
                if queued:
                    report.legitimately_queued += 1
                else:
                    report.violations.append(f"task {t.id} is queued but not in the queue")
            elif t.status not in TERMINAL:
                report.violations.append(f"task {t.id} ended the soak {t.status}")
            events = parse_entries(client.xrange(keys.task_events(t.id)))
            check_stream(report, t.id, events)
            kinds = [e.type.value for _, e in events]
            if t.status == "completed":
                if "completed" not in kinds:
                    report.violations.append(f"task {t.id} completed without the event")
                try:
                    data = cluster.read_object(t.video_key or "missing")
                    with av.open(io.BytesIO(data)) as container:
                        frames = sum(1 for _ in container.decode(video=0))
                    if frames < 1:
                        raise ValueError("no frames")
                    report.videos_decoded += 1
                    report.frames_decoded += frames
                except Exception as e:
                    report.violations.append(f"task {t.id}: the video is missing or does "
                                             f"not decode: {e}")
                try:
                    cluster.read_object(t.poster_key or "missing")
                except Exception as e:
                    report.violations.append(f"task {t.id}: no poster ({e})")
    finally:
        client.close()
    report.outbox_left = asyncio.run(outbox_count(db_url))
    if report.outbox_left:
        report.violations.append(f"{report.outbox_left} outbox events never published")
    ends = asyncio.run(usage_task_ends(db_url))
    report.usage_task_ends = sum(ends.values())
    terminal = Counter(t.user_id for t in tasks if t.status in TERMINAL)
    for user in set(ends) | set(terminal):
        if ends.get(user, 0) != terminal[user]:
            report.violations.append(
                f"user {user}: usage recorded {ends.get(user, 0)} task ends for "
                f"{terminal[user]} finished tasks (an end applied twice, or lost)")


# ---------------------------------------------------------------- the run


def run_soak(cfg: SoakConfig, *, work: Path, model_root: Path, pg_url: str | None = None,
             log: Any = print) -> SoakReport:
    """Run the soak (see the module docstring) and return its report.

    ``pg_url`` is the database to use; with ``cfg.pg_restart`` (or no ``pg_url``) the
    soak starts a private PostgreSQL cluster under ``work`` instead, and with
    ``cfg.s3``/``cfg.s3_outage`` a private SeaweedFS."""
    with contextlib.ExitStack() as stack:
        pg = None
        if cfg.pg_restart or pg_url is None:
            pg = stack.enter_context(private_postgres(work / "pg"))
            pg_url = pg.create_database("soak")
        weed = None
        if cfg.s3 or cfg.s3_outage:
            weed = stack.enter_context(private_seaweedfs(work / "weed"))
        return _run(cfg, work=work, pg_url=pg_url, model_root=model_root, log=log, pg=pg,
                    weed=weed)


def _run(cfg: SoakConfig, *, work: Path, pg_url: str, model_root: Path, log: Any,
         pg: PrivatePostgres | None, weed: PrivateSeaweedFS | None) -> SoakReport:
    from vidmaas.db.migrate import upgrade_sync

    report = SoakReport(submitted=cfg.tasks)
    rng = random.Random(cfg.seed)
    t0 = time.monotonic()
    upgrade_sync(pg_url)
    keys = asyncio.run(make_users(pg_url, cfg.users))
    cluster = Cluster(work=work, pg_url=pg_url, model_root=model_root, cfg=cfg, pg=pg,
                      weed=weed)
    sampler = Sampler(cluster, report, cfg.capacity)
    started = time.monotonic()

    def stamp(msg: str) -> None:
        log(f"[{time.monotonic() - started:6.1f}s] {msg}")

    try:
        cluster.start_all()
        report.timings["start"] = time.monotonic() - t0
        sampler.start()
        submitter = Submitter(cluster, keys, cfg, deadline=time.monotonic()
                              + cfg.submit_spread_s + cfg.chaos_duration_s + 120)
        submitter.start()
        stamp(f"started; {cfg.tasks} tasks from {cfg.users} users, capacity {cfg.capacity}")
        chaos(cluster, cfg, report, rng, stamp)
        stamp("chaos over")
        report.timings["chaos"] = time.monotonic() - t0 - report.timings["start"]
        cluster.ensure_running()
        submitter.join(cfg.submit_spread_s + 180)
        t1 = time.monotonic()
        tasks = _drain(cluster, pg_url, cfg.drain_timeout_s, stamp)
        report.timings["drain"] = time.monotonic() - t1
        stamp("draining done; stopping the roles")
    finally:
        sampler.stop_event.set()
        sampler.join(10)
        cluster.stop_roles()
    try:
        if cluster.procs["redis"].poll() is not None:
            cluster.start_redis()
        _check(cluster, report, tasks, submitter, pg_url)
    finally:
        cluster.stop_redis()
    report.timings["total"] = time.monotonic() - t0
    if not report.ok:
        for name in cluster.role_names():
            log(f"---- tail of {name}.log\n{cluster.tail(name, 1500)}")
    return report
