# syntax=docker/dockerfile:1
#
# The API image: `d4c serve` (FastAPI) and `d4c db upgrade` (the compose `migrate` service).
# Build from the repository root:  docker build -f docker/api.Dockerfile -t d4c-api .
#
# The API imports d4c_core to validate jobs and uploaded checkpoints (open_clip + torch), so
# it carries torch, but the CPU build (a few hundred MB instead of the CUDA build's GBs): the
# API never runs a job. Nothing secret is baked in; every setting comes from D4C_* at run time.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- build: a virtualenv with the pinned torch (CPU) and the service installed -------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch first, from the PyTorch index, so the PyPI resolve below finds it satisfied
# (2.14.1+cpu satisfies ==2.14.1) instead of pulling the CUDA build.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN pip install --index-url "${TORCH_INDEX_URL}" torch==2.14.1 torchvision==0.29.1
WORKDIR /opt/d4c
# Dependencies in their own layer: a source change does not reinstall them.
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

# ---- runtime: no compilers, no pip cache, a non-root user ----------------------------------
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
    D4C_DATA_DIR=/data
WORKDIR /opt/d4c
# Artifacts, uploaded checkpoints and work dirs: a volume shared with the workers.
VOLUME ["/data"]
USER d4c:d4c
EXPOSE 8000
# Liveness: the process answers. (Compose probes /readyz instead, for depends_on ordering.)
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
  CMD ["python", "/opt/d4c/docker/healthcheck.py", "http", "http://127.0.0.1:8000/healthz"]
CMD ["d4c", "serve", "--host", "0.0.0.0", "--port", "8000"]
