"""PyTorchJob resources and topology: memory per model, node selection, one node by
default, what a job that spans nodes adds, NCCL settings, the init container's node
rank, the entrypoint and the watermark logo. Every manifest here is validated against
the PyTorchJob CRD and the strict pod schema (``settings_with`` names the CRD)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.dispatcher.render_support import (
    REGISTRY,
    env_of,
    main_of,
    operator_template,
    pod_of,
    replicas_of,
    settings_with,
    spec_of,
)
from vidmaas.dispatcher.executors.kubernetes import LABEL_TASK_ID, render_pytorchjob
from vidmaas.domain.jobs import job_args
from vidmaas.domain.models import ModelSpec
from vidmaas.errors import ExecutorError
from vidmaas.runtime.cli import build_parser
from vidmaas.runtime.job import JobEnv

TWO_NODES = REGISTRY["wan2.2-i2v-a14b"].model_copy(update={"nproc_per_node": 4, "nnodes": 2})
"""A14B as two nodes of four GPUs (the registry ships it as one node of eight)."""
MULTI_NODE = {"multi_node": True, "rdma_resource_name": "rdma/hca", "nccl_socket_ifname": "eth0",
              "nccl_ib_hca": "mlx5_0,mlx5_1"}


def _render(model: ModelSpec, prompt: str = "a cat", **kube: Any) -> dict[str, Any]:
    return render_pytorchjob(settings=settings_with(**kube), spec=spec_of(model, prompt))


# ---------------------------------------------------------------- memory per model


@pytest.mark.parametrize("model_id", list(REGISTRY))
def test_each_model_asks_for_its_own_vgpu_memory_and_pod_memory(model_id: str) -> None:
    model = REGISTRY[model_id]

    manifest = _render(model, gpu_memory_resource_name="nvidia.com/gpumem")

    resources = main_of(replicas_of(manifest)["Master"])["resources"]
    assert resources["limits"]["nvidia.com/gpumem"] == int(model.gpu_memory_gib * 1024)
    assert resources["limits"]["nvidia.com/gpu"] == model.gpus_per_job
    assert resources["requests"]["memory"] == f"{int(model.pod_memory_gib)}Gi"
    assert resources["limits"]["memory"] == resources["requests"]["memory"]


def test_two_models_get_different_vgpu_memory_slices() -> None:
    small = _render(REGISTRY["wan2.2-ti2v-5b"], gpu_memory_resource_name="nvidia.com/gpumem")
    large = _render(REGISTRY["wan2.2-t2v-a14b"], gpu_memory_resource_name="nvidia.com/gpumem")

    def gpumem(m: dict[str, Any]) -> int:
        value: int = main_of(replicas_of(m)["Master"])["resources"]["limits"]["nvidia.com/gpumem"]
        return value

    assert (gpumem(small), gpumem(large)) == (32 * 1024, 48 * 1024)


def test_without_a_vgpu_memory_resource_only_gpus_and_memory_are_limited() -> None:
    manifest = _render(REGISTRY["wan2.2-ti2v-5b"], gpu_resource_name="nvidia.com/vgpu")

    limits = main_of(replicas_of(manifest)["Master"])["resources"]["limits"]
    assert limits == {"nvidia.com/vgpu": 2, "memory": "24Gi"}


def test_the_global_memory_settings_override_every_model_alike() -> None:
    manifest = _render(REGISTRY["wan2.2-ti2v-5b"], gpu_memory_resource_name="nvidia.com/gpumem",
                       gpu_memory_mib=24000, memory_request="40Gi")

    resources = main_of(replicas_of(manifest)["Master"])["resources"]
    assert resources["limits"]["nvidia.com/gpumem"] == 24000
    assert resources["requests"]["memory"] == resources["limits"]["memory"] == "40Gi"


def test_a_fractional_pod_memory_becomes_whole_mebibytes() -> None:
    model = REGISTRY["tiny-t2v"].model_copy(update={"pod_memory_gib": 1.5})

    manifest = _render(model)

    assert main_of(replicas_of(manifest)["Master"])["resources"]["requests"]["memory"] == "1536Mi"


def test_a_template_that_drops_the_vgpu_memory_is_rejected(tmp_path: Path) -> None:
    template = operator_template(tmp_path, "limits: {{ limits }}",
                                 "limits: {{ {gpu_resource_name: nproc_per_node} }}")

    with pytest.raises(ExecutorError, match=r"nvidia\.com/gpumem"):
        render_pytorchjob(settings=settings_with(template_path=template,
                                                 gpu_memory_resource_name="nvidia.com/gpumem"),
                          spec=spec_of(REGISTRY["tiny-t2v"]))


# ---------------------------------------------------------------- node selection, /dev/shm


def test_no_gpu_product_is_selected_by_default() -> None:
    assert "nodeSelector" not in pod_of(replicas_of(_render(REGISTRY["tiny-t2v"]))["Master"])


def test_a_gpu_product_setting_pins_every_pod_to_that_gpu_model() -> None:
    manifest = _render(TWO_NODES, gpu_product="NVIDIA-H100-80GB-HBM3", multi_node=True)

    for replica in replicas_of(manifest).values():
        assert pod_of(replica)["nodeSelector"] == {
            "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}


@pytest.mark.parametrize(("kube", "size"), [({}, "8Gi"), ({"shm_size_limit": "32Gi"}, "32Gi")])
def test_dev_shm_is_an_in_memory_volume_with_the_configured_size_limit(
        kube: dict[str, Any], size: str) -> None:
    replica = replicas_of(_render(REGISTRY["wan2.2-t2v-a14b"], **kube))["Master"]

    volumes = {v["name"]: v for v in pod_of(replica)["volumes"]}
    assert volumes["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": size}
    assert {"name": "dshm", "mountPath": "/dev/shm"} in main_of(replica)["volumeMounts"]


# ---------------------------------------------------------------- topology


def test_by_default_a_job_runs_in_one_pod_with_all_its_gpus_and_no_anti_affinity() -> None:
    manifest = _render(TWO_NODES, rdma_resource_name="rdma/hca", nccl_socket_ifname="eth0",
                       nccl_ib_hca="mlx5_0")

    (master,) = replicas_of(manifest).values()
    assert manifest["spec"]["nprocPerNode"] == "8"
    pod = pod_of(master)
    assert "affinity" not in pod
    limits = main_of(master)["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == TWO_NODES.gpus_per_job
    assert "rdma/hca" not in limits
    assert limits["memory"] == f"{int(TWO_NODES.pod_memory_gib) * 2}Gi"  # two nodes' ranks
    assert "securityContext" not in main_of(master)
    env = env_of(main_of(master))
    assert "NCCL_SOCKET_IFNAME" not in env and "NCCL_IB_HCA" not in env
    assert env_of(pod["initContainers"][0])["PET_NNODES"]["value"] == "1"


def test_a_job_that_spans_nodes_gets_workers_anti_affinity_rdma_and_nccl_interfaces() -> None:
    spec = spec_of(TWO_NODES)

    manifest = render_pytorchjob(settings=settings_with(**MULTI_NODE), spec=spec)

    replicas = replicas_of(manifest)
    assert (replicas["Master"]["replicas"], replicas["Worker"]["replicas"]) == (1, 1)
    assert manifest["spec"]["nprocPerNode"] == "4"
    for replica in replicas.values():
        pod = pod_of(replica)
        assert replica["template"]["metadata"]["labels"][LABEL_TASK_ID] == spec.task_id
        anti = pod["affinity"]["podAntiAffinity"]
        (term,) = anti["requiredDuringSchedulingIgnoredDuringExecution"]
        assert term == {"labelSelector": {"matchLabels": {LABEL_TASK_ID: spec.task_id}},
                        "topologyKey": "kubernetes.io/hostname"}
        main = main_of(replica)
        assert main["resources"]["limits"] == {"nvidia.com/gpu": 4, "rdma/hca": 1,
                                               "memory": f"{int(TWO_NODES.pod_memory_gib)}Gi"}
        assert main["securityContext"] == {"capabilities": {"add": ["IPC_LOCK"]}}
        env = env_of(main)
        assert env["NCCL_SOCKET_IFNAME"]["value"] == "eth0"
        assert env["NCCL_IB_HCA"]["value"] == "mlx5_0,mlx5_1"
        assert replica["restartPolicy"] == "Never"


def test_multi_node_changes_nothing_for_a_model_that_fits_one_node() -> None:
    manifest = _render(REGISTRY["wan2.2-t2v-a14b"], **MULTI_NODE)

    (master,) = replicas_of(manifest).values()
    assert "affinity" not in pod_of(master)
    assert "rdma/hca" not in main_of(master)["resources"]["limits"]
    assert "NCCL_SOCKET_IFNAME" not in env_of(main_of(master))


# ---------------------------------------------------------------- NCCL settings


def test_hami_nccl_workaround_and_collective_timeout_are_off_by_default() -> None:
    env = env_of(main_of(replicas_of(_render(REGISTRY["wan2.2-ti2v-5b"]))["Master"]))

    assert not {"NCCL_P2P_DISABLE", "NCCL_SHM_DISABLE", "TORCH_NCCL_ASYNC_ERROR_HANDLING",
                "VIDMAAS_COLLECTIVE_TIMEOUT_S"} & env.keys()


def test_hami_nccl_workaround_and_collective_timeout_are_rendered_when_set() -> None:
    manifest = _render(TWO_NODES, hami_nccl_workaround=True, collective_timeout_s=180,
                       multi_node=True)

    for replica in replicas_of(manifest).values():
        env = {k: v["value"] for k, v in env_of(main_of(replica)).items() if "value" in v}
        assert env["NCCL_P2P_DISABLE"] == env["NCCL_SHM_DISABLE"] == "1"
        assert env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"
        assert env["VIDMAAS_COLLECTIVE_TIMEOUT_S"] == "180"


# ---------------------------------------------------------------- the init container's rank


def _fake_vidmaas_job(bin_dir: Path, out: Path) -> None:
    script = bin_dir / "vidmaas-job"
    script.write_text(f"#!{sys.executable}\nimport json, os, sys\n"
                      f"json.dump({{'argv': sys.argv[1:], 'env': dict(os.environ)}}, "
                      f"open({str(out)!r}, 'w'))\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)


def _run_init(init: dict[str, Any], tmp_path: Path, labels: dict[str, str]) -> dict[str, Any]:
    """Run an initContainer's command line here, with its literal environment and the
    downward-API values the kubelet would fill in from the pod's labels."""
    bin_dir, out = tmp_path / "bin", tmp_path / "seen.json"
    bin_dir.mkdir(exist_ok=True)
    _fake_vidmaas_job(bin_dir, out)
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    for e in init["env"]:
        if "value" in e:
            env[e["name"]] = e["value"]
        elif "fieldRef" in e.get("valueFrom", {}):
            path = e["valueFrom"]["fieldRef"]["fieldPath"]
            key = path.removeprefix("metadata.labels['").removesuffix("']")
            env[e["name"]] = labels[key]
    subprocess.run(init["command"], env=env, check=True, timeout=30)
    seen: dict[str, Any] = json.loads(out.read_text())
    return seen


