"""Fixtures for the deployment checks: the kustomize builds of every shipped variant,
built once per session (see support.py)."""

from __future__ import annotations

import pytest

from tests.deploy.support import (
    BASE,
    OVERLAYS,
    PRODUCTION_COMPONENT_SETS,
    Doc,
    kustomize,
    production_with,
)


@pytest.fixture(scope="session")
def builds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Doc]]:
    out = {"base": kustomize(BASE)}
    for name in ("production", "embedded-demo"):
        out[name] = kustomize(OVERLAYS / name)
    for name, components in PRODUCTION_COMPONENT_SETS.items():
        out[name] = production_with(components, tmp_path_factory.mktemp(name))
    return out
