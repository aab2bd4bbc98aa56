# syntax=docker/dockerfile:1.7
#
# vidmaas control plane: the api, dispatcher and relay roles (and `vidmaas migrate`).
# No torch, no CUDA: the GPU side lives in runtime.Dockerfile.
#
# Build from the repository root (the build context must be the root):
#   docker build -f deploy/images/control-plane.Dockerfile -t REGISTRY/vidmaas-control-plane:0.1.0 .
#
# One image, three roles; the Kubernetes manifests pick the role with `args`:
#   vidmaas api | vidmaas dispatcher | vidmaas relay | vidmaas migrate
#
# Health: Kubernetes ignores a Dockerfile HEALTHCHECK, so probes are declared in
# deploy/k8s/base (api: GET /readyz and /healthz on port 8000; dispatcher and relay:
# GET /healthz on the metrics port 9100). The image declares none on purpose: one
# check could not fit three roles listening on different ports.
# No secret is baked in: database, Redis and S3 credentials arrive as environment
# variables from Kubernetes Secrets at run time.

ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

# ---------------------------------------------------------------- build: the wheel
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN pip install --no-cache-dir build==1.2.2.post1
COPY pyproject.toml README.md ./
COPY src ./src
RUN python -m build --wheel --outdir /dist . \
 && python -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir /dist/*.whl

# ---------------------------------------------------------------- run
FROM ${PYTHON_IMAGE} AS control-plane
LABEL org.opencontainers.image.title="vidmaas-control-plane" \
      org.opencontainers.image.description="vidmaas api, dispatcher and relay" \
      org.opencontainers.image.source="https://github.com/vidmaas/vidmaas" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    VIDMAAS_API_HOST=0.0.0.0 \
    VIDMAAS_LOG_JSON=true
# A fixed numeric uid/gid so that runAsNonRoot can verify it without /etc/passwd.
RUN groupadd --system --gid 10001 vidmaas \
 && useradd --system --uid 10001 --gid 10001 --home-dir /home/vidmaas --create-home \
      --shell /usr/sbin/nologin vidmaas
COPY --from=build /opt/venv /opt/venv
WORKDIR /home/vidmaas
USER 10001:10001
EXPOSE 8000 9100
ENTRYPOINT ["vidmaas"]
CMD ["api"]