@pytest.mark.parametrize("prompt", ['a "cat" $(id) `x` ${HOME} \\ \n', "--help", "-v"])
def test_a_workers_fetch_input_learns_its_node_rank_and_keeps_the_arguments(
        tmp_path: Path, prompt: str) -> None:
    model = TWO_NODES.model_copy(update={"nnodes": 3})
    spec = spec_of(model, prompt)
    manifest = render_pytorchjob(settings=settings_with(multi_node=True), spec=spec)
    replicas = replicas_of(manifest)
    (master_init,) = pod_of(replicas["Master"])["initContainers"]
    (worker_init,) = pod_of(replicas["Worker"])["initContainers"]
    assert env_of(master_init)["PET_NODE_RANK"]["value"] == "0"

    # The second Worker (index 1) is node 2, as the operator numbers PET_NODE_RANK.
    seen = _run_init(worker_init, tmp_path, {"training.kubeflow.org/replica-index": "1"})

    assert seen["argv"] == ["fetch-input", *job_args(spec)]
    ns = build_parser().parse_args(seen["argv"])
    assert (ns.prompt, ns.image) == (prompt, spec.input_key)
    dist = JobEnv.from_environ(seen["env"]).dist
    assert (dist.node_rank, dist.nnodes, dist.nproc_per_node) == (2, 3, 4)
    assert not dist.is_reporter and not dist.reports_outcome


