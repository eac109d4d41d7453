# whisper-grpc: the two commands are `make serve` and `make test`; both set up .venv first.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --disable-pip-version-check -q -c constraints.txt
STAMP := $(VENV)/.installed
PORT ?= 50051
MODEL ?= tiny.en
# `make serve` is for one's own machine: loopback unless told (HOST=0.0.0.0); images bind all.
HOST ?= 127.0.0.1

.PHONY: install model serve test lint typecheck buf pytest protos bench bench-engines freeze clean images loadtest \
	bench-precision fuzz-long soak study

TORCH_VERSION := 2.13.0
# PyTorch's own index of CPU wheels: torch from the default package index is the CUDA build
# with several GB of nvidia-* packages. Used when it answers; where it doesn't (an offline
# mirror, a wheel cache), torch comes from whatever pip is configured with. For a GPU host:
# make install TORCH_INDEX=https://download.pytorch.org/whl/cu126 (or TORCH_INDEX= to skip).
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu

# Idempotent: the stamp is newer than the files it was made from, so a second run is instant.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first, from TORCH_INDEX if it is reachable (3 s to answer), else as pip finds it.
	if [ -n "$(TORCH_INDEX)" ] && $(PY) -c 'import sys, urllib.request; \
	    urllib.request.urlopen(sys.argv[1], timeout=3)' "$(TORCH_INDEX)" 2>/dev/null; then \
	  $(PIP) --index-url "$(TORCH_INDEX)" torch==$(TORCH_VERSION); \
	else \
	  $(PIP) torch==$(TORCH_VERSION); \
	fi
	$(PIP) -e '.[dev,base,loadgen]'
	# Only for its data file english.json (Whisper's English normalizer, used for WER):
	# without --no-deps it would pull numba, tiktoken and a second torch.
	$(PIP) --no-deps openai-whisper
	touch $(STAMP)

install: $(STAMP)

# Convert the embedded default model once into ~/.cache/whisper-grpc (no network needed).
model: install
	$(PY) -m server.checkpoints.provision $(MODEL)

serve: model
	$(PY) -m server --host $(HOST) --port $(PORT) --model $(MODEL)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: install
	$(VENV)/bin/mypy server scripts asr/client.py $(wildcard loadgen)

# buf lint + buf breaking against the released contract (buf/released/), offline.
buf: install
	$(PY) scripts/buf_check.py

pytest: install
	$(VENV)/bin/pytest -q

test: lint typecheck buf pytest

# Regenerate the Python stubs in asr/v1/ and asr/vendors/ from protos/ (tests check they match).
protos: install
	$(PY) scripts/gen_protos.py

# A folder of FLAC/WAV files (LibriSpeech's layout works); this repo's tests use ../shared/data.
BENCH_DATASET ?= ../shared/data/LibriSpeech

bench: model
	$(PY) -m server.bench --dataset $(BENCH_DATASET) --model $(MODEL)

# The continuous engine against the generate engine and in-process generate (long: ~25 min here).
bench-engines: model
	$(PY) scripts/bench_engines.py --dataset $(BENCH_DATASET) --model $(MODEL)

# The seed study on this host: generate per batch size per model, and the server at matching
# concurrencies; study.csv/json/png in $(STUDY_OUT). Compare hosts with
# `python -m server.bench study compare DIR... --price LABEL=$/h --out DIR`.
STUDY_MODELS ?= tiny.en,base
STUDY_BATCH_SIZES ?= 1,2,4,8,16
STUDY_ARGS ?=
STUDY_OUT ?= runs/study-$(shell date +%Y%m%d-%H%M%S)

study: model
	$(PY) -m server.bench study --dataset $(BENCH_DATASET)/test-clean --models $(STUDY_MODELS) \
	  --batch-sizes $(STUDY_BATCH_SIZES) --out $(STUDY_OUT) $(STUDY_ARGS)

LOADTEST_PORT ?= 50071
DATASET ?= librispeech:test-clean
LOADTEST_ARGS ?= --concurrency 1,2,4,8 --duration 20 --warmup 5 --limit 64
LOADTEST_STAMP := $(shell date +%Y%m%d-%H%M%S)
LOADTEST_OUT ?= runs/loadtest-$(LOADTEST_STAMP)

# Serve the embedded default model on loopback, sweep it with the load generator, print the
# table (report, plots, raw records and the server's log in $(LOADTEST_OUT)), stop the server.
# DATASET: a LibriSpeech folder (one split or the root), an audio folder, or librispeech:<split>
# (downloaded and verified once into ~/.cache/whisper-grpc/datasets).
loadtest: model
	@mkdir -p $(LOADTEST_OUT)
	@$(PY) -m server --host 127.0.0.1 --port $(LOADTEST_PORT) --metrics-port -1 --model $(MODEL) \
	  2> $(LOADTEST_OUT)/server.log & server=$$!; \
	trap 'kill $$server 2>/dev/null; wait $$server 2>/dev/null' EXIT; \
	$(PY) -m loadgen run --target 127.0.0.1:$(LOADTEST_PORT) --dataset '$(DATASET)' \
	  --wait-ready 600 --out $(LOADTEST_OUT) $(LOADTEST_ARGS)

# float32 against bfloat16 on this machine's CPU, side by side (unary and real-time streams).
bench-precision: model
	$(PY) scripts/bench_precision.py --dataset $(BENCH_DATASET)

freeze: install
	$(PY) -m pip freeze --all --exclude-editable | grep -v -E '^(pip|openai-whisper)==' > /tmp/whisper-grpc-freeze.txt
	@echo "review /tmp/whisper-grpc-freeze.txt and merge it into constraints.txt"

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

