"""What the PyTorchJob rendering tests share: settings against the real CRD, job specs,
and ways into a rendered manifest or a changed copy of the shipped template."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vidmaas.config import KubeSettings, Settings, StorageSettings
from vidmaas.domain.ids import job_name, new_task_id
from vidmaas.domain.jobs import JobSpec
from vidmaas.domain.models import ModelRegistry, ModelSpec

REPO_ROOT = Path(__file__).resolve().parents[2]
CRD_PATH = REPO_ROOT / ".." / "shared" / "k8s" / "crds" / "kubeflow.org_pytorchjobs.yaml"
SHIPPED_TEMPLATE = REPO_ROOT / "src" / "vidmaas" / "templates" / "pytorchjob.yaml.j2"

REGISTRY = ModelRegistry.load()


def settings_with(**kube: Any) -> Settings:
    return Settings(storage=StorageSettings(url="s3://vidmaas-bucket/prod"),
                    kube=KubeSettings(crd_schema_path=CRD_PATH, **kube))


def spec_of(model: ModelSpec, prompt: str = "a cat", *, image: bool | None = None,
            negative_prompt: str | None = None, labels: dict[str, str] | None = None,
            seed: int = 1234) -> JobSpec:
    has_image = model.image == "required" if image is None else image
    params = model.resolve(size=None, num_frames=None, steps=None, seed=seed,
                           has_image=has_image)
    task_id = new_task_id()
    return JobSpec(task_id=task_id, job_name=job_name(task_id), user_id="u0123456789abcdefghjk",
                   model=model, prompt=prompt, params=params.as_dict(), attempt=1,
                   input_key=f"inputs/{task_id}/input.png" if has_image else None,
                   negative_prompt=negative_prompt, labels=labels or {})


def replicas_of(manifest: dict[str, Any]) -> dict[str, Any]:
    replicas: dict[str, Any] = manifest["spec"]["pytorchReplicaSpecs"]
    return replicas


def pod_of(replica: dict[str, Any]) -> dict[str, Any]:
    pod: dict[str, Any] = replica["template"]["spec"]
    return pod


def main_of(replica: dict[str, Any]) -> dict[str, Any]:
    container: dict[str, Any] = pod_of(replica)["containers"][0]
    return container


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e for e in container["env"]}


def operator_template(tmp_path: Path, old: str, new: str) -> Path:
    """A copy of the shipped template with ``old`` (which must be there) replaced."""
    text = SHIPPED_TEMPLATE.read_text(encoding="utf-8")
    assert old in text, f"the shipped template no longer holds {old!r}"
    path = tmp_path / "pytorchjob.yaml.j2"
    path.write_text(text.replace(old, new, 1), encoding="utf-8")
    return path
