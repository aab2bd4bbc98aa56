"""The shipped deployment runs warm-pool workers: the dispatcher finds the mounted
LeaderWorkerSet template, and the production settings render workers the real CRD and
the strict pod schema accept, with the Kueue and HAMI components when they are on."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from tests.deploy.support import ROOT, Doc, find, one
from vidmaas.config import Settings

LWS_CRD = ROOT.parent / "shared" / "k8s" / "crds" / "leaderworkerset.x-k8s.io_leaderworkersets.yaml"


def _configmap(docs: list[Doc], prefix: str) -> Doc:
    [cm] = [d for d in find(docs, "ConfigMap")
            if re.fullmatch(re.escape(prefix) + r"(-[a-z0-9]{10})?", d["metadata"]["name"])]
    return cm


@pytest.mark.parametrize("variant", ["production", "production+kueue+hami"])
def test_the_production_settings_render_pool_workers_the_crd_accepts(
    builds: dict[str, list[Doc]], variant: str, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from vidmaas.dispatcher.executors.kubernetes import render_pool_for_cli

    assert LWS_CRD.is_file(), f"lay shared/ beside the repository: {LWS_CRD} is missing"
    docs = builds[variant]
    registry = _configmap(docs, "vidmaas-registry")["data"]
    for name, text in registry.items():
        (tmp_path / name).write_text(text)
    dispatcher = one(docs, "Deployment", "vidmaas-dispatcher")["spec"]["template"]["spec"]
    (container,) = dispatcher["containers"]
    template = next(e["value"] for e in container["env"]
                    if e["name"] == "VIDMAAS_KUBE_POOL_TEMPLATE_PATH")
    env = dict(_configmap(docs, "vidmaas-settings")["data"])
    env.update({
        "VIDMAAS_MODELS_PATH": str(tmp_path / "models.yaml"),
        "VIDMAAS_KUBE_POOL_TEMPLATE_PATH": str(tmp_path / Path(template).name),
        "VIDMAAS_KUBE_POOL_CRD_SCHEMA_PATH": str(LWS_CRD),
        "VIDMAAS_KUBE_NAMESPACE": "vidmaas",
        "VIDMAAS_STORAGE_URL": "s3://videos/vidmaas",
    })
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = Settings()
    models = yaml.safe_load(registry["models.yaml"])["models"]
    for model in (m for m in models if not m.get("tiny")):
        manifest = yaml.safe_load(render_pool_for_cli(settings=settings, model_id=model["id"]))
        assert manifest["kind"] == "LeaderWorkerSet"
        text = yaml.safe_dump(manifest)
        assert "claimName: vidmaas-models" in text
        assert ("kueue.x-k8s.io/queue-name: vidmaas-gpu" in text) == ("kueue" in variant)
        assert ("nvidia.com/gpumem" in text) == ("hami" in variant)
