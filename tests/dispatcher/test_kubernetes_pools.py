"""Pool workers as LeaderWorkerSets, against the kmock Kubernetes API emulator.

The tests play the LeaderWorkerSet controller and the kubelet: they create the pods of
a worker's group and patch their status over HTTP, so the executor's calls and watch
see what they would see from a real API server.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
from collections.abc import AsyncIterator
from typing import Any

import kmock
import pytest
import redis.asyncio as aioredis

from tests.dispatcher.dispatch_support import World, database, eventually, make_settings, running
from tests.dispatcher.test_pool_render import LWS_CRD
from vidmaas.bus.pools import PoolRegistry
from vidmaas.config import (
    KubeSettings,
    PoolModelSettings,
    PoolSettings,
    Settings,
    StorageSettings,
)
from vidmaas.dispatcher.executors.base import JobState, JobStatus, PoolExecutor, WorkerSpec
from vidmaas.dispatcher.executors.kubernetes import (
    POOL_API_CALLS,
    KubernetesExecutor,
    worker_lws_name,
)
from vidmaas.domain.ids import new_worker_id
from vidmaas.domain.models import ModelRegistry
from vidmaas.domain.workers import WorkerLimits, worker_args
from vidmaas.errors import ExecutorError

NAMESPACE = "vidmaas-test"
LWS = "leaderworkerset.x-k8s.io/v1/leaderworkersets"
PODS = "v1/pods"
LWS_URL = f"/apis/leaderworkerset.x-k8s.io/v1/namespaces/{NAMESPACE}/leaderworkersets"
PODS_URL = f"/api/v1/namespaces/{NAMESPACE}/pods"
MODEL = "wan2.2-ti2v-5b"

REGISTRY = ModelRegistry.load()


@pytest.fixture
def emulator(kmock: kmock.KubernetesEmulator) -> kmock.KubernetesEmulator:
    kmock.resources[LWS] = kmock.ResourceInfo(kind="LeaderWorkerSet", namespaced=True)
    kmock.resources[PODS] = kmock.ResourceInfo(kind="Pod", namespaced=True)
    kmock.resources["kubeflow.org/v1/pytorchjobs"] = kmock.ResourceInfo(kind="PyTorchJob",
                                                                        namespaced=True)
    return kmock


@pytest.fixture
def settings(emulator: kmock.KubernetesEmulator) -> Settings:
    settings = Settings(
        storage=StorageSettings(url="s3://bucket/prefix"),
        kube=KubeSettings(namespace=NAMESPACE, api_server_url=str(emulator.url),
                          pool_crd_schema_path=LWS_CRD))
    settings.pools.models = {MODEL: PoolModelSettings(max_workers=2)}
    settings.dispatcher.pending_timeout_s = 60.0
    return settings


@pytest.fixture
async def executor(settings: Settings) -> AsyncIterator[KubernetesExecutor]:
    executor = KubernetesExecutor(settings)
    yield executor
    await executor.close()


def _worker(model_id: str = MODEL) -> WorkerSpec:
    model = REGISTRY[model_id]
    return WorkerSpec(worker_id=new_worker_id(model_id), model=model,
                      args=worker_args(model, WorkerLimits()),
                      labels={"vidmaas.io/pool": model_id})


def _sets(emulator: kmock.KubernetesEmulator) -> list[Any]:
    return [obj for (res, _, _), obj in emulator.objects.items()
            if res.plural == "leaderworkersets" and not obj.deleted]


def _timestamp(age_s: float) -> str:
    created = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=age_s)
    return created.isoformat().replace("+00:00", "Z")


async def _create_pod(emulator: kmock.KubernetesEmulator, worker_id: str, *, index: int = 0,
                      status: dict[str, Any], age_s: float = 1.0) -> str:
    name = f"{worker_lws_name(worker_id)}-0" + (f"-{index}" if index else "")
    pod = {"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": name, "namespace": NAMESPACE,
                        "creationTimestamp": _timestamp(age_s),
                        "labels": {"app.kubernetes.io/managed-by": "vidmaas",
                                   "vidmaas.io/worker-id": worker_id,
                                   "leaderworkerset.sigs.k8s.io/worker-index": str(index)}},
           "spec": {"containers": [{"name": "serve", "image": "x"}]},
           "status": status}
    resp = await emulator.post(PODS_URL, json=pod)
    assert resp.status in (200, 201)
    return name


def _serve(state: dict[str, Any], *, phase: str = "Running",
           last: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"phase": phase, "containerStatuses": [
        {"name": "serve", "ready": "running" in state, "restartCount": 1 if last else 0,
         "image": "x", "imageID": "", "state": state, "lastState": last or {}}]}


async def _next(updates: AsyncIterator[JobStatus], worker_id: str) -> JobStatus:
    async def first() -> JobStatus:
        async for status in updates:
            if status.job_name == worker_id:
                return status
        raise AssertionError("updates ended")
    return await asyncio.wait_for(first(), timeout=10)


async def _next_where(updates: AsyncIterator[JobStatus], worker_id: str,
                      what: str) -> JobStatus:
    for _ in range(10):
        status = await _next(updates, worker_id)
        if (what == "stuck" and status.stuck) or (what == "finished" and status.state.finished) \
                or what == status.state.value:
            return status
    raise AssertionError(f"no {what} status for {worker_id}")


def test_the_kubernetes_executor_is_a_pool_executor(settings: Settings) -> None:
    assert isinstance(KubernetesExecutor(settings), PoolExecutor)


async def test_starting_a_worker_creates_its_leaderworkerset_once(
        emulator: kmock.KubernetesEmulator, executor: KubernetesExecutor) -> None:
    spec = _worker()

    await executor.start_worker(spec)
    await executor.start_worker(spec)

    (lws,) = _sets(emulator)
    assert lws["metadata"]["name"] == worker_lws_name(spec.worker_id)
    assert lws["metadata"]["labels"]["vidmaas.io/worker-id"] == spec.worker_id
    assert lws["spec"]["replicas"] == 1
    container = lws["spec"]["leaderWorkerTemplate"]["workerTemplate"]["spec"]["containers"][0]
    assert container["args"] == spec.args
    posts = [r for r in emulator if r.method == "POST" and r.resource is not None
             and r.resource.plural == "leaderworkersets"]
    assert len(posts) == 2  # the second answered 409: the same worker, kept


async def test_a_name_held_by_another_worker_is_an_executor_error(
        emulator: kmock.KubernetesEmulator, executor: KubernetesExecutor) -> None:
    spec = _worker()
    other = {"apiVersion": "leaderworkerset.x-k8s.io/v1", "kind": "LeaderWorkerSet",
             "metadata": {"name": worker_lws_name(spec.worker_id), "namespace": NAMESPACE,
                          "labels": {"app.kubernetes.io/managed-by": "vidmaas",
                                     "vidmaas.io/worker-id": new_worker_id(MODEL)}},
             "spec": {"replicas": 1}}
    assert (await emulator.post(LWS_URL, json=other)).status in (200, 201)

    with pytest.raises(ExecutorError, match="another worker"):
        await executor.start_worker(spec)


async def test_list_workers_names_the_live_workers_only(
        emulator: kmock.KubernetesEmulator, executor: KubernetesExecutor) -> None:
    specs = [_worker() for _ in range(3)]
    for spec in specs:
        await executor.start_worker(spec)
    await executor.stop_worker(specs[1].worker_id, grace_s=5)

    workers = await executor.list_workers()

    assert workers == sorted([specs[0].worker_id, specs[2].worker_id])
    assert await executor.list_jobs() == []  # workers are never jobs


async def test_stopping_a_worker_deletes_its_leaderworkerset_in_the_foreground(
        emulator: kmock.KubernetesEmulator, executor: KubernetesExecutor) -> None:
    spec = _worker()
    await executor.start_worker(spec)

    await executor.stop_worker(spec.worker_id, grace_s=12.5)
    await executor.stop_worker(spec.worker_id, grace_s=0)  # gone already: fine

    assert _sets(emulator) == []
    deletes = [r for r in emulator if r.method == "DELETE" and r.resource is not None
               and r.resource.plural == "leaderworkersets"]
    assert deletes[0].params.get("propagationPolicy") == "Foreground"
    assert deletes[0].params.get("gracePeriodSeconds") == "13"
    assert (await executor.worker_status(spec.worker_id)).state is JobState.MISSING


async def test_a_worker_is_pending_until_its_serve_container_runs(
        emulator: kmock.KubernetesEmulator, executor: KubernetesExecutor) -> None:
    spec = _worker()
    await executor.start_worker(spec)

    pending = await executor.worker_status(spec.worker_id)
    await _create_pod(emulator, spec.worker_id, status=_serve({"running": {}}))
    running = await executor.worker_status(spec.worker_id)

    assert (pending.state, pending.stuck) == (JobState.PENDING, False)
    assert (running.state, running.stuck) == (JobState.RUNNING, False)


async def test_a_two_node_worker_runs_only_once_both_of_its_pods_serve(
        emulator: kmock.KubernetesEmulator, settings: Settings,
        executor: KubernetesExecutor) -> None:
    settings.kube.multi_node = True  # two nodes are two pods only when jobs may span nodes
    model = REGISTRY["wan2.2-t2v-a14b"].model_copy(update={"nnodes": 2, "nproc_per_node": 4})
    spec = WorkerSpec(worker_id=new_worker_id(model.id), model=model,
                      args=worker_args(model, WorkerLimits()), labels={})
    await executor.start_worker(spec)

    await _create_pod(emulator, spec.worker_id, status=_serve({"running": {}}))
    leader_only = await executor.worker_status(spec.worker_id)
    await _create_pod(emulator, spec.worker_id, index=1, status=_serve({"running": {}}))
    both = await executor.worker_status(spec.worker_id)

    assert leader_only.state is JobState.PENDING
    assert both.state is JobState.RUNNING


@pytest.mark.parametrize(("status", "age_s", "reason", "retryable"), [
    (_serve({"waiting": {"reason": "ImagePullBackOff", "message": "no such image"}},
            phase="Pending"), 1.0, "ImagePullBackOff", True),
    (_serve({"waiting": {"reason": "InvalidImageName"}}, phase="Pending"), 1.0,
     "InvalidImageName", False),
    ({"phase": "Pending", "conditions": [
        {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
         "message": "0/4 nodes have enough nvidia.com/gpu"}]}, 120.0, "Unschedulable", True),
])
async def test_a_worker_whose_pod_cannot_start_is_stuck(
        emulator: kmock.KubernetesEmulator, executor: KubernetesExecutor,
        status: dict[str, Any], age_s: float, reason: str, retryable: bool) -> None:
    spec = _worker()
    await executor.start_worker(spec)
    await _create_pod(emulator, spec.worker_id, status=status, age_s=age_s)

    got = await executor.worker_status(spec.worker_id)

    assert (got.stuck, got.reason, got.retryable) == (True, reason, retryable)
    assert not got.state.finished


async def test_a_worker_without_pods_past_the_pending_timeout_is_stuck(
        emulator: kmock.KubernetesEmulator, executor: KubernetesExecutor) -> None:
    spec = _worker()
    await executor.start_worker(spec)
    await emulator.patch(f"{LWS_URL}/{worker_lws_name(spec.worker_id)}",
                         json={"metadata": {"creationTimestamp": _timestamp(120)}})

    got = await executor.worker_status(spec.worker_id)

    assert (got.stuck, got.reason) == (True, "NoPods")
    assert "LeaderWorkerSet controller" in (got.message or "")


async def test_a_worker_whose_process_ended_is_scaled_to_zero_and_keeps_its_exit_code(
        emulator: kmock.KubernetesEmulator, executor: KubernetesExecutor) -> None:
    spec = _worker()
    await executor.start_worker(spec)
    await _create_pod(emulator, spec.worker_id, status=_serve(
        {"waiting": {"reason": "ContainerCreating"}},
        last={"terminated": {"exitCode": 70, "reason": "Error"}}))

    first = await executor.worker_status(spec.worker_id)
    for (res, _, _), obj in list(emulator.objects.items()):
        if res.plural == "pods":
            obj.delete()  # the controller removes the group's pods
    again = await executor.worker_status(spec.worker_id)

    (lws,) = _sets(emulator)
    assert lws["spec"]["replicas"] == 0
    assert lws["metadata"]["annotations"]["vidmaas.io/exit-code"] == "70"
    assert (first.state, first.exit_code) == (JobState.FAILED, 70)
    assert again == first
    # Still listed until deleted: the dispatcher retires it, then stops it as an orphan.
    assert await executor.list_workers() == [spec.worker_id]


async def test_updates_report_a_workers_end_stuck_pods_and_deletion_under_its_id(
        emulator: kmock.KubernetesEmulator, executor: KubernetesExecutor) -> None:
    stuck, ending = _worker(), _worker()
    async with contextlib.aclosing(executor.updates()) as updates:
        await executor.start_worker(stuck)
        assert (await _next(updates, stuck.worker_id)).state is JobState.PENDING
        await _create_pod(emulator, stuck.worker_id, status=_serve(
            {"waiting": {"reason": "ErrImagePull", "message": "pull access denied"}},
            phase="Pending"))
        got_stuck = await _next_where(updates, stuck.worker_id, "stuck")

        await executor.start_worker(ending)
        await _create_pod(emulator, ending.worker_id, status=_serve({"running": {}}))
        await _create_pod(emulator, ending.worker_id, index=1, status=_serve(
            {"terminated": {"exitCode": 0, "reason": "Completed"}}, phase="Succeeded"))
        ended = await _next_where(updates, ending.worker_id, "finished")

        await executor.stop_worker(stuck.worker_id, grace_s=0)
        gone = await _next_where(updates, stuck.worker_id, "missing")

    assert (got_stuck.reason, got_stuck.retryable) == ("ErrImagePull", True)
    assert (ended.state, ended.exit_code) == (JobState.SUCCEEDED, 0)
    lws = next(o for o in _sets(emulator)
               if o["metadata"]["labels"]["vidmaas.io/worker-id"] == ending.worker_id)
    assert lws["spec"]["replicas"] == 0
    assert gone.reason == "Deleted"


async def test_without_pools_configured_no_leaderworkerset_is_watched(
        emulator: kmock.KubernetesEmulator, settings: Settings) -> None:
    settings.pools.models = {}
    executor = KubernetesExecutor(settings)
    try:
        async with contextlib.aclosing(executor.updates()) as updates:
            waiter = asyncio.ensure_future(anext(updates))
            await asyncio.sleep(0.5)
            waiter.cancel()
            await asyncio.gather(waiter, return_exceptions=True)
    finally:
        await executor.close()

    watched = {r.resource.plural for r in emulator
               if r.resource is not None and r.params.get("watch") == "true"}
    assert "pods" in watched  # the watches did start
    assert "leaderworkersets" not in watched
    assert not [r for r in emulator if r.resource is not None
                and r.resource.plural == "leaderworkersets"]


async def test_pool_api_calls_lists_every_call_made_on_leaderworkersets(
        emulator: kmock.KubernetesEmulator, executor: KubernetesExecutor) -> None:
    spec = _worker()
    async with contextlib.aclosing(executor.updates()) as updates:
        await executor.start_worker(spec)
        await executor.start_worker(spec)
        await _next(updates, spec.worker_id)
        await _create_pod(emulator, spec.worker_id, status=_serve(
            {"terminated": {"exitCode": 1, "reason": "Error"}}, phase="Failed"))
        await _next_where(updates, spec.worker_id, "finished")
        await executor.worker_status(spec.worker_id)
        await executor.list_workers()
        await executor.stop_worker(spec.worker_id, grace_s=1)
        await _next_where(updates, spec.worker_id, "missing")
    verbs = {"GET": "get", "POST": "create", "DELETE": "delete", "PATCH": "patch"}

    made = set()
    for r in emulator:
        if r.resource is None or r.headers.get("User-Agent", "").startswith("kmock"):
            continue  # the test's own calls
        if r.params.get("watch") == "true":
            verb = "watch"
        elif r.method == "GET" and r.name is None:
            verb = "list"
        else:
            verb = verbs[r.method.value]
        made.add((r.resource.group or "", r.resource.plural, verb))

    assert {c for c in made if c[1] == "leaderworkersets"} == set(POOL_API_CALLS)
    assert {c for c in made if c[1] != "leaderworkersets"} <= {
        ("", "pods", "list"), ("", "pods", "watch"), ("kubeflow.org", "pytorchjobs", "watch")}


@pytest.mark.parametrize("pod_status", [
    _serve({"waiting": {"reason": "ImagePullBackOff", "message": "no such image"}},
           phase="Pending"),
    _serve({"waiting": {"reason": "ContainerCreating"}},
           last={"terminated": {"exitCode": 0, "reason": "Completed"}}),
], ids=["stuck-in-image-pull", "exited"])
async def test_the_dispatcher_retires_a_stuck_or_ended_worker_deletes_it_and_starts_a_new_one(
        emulator: kmock.KubernetesEmulator, settings: Settings, sqlite_url: str,
        redis: aioredis.Redis, redis_url: str, pod_status: dict[str, Any]) -> None:
    base = make_settings(db_url=sqlite_url, redis_url=redis_url, capacity=2)
    base.kube, base.dispatcher.pending_timeout_s = settings.kube, 60.0
    base.pools = PoolSettings(models={"tiny-t2v": PoolModelSettings(min_workers=1)},
                              manage_interval_s=0.1, start_timeout_s=30, stop_grace_s=1.0)
    registry = PoolRegistry(redis)

    def worker_ids() -> list[str]:
        return [o["metadata"]["labels"]["vidmaas.io/worker-id"] for o in _sets(emulator)]

    async def one_worker() -> bool:
        return len(worker_ids()) == 1

    async with database(sqlite_url) as sessions:
        world = World(settings=base, sessions=sessions, redis=redis)
        async with running(world.dispatcher(KubernetesExecutor(base))):
            await eventually(one_worker)
            (first,) = worker_ids()
            assert [w.id for w in await registry.workers()] == [first]
            await _create_pod(emulator, first, status=pod_status)

            async def replaced() -> bool:
                return len(worker_ids()) == 1 and worker_ids() != [first]

            await eventually(replaced)
            (second,) = worker_ids()

    assert [w.id for w in await registry.workers()] == [second]
