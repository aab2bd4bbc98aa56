"""Pool worker LeaderWorkerSets: checked, valid against the real CRD and the strict pod
schema, and built from the same pieces as the PyTorchJob of a task."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import SecretStr

from vidmaas.cli import main
from vidmaas.config import KubeSettings, Settings, StorageSettings
from vidmaas.dispatcher.executors.base import WorkerSpec
from vidmaas.dispatcher.executors.kubernetes import (
    LABEL_KUEUE_QUEUE,
    render_pool,
    render_pytorchjob,
    worker_lws_name,
)
from vidmaas.domain.ids import is_worker_id, job_name, new_task_id, new_worker_id
from vidmaas.domain.jobs import JobSpec
from vidmaas.domain.models import ModelRegistry, ModelSpec
from vidmaas.domain.workers import WorkerLimits, worker_args
from vidmaas.errors import ExecutorError

REPO_ROOT = Path(__file__).resolve().parents[2]
CRDS = REPO_ROOT / ".." / "shared" / "k8s" / "crds"
LWS_CRD = CRDS / "leaderworkerset.x-k8s.io_leaderworkersets.yaml"
JOB_CRD = CRDS / "kubeflow.org_pytorchjobs.yaml"
SHIPPED_TEMPLATE = REPO_ROOT / "src" / "vidmaas" / "templates" / "leaderworkerset.yaml.j2"

REGISTRY = ModelRegistry.load()


def _settings(**kube: Any) -> Settings:
    return Settings(storage=StorageSettings(url="s3://vidmaas-bucket/prod"),
                    kube=KubeSettings(pool_crd_schema_path=LWS_CRD, crd_schema_path=JOB_CRD,
                                      **kube))


def _worker(model: ModelSpec) -> WorkerSpec:
    return WorkerSpec(worker_id=new_worker_id(model.id), model=model,
                      args=worker_args(model, WorkerLimits(max_tasks=50)),
                      labels={"vidmaas.io/pool": model.id})


def _two_nodes(model_id: str = "wan2.2-t2v-a14b") -> ModelSpec:
    return REGISTRY[model_id].model_copy(update={"nnodes": 2, "nproc_per_node": 4})


def _pod(manifest: dict[str, Any]) -> dict[str, Any]:
    pod: dict[str, Any] = manifest["spec"]["leaderWorkerTemplate"]["workerTemplate"]["spec"]
    return pod


def _env(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e for e in container["env"]}


def _operator_template(tmp_path: Path, old: str, new: str) -> Path:
    text = SHIPPED_TEMPLATE.read_text(encoding="utf-8")
    assert old in text
    path = tmp_path / "pool.yaml.j2"
    path.write_text(text.replace(old, new, 1), encoding="utf-8")
    return path


def test_the_leaderworkerset_crd_file_is_where_the_tests_expect_it() -> None:
    assert LWS_CRD.is_file(), f"lay shared/ beside the repository: {LWS_CRD} is missing"


@pytest.mark.parametrize("model_id", list(REGISTRY))
def test_every_model_renders_one_group_of_its_nodes_running_serve_with_the_worker_args(
        model_id: str) -> None:
    spec = _worker(REGISTRY[model_id])

    manifest = render_pool(settings=_settings(kueue_queue="gpu-queue"), spec=spec)

    assert (manifest["apiVersion"], manifest["kind"]) == ("leaderworkerset.x-k8s.io/v1",
                                                          "LeaderWorkerSet")
    assert manifest["metadata"]["name"] == worker_lws_name(spec.worker_id)
    assert manifest["metadata"]["labels"][LABEL_KUEUE_QUEUE] == "gpu-queue"
    assert manifest["metadata"]["labels"]["vidmaas.io/worker-id"] == spec.worker_id
    assert manifest["spec"]["replicas"] == 1
    assert manifest["spec"]["leaderWorkerTemplate"]["size"] == spec.model.nnodes
    (serve,) = _pod(manifest)["containers"]
    assert serve["command"] == ["vidmaas-job", "serve"]
    assert serve["args"] == spec.args
    assert _env(serve)["VIDMAAS_WORKER_ID"]["value"] == spec.worker_id
    assert "VIDMAAS_TASK_ID" not in _env(serve)  # per-task values come with each assignment


def test_a_two_node_worker_gets_the_leader_address_and_its_rank_from_the_group() -> None:
    spec = _worker(_two_nodes())

    manifest = render_pool(settings=_settings(namespace="gen", multi_node=True), spec=spec)

    name = manifest["metadata"]["name"]
    env = _env(_pod(manifest)["containers"][0])
    assert manifest["spec"]["leaderWorkerTemplate"]["size"] == 2
    assert env["PET_NNODES"]["value"] == "2"
    assert env["PET_NPROC_PER_NODE"]["value"] == "4"
    assert env["MASTER_ADDR"]["value"] == f"{name}-0.{name}.gen"
    assert env["PET_NODE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"] == \
        "metadata.labels['leaderworkerset.sigs.k8s.io/worker-index']"
    anti = _pod(manifest)["affinity"]["podAntiAffinity"]
    assert anti["requiredDuringSchedulingIgnoredDuringExecution"][0]["labelSelector"] == {
        "matchLabels": {"vidmaas.io/worker-id": spec.worker_id}}


def test_a_two_node_model_is_one_pod_of_all_its_gpus_unless_multi_node_is_on() -> None:
    manifest = render_pool(settings=_settings(), spec=_worker(_two_nodes()))

    assert manifest["spec"]["leaderWorkerTemplate"]["size"] == 1
    main = _pod(manifest)["containers"][0]
    assert main["resources"]["limits"]["nvidia.com/gpu"] == 8
    assert "MASTER_ADDR" not in _env(main)
    assert "affinity" not in _pod(manifest)


def test_a_one_node_worker_runs_torchrun_standalone() -> None:
    manifest = render_pool(settings=_settings(), spec=_worker(REGISTRY["wan2.2-ti2v-5b"]))

    env = _env(_pod(manifest)["containers"][0])
    assert "MASTER_ADDR" not in env
    assert env["PET_NNODES"]["value"] == "1"


@pytest.mark.parametrize("volume", ["hostPath", "pvc", "image"])
def test_a_worker_pod_gets_the_same_image_resources_volumes_and_secrets_as_a_job_pod(
        volume: str) -> None:
    settings = _settings(model_volume=volume, gpu_resource_name="nvidia.com/vgpu",
                         gpu_memory_resource_name="nvidia.com/gpumem", gpu_memory_mib=40000,
                         service_account="vidmaas-job", image_pull_policy="Always",
                         kueue_queue="gpu-queue", multi_node=True)
    model = _two_nodes()
    params = model.resolve(size=None, num_frames=None, steps=None, seed=1, has_image=False)
    task_id = new_task_id()
    job = render_pytorchjob(settings=settings, spec=JobSpec(
        task_id=task_id, job_name=job_name(task_id), user_id="u0123456789abcdefghjk",
        model=model, prompt="a cat", params=params.as_dict(), attempt=1))
    job_pod = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]

    pool_pod = _pod(render_pool(settings=settings, spec=_worker(model)))

    job_main, pool_main = job_pod["containers"][0], pool_pod["containers"][0]
    for key in ("image", "imagePullPolicy", "resources", "volumeMounts"):
        assert pool_main[key] == job_main[key], key
    assert pool_main["resources"]["limits"] == {"nvidia.com/vgpu": 4,
                                                "nvidia.com/gpumem": 40000,
                                                "memory": job_main["resources"]["limits"]["memory"]}
    for key in ("volumes", "serviceAccountName", "tolerations"):
        assert pool_pod[key] == job_pod[key], key
    job_env, pool_env = _env(job_main), _env(pool_main)
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "VIDMAAS_REDIS_URL",
                 "VIDMAAS_STORAGE_URL", "VIDMAAS_STORAGE_S3_REGION", "VIDMAAS_MODEL_DIR",
                 "VIDMAAS_WORK_DIR", "VIDMAAS_WATERMARK_TEXT", "VIDMAAS_HEARTBEAT_INTERVAL_S",
                 "VIDMAAS_PREVIEW_INTERVAL_S", "VIDMAAS_PREVIEW_MAX",
                 "VIDMAAS_STORAGE_RETRY_ATTEMPTS", "VIDMAAS_STORAGE_RETRY_TOTAL_S"):
        assert pool_env[name] == job_env[name], name


def test_the_models_own_runtime_image_wins_over_the_default() -> None:
    model = REGISTRY["tiny-t2v"].model_copy(update={"runtime_image": "registry/own:1"})

    manifest = render_pool(settings=_settings(), spec=_worker(model))

    assert _pod(manifest)["containers"][0]["image"] == "registry/own:1"


def test_worker_pods_are_given_the_stop_grace_to_exit() -> None:
    settings = _settings()
    settings.pools.stop_grace_s = 45.5

    manifest = render_pool(settings=settings, spec=_worker(REGISTRY["tiny-t2v"]))

    assert _pod(manifest)["terminationGracePeriodSeconds"] == 46


def test_the_object_name_stays_short_enough_for_the_controllers_names() -> None:
    long_model = "a" * 30 + "-" + "b" * 30
    worker_id = new_worker_id(long_model)

    name = worker_lws_name(worker_id)

    assert len(worker_id) > 50
    assert len(name) <= 40
    assert name.endswith(worker_id[-9:])  # the incarnation survives
    assert is_worker_id(name)
    short = new_worker_id("tiny-t2v")
    assert worker_lws_name(short) == short


def test_a_value_that_is_not_a_worker_id_is_refused() -> None:
    with pytest.raises(ExecutorError, match="not a pool worker id"):
        worker_lws_name("wan22-job-x")


def test_an_operator_template_is_used_when_configured(tmp_path: Path) -> None:
    path = _operator_template(tmp_path, "startupPolicy: LeaderCreated",
                              "startupPolicy: LeaderReady")

    manifest = render_pool(settings=_settings(pool_template_path=path),
                           spec=_worker(REGISTRY["tiny-t2v"]))

    assert manifest["spec"]["startupPolicy"] == "LeaderReady"


@pytest.mark.parametrize(("old", "new", "match"), [
    ("            args:\n{%- for arg in args %}", "            args: [\"--model\", \"other\"]\n"
     "{%- for arg in [] %}", "args differ"),
    ("  replicas: 1", "  replicas: 3", "one group"),
    ("    size: {{ nnodes }}", "    size: 5", "one group"),
    ("                value: {{ worker_id }}", "                value: wan22-pool-x-00000000",
     "VIDMAAS_WORKER_ID"),
    ("                valueFrom:\n                  secretKeyRef: {name: {{ redis_secret_name }}"
     ", key: VIDMAAS_REDIS_URL}", "                value: redis://inline", "from a Secret"),
    ("        terminationGracePeriodSeconds:", "        notAPodField: 1\n"
     "        terminationGracePeriodSeconds:", "workerTemplate fails schema validation"),
    ("  startupPolicy: LeaderCreated", "  startupPolicy: Whenever",
     "LeaderWorkerSet fails schema validation"),
    ("kind: LeaderWorkerSet", "kind: StatefulSet", "not a leaderworkerset"),
])
def test_a_template_that_breaks_a_guarantee_is_refused(
        tmp_path: Path, old: str, new: str, match: str) -> None:
    path = _operator_template(tmp_path, old, new)

    with pytest.raises(ExecutorError, match=f"(?i){match}"):
        render_pool(settings=_settings(pool_template_path=path),
                    spec=_worker(REGISTRY["wan2.2-t2v-a14b"]))


def test_a_configured_secret_value_never_appears_in_the_manifest(tmp_path: Path) -> None:
    settings = _settings()
    settings.storage.s3_access_key_id = SecretStr("AKIASECRETVALUE")
    path = _operator_template(tmp_path, "              - name: VIDMAAS_MODEL_DIR",
                              "              - name: LEAK\n"
                              "                value: {{ \"AKIASECRETVALUE\" }}\n"
                              "              - name: VIDMAAS_MODEL_DIR")

    with pytest.raises(ExecutorError, match="secret value"):
        render_pool(settings=settings.model_copy(update={"kube": settings.kube.model_copy(
            update={"pool_template_path": path})}), spec=_worker(REGISTRY["tiny-t2v"]))


def test_vidmaas_render_pool_prints_the_checked_manifest(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VIDMAAS_KUBE_POOL_CRD_SCHEMA_PATH", str(LWS_CRD))
    worker_id = new_worker_id("wan2.2-i2v-a14b")

    code = main(["render-pool", "--model", "wan2.2-i2v-a14b", "--worker-id", worker_id])

    assert code == 0
    manifest = yaml.safe_load(capsys.readouterr().out)
    assert manifest["kind"] == "LeaderWorkerSet"
    assert manifest["metadata"]["name"] == worker_id
    assert _pod(manifest)["containers"][0]["args"][:2] == ["--model", "wan2.2-i2v-a14b"]


def test_vidmaas_render_pool_names_an_unknown_model(
        capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["render-pool", "--model", "no-such-model"])

    assert code == 1
    assert "unknown model" in capsys.readouterr().err
