# whisper-grpc CPU image: the server's CPU variant and the load generator (Locust), one image.
# Python slim base, the CPU build of torch (no CUDA libraries), the project with its pinned
# dependencies (constraints.txt) in /opt/venv, tiny.en converted at build time, a non-root user.
#
#   docker build -f docker/cpu.Dockerfile -t whisper-grpc-cpu .
#   docker run -p 50051:50051 -p 9090:9090 whisper-grpc-cpu                  # CPU server
#   docker run -v "$PWD/runs:/runs" whisper-grpc-cpu python -m loadgen ...   # load generator
#
# The model is chosen by WHISPER_GRPC_MODEL, as in docker/server.Dockerfile.

# The Python series constraints.txt was frozen with.
ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm
FROM ${PYTHON_IMAGE}

# Must equal the torch pin in constraints.txt (tests/unit/test_deploy.py checks it).
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# Extras of pyproject.toml to install: the load generator's dependencies.
ARG EXTRAS=loadgen
ARG PRELOAD_MODELS="tiny.en"

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# g++ (and gcc): torch.compile (inductor) builds the decode step's CPU kernels with it at start-up
# (--compile auto); without it the server decodes eagerly and says why in its log.
RUN apt-get update \
 && apt-get install -y --no-install-recommends g++ gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*

RUN python -m venv "$VIRTUAL_ENV"

WORKDIR /opt/whisper-grpc/src

# The CPU build of torch from the PyTorch index: PyPI's Linux torch is a CUDA build that would
# pull gigabytes of CUDA libraries. Its local version (2.13.0+cpu) satisfies `torch==2.13.0`.
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

# Dependencies before the code, so that editing the code doesn't reinstall them; every version
# comes from constraints.txt.
COPY pyproject.toml constraints.txt ./
RUN python -c 'import sys, tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]; \
extras = [e for e in sys.argv[1].replace(",", " ").split() if e]; \
print("\n".join(p["dependencies"] + [r for e in extras for r in p["optional-dependencies"][e]]))' \
    "${EXTRAS}" > /tmp/requirements.txt \
 && pip install -c constraints.txt -r /tmp/requirements.txt \
 && rm /tmp/requirements.txt

RUN useradd --system --uid 10001 --user-group --create-home --home-dir /home/app app \
 && mkdir -p /opt/whisper-grpc/models /opt/whisper-grpc/hf /models /runs /data \
 && chown app:app /opt/whisper-grpc/models /opt/whisper-grpc/hf /runs

COPY asr/ asr/
COPY server/ server/
COPY loadgen/ loadgen/
# The project itself; its dependencies are in place, and setuptools came with torch.
RUN pip install --no-deps --no-build-isolation . \
 && rm -rf build ./*.egg-info

ENV WHISPER_GRPC_MODEL=tiny.en \
    WHISPER_GRPC_DEVICE=cpu \
    WHISPER_GRPC_CACHE_DIR=/opt/whisper-grpc/models \
    HF_HOME=/opt/whisper-grpc/hf

USER 10001:10001
WORKDIR /home/app
RUN for model in ${PRELOAD_MODELS}; do \
      python -m server.checkpoints.provision "$model" --cache-dir "$WHISPER_GRPC_CACHE_DIR" || exit 1; \
    done

EXPOSE 50051 9090
# Meaningful for the server; the load generator's services in docker-compose.yml turn it off.
HEALTHCHECK --interval=10s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python", "-m", "server.healthcheck"]
CMD ["python", "-m", "server"]
