# syntax=docker/dockerfile:1.7
# Moderators' review page: `moderation review` (FastAPI + uvicorn), no GPU. The project depends on torch;
# the CPU-only wheel from PyTorch's index keeps this image small (pip prefers 2.x.y+cpu over the CUDA wheel).
#
#   docker build -f docker/review.Dockerfile -t moderation-review .      (from the repository root)
FROM python:3.12-slim AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml README.md ./
RUN --mount=type=cache,target=/root/.cache/pip \
    mkdir -p worker training && touch worker/__init__.py training/__init__.py \
 && pip install --extra-index-url https://download.pytorch.org/whl/cpu . \
 && pip uninstall -y moderation && rm -rf worker training
COPY worker ./worker
COPY training ./training
RUN pip install --no-deps --no-cache-dir .

FROM python:3.12-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
RUN apt-get update && apt-get install -y --no-install-recommends tini && rm -rf /var/lib/apt/lists/*
COPY --from=build /opt/venv /opt/venv
RUN useradd --create-home --uid 10001 moderation
USER moderation
WORKDIR /home/moderation
# Created as the user, so the named volume compose mounts here starts owned by it (accounts, session secret).
RUN mkdir -p /home/moderation/.moderation
ENV MODERATION_HOME=/home/moderation/.moderation \
    MODERATION_LOG_FORMAT=json \
    MODERATION_DEVICE=cpu
EXPOSE 8000
STOPSIGNAL SIGTERM
ENTRYPOINT ["tini", "--", "moderation"]
CMD ["review", "--host", "0.0.0.0", "--port", "8000"]
