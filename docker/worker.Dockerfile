# syntax=docker/dockerfile:1
#
# The GPU worker image: `d4c worker` on the CUDA build of the pinned torch==2.14.1.
# Build from the repository root:  docker build -f docker/worker.Dockerfile -t d4c-worker:cuda .
#
# Base: the CUDA 13.0 runtime image, matching the cu130 torch wheels (the build the project
# is developed on: torch 2.14.1+cu130). The host needs an NVIDIA driver for CUDA 13 and the
# NVIDIA Container Toolkit. The wheels bundle their own CUDA libraries (nvidia-* packages), so
# CUDA_IMAGE may be the smaller `-base-` flavour; the runtime flavour is the safe default.
# Python 3.11 comes from uv's standalone CPython build (Ubuntu 24.04 ships 3.12): the same
# interpreter version as the API image and the tests.
ARG CUDA_IMAGE=nvidia/cuda:13.0.2-runtime-ubuntu24.04
ARG UV_IMAGE=ghcr.io/astral-sh/uv:0.8.22

FROM ${UV_IMAGE} AS uv

# ---- build: CPython 3.11 + a virtualenv with the CUDA torch and the service ----------------
FROM ${CUDA_IMAGE} AS build
COPY --from=uv /uv /usr/local/bin/uv
ENV UV_PYTHON_INSTALL_DIR=/opt/python \
    UV_PYTHON_PREFERENCE=only-managed \
    UV_NO_CACHE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN uv python install 3.11 && uv venv --seed --python 3.11 /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# The CUDA build from the PyTorch index first; the PyPI resolve below finds ==2.14.1
# satisfied by 2.14.1+cu130 and keeps it.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130
RUN pip install --index-url "${TORCH_INDEX_URL}" torch==2.14.1 torchvision==0.29.1
WORKDIR /opt/d4c
COPY pyproject.toml README.md ./
RUN python -c "import tomllib; d = tomllib.load(open('pyproject.toml', 'rb')); \
print('\n'.join(d['project']['dependencies']))" > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt
COPY d4c_core ./d4c_core
COPY app ./app
COPY worker ./worker
COPY docker/healthcheck.py ./docker/healthcheck.py
# A regular (non-editable) install into the venv: the Alembic scripts ship inside the
# package (app/db/migrations), so the runtime needs no source tree beside it.
RUN pip install --no-deps . && python -m compileall -q docker

# ---- runtime: the CUDA runtime, the interpreter, the venv, a non-root user -----------------
FROM ${CUDA_IMAGE} AS runtime
RUN groupadd --system --gid 10001 d4c \
 && useradd --system --uid 10001 --gid d4c --create-home --home-dir /home/d4c d4c \
 && mkdir -p /data && chown d4c:d4c /data
# The venv's interpreter is a link into /opt/python: both keep their build-stage paths.
COPY --from=build /opt/python /opt/python
COPY --from=build /opt/venv /opt/venv
# Only the healthcheck script: the code runs from the venv's site-packages.
COPY --from=build /opt/d4c/docker /opt/d4c/docker
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    D4C_DATA_DIR=/data \
    D4C_WORKER_DEVICE=cuda \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
WORKDIR /opt/d4c
VOLUME ["/data"]
USER d4c:d4c
# Broker and job DB reachable (Celery remote control is off: no `inspect ping`).
HEALTHCHECK --interval=60s --timeout=15s --start-period=120s --retries=3 \
  CMD ["python", "/opt/d4c/docker/healthcheck.py", "worker"]
CMD ["d4c", "worker"]
