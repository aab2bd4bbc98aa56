"""The Kubernetes executor against the kmock Kubernetes API emulator (no real cluster runs here).

The emulator stores the objects the executor creates; the tests play the Training
Operator and the kubelet by patching job conditions and creating pods over HTTP, so
the executor's watch sees the same events it would see from a real API server.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import kmock
import pytest

from vidmaas.config import KubeSettings, Settings, StorageSettings
from vidmaas.dispatcher.executors.base import Executor, JobState, JobStatus
from vidmaas.dispatcher.executors.kubernetes import (
    KUBE_API_CALLS,
    POD_JOB_LABEL,
    POOL_API_CALLS,
    KubernetesExecutor,
)
from vidmaas.dispatcher.executors.kubernetes import executor as kubernetes_executor
from vidmaas.domain.ids import job_name, new_task_id
from vidmaas.domain.jobs import ExitCode, JobSpec, job_args
from vidmaas.domain.models import ModelRegistry
from vidmaas.errors import ExecutorError

REPO_ROOT = Path(__file__).resolve().parents[2]
CRD_PATH = REPO_ROOT / ".." / "shared" / "k8s" / "crds" / "kubeflow.org_pytorchjobs.yaml"
NAMESPACE = "vidmaas-test"
JOBS = "kubeflow.org/v1/pytorchjobs"
PODS = "v1/pods"
JOBS_URL = f"/apis/kubeflow.org/v1/namespaces/{NAMESPACE}/pytorchjobs"
PODS_URL = f"/api/v1/namespaces/{NAMESPACE}/pods"

REGISTRY = ModelRegistry.load()


@pytest.fixture
def emulator(kmock: kmock.KubernetesEmulator) -> kmock.KubernetesEmulator:
    kmock.resources[JOBS] = kmock.ResourceInfo(kind="PyTorchJob", namespaced=True)
    kmock.resources[PODS] = kmock.ResourceInfo(kind="Pod", namespaced=True)
    return kmock


@pytest.fixture
def settings(emulator: kmock.KubernetesEmulator) -> Settings:
    settings = Settings(
        storage=StorageSettings(url="s3://bucket/prefix"),
        kube=KubeSettings(namespace=NAMESPACE, api_server_url=str(emulator.url),
                          crd_schema_path=CRD_PATH))
    settings.dispatcher.pending_timeout_s = 60.0
    return settings


@pytest.fixture
async def executor(settings: Settings) -> AsyncIterator[KubernetesExecutor]:
    executor = KubernetesExecutor(settings)
    yield executor
    await executor.close()


def _spec(model_id: str = "wan2.2-t2v-a14b", *, attempt: int = 1,
          prompt: str = 'a "cat"\n---\nkind: Pod') -> JobSpec:
    model = REGISTRY[model_id]
    params = model.resolve(size=None, num_frames=None, steps=None, seed=42,
                           has_image=model.image == "required")
    task_id = new_task_id()
    return JobSpec(task_id=task_id, job_name=job_name(task_id), user_id="u0123456789abcdefghjk",
                   model=model, prompt=prompt, params=params.as_dict(), attempt=attempt)


async def _set_conditions(emulator: kmock.KubernetesEmulator, name: str,
                          *conditions: tuple[str, str]) -> None:
    body = {"status": {"conditions": [
        {"type": ctype, "status": "True", "reason": f"PyTorchJob{ctype}", "message": message}
        for ctype, message in conditions]}}
    resp = await emulator.patch(f"{JOBS_URL}/{name}", json=body)
    assert resp.status == 200


async def _create_pod(emulator: kmock.KubernetesEmulator, job: str, *, name: str,
                      status: dict[str, Any], replica: str = "master",
                      age_s: float = 1.0) -> None:
    created = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=age_s)
    pod = {"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": name, "namespace": NAMESPACE,
                        "creationTimestamp": created.isoformat().replace("+00:00", "Z"),
                        "labels": {POD_JOB_LABEL: job,
                                   "training.kubeflow.org/replica-type": replica,
                                   # from the template's pod labels
                                   "app.kubernetes.io/managed-by": "vidmaas"}},
           "spec": {"containers": [{"name": "pytorch", "image": "x"}]},
           "status": status}
    resp = await emulator.post(PODS_URL, json=pod)
    assert resp.status in (200, 201)


def _waiting(reason: str, message: str = "") -> dict[str, Any]:
    return {"phase": "Pending", "containerStatuses": [
        {"name": "pytorch", "ready": False, "restartCount": 0, "image": "x", "imageID": "",
         "state": {"waiting": {"reason": reason, "message": message}}}]}


def _terminated(code: int) -> dict[str, Any]:
    return {"phase": "Failed" if code else "Succeeded", "containerStatuses": [
        {"name": "pytorch", "ready": False, "restartCount": 0, "image": "x", "imageID": "",
         "state": {"terminated": {"exitCode": code, "reason": "Error" if code else "Completed"}}}]}


def _jobs(emulator: kmock.KubernetesEmulator) -> list[Any]:
    return [obj for (res, _, _), obj in emulator.objects.items()
            if res.plural == "pytorchjobs" and not obj.deleted]


async def _next(updates: AsyncIterator[JobStatus]) -> JobStatus:
    return await asyncio.wait_for(anext(updates), timeout=10)


def test_the_kubernetes_executor_implements_the_executor_protocol(settings: Settings) -> None:
    executor: Executor = KubernetesExecutor(settings)

    assert executor.name == "kubernetes"


async def test_launch_creates_one_pytorchjob_carrying_the_runtime_arguments(
        emulator: kmock.KubernetesEmulator, executor: KubernetesExecutor) -> None:
    spec = _spec()

    name = await executor.launch(spec)

    assert name == spec.job_name
    (job,) = _jobs(emulator)
    assert job["metadata"]["name"] == spec.job_name
    assert job["metadata"]["labels"]["vidmaas.io/task-id"] == spec.task_id
    for replica in job["spec"]["pytorchReplicaSpecs"].values():
        assert replica["template"]["spec"]["containers"][0]["args"] == job_args(spec)


async def test_a_second_launch_answers_409_and_returns_the_existing_job_without_a_second(
        emulator: kmock.KubernetesEmulator, executor: KubernetesExecutor) -> None:
    spec = _spec()
    await executor.launch(spec)

    name = await executor.launch(spec)

    assert name == spec.job_name
    assert len(_jobs(emulator)) == 1
    assert len([r for r in emulator if r.method == "POST"]) == 2


def _next_attempt(spec: JobSpec) -> JobSpec:
    return dataclasses.replace(spec, attempt=spec.attempt + 1)


async def test_a_leftover_job_of_an_earlier_attempt_is_replaced_not_adopted(
        emulator: kmock.KubernetesEmulator, executor: KubernetesExecutor) -> None:
    first = _spec()
    await executor.launch(first)
    await _set_conditions(emulator, first.job_name, ("Failed", "1 Master replica(s) failed"))
    retry = _next_attempt(first)

    assert await executor.launch(retry) == retry.job_name

    (job,) = _jobs(emulator)
    assert job["metadata"]["labels"]["vidmaas.io/attempt"] == "2"
    assert "status" not in job
    assert len([r for r in emulator if r.method == "DELETE"]) == 1


async def test_a_relaunch_waits_until_the_earlier_attempts_job_is_gone(
        emulator: kmock.KubernetesEmulator, executor: KubernetesExecutor) -> None:
    first = _spec()
    await executor.launch(first)
    # A finalizer keeps the old job, marked for deletion, as pods being torn down would.
    await emulator.patch(f"{JOBS_URL}/{first.job_name}",
                         json={"metadata": {"finalizers": ["test.vidmaas.io/hold"]}})

    async def release_later() -> None:
        await asyncio.sleep(0.5)
        await emulator.patch(f"{JOBS_URL}/{first.job_name}", json={"metadata": {"finalizers": []}})

    release = asyncio.create_task(release_later())
    name = await executor.launch(_next_attempt(first))
    await release

    assert name == first.job_name
    (job,) = _jobs(emulator)
    assert job["metadata"]["labels"]["vidmaas.io/attempt"] == "2"


async def test_a_relaunch_fails_when_the_earlier_attempts_job_does_not_go(
        emulator: kmock.KubernetesEmulator, executor: KubernetesExecutor, settings: Settings,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kubernetes_executor, "STALE_JOB_EXTRA_WAIT_S", 0.3)
    settings.dispatcher.cancel_grace_s = 0
    first = _spec()
    await executor.launch(first)
    await emulator.patch(f"{JOBS_URL}/{first.job_name}",
                         json={"metadata": {"finalizers": ["test.vidmaas.io/hold"]}})

    with pytest.raises(ExecutorError, match="still being removed"):
        await executor.launch(_next_attempt(first))


async def test_status_follows_the_job_conditions(
        emulator: kmock.KubernetesEmulator, executor: KubernetesExecutor) -> None:
    spec = _spec()
    await executor.launch(spec)
    assert (await executor.status(spec.job_name)).state is JobState.PENDING

    await _set_conditions(emulator, spec.job_name, ("Created", "created"))
    assert (await executor.status(spec.job_name)).state is JobState.PENDING

    await _set_conditions(emulator, spec.job_name, ("Created", "created"), ("Running", "running"))
    assert (await executor.status(spec.job_name)).state is JobState.RUNNING

    await _set_conditions(emulator, spec.job_name, ("Created", "c"), ("Succeeded", "done"))
    status = await executor.status(spec.job_name)
    assert status.state is JobState.SUCCEEDED
    assert status.exit_code == 0


async def test_an_unknown_job_is_missing(executor: KubernetesExecutor) -> None:
    status = await executor.status(job_name(new_task_id()))

    assert status.state is JobState.MISSING


async def test_updates_follow_the_watch_through_every_transition_once(
        emulator: kmock.KubernetesEmulator, executor: KubernetesExecutor) -> None:
    spec = _spec()
    async with contextlib.aclosing(executor.updates()) as updates:
        await executor.launch(spec)
        first = await _next(updates)
        assert (first.job_name, first.state) == (spec.job_name, JobState.PENDING)

        await _set_conditions(emulator, spec.job_name, ("Created", "created"))
        assert (await _next(updates)).reason == "Created"

        await _set_conditions(emulator, spec.job_name, ("Created", "c"), ("Running", "r"))
        await _set_conditions(emulator, spec.job_name, ("Created", "c"), ("Running", "r"))
        assert (await _next(updates)).state is JobState.RUNNING

        await _set_conditions(emulator, spec.job_name, ("Succeeded", "done"))
        assert (await _next(updates)).state is JobState.SUCCEEDED  # no repeated RUNNING

        await executor.cancel(spec.job_name, grace_s=1)
        gone = await _next(updates)
        assert (gone.job_name, gone.state) == (spec.job_name, JobState.MISSING)

    watches = [r for r in emulator if r.params.get("watch") is not None]
    assert watches and all(r.params["watch"] == "true" for r in watches)
    assert all(r.params["labelSelector"] == "app.kubernetes.io/managed-by=vidmaas"
               for r in watches)


async def test_updates_report_a_failed_job_with_the_runtime_exit_code(
        emulator: kmock.KubernetesEmulator, executor: KubernetesExecutor) -> None:
    spec = _spec()
    async with contextlib.aclosing(executor.updates()) as updates:
        await executor.launch(spec)
        await _next(updates)
        await _create_pod(emulator, spec.job_name, name=f"{spec.job_name}-master-0",
                          status=_terminated(ExitCode.BAD_INPUT))
        await _create_pod(emulator, spec.job_name, name=f"{spec.job_name}-worker-0",
                          status=_terminated(0), replica="worker")

        await _set_conditions(emulator, spec.job_name, ("Failed", "1 Master replica(s) failed"))
        failed = await _next(updates)

    assert failed.state is JobState.FAILED
    assert failed.exit_code == ExitCode.BAD_INPUT
    assert failed.retryable is False
    assert failed.message == "1 Master replica(s) failed"


async def test_updates_report_a_pod_stuck_in_image_pull_backoff_as_it_happens(
        emulator: kmock.KubernetesEmulator, executor: KubernetesExecutor) -> None:
    spec = _spec()
    async with contextlib.aclosing(executor.updates()) as updates:
        await executor.launch(spec)
        await _set_conditions(emulator, spec.job_name, ("Created", "created"))
        while (await _next(updates)).reason != "Created":
            pass
        await _create_pod(emulator, spec.job_name, name=f"{spec.job_name}-master-0",
                          status={"phase": "Pending"})
        await _create_pod(emulator, spec.job_name, name=f"{spec.job_name}-worker-0",
                          status=_waiting("ImagePullBackOff", "Back-off pulling image"),
                          replica="worker")

        stuck = await _next(updates)

    assert (stuck.job_name, stuck.state, stuck.stuck) == (spec.job_name, JobState.PENDING, True)
    assert stuck.reason == "ImagePullBackOff"
    assert stuck.message is not None and "worker-0" in stuck.message


async def test_the_watch_reconnects_after_the_api_server_fails_it(
        emulator: kmock.KubernetesEmulator, executor: KubernetesExecutor) -> None:
    failures = {"pytorchjobs": 0}

    def fail_the_first_job_watch(request: kmock.Request) -> None:
        if failures["pytorchjobs"] == 0:
            failures["pytorchjobs"] += 1
            raise kmock.KubernetesError(status=500, reason="InternalError", message="etcd hiccup")

    emulator[kmock.action.WATCH, kmock.resource(JOBS)] << fail_the_first_job_watch
    spec = _spec()
    await executor.launch(spec)

    async with contextlib.aclosing(executor.updates()) as updates:
        status = await _next(updates)

    assert (status.job_name, status.state) == (spec.job_name, JobState.PENDING)
    job_watches = [r for r in emulator if r.params.get("watch") == "true"
                   and r.resource is not None and r.resource.plural == "pytorchjobs"]
    assert failures["pytorchjobs"] == 1
    assert len(job_watches) == 2


async def test_cancel_deletes_the_job_with_foreground_propagation(
        emulator: kmock.KubernetesEmulator, executor: KubernetesExecutor) -> None:
    spec = _spec()
    await executor.launch(spec)

    await executor.cancel(spec.job_name, grace_s=20)

    (delete,) = [r for r in emulator if r.method == "DELETE"]
    assert delete.name == spec.job_name
    assert delete.params.get("propagationPolicy") == "Foreground" or \
        (delete.data or {}).get("propagationPolicy") == "Foreground"
    assert _jobs(emulator) == []
    assert (await executor.status(spec.job_name)).state is JobState.MISSING
    await executor.cancel(spec.job_name, grace_s=20)  # already gone: still fine


@pytest.mark.parametrize(("reason", "retryable"), [
    ("ImagePullBackOff", True), ("ErrImagePull", True), ("CrashLoopBackOff", True),
    ("CreateContainerConfigError", False), ("InvalidImageName", False)])
async def test_a_pod_that_cannot_start_is_reported_stuck_with_its_reason(
        emulator: kmock.KubernetesEmulator, executor: KubernetesExecutor,
        reason: str, retryable: bool) -> None:
    spec = _spec()
    await executor.launch(spec)
    await _set_conditions(emulator, spec.job_name, ("Created", "created"))
    await _create_pod(emulator, spec.job_name, name=f"{spec.job_name}-master-0",
                      status=_waiting(reason, 'Back-off pulling image "vidmaas/runtime:0.1.0"'))

    status = await executor.status(spec.job_name)

    assert status.stuck is True
    assert status.reason == reason
    assert status.retryable is retryable
    assert status.message is not None and spec.job_name in status.message


async def test_a_pod_pending_past_the_limit_is_stuck_with_the_schedulers_reason(
        emulator: kmock.KubernetesEmulator, executor: KubernetesExecutor) -> None:
    spec = _spec()
    await executor.launch(spec)
    await _create_pod(emulator, spec.job_name, name=f"{spec.job_name}-master-0", age_s=120,
                      status={"phase": "Pending", "conditions": [
                          {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                           "message": "0/4 nodes are available: 4 Insufficient nvidia.com/gpu."}]})

    status = await executor.status(spec.job_name)

    assert status.stuck is True
    assert status.reason == "Unschedulable"
    assert status.message is not None and "Insufficient nvidia.com/gpu" in status.message


async def test_a_pod_pending_within_the_limit_is_not_stuck(
        emulator: kmock.KubernetesEmulator, executor: KubernetesExecutor) -> None:
    spec = _spec()
    await executor.launch(spec)
    await _create_pod(emulator, spec.job_name, name=f"{spec.job_name}-master-0", age_s=5,
                      status={"phase": "Pending"})

    status = await executor.status(spec.job_name)

    assert (status.state, status.stuck) == (JobState.PENDING, False)


async def test_a_job_suspended_by_kueue_waits_without_being_stuck(
        emulator: kmock.KubernetesEmulator, settings: Settings) -> None:
    settings.kube.kueue_queue = "team-a"
    executor = KubernetesExecutor(settings, clock=lambda: dt.datetime.now(dt.UTC)
                                  + dt.timedelta(days=1))
    try:
        spec = _spec()
        await executor.launch(spec)
        (job,) = _jobs(emulator)
        assert job["spec"]["runPolicy"]["suspend"] is True
        assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
        await _set_conditions(emulator, spec.job_name, ("Created", "c"), ("Suspended", "queued"))

        status = await executor.status(spec.job_name)
    finally:
        await executor.close()

    assert (status.state, status.reason, status.stuck) == (JobState.PENDING, "Suspended", False)


async def test_a_job_that_never_gets_pods_is_stuck(
        emulator: kmock.KubernetesEmulator, settings: Settings) -> None:
    executor = KubernetesExecutor(settings, clock=lambda: dt.datetime.now(dt.UTC)
                                  + dt.timedelta(hours=1))
    try:
        spec = _spec()
        await executor.launch(spec)
        # the emulator sets no creationTimestamp; the API server would
        await emulator.patch(f"{JOBS_URL}/{spec.job_name}",
                             json={"metadata": {"creationTimestamp": "2026-01-01T00:00:00Z"}})

        status = await executor.status(spec.job_name)
    finally:
        await executor.close()

    assert (status.stuck, status.reason) == (True, "NoPods")


async def test_list_jobs_names_only_the_jobs_vidmaas_owns(
        emulator: kmock.KubernetesEmulator, executor: KubernetesExecutor) -> None:
    specs = [_spec("tiny-t2v"), _spec("wan2.2-ti2v-5b")]
    for spec in specs:
        await executor.launch(spec)
    foreign = {"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob",
               "metadata": {"name": "someone-elses-job", "namespace": NAMESPACE},
               "spec": {"pytorchReplicaSpecs": {}}}
    assert (await emulator.post(JOBS_URL, json=foreign)).status in (200, 201)

    names = await executor.list_jobs()

    assert names == sorted(s.job_name for s in specs)
    (listing,) = [r for r in emulator if r.method == "GET" and r.params.get("watch") is None
                  and r.name is None and r.resource is not None
                  and r.resource.plural == "pytorchjobs"]
    assert listing.params["labelSelector"] == "app.kubernetes.io/managed-by=vidmaas"


async def test_kube_api_calls_lists_every_call_the_executor_made(
        emulator: kmock.KubernetesEmulator, executor: KubernetesExecutor) -> None:
    spec = _spec()
    async with contextlib.aclosing(executor.updates()) as updates:
        await executor.launch(spec)
        await executor.launch(spec)
        await _next(updates)
        await _set_conditions(emulator, spec.job_name, ("Failed", "failed"))
        await _next(updates)
        await executor.status(spec.job_name)
        await executor.list_jobs()
        await executor.cancel(spec.job_name, grace_s=1)
        await _next(updates)
    verbs = {"GET": "get", "POST": "create", "DELETE": "delete"}

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

    # The pool workers' calls are checked by tests/dispatcher/test_kubernetes_pools.py.
    assert made == set(KUBE_API_CALLS) - set(POOL_API_CALLS)


async def test_an_unreachable_api_server_is_an_executor_error(settings: Settings) -> None:
    settings.kube.api_server_url = "http://127.0.0.1:9"
    executor = KubernetesExecutor(settings)
    try:
        with pytest.raises(ExecutorError, match="Kubernetes"):
            await executor.list_jobs()
        with pytest.raises(ExecutorError, match="Kubernetes"):
            await executor.launch(_spec("tiny-t2v"))
    finally:
        await executor.close()


async def test_updates_end_when_the_executor_closes(
        emulator: kmock.KubernetesEmulator, settings: Settings) -> None:
    executor = KubernetesExecutor(settings)
    spec = _spec("tiny-t2v")
    await executor.launch(spec)
    seen: list[JobStatus] = []

    async def consume() -> None:
        async for status in executor.updates():
            seen.append(status)

    consumer = asyncio.create_task(consume())
    for _ in range(100):
        if seen:
            break
        await asyncio.sleep(0.05)
    await executor.close()
    await asyncio.wait_for(consumer, timeout=10)

    assert [s.job_name for s in seen] == [spec.job_name]


async def test_a_kubeconfig_file_configures_the_client(
        emulator: kmock.KubernetesEmulator, settings: Settings, tmp_path: Path) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        "apiVersion: v1\nkind: Config\n"
        f"clusters: [{{name: emu, cluster: {{server: '{str(emulator.url).rstrip('/')}'}}}}]\n"
        "users: [{name: ops, user: {token: test-token}}]\n"
        "contexts: [{name: emu, context: {cluster: emu, user: ops}}]\n"
        "current-context: emu\n")
    settings.kube.api_server_url = None
    settings.kube.kubeconfig = kubeconfig
    executor = KubernetesExecutor(settings)
    try:
        assert await executor.list_jobs() == []
    finally:
        await executor.close()

    (listing,) = [r for r in emulator if r.resource is not None]
    assert listing.headers.get("Authorization") == "Bearer test-token"


async def test_a_missing_kubeconfig_is_an_executor_error(
        settings: Settings, tmp_path: Path) -> None:
    settings.kube.api_server_url = None
    settings.kube.kubeconfig = tmp_path / "missing"
    executor = KubernetesExecutor(settings)
    try:
        with pytest.raises(ExecutorError, match="configure the Kubernetes client"):
            await executor.list_jobs()
    finally:
        await executor.close()
