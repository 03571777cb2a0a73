# featmap server images.
#   CPU (default, last stage):  docker build -t featmap:cpu .
#   CUDA:                       docker build --target cuda -t featmap:cuda .
# Both run `featmap serve` on 0.0.0.0:50051 as a non-root user; HEALTHCHECK asks the standard
# grpc.health.v1 service through `featmap health`.

ARG PYTHON_IMAGE=python:3.11-slim
# onnxruntime-gpu wheels on PyPI are built for CUDA 12 and cuDNN 9: the base must carry both.
ARG CUDA_IMAGE=nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04

# --------------------------------------------------------------------------- CUDA
FROM ${CUDA_IMAGE} AS cuda
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
# Ubuntu's Python refuses system-wide pip installs (PEP 668): use a venv on PATH.
RUN python3 -m venv /opt/featmap
ENV PATH=/opt/featmap/bin:$PATH
RUN useradd --create-home --uid 10001 featmap
WORKDIR /src
COPY pyproject.toml README.md ./
COPY service ./service
COPY client ./client
COPY proto ./proto
# onnxruntime and onnxruntime-gpu install the same `onnxruntime` module and clash: install the
# package (which pulls the CPU build), then swap the CPU build for the GPU one.
RUN pip install . \
    && pip uninstall -y onnxruntime \
    && pip install "onnxruntime-gpu>=1.18" \
    && rm -rf /src
USER featmap
WORKDIR /home/featmap
EXPOSE 50051
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["featmap", "health", "--server", "127.0.0.1:50051", "--timeout", "3"]
ENTRYPOINT ["featmap"]
CMD ["serve", "--host", "0.0.0.0", "--port", "50051"]

# --------------------------------------------------------------------------- CPU (default)
FROM ${PYTHON_IMAGE} AS cpu
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN useradd --create-home --uid 10001 featmap
WORKDIR /src
COPY pyproject.toml README.md ./
COPY service ./service
COPY client ./client
COPY proto ./proto
# The package alone: no dev extras (pytest, mypy, grpcio-tools) in a server image.
RUN pip install . && rm -rf /src
USER featmap
WORKDIR /home/featmap
EXPOSE 50051
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
    CMD ["featmap", "health", "--server", "127.0.0.1:50051", "--timeout", "3"]
ENTRYPOINT ["featmap"]
CMD ["serve", "--host", "0.0.0.0", "--port", "50051"]
