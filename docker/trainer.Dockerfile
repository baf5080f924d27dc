# syntax=docker/dockerfile:1.7
# Trainer: `moderation train-worker` (Celery worker on the training queue) or one-off `moderation train ...`,
# on the same CUDA base as the serving worker so a checkpoint trained here loads there unchanged.
#
#   docker build -f docker/trainer.Dockerfile -t moderation-trainer .    (from the repository root)
#   docker run --gpus all --shm-size 8g moderation-trainer train --help
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
    MODERATION_DEVICE=cuda
# DataLoader workers share tensors through /dev/shm: run with --shm-size (compose sets shm_size).
STOPSIGNAL SIGTERM
ENTRYPOINT ["tini", "--", "moderation"]
CMD ["train-worker"]