def test_a_worker_fetch_input_without_its_replica_index_fails_rather_than_act_as_node_0(
        tmp_path: Path) -> None:
    manifest = render_pytorchjob(settings=settings_with(multi_node=True), spec=spec_of(TWO_NODES))
    (init,) = pod_of(replicas_of(manifest)["Worker"])["initContainers"]

    with pytest.raises(subprocess.CalledProcessError):
        _run_init(init, tmp_path, {"training.kubeflow.org/replica-index": ""})
    assert not (tmp_path / "seen.json").exists()


def test_a_template_whose_worker_fetch_input_runs_as_node_0_is_rejected(tmp_path: Path) -> None:
    template = operator_template(tmp_path, "command: {{ replica.fetch_command }}",
                                 "command: {{ fetch_command }}")
    template.write_text(template.read_text().replace(
        "{%- for env in replica.node_env %}", "{%- for env in replicas[0].node_env %}"))

    with pytest.raises(ExecutorError, match=r"Worker fetch-input .* node rank"):
        render_pytorchjob(settings=settings_with(multi_node=True, template_path=template),
                          spec=spec_of(TWO_NODES))


# ---------------------------------------------------------------- entrypoint, watermark logo


@pytest.mark.parametrize(("entrypoint", "command"), [("vidmaas-job", ["vidmaas-job", "run"]),
                                                     ("run.sh", ["run.sh"])])
