"""Warm-pool workers on Kubernetes: one LeaderWorkerSet per worker (DESIGN §12).

How the ``PoolExecutor`` protocol maps onto LeaderWorkerSets, and why:

- A worker is one LeaderWorkerSet group: ``nnodes`` pods (the leader is node rank 0)
  of ``nproc_per_node`` GPUs each, rendered by ``pool_render.render_pool``. Each worker
  has a LeaderWorkerSet of its own, named after its id, with ``spec.replicas: 1``; the
  pool of a model is the set of them labelled ``vidmaas.io/pool=<model>``, and scaling
  the pool is creating and deleting them.
- Not one LeaderWorkerSet per pool with a group per worker, because that cannot be
  correct for this protocol: (1) every group of a LeaderWorkerSet runs one pod
  template, so a group cannot carry its own worker id, and the id must be the one
  the dispatcher reserved (it holds the worker's GPU lease in Redis and fences its
  tasks; an index-derived or reused id is refused by the registry, whose heartbeat
  answers nothing to a retired id); changing the template to add an id rolls every
  group, killing the warm ones; (2) a LeaderWorkerSet scales down only from the
  highest group index, and deleting the pods of a group in the middle only makes the
  controller recreate it, so stopping a chosen idle worker (the oldest idle is the
  one drained) would leave a group holding GPUs that the dispatcher's budget counts
  as free. With one LeaderWorkerSet per worker both are exact: the id is in the
  template, and stopping a worker frees exactly its GPUs.
- ``start_worker`` creates the LeaderWorkerSet; ``409`` for the same worker id is
  success (idempotent), a name held by another worker id is an ``ExecutorError``.
- ``stop_worker`` deletes it (foreground: the controller deletes the group's pods,
  which get SIGTERM and are killed after the template's
  ``terminationGracePeriodSeconds``, ``pools.stop_grace_s``; the API applies the
  ``grace_s`` given to the LeaderWorkerSet object itself, not to its pods). Gone
  already is success.
- A worker's process ending ends the worker (its id is never served again): when
  the executor sees the ``serve`` container of any pod of the group terminated
  (exit code from the leader first, a failure before a success), it patches the
  LeaderWorkerSet to ``spec.replicas: 0`` with the exit code in the
  ``vidmaas.io/exit-code`` annotation (the pods go, their GPUs are free at once, and
  the exit code survives them), and reports the worker ``succeeded``/``failed``. The
  template's ``restartPolicy: None`` keeps the controller from recreating the group
  first. ``list_workers`` still lists such a worker until it is deleted, so the
  dispatcher, having retired it, stops it as an orphan.
- ``worker_status`` and ``updates`` report a worker stuck like a job: a container
  waiting in image pull, crash loop or a config error, a pod ``Pending`` longer than
  ``dispatcher.pending_timeout_s``, or no pods that long (no LeaderWorkerSet
  controller?).
- Every call on LeaderWorkerSets is in ``POOL_API_CALLS`` (part of the executor's
  ``KUBE_API_CALLS``, which the dispatcher's Role grants exactly); pods are only
  listed and watched, as for jobs.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

from kubernetes_asyncio import client as k8s

from vidmaas.config import Settings
from vidmaas.dispatcher.executors.base import JobState, JobStatus, WorkerSpec
from vidmaas.dispatcher.executors.kubernetes.api import (
    CLIENT_ERRORS,
    REQUEST_TIMEOUT_S,
    api_error,
    delete_foreground,
    status_code,
)
from vidmaas.dispatcher.executors.kubernetes.constants import (
    ANNOTATION_EXIT_CODE,
    LABEL_WORKER_ID,
    LWS_GROUP,
    LWS_PLURAL,
    LWS_VERSION,
    LWS_WORKER_INDEX_LABEL,
    OWNED_SELECTOR,
    SERVE_CONTAINER,
)
from vidmaas.dispatcher.executors.kubernetes.pool_render import render_pool, worker_lws_name
from vidmaas.dispatcher.executors.kubernetes.status import (
    container_exit_code,
    owned,
    parse_time,
    stuck_pod,
)
from vidmaas.domain.jobs import exit_code_retryable
from vidmaas.errors import ExecutorError

log = logging.getLogger(__name__)

POOL_API_CALLS: Final[tuple[tuple[str, str, str], ...]] = tuple(
    (LWS_GROUP, LWS_PLURAL, verb) for verb in ("create", "get", "list", "watch", "patch",
                                               "delete"))
"""Every (apiGroup, resource, verb) the pool part calls on LeaderWorkerSets."""
MERGE_PATCH: Final = "application/merge-patch+json"


# ---------------------------------------------------------------- pure mapping


def worker_of(obj: Mapping[str, Any]) -> str | None:
    """The worker id of a vidmaas LeaderWorkerSet or of one of its pods, else None."""
    labels = (obj.get("metadata") or {}).get("labels") or {}
    worker_id = labels.get(LABEL_WORKER_ID)
    return str(worker_id) if worker_id and owned(obj) else None


def worker_exit_code(pods: Sequence[Mapping[str, Any]]) -> int | None:
    """The exit code of a ``serve`` container that terminated (now or before a restart):
    the leader's first, a failure before a success; None while none has."""
    def is_leader(labels: Mapping[str, Any]) -> bool:
        return str(labels.get(LWS_WORKER_INDEX_LABEL, "0")) == "0"

    return container_exit_code(pods, container=SERVE_CONTAINER, is_leader=is_leader)


