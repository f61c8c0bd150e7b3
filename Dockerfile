# syntax=docker/dockerfile:1
# tokengate images, two targets:
#   gateway  slim: the gateway only, for vLLM workers that run elsewhere
#              docker build --target gateway -t tokengate:gateway .
#              docker run -p 8080:8080 -e TOKENGATE_UPSTREAM=http://10.0.0.5:8000 tokengate:gateway
#   managed  vLLM's CUDA image plus tokengate: launches and supervises one worker per preset slice of the GPUs
#              docker build --target managed -t tokengate:managed .
#              docker run --gpus all -v /models:/models -e TOKENGATE_MODEL=/models/llama -e TOKENGATE_REGION=fr \
#                -e TOKENGATE_PRESET=h100-1x -p 8080:8080 tokengate:managed
# BASE_IMAGE is the Python base of the gateway (any Debian-like image with python3 >= 3.11 and its venv module);
# VLLM_IMAGE the base of managed. Nothing secret is baked in: pass API keys at run time (TOKENGATE_* env).
# Behind a TLS-intercepting proxy, hand pip its CA bundle as a build secret; it is mounted for the pip steps only:
#   docker build --secret id=pipca,src=/etc/ssl/certs/ca-certificates.crt ...
# Configure the gateway with TOKENGATE_PORT (not --port): the HEALTHCHECK reads it.
# DL3064 (hadolint ignore below) flags any ENV name containing "TOKEN": TOKENGATE_HOST/PORT/STATE_DIR hold no secret.

ARG BASE_IMAGE=python:3.11-slim-bookworm
ARG VLLM_IMAGE=vllm/vllm-openai:v0.32.0

# --- build: a virtualenv with tokengate and its dependencies, and the wheel for managed ---------------------------
FROM ${BASE_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
COPY pyproject.toml README.md ./
# the dependencies in a layer of their own, rebuilt only when pyproject.toml changes (a stub package stands in)
RUN --mount=type=secret,id=pipca,required=false \
    if [ -s /run/secrets/pipca ]; then export PIP_CERT=/run/secrets/pipca; fi \
    && python3 -m venv /opt/tokengate \
    && mkdir app && echo '__version__ = "0"' > app/__init__.py \
    && /opt/tokengate/bin/pip install . \
    && /opt/tokengate/bin/pip uninstall --yes tokengate \
    && rm -rf app build ./*.egg-info
COPY app/ app/
COPY presets/ presets/
RUN --mount=type=secret,id=pipca,required=false \
    if [ -s /run/secrets/pipca ]; then export PIP_CERT=/run/secrets/pipca; fi \
    && /opt/tokengate/bin/pip wheel --no-deps --wheel-dir /wheels . \
    && /opt/tokengate/bin/pip install --no-deps /wheels/tokengate-*.whl \
    && /opt/tokengate/bin/pip uninstall --yes pip setuptools \
    && site="$(/opt/tokengate/bin/python -I -c 'import app, pathlib; print(pathlib.Path(app.__file__).parent.parent)')" \
    && cp -r presets "$site/presets"

# --- gateway ------------------------------------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS gateway
RUN groupadd --gid 10001 tokengate \
    && useradd --no-log-init --uid 10001 --gid 10001 --create-home --home-dir /home/tokengate \
        --shell /usr/sbin/nologin tokengate \
    && install -d -o tokengate -g tokengate /var/lib/tokengate
COPY --from=build /opt/tokengate /opt/tokengate
# hadolint ignore=DL3064
ENV PATH=/opt/tokengate/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    TOKENGATE_HOST=0.0.0.0 \
    TOKENGATE_PORT=8080 \
    TOKENGATE_STATE_DIR=/var/lib/tokengate
USER 10001:10001
WORKDIR /home/tokengate
EXPOSE 8080
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('TOKENGATE_PORT', '8080'), timeout=4)"]
ENTRYPOINT ["tokengate"]
CMD ["serve"]

# --- managed: vLLM (CUDA) + tokengate -----------------------------------------------------------------------------
FROM ${VLLM_IMAGE} AS managed
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
# into vLLM's own interpreter: workers run as `python -m vllm.entrypoints.openai.api_server` beside the gateway
RUN --mount=type=bind,from=build,source=/wheels,target=/tmp/wheels \
    --mount=type=bind,source=presets,target=/tmp/presets \
    --mount=type=secret,id=pipca,required=false \
    if [ -s /run/secrets/pipca ]; then export PIP_CERT=/run/secrets/pipca; fi \
    && PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install /tmp/wheels/tokengate-*.whl \
    && site="$(python3 -I -c 'import app, pathlib; print(pathlib.Path(app.__file__).parent.parent)')" \
    && cp -r /tmp/presets "$site/presets" \
    && groupadd --gid 10001 tokengate \
    && useradd --no-log-init --uid 10001 --gid 10001 --create-home --home-dir /home/tokengate \
        --shell /usr/sbin/nologin tokengate \
    && install -d -o tokengate -g tokengate /var/lib/tokengate
# hadolint ignore=DL3064
ENV PYTHONUNBUFFERED=1 \
    TOKENGATE_HOST=0.0.0.0 \
    TOKENGATE_PORT=8080 \
    TOKENGATE_STATE_DIR=/var/lib/tokengate \
    HF_HOME=/home/tokengate/.cache/huggingface
USER 10001:10001
WORKDIR /home/tokengate
EXPOSE 8080
HEALTHCHECK --interval=15s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('TOKENGATE_PORT', '8080'), timeout=4)"]
ENTRYPOINT ["tokengate"]
CMD ["serve"]
