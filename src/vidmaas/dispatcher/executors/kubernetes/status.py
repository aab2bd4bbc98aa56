"""Pure mapping of a PyTorchJob and its pods to a ``JobStatus`` (no I/O here).

Guarantees:
- ``job_state_from_conditions`` maps the job's true conditions, the first of
  ``Succeeded``, ``Failed``, ``Suspended``, ``Restarting``, ``Running``, ``Created``
  that holds, to ``JobState`` (suspended and created: pending; restarting: running).
- ``job_status`` adds what the pods say: a failed job's exit code (the Master's main
  container first, a failure before a success); for a job not finished, a container
  waiting in ``ImagePullBackOff``, ``ErrImagePull``, ``CrashLoopBackOff`` or a config
  error, a pod ``Pending`` longer than the pending timeout, or a job with no pods
  that long (no Training Operator?) makes it ``stuck``, with the reason and whether
  trying again can help.
- ``pod_event_status`` turns one watched pod into a stuck status of its job, never
  for a job already known to be finished.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

from vidmaas.dispatcher.executors.base import JobState, JobStatus
from vidmaas.dispatcher.executors.kubernetes.constants import (
    LABEL_ATTEMPT,
    LABEL_JOB_NAME,
    LABEL_MANAGED_BY,
    MAIN_CONTAINER,
    MANAGED_BY,
    POD_JOB_LABEL,
    POD_REPLICA_LABEL,
)
from vidmaas.domain.jobs import exit_code_retryable

# Container waiting reasons that mean the job cannot make progress, and whether
# trying again (elsewhere, later) can help.
STUCK_WAITING_REASONS: Final[Mapping[str, bool]] = {
    "ImagePullBackOff": True,
    "ErrImagePull": True,
    "CrashLoopBackOff": True,
    "CreateContainerError": True,
    "RunContainerError": True,
    "InvalidImageName": False,
    "ErrImageNeverPull": False,
    "CreateContainerConfigError": False,
}

_CONDITION_ORDER: Final = ("Succeeded", "Failed", "Suspended", "Restarting", "Running", "Created")


def parse_time(value: Any) -> dt.datetime | None:
    """A Kubernetes timestamp (UTC when it names no zone); None for anything else."""
    if not isinstance(value, str):
        return None
    try:
        parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)


def job_state_from_conditions(job: Mapping[str, Any]) -> tuple[JobState, str | None, str | None]:
    """(state, reason, message) from a PyTorchJob's ``status.conditions``."""
    conditions = (job.get("status") or {}).get("conditions") or []
    current = {c.get("type"): c for c in conditions if str(c.get("status")) == "True"}
    for ctype in _CONDITION_ORDER:
        cond = current.get(ctype)
        if cond is None:
            continue
        reason, message = cond.get("reason") or ctype, cond.get("message")
        if ctype == "Succeeded":
            return JobState.SUCCEEDED, reason, message
        if ctype == "Failed":
            return JobState.FAILED, reason, message
        if ctype == "Suspended":
            return JobState.PENDING, "Suspended", message
        if ctype in ("Running", "Restarting"):
            return JobState.RUNNING, None if ctype == "Running" else "Restarting", message
        return JobState.PENDING, "Created", message
    return JobState.PENDING, None, None


def pod_exit_code(pods: Sequence[Mapping[str, Any]]) -> int | None:
    """The main container's exit code, the Master's first, a failure before a success."""
    def is_master(labels: Mapping[str, Any]) -> bool:
        return str(labels.get(POD_REPLICA_LABEL, "")).lower() == "master"

    return container_exit_code(pods, container=MAIN_CONTAINER, is_leader=is_master)


def container_exit_code(pods: Sequence[Mapping[str, Any]], *, container: str,
                        is_leader: Callable[[Mapping[str, Any]], bool]) -> int | None:
    """The exit code of ``container`` where it terminated (now or before a restart), in
    the pods whose labels ``is_leader`` first; a failure before a success; None while
    none has."""
    def order(pod: Mapping[str, Any]) -> int:
        return 0 if is_leader((pod.get("metadata") or {}).get("labels") or {}) else 1

    codes: list[int] = []
    for pod in sorted(pods, key=order):
        for cs in (pod.get("status") or {}).get("containerStatuses") or []:
            if cs.get("name") != container:
                continue
            for state in (cs.get("state") or {}, cs.get("lastState") or {}):
                code = (state.get("terminated") or {}).get("exitCode")
                if isinstance(code, int):
                    codes.append(code)
                    break
    failures = [c for c in codes if c != 0]
    if failures:
        return failures[0]
    return codes[0] if codes else None


