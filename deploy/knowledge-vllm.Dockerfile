# RecLoRA knowledge generation on a GPU: vLLM's image with the project beside it, for
# `reclora knowledge --engine vllm` (deploy/k8s/jobs/knowledge-vllm-job).
#
# vLLM pins other versions than the project, so the project gets its own virtual environment
# (/opt/reclora, CPU torch: it only tokenizes, decodes and encodes) and starts generation in the
# image's own Python, which has vLLM (RECLORA_VLLM_PYTHON=/usr/bin/python3). No weights inside:
# the base model is mounted at /app/models, the data at /app/work.
#
#   docker build -f deploy/knowledge-vllm.Dockerfile -t reclora-knowledge-vllm .

ARG VLLM_IMAGE=vllm/vllm-openai:v0.32.0
FROM ${VLLM_IMAGE}

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN apt-get update && apt-get install -y --no-install-recommends python3-venv && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/reclora

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN /opt/reclora/bin/pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

WORKDIR /src
COPY pyproject.toml README.md ./
RUN /opt/reclora/bin/python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && /opt/reclora/bin/pip install -r /tmp/requirements.txt
COPY service ./service
COPY training ./training
RUN /opt/reclora/bin/pip install --no-deps . \
    && /opt/reclora/bin/python -c "import training.cli" \
    && python3 -c "import vllm"

RUN groupadd --system --gid 10001 reclora \
    && useradd --system --uid 10001 --gid reclora --create-home --home-dir /home/reclora reclora \
    && mkdir -p /app/work /app/models && chown -R reclora:reclora /app

ENV PATH=/opt/reclora/bin:$PATH \
    RECLORA_VLLM_PYTHON=/usr/bin/python3 \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    VLLM_NO_USAGE_STATS=1
WORKDIR /app
USER 10001:10001
ENTRYPOINT []
CMD ["reclora", "knowledge", "--help"]
