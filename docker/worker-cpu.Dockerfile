# syntax=docker/dockerfile:1
#
# The CPU worker image: `d4c worker` on the CPU build of the pinned torch, for machines
# without a GPU (and for CI-sized jobs). Same layout as the GPU worker, smaller by GBs.
# Build from the repository root:  docker build -f docker/worker-cpu.Dockerfile -t d4c-worker:cpu .
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- build ---------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch first from the PyTorch CPU index; the PyPI resolve below then keeps it.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
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

# ---- runtime -------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
RUN groupadd --system --gid 10001 d4c \
 && useradd --system --uid 10001 --gid d4c --create-home --home-dir /home/d4c d4c \
 && mkdir -p /data && chown d4c:d4c /data
COPY --from=build /opt/venv /opt/venv
# Only the healthcheck script: the code runs from the venv's site-packages.
COPY --from=build /opt/d4c/docker /opt/d4c/docker
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    OMP_WAIT_POLICY=PASSIVE \
    D4C_DATA_DIR=/data \
    D4C_WORKER_DEVICE=cpu
WORKDIR /opt/d4c
VOLUME ["/data"]
USER d4c:d4c
# Broker and job DB reachable (Celery remote control is off: no `inspect ping`).
HEALTHCHECK --interval=60s --timeout=15s --start-period=60s --retries=3 \
  CMD ["python", "/opt/d4c/docker/healthcheck.py", "worker"]
CMD ["d4c", "worker"]