def stuck_pod(pods: Sequence[Mapping[str, Any]], *, now: dt.datetime,
               pending_timeout_s: float) -> tuple[str, str, bool] | None:
    """(reason, message, retryable) of the first pod that cannot make progress."""
    for pod in pods:
        meta, status = pod.get("metadata") or {}, pod.get("status") or {}
        name = meta.get("name", "?")
        statuses = [*(status.get("initContainerStatuses") or []),
                    *(status.get("containerStatuses") or [])]
        for cs in statuses:
            waiting = (cs.get("state") or {}).get("waiting") or {}
            reason = str(waiting.get("reason"))
            if reason in STUCK_WAITING_REASONS:
                detail = waiting.get("message") or reason
                message = f"pod {name} container {cs.get('name')}: {detail}"
                return reason, message[:500], STUCK_WAITING_REASONS[reason]
        if status.get("phase") == "Pending":
            created = parse_time(meta.get("creationTimestamp"))
            if created is not None and (now - created).total_seconds() > pending_timeout_s:
                scheduled: Mapping[str, Any] = next((c for c in status.get("conditions") or []
                                  if c.get("type") == "PodScheduled"
                                  and str(c.get("status")) == "False"), {})
                reason = scheduled.get("reason") or "PendingTimeout"
                detail = scheduled.get("message") or "not started"
                message = f"pod {name} Pending for over {pending_timeout_s:.0f} s: {detail}"
                return reason, message[:500], True
    return None


def pods_needed(state: JobState, reason: str | None) -> bool:
    """Whether ``job_status`` needs the job's pods: for a failed job's exit code, and to
    tell a pending or running job stuck (a suspended one waits for Kueue: not stuck)."""
    return state is JobState.FAILED or (state is not JobState.SUCCEEDED
                                        and reason != "Suspended")


def job_status(job: Mapping[str, Any], *, pods: Sequence[Mapping[str, Any]] | None,
               now: dt.datetime, pending_timeout_s: float) -> JobStatus:
    """The status of ``job``; ``pods`` None when they were not read."""
    meta = job.get("metadata") or {}
    job_name = str(meta.get("name"))
    state, reason, message = job_state_from_conditions(job)
    if state is JobState.SUCCEEDED:
        return JobStatus(job_name, state, reason=reason, message=message, exit_code=0,
                         retryable=False)
    if state is JobState.FAILED:
        code = pod_exit_code(pods) if pods is not None else None
        return JobStatus(job_name, state, reason=reason, message=message, exit_code=code,
                         retryable=exit_code_retryable(code))
    if pods is None or reason == "Suspended":
        return JobStatus(job_name, state, reason=reason, message=message)
    stuck = stuck_pod(pods, now=now, pending_timeout_s=pending_timeout_s)
    if stuck is not None:
        s_reason, s_message, retryable = stuck
        return JobStatus(job_name, state, reason=s_reason, message=s_message,
                         retryable=retryable, stuck=True)
    created = parse_time(meta.get("creationTimestamp"))
    if (not pods and created is not None
            and (now - created).total_seconds() > pending_timeout_s):
        return JobStatus(job_name, state, reason="NoPods", stuck=True,
                         message=f"no pods after {pending_timeout_s:.0f} s "
                                 "(is the Training Operator running?)")
    return JobStatus(job_name, state, reason=reason, message=message)


def pod_event_status(event_type: str, pod: Mapping[str, Any],
                     last: Mapping[str, JobStatus], *, now: dt.datetime,
                     pending_timeout_s: float) -> JobStatus | None:
    """A stuck status for the pod's job when the pod cannot start, else None; ``last``
    holds the latest status of each job seen."""
    if event_type not in ("ADDED", "MODIFIED"):
        return None
    labels = (pod.get("metadata") or {}).get("labels") or {}
    job_name = labels.get(POD_JOB_LABEL) or labels.get(LABEL_JOB_NAME)
    if not job_name:
        return None
    stuck = stuck_pod([pod], now=now, pending_timeout_s=pending_timeout_s)
    previous = last.get(job_name)
    if stuck is None or (previous is not None and previous.state.finished):
        return None
    reason, message, retryable = stuck
    state = previous.state if previous is not None else JobState.PENDING
    return JobStatus(job_name, state, reason=reason, message=message, retryable=retryable,
                     stuck=True)


def is_attempt(job: Mapping[str, Any], attempt: int) -> bool:
    """The job is this attempt's (or a later one's) and is not being deleted."""
    meta = job.get("metadata") or {}
    try:
        job_attempt = int((meta.get("labels") or {}).get(LABEL_ATTEMPT, attempt))
    except ValueError:
        job_attempt = attempt
    return job_attempt >= attempt and not meta.get("deletionTimestamp")


def owned(job: Mapping[str, Any]) -> bool:
    """The object carries vidmaas's managed-by label."""
    labels = (job.get("metadata") or {}).get("labels") or {}
    return bool(labels.get(LABEL_MANAGED_BY) == MANAGED_BY)
