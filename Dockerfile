# featmap server images.
#   CPU (the default):  docker build -t featmap:cpu .   (or --target cpu)
#   CUDA:               docker build --target cuda -t featmap:cuda .
# Each target installs the package into a venv at /opt/featmap in its build stage; the image
# gets that venv alone: no sources, no pip, no build tools or caches. Both run
# `featmap serve` on 0.0.0.0:50051 as the non-root user featmap (uid 10001); HEALTHCHECK asks
# the standard grpc.health.v1 service through `featmap health`.
# The build context is what .dockerignore lets through (a whitelist): a new top-level source
# folder needs its `!folder/` line there and nothing here.

ARG PYTHON_IMAGE=python:3.11-slim
# onnxruntime-gpu wheels on PyPI are built for CUDA 12 and cuDNN 9: the base must carry both.
ARG CUDA_IMAGE=nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04

# --------------------------------------------------------------------------- CPU: build
FROM ${PYTHON_IMAGE} AS cpu-build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/featmap
ENV PATH=/opt/featmap/bin:$PATH
COPY . /src
# The package with its server extra (the runtime: onnx, onnxruntime; no dev extras: pytest,
# mypy, grpcio-tools); then pip goes, and the test suites and test data that wheels carry.
RUN pip install "/src[server]" \
    && pip uninstall -y pip setuptools \
    && find /opt/featmap -depth -type d \( -name tests -o -path "*/onnx/backend/test/data" \) \
        -exec rm -rf {} +

# --------------------------------------------------------------------------- CPU
FROM ${PYTHON_IMAGE} AS cpu
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/featmap/bin:$PATH
# The pipeline store's folder (docker-compose.yml mounts a named volume there, which Docker
# seeds with this owner and mode): the server's user alone may read it.
RUN useradd --create-home --uid 10001 --user-group featmap \
    && install -d -o 10001 -g 10001 -m 0700 /var/lib/featmap /var/lib/featmap/pipelines
COPY --from=cpu-build /opt/featmap /opt/featmap
USER 10001:10001
WORKDIR /home/featmap
EXPOSE 50051
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
    CMD ["featmap", "health", "--server", "127.0.0.1:50051", "--timeout", "3"]
ENTRYPOINT ["featmap"]
CMD ["serve", "--host", "0.0.0.0", "--port", "50051"]

# --------------------------------------------------------------------------- CUDA: build
FROM ${CUDA_IMAGE} AS cuda-build
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# The base image's Ubuntu release fixes the versions; pins would break on its next update.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
# Ubuntu's Python refuses system-wide pip installs (PEP 668): a venv, which the image copies.
RUN python3 -m venv /opt/featmap
ENV PATH=/opt/featmap/bin:$PATH
COPY . /src
# onnxruntime and onnxruntime-gpu install the same `onnxruntime` module and clash: install the
# package with its server extra (which pulls the CPU build), then swap the CPU build for the GPU one. Then pip goes,
# and the test suites and test data that wheels carry.
RUN pip install "/src[server]" \
    && pip uninstall -y onnxruntime \
    && pip install "onnxruntime-gpu>=1.18" \
    && pip uninstall -y pip setuptools \
    && find /opt/featmap -depth -type d \( -name tests -o -path "*/onnx/backend/test/data" \) \
        -exec rm -rf {} +

# --------------------------------------------------------------------------- CUDA
FROM ${CUDA_IMAGE} AS cuda
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/featmap/bin:$PATH
# python3 alone: the venv's interpreter is a link to it.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 10001 --user-group featmap \
    && install -d -o 10001 -g 10001 -m 0700 /var/lib/featmap /var/lib/featmap/pipelines
COPY --from=cuda-build /opt/featmap /opt/featmap
USER 10001:10001
WORKDIR /home/featmap
EXPOSE 50051
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["featmap", "health", "--server", "127.0.0.1:50051", "--timeout", "3"]
ENTRYPOINT ["featmap"]
CMD ["serve", "--host", "0.0.0.0", "--port", "50051"]

# --------------------------------------------------------------------------- default
# A plain `docker build .` gives the CPU image. The CPU stages come first because the classic
# builder (docker-compose v1, DOCKER_BUILDKIT=0) builds every stage up to its target, and
# `--target cpu` must not pull the CUDA base.
FROM cpu AS default