def ended_status(worker_id: str, code: int | None) -> JobStatus:
    """The status of a worker whose process ended with ``code``."""
    return JobStatus(worker_id, JobState.SUCCEEDED if code == 0 else JobState.FAILED,
                     reason="Exited", message=f"pool worker {worker_id} exited with code {code}",
                     exit_code=code, retryable=exit_code_retryable(code))


def _recorded_exit(lws: Mapping[str, Any]) -> tuple[bool, int | None]:
    """(ended, exit code) from the annotation the executor sets when a worker ends."""
    annotations = (lws.get("metadata") or {}).get("annotations") or {}
    if ANNOTATION_EXIT_CODE not in annotations:
        return False, None
    try:
        return True, int(annotations[ANNOTATION_EXIT_CODE])
    except (TypeError, ValueError):
        return True, None


def _serving(pod: Mapping[str, Any]) -> bool:
    return any(cs.get("name") == SERVE_CONTAINER and "running" in (cs.get("state") or {})
               for cs in (pod.get("status") or {}).get("containerStatuses") or [])


def worker_status_of(lws: Mapping[str, Any], *, pods: Sequence[Mapping[str, Any]] | None,
                     now: dt.datetime, pending_timeout_s: float) -> JobStatus:
    """The status of the worker of ``lws``; ``pods`` None when they were not read."""
    meta = lws.get("metadata") or {}
    worker_id = worker_of(lws) or str(meta.get("name"))
    ended, code = _recorded_exit(lws)
    if ended:
        return ended_status(worker_id, code)
    size = int(((lws.get("spec") or {}).get("leaderWorkerTemplate") or {}).get("size") or 1)
    if pods is None:
        ready = int((lws.get("status") or {}).get("readyReplicas") or 0)
        return JobStatus(worker_id, JobState.RUNNING if ready else JobState.PENDING)
    code = worker_exit_code(pods)
    if code is not None:
        return ended_status(worker_id, code)
    # Running once every pod of the group serves (the gang needs all of them).
    state = JobState.RUNNING if sum(1 for p in pods if _serving(p)) >= size \
        else JobState.PENDING
    stuck = stuck_pod(pods, now=now, pending_timeout_s=pending_timeout_s)
    if stuck is not None:
        reason, message, retryable = stuck
        return JobStatus(worker_id, state, reason=reason, message=message,
                         retryable=retryable, stuck=True)
    created = parse_time(meta.get("creationTimestamp"))
    if not pods and created is not None and (now - created).total_seconds() > pending_timeout_s:
        return JobStatus(worker_id, state, reason="NoPods", stuck=True,
                         message=f"no pods after {pending_timeout_s:.0f} s "
                                 "(is the LeaderWorkerSet controller running?)")
    return JobStatus(worker_id, state)


