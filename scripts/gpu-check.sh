#!/usr/bin/env bash
# The GPU check: the job runtime on a real accelerator, printing its figures (docs/runtime.md,
# "The GPU check"). Finishes in under 8 minutes on one H200:
#
#   bash scripts/gpu-check.sh [--only SECTION ...] [--budget-s S]
#
# Self-contained: run it from a copy of the working tree. It uses a Python whose torch
# sees CUDA (PYTHON, else python3) and adds the runtime's other packages it lacks: from
# wheels in ./.whl when there are some, else from the package index into a reused
# virtualenv that keeps the machine's own torch. With no torch that sees CUDA on a GPU
# machine it installs the image's pinned versions (deploy/images/runtime-constraints.txt)
# into that virtualenv; with no GPU at all it runs the CPU smoke version. Then it runs
# `python -m vidmaas.runtime.gpucheck` from src/; the report also lands in
# $GPU_CHECK_OUT/gpu-check.json (default ./gpu-check-out).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
out="${GPU_CHECK_OUT:-$root/gpu-check-out}"
py="${PYTHON:-python3}"
venv="$root/.gpucheck-venv"
site="$root/.gpucheck-site"
started=$(date +%s)

# One line: "<1 if torch sees CUDA> <torch version or -> <packages missing…>".
probe() {
    PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" "$1" - <<'PY' 2>/dev/null || echo "0 - ?"
import importlib.util
need = {"diffusers": "diffusers", "transformers": "transformers", "accelerate": "accelerate",
        "safetensors": "safetensors", "ftfy": "ftfy", "wcwidth": "wcwidth", "PIL": "pillow",
        "numpy": "numpy", "pydantic": "pydantic", "pydantic_core": "pydantic-core",
        "annotated_types": "annotated-types", "typing_inspection": "typing-inspection",
        "yaml": "pyyaml", "regex": "regex"}
missing = [pkg for mod, pkg in need.items() if importlib.util.find_spec(mod) is None]
try:
    import torch
    cuda, version = int(torch.cuda.is_available()), torch.__version__
except ImportError:
    cuda, version = 0, "-"
print(cuda, version, *missing)
PY
}

echo "== setup"
gpu=0
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    gpu=1
    nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader
else
    echo "nvidia-smi: no GPU"
fi
read -r cuda torch_version missing <<<"$(probe "$py")"
if [ "$cuda" != 1 ] && [ -x "$venv/bin/python" ]; then
    read -r vcuda vtorch vmissing <<<"$(probe "$venv/bin/python")"
    if [ "$vcuda" = 1 ] || [ "$gpu" = 0 ]; then
        py="$venv/bin/python" cuda=$vcuda torch_version=$vtorch missing=$vmissing
        echo "reusing $venv"
    fi
fi
if [ "$cuda" = 1 ]; then
    echo "using $py: torch $torch_version with CUDA"
elif [ "$gpu" = 0 ] && [ "$torch_version" != - ]; then
    echo "no GPU here: running the CPU smoke version with $py (torch $torch_version)"
    set -- --smoke "$@"
else
    echo "no torch that sees CUDA: installing the runtime's pinned versions into $venv"
    t=$(date +%s)
    [ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
    "$venv/bin/pip" install -q -c deploy/images/runtime-constraints.txt -e ".[runtime]"
    py="$venv/bin/python"
    read -r cuda torch_version missing <<<"$(probe "$py")"
    echo "installed torch $torch_version (CUDA: $cuda) and the runtime in $(( $(date +%s) - t )) s"
fi

if [ -n "${missing// /}" ]; then
    echo "missing: $missing"
    t=$(date +%s)
    if compgen -G "$root/.whl/*.whl" >/dev/null; then
        "$py" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$site" \
            "$root"/.whl/*.whl
        echo "installed the wheels of .whl into $site in $(( $(date +%s) - t )) s"
    else
        # Keep this machine's own (CUDA) torch; every other pin of the image applies.
        grep -v '^torch==' deploy/images/runtime-constraints.txt > "$root/.gpucheck-constraints.txt"
        if [ "$py" != "$venv/bin/python" ]; then
            [ -x "$venv/bin/python" ] || "$py" -m venv --system-site-packages "$venv"
            py="$venv/bin/python"
        fi
        # shellcheck disable=SC2086  # one word per package
        if ! "$py" -m pip install -q -c "$root/.gpucheck-constraints.txt" $missing; then
            echo "cannot install $missing here (no package index?): put their wheels, and" \
                 "those of their missing dependencies, in ./.whl and run again" >&2
            exit 2
        fi
        echo "installed $missing into $venv in $(( $(date +%s) - t )) s"
    fi
fi

export PYTHONPATH="$site:$root/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
echo "setup took $(( $(date +%s) - started )) s"
exec "$py" -m vidmaas.runtime.gpucheck --out "$out" "$@"
