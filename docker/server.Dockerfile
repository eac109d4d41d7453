# whisper-grpc server, CUDA image: the CUDA build of torch on an NVIDIA CUDA base, the project
# and its pinned dependencies (constraints.txt) in /opt/venv, the built-in models converted at
# build time (a container starts without converting), a non-root user, and a HEALTHCHECK that
# asks the server's own grpc.health.v1 service (`python -m server.healthcheck`).
#
#   docker build -f docker/server.Dockerfile -t whisper-grpc-server .
#   docker run --gpus '"device=0"' -p 50051:50051 -p 9090:9090 whisper-grpc-server
#
# The model is chosen at run time by WHISPER_GRPC_MODEL:
#   tiny.en (default) or base      built in, converted here at build time
#   /models/<dir>                  a checkpoint directory mounted into the container
#                                  (transformers or CTranslate2; the latter is converted once
#                                  into WHISPER_GRPC_CACHE_DIR)
#   openai/whisper-large-v3        a Hugging Face hub id, downloaded into HF_HOME at first start
#                                  (needs network; mount a volume there to keep it)
#
# CUDA build of torch: torch 2.13 ships CUDA 12.6 (legacy), 13.0 and 13.2 builds, no 12.8 one.
# The 12.6 build is the default because it is the one that runs on every card we tune for
# (it still has Volta kernels, for V100; 13.x starts at Turing) and with older drivers (13.x
# needs >= 580). On Turing or newer with a driver >= 580, 13.0 works too:
#   --build-arg CUDA_IMAGE=nvidia/cuda:13.0.x-base-ubuntu24.04 \
#   --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130
# The CUDA "base" flavor (not "runtime") is enough and gigabytes smaller: the torch wheels bring
# their own cuBLAS/cuDNN/NCCL; the base image adds the CUDA runtime, the driver-version check
# (NVIDIA_REQUIRE_CUDA) and the NVIDIA_* variables the container toolkit reads.

ARG CUDA_IMAGE=nvidia/cuda:12.6.3-base-ubuntu24.04
FROM ${CUDA_IMAGE}

# Must equal the torch pin in constraints.txt (tests/unit/test_deploy.py checks it).
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126
# Extras of pyproject.toml to install; `base` brings the multilingual built-in model.
ARG EXTRAS=base
# Built-in models converted at build time, so that choosing one never converts at start.
ARG PRELOAD_MODELS="tiny.en base"

# Build-time only (ARG, not ENV): apt must not prompt here, and the running image keeps no trace.
ARG DEBIAN_FRONTEND=noninteractive
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# Ubuntu 24.04's Python 3.12. The distribution's packages are not pinned: the base image tag
# fixes the release, and its archive keeps only the latest patch of each package.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv "$VIRTUAL_ENV"

WORKDIR /opt/whisper-grpc/src

# The CUDA torch first, from the PyTorch index (PyPI's torch is another CUDA build). Its local
# version (2.13.0+cu126) satisfies the `torch==2.13.0` pin of the next step.
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

# Dependencies before the code, so that editing the code doesn't reinstall them; every version
# comes from constraints.txt (pip moves torch's own dependencies to the pinned versions too).
COPY pyproject.toml constraints.txt ./
RUN python -c 'import sys, tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]; \
extras = [e for e in sys.argv[1].replace(",", " ").split() if e]; \
print("\n".join(p["dependencies"] + [r for e in extras for r in p["optional-dependencies"][e]]))' \
    "${EXTRAS}" > /tmp/requirements.txt \
 && pip install -c constraints.txt -r /tmp/requirements.txt \
 && rm /tmp/requirements.txt

RUN useradd --system --uid 10001 --user-group --create-home --home-dir /home/app app \
 && mkdir -p /opt/whisper-grpc/models /opt/whisper-grpc/hf /models \
 && chown app:app /opt/whisper-grpc/models /opt/whisper-grpc/hf

COPY asr/ asr/
COPY server/ server/
# The project itself; its dependencies are in place, and setuptools came with torch.
RUN pip install --no-deps --no-build-isolation . \
 && rm -rf build ./*.egg-info

ENV WHISPER_GRPC_MODEL=tiny.en \
    WHISPER_GRPC_CACHE_DIR=/opt/whisper-grpc/models \
    HF_HOME=/opt/whisper-grpc/hf

USER 10001:10001
WORKDIR /home/app
RUN for model in ${PRELOAD_MODELS}; do \
      python -m server.checkpoints.provision "$model" --cache-dir "$WHISPER_GRPC_CACHE_DIR" || exit 1; \
    done

EXPOSE 50051 9090
# The start period covers loading, a hub download and warm-up; probes that fail during it
# don't count, the first one that succeeds marks the container healthy.
HEALTHCHECK --interval=10s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python", "-m", "server.healthcheck"]
CMD ["python", "-m", "server"]
