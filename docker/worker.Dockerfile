# syntax=docker/dockerfile:1.7
# GPU queue worker: `moderation worker` on a CUDA runtime base.
#
#   docker build -f docker/worker.Dockerfile -t moderation-worker .      (from the repository root)
#
# The PyTorch wheel from PyPI carries its own CUDA libraries; the CUDA base image provides the NVIDIA
# container runtime wiring (NVIDIA_VISIBLE_DEVICES, driver capabilities) and a matching userland. The host
# driver must support the CUDA version of the torch wheel (see docs/operations.md). Override the base with
# --build-arg CUDA_IMAGE=... to follow your driver.
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

FROM ${CUDA_IMAGE} AS base
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates tini \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv

FROM base AS build
WORKDIR /src
# Dependencies first (a layer that survives code changes): install the project's requirements from
# pyproject.toml with an empty package, then the real code without touching the dependencies.
COPY pyproject.toml README.md ./
RUN --mount=type=cache,target=/root/.cache/pip \
    mkdir -p worker training && touch worker/__init__.py training/__init__.py \
 && pip install . && pip uninstall -y moderation && rm -rf worker training
COPY worker ./worker
COPY training ./training
RUN pip install --no-deps --no-cache-dir .

FROM base
COPY --from=build /opt/venv /opt/venv
RUN useradd --create-home --uid 10001 moderation
USER moderation
WORKDIR /home/moderation
ENV MODERATION_HOME=/home/moderation/.moderation \
    MODERATION_LOG_FORMAT=json \
    MODERATION_METRICS_PORT=9100 \
    MODERATION_DEVICE=cuda
EXPOSE 9100
# Celery's warm shutdown: the first SIGTERM finishes the in-flight batch, acks it and exits.
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s \
  CMD python3 -c "import os,urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/metrics' % os.environ['MODERATION_METRICS_PORT'], timeout=4)"
ENTRYPOINT ["tini", "--", "moderation"]
CMD ["worker"]