# ---------------------------------------------------------------- the executor's half


class PoolMixin:
    """The ``PoolExecutor`` methods of ``KubernetesExecutor`` (see the module docstring)."""

    _settings: Settings
    _namespace: str
    _clock: Callable[[], dt.datetime]

    async def _client(self) -> Any:
        raise NotImplementedError  # the executor's API client

    async def _custom(self) -> Any:
        raise NotImplementedError  # the executor's CustomObjectsApi

    @property
    def watches_pools(self) -> bool:
        """Whether ``updates`` watches LeaderWorkerSets (only when pools are configured,
        so that a cluster without the LeaderWorkerSet CRD is not asked for them)."""
        pools = self._settings.pools
        return pools.enabled and bool(pools.models)

    async def start_worker(self, spec: WorkerSpec) -> None:
        manifest = await asyncio.to_thread(render_pool, settings=self._settings, spec=spec)
        name = str(manifest["metadata"]["name"])
        api = await self._custom()
        try:
            await api.create_namespaced_custom_object(
                LWS_GROUP, LWS_VERSION, self._namespace, LWS_PLURAL, manifest,
                _request_timeout=REQUEST_TIMEOUT_S)
        except CLIENT_ERRORS as e:
            if status_code(e) != 409:
                raise api_error(f"create of {name}", e) from e
            if await self._get_lws(spec.worker_id) is None:
                raise ExecutorError(f"LeaderWorkerSet {name} exists for another worker "
                                    f"or is being deleted; not starting {spec.worker_id}") from e
            log.info("pool worker %s: LeaderWorkerSet %s already exists", spec.worker_id, name)
            return
        log.info("pool worker %s: LeaderWorkerSet %s created (%d GPUs)",
                 spec.worker_id, name, spec.model.gpus_per_job)

    async def stop_worker(self, worker_id: str, *, grace_s: float) -> None:
        name = worker_lws_name(worker_id)
        if not await delete_foreground(await self._custom(), group=LWS_GROUP,
                                       version=LWS_VERSION, namespace=self._namespace,
                                       plural=LWS_PLURAL, name=name, grace_s=grace_s):
            return
        log.info("pool worker %s: LeaderWorkerSet %s deleted (stop, grace %.0f s)", worker_id,
                 name, grace_s)

    async def worker_status(self, worker_id: str) -> JobStatus:
        lws = await self._get_lws(worker_id)
        if lws is None:
            return JobStatus(worker_id, JobState.MISSING, reason="NotFound")
        ended, _ = _recorded_exit(lws)
        pods = None if ended else await self._worker_pods(worker_id)
        status = worker_status_of(lws, pods=pods, now=self._clock(),
                                  pending_timeout_s=self._settings.dispatcher.pending_timeout_s)
        if status.state.finished and not ended:
            await self._record_end(worker_id, status.exit_code)
        return status

    async def list_workers(self) -> list[str]:
        api = await self._custom()
        try:
            result = await api.list_namespaced_custom_object(
                LWS_GROUP, LWS_VERSION, self._namespace, LWS_PLURAL,
                label_selector=f"{OWNED_SELECTOR},{LABEL_WORKER_ID}",
                _request_timeout=REQUEST_TIMEOUT_S)
        except CLIENT_ERRORS as e:
            raise api_error("list of pool workers", e) from e
        return sorted(worker for item in result.get("items") or []
                      if (worker := worker_of(item)) is not None
                      and not (item.get("metadata") or {}).get("deletionTimestamp"))

    # ------------------------------------------------------------ helpers

    async def _get_lws(self, worker_id: str) -> dict[str, Any] | None:
        """The worker's LeaderWorkerSet; None if gone, being deleted, or another's."""
        name = worker_lws_name(worker_id)
        api = await self._custom()
        try:
            lws = dict(await api.get_namespaced_custom_object(
                LWS_GROUP, LWS_VERSION, self._namespace, LWS_PLURAL, name,
                _request_timeout=REQUEST_TIMEOUT_S))
        except CLIENT_ERRORS as e:
            if status_code(e) == 404:
                return None
            raise api_error(f"get of {name}", e) from e
        if worker_of(lws) != worker_id or (lws.get("metadata") or {}).get("deletionTimestamp"):
            return None
        return lws

    async def _worker_pods(self, worker_id: str) -> list[dict[str, Any]]:
        client = await self._client()
        try:
            result = await k8s.CoreV1Api(client).list_namespaced_pod(
                self._namespace, label_selector=f"{LABEL_WORKER_ID}={worker_id}",
                _request_timeout=REQUEST_TIMEOUT_S)
        except CLIENT_ERRORS as e:
            raise api_error(f"list of the pods of {worker_id}", e) from e
        items = client.sanitize_for_serialization(result).get("items") or []
        return [p for p in items if worker_of(p) == worker_id]

    async def _record_end(self, worker_id: str, code: int | None) -> None:
        """Scale the ended worker's LeaderWorkerSet to zero and keep its exit code."""
        name = worker_lws_name(worker_id)
        body = {"metadata": {"annotations": {ANNOTATION_EXIT_CODE: str(code)}},
                "spec": {"replicas": 0}}
        api = await self._custom()
        try:
            await api.patch_namespaced_custom_object(
                LWS_GROUP, LWS_VERSION, self._namespace, LWS_PLURAL, name, body,
                _content_type=MERGE_PATCH, _request_timeout=REQUEST_TIMEOUT_S)
        except CLIENT_ERRORS as e:
            if status_code(e) == 404:
                return
            raise api_error(f"scale to zero of {name}", e) from e
        log.info("pool worker %s ended (exit code %s): LeaderWorkerSet %s scaled to 0",
                 worker_id, code, name)

    async def _pool_event_status(self, kind: str, event_type: str, obj: dict[str, Any],
                                 last: Mapping[str, JobStatus]) -> JobStatus | None:
        """The worker status one watched LeaderWorkerSet or pod event says, if any."""
        worker_id = worker_of(obj)
        if worker_id is None:
            return None
        if kind == LWS_PLURAL:
            if event_type == "DELETED":
                return JobStatus(worker_id, JobState.MISSING, reason="Deleted")
            if event_type not in ("ADDED", "MODIFIED"):
                return None
            return worker_status_of(obj, pods=None, now=self._clock(),
                                    pending_timeout_s=self._settings.dispatcher.pending_timeout_s)
        previous = last.get(worker_id)
        if event_type not in ("ADDED", "MODIFIED") or (previous is not None
                                                       and previous.state.finished):
            return None
        code = worker_exit_code([obj])
        if code is not None:
            try:
                await self._record_end(worker_id, code)
            except ExecutorError as e:
                log.warning("pool worker %s ended but could not be scaled to 0: %s",
                            worker_id, e)
            return ended_status(worker_id, code)
        stuck = stuck_pod([obj], now=self._clock(),
                          pending_timeout_s=self._settings.dispatcher.pending_timeout_s)
        state = previous.state if previous is not None else JobState.PENDING
        if stuck is not None:
            reason, message, retryable = stuck
            return JobStatus(worker_id, state, reason=reason, message=message,
                             retryable=retryable, stuck=True)
        return None
