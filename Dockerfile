# RecLoRA gateway: `python -m service.api` on CPU with the embedded torch engine.
#
# The image holds code and dependencies only, never weights: mount the model store (bundles from
# `reclora export`) at /app/model_store and the base LLM directory (from `reclora base-model`) at
# /app/models. Nothing is downloaded at run time (Hugging Face libraries run offline).
#
#   docker build -t reclora-gateway .
#   docker run -p 8000:8000 -v "$PWD/model_store:/app/model_store:ro" -v "$PWD/models:/app/models:ro" \
#       -e RECLORA_REDIS_URL=redis://HOST:6379/0 reclora-gateway

ARG PYTHON_IMAGE=python:3.11-slim

# ---- build: a virtual environment in /opt/venv, copied whole into the runtime stage
FROM ${PYTHON_IMAGE} AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# torch first, from the PyTorch CPU index: the PyPI wheel for Linux is the (much larger) CUDA build.
# The project pins torch==2.13.0, which the local version 2.13.0+cpu satisfies.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

WORKDIR /src
# The pinned dependencies in their own layer: only a change of pyproject.toml reinstalls them.
COPY pyproject.toml README.md ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt

# Then the project itself (service/ and training/, with the `reclora` command).
COPY service ./service
COPY training ./training
RUN pip install --no-deps . \
    && python -c "import service.api.server, training.cli"

# ---- runtime
FROM ${PYTHON_IMAGE}

# A C++ compiler, so the engine builds its native kernels (attention, the MLP's SiLU product) for
# the host's CPU on first start (into the user's cache, well under a second). With NATIVE_KERNELS=0
# the image is smaller and the engine uses torch's kernels instead, which are slower (README, Gateway).
ARG NATIVE_KERNELS=1
RUN if [ "${NATIVE_KERNELS}" = 1 ]; then \
        apt-get update && apt-get install -y --no-install-recommends g++ && rm -rf /var/lib/apt/lists/*; \
    fi

RUN groupadd --system --gid 10001 reclora \
    && useradd --system --uid 10001 --gid reclora --create-home --home-dir /home/reclora reclora \
    && mkdir -p /app/model_store /app/models /adapters \
    && chown -R reclora:reclora /app /adapters

COPY --from=build /opt/venv /opt/venv

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    HF_HUB_DISABLE_TELEMETRY=1 \
    RECLORA_HOST=0.0.0.0 \
    RECLORA_PORT=8000 \
    RECLORA_MODEL_STORE=/app/model_store \
    RECLORA_BASE_MODEL_DIR=/app/models/smollm2-135m-instruct

WORKDIR /app
# numeric, so that orchestrators can verify it is not root (e.g. Kubernetes runAsNonRoot)
USER 10001:10001

VOLUME ["/app/model_store", "/app/models"]
EXPOSE 8000

# Liveness only (the process answers); readiness (model loaded, Redis up) is /readyz, which the
# orchestrator checks separately so that a Redis outage does not restart the gateway.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/livez' % os.environ.get('RECLORA_PORT', '8000'), timeout=4)"]

CMD ["python", "-m", "service.api"]
