"""The Kubernetes executor: one Kubeflow PyTorchJob per task (DESIGN §7), and the warm-pool
workers of ``pools`` (one LeaderWorkerSet each, DESIGN §12).

Guarantees, on top of the executor protocol's:
- ``launch`` renders the job with ``render_pytorchjob`` (injection-proof, CRD-checked)
  and creates it; ``409 Conflict`` for a job of the same task and attempt is success,
  so a second launch never creates a second job. A leftover job of an earlier attempt
  (failed, or being deleted) is never adopted: it is deleted, the launch waits for it
  to go (the cancel grace plus a margin) and creates the new one, or fails with
  ``ExecutorError`` if it does not go in time.
- ``status`` reads the job and, when they matter, its pods, and maps them with
  ``status.job_status``: the job's conditions (``Created``, ``Running``,
  ``Restarting``, ``Succeeded``, ``Failed``, ``Suspended``) give the ``JobState``; a
  container waiting in ``ImagePullBackOff``, ``ErrImagePull``, ``CrashLoopBackOff``
  or a config error, a pod ``Pending`` longer than ``dispatcher.pending_timeout_s``,
  or a job with no pods that long (no Training Operator?) is reported ``stuck`` with
  the reason. A failed job's exit code comes from its pods when they still exist.
- ``updates`` follows a watch on the jobs carrying ``app.kubernetes.io/managed-by=
  vidmaas`` (``watch=true``), resumes from the last resource version after a dropped
  connection, starts over after ``410 Gone``, reconnects with backoff after errors,
  and yields a status only when it changed. It creates no background task: closing
  the iterator (or ``close()``) ends it.
- ``cancel`` deletes the job with foreground propagation; its pods get SIGTERM and are
  killed after ``terminationGracePeriodSeconds`` (the cancel grace, set by the template).
  A job that is already gone is success.
- ``updates`` also follows the pool workers' LeaderWorkerSets (when pools are configured)
  and their pods, and reports a worker's end or stuck pods under its worker id.
- Every Kubernetes call is listed in ``KUBE_API_CALLS`` (for the RBAC Role), and every
  client error is raised as ``ExecutorError``.

Nothing connects at construction: the API client is built on first use.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping
from typing import Any, Final, TypeVar

from kubernetes_asyncio import client as k8s
from kubernetes_asyncio import config as k8s_config

from vidmaas.config import Settings
from vidmaas.dispatcher.executors.base import JobState, JobStatus
from vidmaas.dispatcher.executors.kubernetes.api import CLIENT_ERRORS as _CLIENT_ERRORS
from vidmaas.dispatcher.executors.kubernetes.api import REQUEST_TIMEOUT_S, delete_foreground
from vidmaas.dispatcher.executors.kubernetes.api import api_error as _api_error
from vidmaas.dispatcher.executors.kubernetes.api import status_code as _status_code
from vidmaas.dispatcher.executors.kubernetes.constants import (
    GROUP,
    LABEL_ATTEMPT,
    LWS_GROUP,
    LWS_PLURAL,
    LWS_VERSION,
    OWNED_SELECTOR,
    PLURAL,
    POD_JOB_LABEL,
    VERSION,
)
from vidmaas.dispatcher.executors.kubernetes.pools import POOL_API_CALLS, PoolMixin, worker_of
from vidmaas.dispatcher.executors.kubernetes.render import render_pytorchjob
from vidmaas.dispatcher.executors.kubernetes.status import (
    is_attempt,
    job_state_from_conditions,
    job_status,
    owned,
    pod_event_status,
    pods_needed,
)
from vidmaas.domain.ids import task_id_from_job_name
from vidmaas.domain.jobs import JobSpec
from vidmaas.errors import ExecutorError
from vidmaas.logs import TaskLog

log = logging.getLogger(__name__)
tlog = TaskLog(log)

KUBE_API_CALLS: Final[tuple[tuple[str, str, str], ...]] = (
    (GROUP, PLURAL, "create"),
    (GROUP, PLURAL, "get"),
    (GROUP, PLURAL, "list"),
    (GROUP, PLURAL, "watch"),
    (GROUP, PLURAL, "delete"),
    ("", "pods", "list"),
    ("", "pods", "watch"),
    *POOL_API_CALLS,
)
"""Every (apiGroup, resource, verb) this executor uses: what its Role must grant."""

WATCH_TIMEOUT_S: Final = 290
"""Server-side length of one watch request; the watch then resumes."""
STALE_JOB_EXTRA_WAIT_S: Final = 15.0
"""How long past the cancel grace a launch waits for an earlier attempt's job to go."""
WATCH_BACKOFF_INITIAL_S: Final = 0.5
WATCH_BACKOFF_MAX_S: Final = 30.0