def test_the_entrypoint_setting_chooses_the_main_command_and_passes_the_checks(
        entrypoint: str, command: list[str]) -> None:
    spec = spec_of(TWO_NODES)

    manifest = render_pytorchjob(settings=settings_with(entrypoint=entrypoint, multi_node=True),
                                 spec=spec)

    for replica in replicas_of(manifest).values():
        assert main_of(replica)["command"] == command
        assert main_of(replica)["args"] == job_args(spec)


def test_the_watermark_logo_reaches_the_pods_only_when_set() -> None:
    plain = env_of(main_of(replicas_of(_render(REGISTRY["tiny-t2v"]))["Master"]))
    settings = settings_with()
    settings.runtime.watermark_logo_path = Path("/models/brand/logo.png")

    manifest = render_pytorchjob(settings=settings, spec=spec_of(REGISTRY["tiny-t2v"]))

    assert "VIDMAAS_WATERMARK_LOGO" not in plain
    env = env_of(main_of(replicas_of(manifest)["Master"]))
    assert env["VIDMAAS_WATERMARK_LOGO"]["value"] == "/models/brand/logo.png"
    assert JobEnv.from_environ({"VIDMAAS_WATERMARK_LOGO": env["VIDMAAS_WATERMARK_LOGO"]["value"]}
                               ).watermark_logo == Path("/models/brand/logo.png")


def test_the_gang_scheduling_policy_the_guide_suggests_passes_the_crd(tmp_path: Path) -> None:
    template = operator_template(tmp_path, "    backoffLimit: {{ backoff_limit }}\n",
                                 "    backoffLimit: {{ backoff_limit }}\n"
                                 "    schedulingPolicy: {minAvailable: {{ nnodes }}}\n")

    manifest = render_pytorchjob(settings=settings_with(template_path=template, multi_node=True),
                                 spec=spec_of(TWO_NODES))

    assert manifest["spec"]["runPolicy"]["schedulingPolicy"] == {"minAvailable": 2}
