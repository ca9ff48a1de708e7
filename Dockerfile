# vision-serve: VGG16 / SSD inference over HTTP (README.md, docs/api.md).
#
# GPU image (default): CUDA 13.0 runtime on Ubuntu 24.04, Python 3.12 from Ubuntu, and the
# torch wheels from the default package index, which are CUDA 13.0 builds (torch 2.14.1+cu130)
# carrying their own cuDNN/cuBLAS; the host needs only the NVIDIA driver and container toolkit.
#   docker build -t vision-serve:gpu .
# CPU image: Debian slim with Python 3.11 and PyTorch's CPU-only wheels (about 1 GB instead of 6):
# TORCH_BACKEND=cpu has uv (`uv pip install --torch-backend cpu`) take torch and torchvision from
# PyTorch's own index for that build; TORCH_INDEX=URL installs them with pip from that index instead.
#   docker build -t vision-serve:cpu --build-arg BASE_IMAGE=python:3.11-slim --build-arg TORCH_BACKEND=cpu .
# Run: mount the folder holding models.toml and the checkpoints read-only on /weights.
#   docker run --gpus all -p 8000:8000 -v "$PWD/weights:/weights:ro" vision-serve:gpu

ARG BASE_IMAGE=nvidia/cuda:13.0.1-runtime-ubuntu24.04
FROM ${BASE_IMAGE}

# Keep in step with the pins in pyproject.toml (tests/test_container.py checks).
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
# Where torch and torchvision come from. Both empty: pip's configured index (CUDA builds).
# TORCH_BACKEND (cpu, cu130, ...): PyTorch's index for that build, through uv, which knows it.
# TORCH_INDEX (a URL): pip with that index; it wins over TORCH_BACKEND.
ARG TORCH_BACKEND=""
ARG TORCH_INDEX=""
ARG UV_VERSION=0.13.8

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# Python: the CUDA base has none, python:*-slim has it. Ubuntu's python3 is unpinned on purpose:
# the base image tag fixes the distribution release, and security updates should flow in.
# hadolint ignore=DL3008
RUN if ! python3 -c "import ensurepip, venv" 2>/dev/null; then \
        apt-get update \
        && apt-get install -y --no-install-recommends python3 python3-venv \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# torch first, in its own layer: it is most of the image and changes least often. uv is removed
# again in the same layer.
RUN if [ -n "$TORCH_INDEX" ]; then \
        PIP_INDEX_URL="$TORCH_INDEX" pip install "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}"; \
    elif [ -n "$TORCH_BACKEND" ]; then \
        pip install "uv==${UV_VERSION}" \
        && UV_NO_CACHE=1 uv pip install --python /opt/venv/bin/python --torch-backend "$TORCH_BACKEND" \
            "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}" \
        && pip uninstall -y uv; \
    else \
        pip install "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}"; \
    fi

WORKDIR /srv/vision
COPY pyproject.toml README.md ./
COPY app ./app
COPY models ./models
# The other dependencies' bounds are in pyproject.toml; torch is satisfied by the layer above.
RUN pip install .

# The models files, label file and the small demo checkpoints (2.8 MB) that the default models.toml
# serves, so the image answers with no mount. Other checkpoints are not in the image (.dockerignore):
# mount your folder over /weights read-only, e.g. -v "$PWD/weights:/weights:ro".
COPY weights/models.toml weights/public.toml weights/voc.txt weights/download.py weights/README.md /weights/
COPY weights/demo /weights/demo

# glibc malloc kept from unmapping and trimming the activation buffers every batch (page faults
# cost 1.2x-2.7x on CPU). `python -m app` sets the same when missing (app/allocator.py); here it is
# explicit so any other entry point in the image gets it too.
ENV MALLOC_MMAP_MAX_=0 \
    MALLOC_TRIM_THRESHOLD_=17179869184

RUN groupadd --system --gid 10001 vision \
    && useradd --system --uid 10001 --gid vision --create-home --shell /usr/sbin/nologin vision
USER 10001:10001

ENV VISION_MODELS_FILE=/weights/models.toml
EXPOSE 8000

# Liveness only: readiness (/health/ready, models warmed up) is for the orchestrator to check,
# see docker-compose.yml. No curl in the image: Python's urllib fails on non-2xx or no answer.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health/live', timeout=4)"]

CMD ["python", "-m", "app", "--host", "0.0.0.0", "--port", "8000"]