_Clock = Callable[[], dt.datetime]
_T = TypeVar("_T")


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


# ---------------------------------------------------------------- the executor


class KubernetesExecutor(PoolMixin):
    """Runs each task as a PyTorchJob, each pool worker as a LeaderWorkerSet, in
    ``settings.kube.namespace``."""

    name = "kubernetes"

    def __init__(self, settings: Settings, *, api_client: Any = None,
                 clock: _Clock = _utcnow) -> None:
        self._settings = settings
        self._namespace = settings.kube.namespace
        self._api_client: Any = api_client
        self._owns_client = api_client is None
        self._connect_lock = asyncio.Lock()
        self._clock = clock
        self._closed = False
        self._closed_event = asyncio.Event()
        self._watches: set[Any] = set()

    # ------------------------------------------------------------ connection

    async def _client(self) -> Any:
        if self._closed:
            raise ExecutorError("the Kubernetes executor is closed")
        if self._api_client is not None:
            return self._api_client
        async with self._connect_lock:
            if self._api_client is None:
                self._api_client = await self._connect()
        return self._api_client

    async def _connect(self) -> Any:
        kube = self._settings.kube
        configuration = k8s.Configuration()
        try:
            if kube.api_server_url is not None:
                configuration.host = kube.api_server_url.rstrip("/")
            elif kube.kubeconfig is not None:
                await k8s_config.load_kube_config(config_file=str(kube.kubeconfig),
                                                  client_configuration=configuration)
            else:
                try:
                    k8s_config.load_incluster_config(  # type: ignore[no-untyped-call]
                        client_configuration=configuration)
                except k8s_config.ConfigException:
                    await k8s_config.load_kube_config(client_configuration=configuration)
        except (k8s_config.ConfigException, OSError, ValueError) as e:
            raise ExecutorError(f"cannot configure the Kubernetes client: {e}") from e
        return k8s.ApiClient(configuration)

    async def _custom(self) -> Any:
        return k8s.CustomObjectsApi(await self._client())

    async def _core(self) -> Any:
        return k8s.CoreV1Api(await self._client())

    # ------------------------------------------------------------ protocol

    async def launch(self, spec: JobSpec) -> str:
        manifest = await asyncio.to_thread(render_pytorchjob, settings=self._settings, spec=spec)
        for _ in range(2):
            if await self._create(spec, manifest):
                tlog.info(spec.task_id, "job %s created (attempt %d)", spec.job_name,
                          spec.attempt)
                return spec.job_name
            job = await self._get(spec.job_name)
            if job is None:
                continue  # removed between the create and the get: create again
            if is_attempt(job, spec.attempt):
                tlog.info(spec.task_id, "job %s already exists", spec.job_name)
                return spec.job_name
            await self._remove_stale(spec, job)
        raise ExecutorError(f"job {spec.job_name} keeps conflicting; launch again later")

    async def _create(self, spec: JobSpec, manifest: dict[str, Any]) -> bool:
        """Create the job; False when one of that name exists (409)."""
        api = await self._custom()
        try:
            await api.create_namespaced_custom_object(
                GROUP, VERSION, self._namespace, PLURAL, manifest,
                _request_timeout=REQUEST_TIMEOUT_S)
        except _CLIENT_ERRORS as e:
            if _status_code(e) == 409:
                return False
            raise _api_error(f"create of {spec.job_name}", e) from e
        return True

    async def _remove_stale(self, spec: JobSpec, job: Mapping[str, Any]) -> None:
        """Delete the job an earlier attempt left (or one being deleted) and wait until gone."""
        meta = job.get("metadata") or {}
        tlog.info(spec.task_id,
                  "job %s of an earlier attempt (%s) is in the way of attempt %d; removing it",
                  spec.job_name, (meta.get("labels") or {}).get(LABEL_ATTEMPT, "?"), spec.attempt)
        grace_s = self._settings.dispatcher.cancel_grace_s
        if not meta.get("deletionTimestamp"):
            await self.cancel(spec.job_name, grace_s=grace_s)
        deadline = asyncio.get_running_loop().time() + grace_s + STALE_JOB_EXTRA_WAIT_S
        delay_s = 0.1
        while await self._get(spec.job_name) is not None:
            if asyncio.get_running_loop().time() + delay_s > deadline:
                raise ExecutorError(f"job {spec.job_name} of an earlier attempt is still being "
                                    f"removed; attempt {spec.attempt} must be launched later")
            await asyncio.sleep(delay_s)
            delay_s = min(delay_s * 2, 2.0)

    async def _get(self, job_name: str) -> dict[str, Any] | None:
        api = await self._custom()
        try:
            job = await api.get_namespaced_custom_object(
                GROUP, VERSION, self._namespace, PLURAL, job_name,
                _request_timeout=REQUEST_TIMEOUT_S)
        except _CLIENT_ERRORS as e:
            if _status_code(e) == 404:
                return None
            raise _api_error(f"get of {job_name}", e) from e
        return dict(job)

    async def _pods(self, job_name: str) -> list[dict[str, Any]]:
        client = await self._client()
        api = k8s.CoreV1Api(client)
        try:
            result = await api.list_namespaced_pod(
                self._namespace, label_selector=f"{POD_JOB_LABEL}={job_name}",
                _request_timeout=REQUEST_TIMEOUT_S)
        except _CLIENT_ERRORS as e:
            raise _api_error(f"list of the pods of {job_name}", e) from e
        items = client.sanitize_for_serialization(result).get("items") or []
        # Filter here too: a selector the server ignores must not mix jobs up.
        return [p for p in items
                if ((p.get("metadata") or {}).get("labels") or {}).get(POD_JOB_LABEL) == job_name]

    async def _status_of(self, job: Mapping[str, Any], *, read_pods: bool) -> JobStatus:
        state, reason, _ = job_state_from_conditions(job)
        pods = None
        if read_pods and pods_needed(state, reason):
            pods = await self._pods(str((job.get("metadata") or {}).get("name")))
        return job_status(job, pods=pods, now=self._clock(),
                          pending_timeout_s=self._settings.dispatcher.pending_timeout_s)

    async def status(self, job_name: str) -> JobStatus:
        job = await self._get(job_name)
        if job is None:
            return JobStatus(job_name, JobState.MISSING, reason="NotFound")
        return await self._status_of(job, read_pods=True)

    async def cancel(self, job_name: str, *, grace_s: float) -> None:
        if not await delete_foreground(await self._custom(), group=GROUP, version=VERSION,
                                       namespace=self._namespace, plural=PLURAL,
                                       name=job_name, grace_s=grace_s):
            return
        tlog.info(task_id_from_job_name(job_name), "job %s deleted (cancel, grace %.0f s)",
                  job_name, grace_s)

    async def list_jobs(self) -> list[str]:
        api = await self._custom()
        try:
            result = await api.list_namespaced_custom_object(
                GROUP, VERSION, self._namespace, PLURAL, label_selector=OWNED_SELECTOR,
                _request_timeout=REQUEST_TIMEOUT_S)
        except _CLIENT_ERRORS as e:
            raise _api_error("list of jobs", e) from e
        names = [str((item.get("metadata") or {}).get("name"))
                 for item in result.get("items") or [] if owned(item)]
        return sorted(names)

    async def updates(self) -> AsyncIterator[JobStatus]:
        last: dict[str, JobStatus] = {}
        sources = [self._events("pytorchjobs"), self._events("pods")]
        if self.watches_pools:
            sources.append(self._events(LWS_PLURAL))
        async with contextlib.aclosing(_merge(sources)) as events:
            async for kind, event_type, obj in events:
                if worker_of(obj) is not None:
                    status = await self._pool_event_status(kind, event_type, obj, last)
                elif kind == "pytorchjobs":
                    status = await self._job_event_status(event_type, obj)
                else:
                    status = pod_event_status(
                        event_type, obj, last, now=self._clock(),
                        pending_timeout_s=self._settings.dispatcher.pending_timeout_s)
                if status is None or last.get(status.job_name) == status:
                    continue
                if status.state is JobState.MISSING:
                    last.pop(status.job_name, None)
                else:
                    last[status.job_name] = status
                tlog.info(task_id_from_job_name(status.job_name), "job %s is %s%s (%s)",
                          status.job_name, status.state.value,
                          " and stuck" if status.stuck else "", status.reason or "-")
                yield status

    async def _job_event_status(self, event_type: str, job: dict[str, Any]) -> JobStatus | None:
        name = str((job.get("metadata") or {}).get("name"))
        if event_type == "DELETED":
            return JobStatus(name, JobState.MISSING, reason="Deleted")
        if event_type not in ("ADDED", "MODIFIED"):
            return None
        status = await self._status_of(job, read_pods=False)
        if status.state is JobState.FAILED:  # the exit code decides whether to retry
            with contextlib.suppress(ExecutorError):
                status = await self._status_of(job, read_pods=True)
        return status

    async def _events(self, plural: str) -> AsyncGenerator[tuple[str, str, dict[str, Any]], None]:
        """(plural, type, object) of the owned objects, across reconnects, until closed."""
        resource_version: str | None = None
        backoff_s = WATCH_BACKOFF_INITIAL_S
        while not self._closed:
            try:
                async for event_type, obj in self._watch_once(plural, resource_version):
                    backoff_s = WATCH_BACKOFF_INITIAL_S
                    rv = (obj.get("metadata") or {}).get("resourceVersion")
                    if isinstance(rv, str) and rv:
                        resource_version = rv
                    if event_type != "BOOKMARK" and owned(obj):
                        yield plural, event_type, obj
            except _WatchExpired:
                resource_version = None
            except (ExecutorError, *_CLIENT_ERRORS) as e:
                if self._closed:
                    return
                log.warning("watch of %s failed, reconnecting in %.1f s: %s", plural, backoff_s,
                            e)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._closed_event.wait(), backoff_s)
                backoff_s = min(backoff_s * 2, WATCH_BACKOFF_MAX_S)

    async def _watch_once(
        self, plural: str, resource_version: str | None,
    ) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        """One watch request: (type, object) events until the server ends it."""
        kwargs: dict[str, Any] = {
            "label_selector": OWNED_SELECTOR,
            "watch": "true",  # lower-case, as every API server (and emulator) accepts
            "allow_watch_bookmarks": "true",
            "timeout_seconds": WATCH_TIMEOUT_S,
            "_preload_content": False,
            "_request_timeout": (REQUEST_TIMEOUT_S, WATCH_TIMEOUT_S + REQUEST_TIMEOUT_S),
        }
        if resource_version is not None:
            kwargs["resource_version"] = resource_version
        if plural == "pods":
            resp = await (await self._core()).list_namespaced_pod(self._namespace, **kwargs)
        else:
            group, version = (LWS_GROUP, LWS_VERSION) if plural == LWS_PLURAL else (GROUP, VERSION)
            resp = await (await self._custom()).list_namespaced_custom_object(
                group, version, self._namespace, plural, **kwargs)
        self._watches.add(resp)
        try:
            if resp.status == 410:
                raise _WatchExpired
            if not 200 <= resp.status <= 299:
                body = (await resp.read())[:300].decode("utf-8", "replace")
                raise ExecutorError(f"Kubernetes watch of {plural} failed: {resp.status} {body}")
            while True:
                line = await resp.content.readline()
                if not line:
                    return
                if not line.strip():
                    continue
                event = json.loads(line)
                obj = event.get("object") or {}
                if event.get("type") == "ERROR":
                    if obj.get("code") == 410:
                        raise _WatchExpired
                    raise ExecutorError(f"Kubernetes watch error: {str(obj.get('message'))[:300]}")
                yield str(event.get("type")), obj
        finally:
            self._watches.discard(resp)
            resp.close()

    async def close(self) -> None:
        self._closed = True
        self._closed_event.set()
        for resp in list(self._watches):
            resp.close()
        if self._api_client is not None and self._owns_client:
            await self._api_client.close()
        self._api_client = None


async def _merge(sources: list[AsyncGenerator[_T, None]]) -> AsyncGenerator[_T, None]:
    """Items of several iterators as they come; closing this closes them all."""
    pending: dict[asyncio.Future[_T], AsyncGenerator[_T, None]] = {
        asyncio.ensure_future(anext(source)): source for source in sources}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for future in done:
                source = pending.pop(future)
                try:
                    item = future.result()
                except StopAsyncIteration:
                    continue
                pending[asyncio.ensure_future(anext(source))] = source
                yield item
    finally:
        for future in pending:
            future.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for source in sources:
            await source.aclose()


class _WatchExpired(Exception):
    """``410 Gone``: the resource version is too old; watch from the current state."""
