"""Events from the job (DESIGN §4): delivery that survives Redis blips, heartbeats, progress.

Guarantees:
- A Redis error never escapes a ``Reporter`` method: a blip cannot kill the job.
  Terminal events (``completed``, ``failed``, ``cancelled``) and ``started`` are
  retried with backoff for ``critical_retry_s``; ``stage`` and ``log`` for a few
  seconds; ``progress``, ``heartbeat`` and ``preview`` are best-effort (the next one
  supersedes).
- At most one terminal event and one ``started`` per job, across all the steps'
  processes: each is guarded by a marker file in the work directory. A full disk
  never swallows the event: a marker that was created but not written still guards,
  and one that cannot be created at all is logged and the event sent regardless.
- ``progress`` is the stage-weighted overall percent (``STAGE_WEIGHTS``), never lower
  than one already sent by any step of this job, throttled to one per
  ``progress_interval_s`` except at a stage's end; each carries an ``eta_s``.
- Only a reporter made with ``reports=True`` (rank 0) writes progress, stages,
  heartbeats and ``started``; the others are silent, so a multi-rank job does not
  repeat itself. A reporter made with ``reports_outcome=True`` (any rank on the node
  of rank 0, which shares its work directory) may write the one terminal event:
  whichever rank fails first tells why, and rank 0, stopped by torchrun because of
  it, does not bury that under its own ``terminated``.
- Without a Redis URL (a job run by hand) every method is a no-op.
- A reporter made with a ``fence`` (a pool worker's task, DESIGN §12) writes every event
  through ``bus.events.publish_fenced_sync``: nothing gets through once the task's fence
  no longer names this worker and attempt. From then on it is ``superseded`` and
  ``cancel_requested`` answers ``superseded``, so the stale attempt stops at its next
  step (what it would send is dropped anyway). A fence that is gone altogether (Redis
  lost its data; the dispatcher's rebuild gives it back) is a Redis error like any
  other: retried for the event's retry time, never taken for a takeover.
- ``heartbeats()`` runs a daemon thread that sends ``heartbeat`` every
  ``heartbeat_interval_s`` (0 turns it off) until the block exits.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any

from vidmaas.domain import events as ev
from vidmaas.domain.events import Event, Stage
from vidmaas.runtime.job import WorkDir

log = logging.getLogger(__name__)

STAGE_WEIGHTS: dict[Stage, float] = {
    Stage.FETCH_INPUT: 2.0,
    Stage.LOAD_MODEL: 10.0,
    Stage.ENCODE_PROMPT: 3.0,
    Stage.DENOISE: 70.0,
    Stage.DECODE: 7.0,
    Stage.POSTPROCESS: 5.0,
    Stage.UPLOAD: 3.0,
}
"""Share of the whole job per stage, in percent; they add up to 100."""

_ORDER = list(STAGE_WEIGHTS)
SUPERSEDED = "superseded"
"""Who ``cancel_requested`` names once a fenced reporter's attempt was taken over."""


def overall_percent(stage: Stage, fraction: float) -> float:
    """Overall percent when ``stage`` is ``fraction`` (0..1) done."""
    start = sum(STAGE_WEIGHTS[s] for s in _ORDER[:_ORDER.index(stage)])
    return min(100.0, start + STAGE_WEIGHTS[stage] * min(1.0, max(0.0, fraction)))