IMAGE_TAG ?= local
# Docker images (needs a Docker engine; not part of `make test`).
images:
	docker build -f docker/server.Dockerfile -t whisper-grpc-server:$(IMAGE_TAG) .
	docker build -f docker/cpu.Dockerfile -t whisper-grpc-cpu:$(IMAGE_TAG) .

# The long fuzz pass (make test runs a bounded one): each atheris target for FUZZ_S seconds
# over a corpus kept in runs/fuzz-corpus/; finds land in runs/fuzz-finds/ (make each a file
# in tests/fuzz/regressions/<target>/, which make test replays).
FUZZ_S ?= 1800
fuzz-long: install
	@mkdir -p runs/fuzz-finds
	for target in audio request; do \
	  mkdir -p runs/fuzz-corpus/$$target; \
	  $(PY) -m tests.fuzz.targets $$target -max_total_time=$(FUZZ_S) -max_len=65536 \
	    -artifact_prefix=runs/fuzz-finds/$$target- runs/fuzz-corpus/$$target || exit 1; \
	done

# N minutes of mixed unary calls and real-time streams against a real server (a benchmark).
SOAK_MINUTES ?= 30
soak: model
	$(PY) scripts/soak.py --dataset $(BENCH_DATASET)/test-clean --model $(MODEL) --minutes $(SOAK_MINUTES)

# -- the first-GPU check (loadgen/gpu; README "On a GPU machine") ----------------------------
.PHONY: gpu-pack gpu-check gpu-rehearsal gpu-rehearsal-env
GPU_PACK ?= .gpu-pack
GPU_OUT ?= runs/gpu-check
GPU_CHECK_ARGS ?=
# What travels to the GPU machine besides the tree (<= 60 MiB with it): int8 tiny.en, 40
# LibriSpeech files, the CPU's reference transcripts, the wheels the machine lacks (derived
# from the code; the pack refuses to build without one of them or without its pin).
gpu-pack: model
	$(PY) -m loadgen.gpu.pack --out $(GPU_PACK) --dataset $(BENCH_DATASET)

# The check here (on a machine without CUDA it writes a "skipped" JSON and exits 0).
gpu-check: gpu-pack
	$(PY) -m loadgen.gpu.check --pack $(GPU_PACK) --out $(GPU_OUT)/gpu_check.json $(GPU_CHECK_ARGS)

# The check as the GPU machine would run it, on this CPU (loopback only: `ip link set lo up` in a
# fresh network namespace): a Python 3.12 environment with that
# machine's torch 2.11.0 / transformers 5.17.0 and what else of its package list the check uses
# (older grpcio and protobuf than ours, so the pack's wheels must win), no network (a network
# namespace), --device cpu, a short budget, float32 (this CPU's fast path; the dtype code paths are
# the GPU tests' and the unit tests'), a random-weight `base` as the probe (large-v3's encoder would
# take minutes a window here). Downloads several GB once; not part of `make test`.
REHEARSAL_DIR ?= $(HOME)/.cache/whisper-grpc/gpu-rehearsal
REHEARSAL_PYTHON ?= $(shell command -v python3.12 || echo $(HOME)/.pyenv/versions/3.12.1/bin/python3.12)
REHEARSAL_PY := $(REHEARSAL_DIR)/venv/bin/python
REHEARSAL_ARGS ?= --device cpu --budget-s 1800 --tests-share 0.5 --level-s 3 --levels 1,8 \
	--files 8 --dtypes float32 --compile off,on --probes base --probe-dtype float32 \
	--leaderboard-dtype float32
$(REHEARSAL_DIR)/.installed:
	test -x $(REHEARSAL_PY) || $(REHEARSAL_PYTHON) -m venv $(REHEARSAL_DIR)/venv
	if $(REHEARSAL_PY) -c 'import sys, urllib.request; \
	    urllib.request.urlopen(sys.argv[1], timeout=3)' "$(TORCH_INDEX)" 2>/dev/null; then \
	  $(REHEARSAL_PY) -m pip install -q --index-url "$(TORCH_INDEX)" torch==2.11.0; \
	else \
	  $(REHEARSAL_PY) -m pip install -q torch==2.11.0; \
	fi
	touch $@

# Of the machine's list, what the code imports (loadgen.gpu.needs derives it; any version will
# do), pytest-timeout (pyproject's `timeout`), and grpcio/protobuf older than ours.
gpu-rehearsal-env: $(REHEARSAL_DIR)/.installed
	$(REHEARSAL_PY) -m pip install -q transformers==5.17.0 pytest-timeout 'protobuf<6' 'grpcio<1.80' \
	  $$($(PY) -m loadgen.gpu.needs torch,transformers,grpcio,protobuf)

gpu-rehearsal: gpu-rehearsal-env gpu-pack
	@mkdir -p $(GPU_OUT)-rehearsal
	@if [ "$$(id -u)" = 0 ]; then netns="unshare -n"; else netns="unshare -rn"; fi; \
	$$netns sh -c 'ip link set lo up && exec env -u PYTHONPATH "$$@"' sh \
	  $(REHEARSAL_PY) -m loadgen.gpu.check --pack $(GPU_PACK) \
	  --out $(GPU_OUT)-rehearsal/gpu_check.json $(REHEARSAL_ARGS); rc=$$?; \
	$(PY) -c 'import json, sys; d = json.load(open(sys.argv[1])); \
	  print("status:", d["status"], "| wall_s:", d["wall_s"]); \
	  [print("FAILED:", f) for f in d["failures"]]' $(GPU_OUT)-rehearsal/gpu_check.json; \
	exit $$rc
