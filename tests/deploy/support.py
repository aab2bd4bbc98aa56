"""Helpers for the deployment checks: paths, the shipped variants, kustomize builds.

``kubectl kustomize`` must be on PATH (it is on the project's machines and in CI):
these tests fail rather than skip without it, since an unchecked manifest is the
thing they exist to prevent.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
BASE = K8S / "base"
OVERLAYS = K8S / "overlays"
COMPONENTS = K8S / "components"

Doc = dict[str, Any]

# The variants an operator can deploy: each overlay as shipped, and production with
# the optional components switched on (as uncommenting its `components:` list does).
PRODUCTION_COMPONENT_SETS: dict[str, tuple[str, ...]] = {
    "production+kueue": ("kueue",),
    "production+hami": ("hami",),
    "production+kueue+hami": ("kueue", "hami"),
}
VARIANTS = ("base", "production", "embedded-demo", *PRODUCTION_COMPONENT_SETS)


def kustomize(directory: Path) -> list[Doc]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("kubectl is not on PATH; it is needed for `kubectl kustomize`")
    proc = subprocess.run([kubectl, "kustomize", str(directory)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, f"kustomize {directory} failed:\n{proc.stderr}"
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def production_with(components: tuple[str, ...], tmp: Path) -> list[Doc]:
    overlay = tmp / "overlay"
    overlay.mkdir()
    production = yaml.safe_load((OVERLAYS / "production" / "kustomization.yaml").read_text())
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "namespace": production["namespace"],
        "resources": [os.path.relpath(OVERLAYS / "production", overlay)],
        "components": [os.path.relpath(COMPONENTS / c, overlay) for c in components],
    }))
    return kustomize(overlay)


def find(docs: list[Doc], kind: str, name: str | None = None) -> list[Doc]:
    return [d for d in docs if d["kind"] == kind
            and (name is None or d["metadata"]["name"] == name)]


def one(docs: list[Doc], kind: str, name: str) -> Doc:
    found = find(docs, kind, name)
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def pod_specs(docs: list[Doc]) -> list[tuple[str, Doc]]:
    """(kind/name, pod spec) of every workload."""
    out = []
    for d in docs:
        if d["kind"] in ("Deployment", "Job", "StatefulSet", "DaemonSet"):
            out.append((f"{d['kind']}/{d['metadata']['name']}", d["spec"]["template"]["spec"]))
    return out