class Reporter:
    """Writes one job's events to Redis; see the module docstring for the guarantees."""

    def __init__(self, *, task_id: str, redis_url: str | None, work_dir: WorkDir,
                 reports: bool = True, reports_outcome: bool | None = None,
                 heartbeat_interval_s: float = 5.0,
                 progress_interval_s: float = 0.5, critical_retry_s: float = 120.0,
                 fence: str | None = None, client: Any = None) -> None:
        """``client``: a blocking Redis client to share (not closed by ``close``)."""
        self.task_id = task_id
        self.work = work_dir
        connected = bool(redis_url) and bool(task_id)
        self.reports = reports and connected
        self.reports_outcome = (reports if reports_outcome is None else reports_outcome) \
            and connected
        self.heartbeat_interval_s = heartbeat_interval_s
        self.progress_interval_s = progress_interval_s
        self.critical_retry_s = critical_retry_s
        self.fence = fence
        self.superseded = False
        self._client: Any = client
        self._owns_client = client is None
        if client is None and (self.reports or self.reports_outcome) and redis_url:
            from vidmaas.bus.client import connect_sync

            self._client = connect_sync(redis_url, socket_timeout_s=5.0)
        self._lock = threading.Lock()
        self._last_sent_at = 0.0
        self._percent, self._t0 = self._load_state()

    # ---------------------------------------------------------------- delivery

    def publish(self, event: Event, *, retry_s: float = 0.0) -> bool:
        """Write ``event``; retry Redis errors for ``retry_s``. True if it was written."""
        if not (self.reports or (event.type.terminal and self.reports_outcome)):
            return False
        from redis.exceptions import RedisError

        from vidmaas.bus.events import publish_fenced_sync, publish_sync

        if self.superseded:
            return False
        deadline = time.monotonic() + retry_s
        delay_s = 0.1
        while True:
            try:
                if self.fence is None:
                    publish_sync(self._client, event)
                    return True
                if publish_fenced_sync(self._client, event, fence=self.fence) is not None:
                    return True
                log.warning("task_id=%s the fence no longer names %s: this attempt was taken "
                            "over; dropping its events", self.task_id, self.fence)
                self.superseded = True
                return False
            except RedisError as e:
                if time.monotonic() + delay_s > deadline:
                    log.warning("task_id=%s dropped %s event: %s", self.task_id,
                                event.type.value, e)
                    return False
                log.info("task_id=%s redis error on %s, retrying in %.1fs: %s",
                         self.task_id, event.type.value, delay_s, e)
                time.sleep(delay_s)
                delay_s = min(2.0, delay_s * 2)

    def _once(self, marker: str, event: Event) -> bool:
        """Publish ``event`` unless this job already did (terminal events, ``started``)."""
        if not (self.reports or (event.type.terminal and self.reports_outcome)):
            return False
        path = self.work.marker(marker)
        try:  # O_EXCL: of several processes racing, exactly one creates it
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            log.info("task_id=%s %s already reported; not repeating %s", self.task_id,
                     marker, event.type.value)
            return False
        except OSError as e:  # a full disk: better a possible repeat than no event
            log.warning("task_id=%s cannot create the %s marker (%s); sending %s anyway",
                        self.task_id, marker, e, event.type.value)
            return self.publish(event, retry_s=self.critical_retry_s)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(event.type.value)
        except OSError as e:  # the marker exists, which is what guards
            log.warning("task_id=%s cannot write the %s marker: %s", self.task_id, marker, e)
        return self.publish(event, retry_s=self.critical_retry_s)

    def already_terminal(self) -> bool:
        return self.work.marker("terminal").exists()

    # ---------------------------------------------------------------- events

    def started(self, *, world_size: int, host: str, worker: str | None = None) -> None:
        """``worker``: the pool worker's id (its pid goes with it)."""
        self._once("started", ev.started(self.task_id, world_size=world_size, host=host,
                                         worker=worker,
                                         pid=os.getpid() if worker is not None else None))

    def stage(self, stage: Stage) -> None:
        log.info("task_id=%s stage %s", self.task_id, stage.value)
        self.publish(ev.stage(self.task_id, stage), retry_s=5.0)
        self.progress(stage, 0, 1, force=True)

    def progress(self, stage: Stage, step: int, total: int, *, force: bool = False) -> None:
        """Report ``step`` of ``total`` done within ``stage``."""
        if not self.reports:
            return
        percent = overall_percent(stage, step / total if total else 1.0)
        now = time.monotonic()
        with self._lock:
            percent = max(percent, self._percent)
            due = force or step >= total or now - self._last_sent_at >= self.progress_interval_s
            if not due:
                return
            self._percent = percent
            self._last_sent_at = now
            elapsed_s = max(0.0, time.time() - self._t0)
            eta_s = 0.0 if percent >= 100 else (
                elapsed_s * (100.0 - percent) / percent if percent >= 1.0 else None)
            self._save_state()
        self.publish(ev.progress(self.task_id, step=step, total=total, percent=percent,
                                 eta_s=eta_s, stage_=stage))

    def preview(self, *, key: str, step: int, total: int, width: int, height: int) -> bool:
        """Announce a preview image just stored at ``key`` (best-effort)."""
        return self.publish(ev.preview(self.task_id, key=key, step=step, total=total,
                                       width=width, height=height))

    def log(self, level: str, message: str) -> None:
        self.publish(ev.log(self.task_id, level=level, message=message), retry_s=2.0)

    def completed(self, data: Mapping[str, Any]) -> bool:
        return self._once("terminal", Event(self.task_id, ev.EventType.COMPLETED, dict(data)))

    def failed(self, *, code: str, message: str, retryable: bool) -> bool:
        log.error("task_id=%s failed code=%s retryable=%s: %s", self.task_id, code, retryable,
                  message)
        return self._once("terminal", ev.failed(self.task_id, code=code, message=message,
                                                retryable=retryable))

    def cancelled(self, *, by: str) -> bool:
        log.info("task_id=%s cancelled by %s", self.task_id, by)
        return self._once("terminal", ev.cancelled(self.task_id, by=by))

    def cancel_requested(self) -> str | None:
        """Who asked to cancel the task, or None (also None when Redis cannot say)."""
        if self.superseded:
            return SUPERSEDED
        if self._client is None:
            return None
        from redis.exceptions import RedisError

        from vidmaas.bus.control import cancel_requested_sync

        try:
            return cancel_requested_sync(self._client, self.task_id)
        except RedisError as e:
            log.warning("task_id=%s cannot read the cancel flag: %s", self.task_id, e)
            return None

    # ---------------------------------------------------------------- heartbeat

    @contextlib.contextmanager
    def heartbeats(self) -> Iterator[None]:
        """Send ``heartbeat`` events from a daemon thread while the block runs."""
        if not self.reports or self.heartbeat_interval_s <= 0:
            yield
            return
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(self.heartbeat_interval_s):
                self.publish(ev.heartbeat(self.task_id))

        thread = threading.Thread(target=beat, name=f"heartbeat-{self.task_id}", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(timeout=5)

    def reload_state(self) -> None:
        """Take in the progress another step of this job sent (after a child step)."""
        percent, t0 = self._load_state()
        with self._lock:
            self._percent = max(self._percent, percent)
            self._t0 = min(self._t0, t0)

    def close(self) -> None:
        if self._client is not None and self._owns_client:
            self._client.close()

    # ---------------------------------------------------------------- state

    def _load_state(self) -> tuple[float, float]:
        try:
            data = self.work.read_json(self.work.marker("progress.json"))
            return float(data["percent"]), float(data["t0"])
        except (OSError, ValueError, KeyError, TypeError):
            return 0.0, time.time()

    def _save_state(self) -> None:
        if not self.reports:
            return
        try:
            self.work.write_json(self.work.marker("progress.json"),
                                 {"percent": self._percent, "t0": self._t0, "pid": os.getpid()})
        except OSError as e:
            log.warning("task_id=%s cannot save progress state: %s", self.task_id, e)
