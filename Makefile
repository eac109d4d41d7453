# whisper-grpc: `make help` lists the targets. The two commands are `make serve` and
# `make test`; both set up .venv first. Every measuring target runs `python -m loadgen ...`.
SHELL := /bin/bash
.DEFAULT_GOAL := help
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --disable-pip-version-check -q -c constraints.txt
STAMP := $(VENV)/.installed
PORT ?= 50051
MODEL ?= tiny.en
# `make serve` is for one's own machine: loopback unless told (HOST=0.0.0.0); images bind all.
HOST ?= 127.0.0.1
# The audio every measuring target uses: `sample` is what ships in samples/ (no network);
# or a LibriSpeech folder (one split or the root), an audio folder, librispeech:<split>.
DATASET ?= sample
STAMP_TIME := $(shell date +%Y%m%d-%H%M%S)

.PHONY: help install model serve test test-fast lint typecheck buf pytest docs protos loadtest \
	study bench-engines bench-precision languages bench-decode soak fuzz-long gpu-pack gpu-check \
	gpu-rehearsal gpu-rehearsal-env images freeze clean

help: ## this list
	@awk 'BEGIN {FS = ":.*## "} /^[a-z][a-z-]*:.*## / {printf "  %-16s %s\n", $$1, $$2}' \
	  $(MAKEFILE_LIST)
	@echo "  variables: DATASET=$(DATASET) MODEL=$(MODEL) PORT=$(PORT) HOST=$(HOST)"

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

install: $(STAMP) ## set up .venv (torch CPU build, the project, dev tools)

model: install ## convert the built-in MODEL once into ~/.cache/whisper-grpc (no network)
	$(PY) -m server.checkpoints.provision $(MODEL)

serve: model ## serve MODEL on HOST:PORT
	$(PY) -m server --host $(HOST) --port $(PORT) --model $(MODEL)

lint: install ## ruff check + ruff format --check
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: install ## mypy over server, loadgen and the client
	$(VENV)/bin/mypy server loadgen asr/client.py

buf: install ## buf lint + buf breaking against the released contract, offline
	$(PY) scripts/buf_check.py

pytest: install
	$(VENV)/bin/pytest -q --durations=20

test: lint typecheck buf pytest ## the whole suite, as CI runs it (prints the 20 slowest tests)

test-fast: lint typecheck ## lint, types and the tests that start no subprocess and load no real weights
	$(VENV)/bin/pytest -q -m "not slow and not gpu" --durations=10

docs: install ## regenerate docs/configuration.md from Settings (a test checks it)
	$(PY) scripts/gen_config_doc.py

protos: install ## regenerate asr/v1 and asr/vendors stubs from protos/
	$(PY) scripts/gen_protos.py

LOADTEST_ARGS ?= --concurrency 1,2,4,8 --duration 20 --warmup 5 --limit 64
LOADTEST_OUT ?= runs/loadtest-$(STAMP_TIME)

loadtest: model ## serve MODEL on loopback, sweep it over DATASET, print the table, stop it
	$(PY) -m loadgen run --spawn-server --server-args="--model $(MODEL)" --dataset '$(DATASET)' \
	  --out $(LOADTEST_OUT) $(LOADTEST_ARGS)

STUDY_MODELS ?= tiny.en,base
STUDY_BATCH_SIZES ?= 1,2,4,8,16
STUDY_DTYPES ?= float32,bfloat16
STUDY_ARGS ?=
STUDY_OUT ?= runs/study-$(STAMP_TIME)

study: model ## the seed study: STUDY_MODELS x STUDY_BATCH_SIZES x STUDY_DTYPES on DATASET
	$(PY) -m loadgen study --dataset '$(DATASET)' --models $(STUDY_MODELS) \
	  --batch-sizes $(STUDY_BATCH_SIZES) --dtypes $(STUDY_DTYPES) --out $(STUDY_OUT) $(STUDY_ARGS)

bench-engines: model ## continuous vs generate engine vs in-process generate on DATASET
	$(PY) -m loadgen engines --dataset '$(DATASET)' --model $(MODEL)

bench-precision: model ## float32 vs bfloat16 on this CPU, unary and real-time streams
	$(PY) -m loadgen precision --dataset '$(DATASET)' --model $(MODEL)

LANGUAGES_MODEL ?= base
languages: install ## the language LANGUAGES_MODEL detects on espeak-ng speech in 8 languages
	$(PY) -m server.checkpoints.provision $(LANGUAGES_MODEL)
	$(PY) -m loadgen languages --model $(LANGUAGES_MODEL) --out runs/languages-$(STAMP_TIME)

bench-decode: model ## the decode step benchmark
	$(PY) -m loadgen decode

SOAK_MINUTES ?= 30
soak: model ## SOAK_MINUTES of mixed unary calls and streams: RSS series and a verdict
	$(PY) -m loadgen soak --dataset '$(DATASET)' --server-args="--model $(MODEL)" \
	  --minutes $(SOAK_MINUTES)

# The long fuzz pass (make test runs a bounded one): each atheris target for FUZZ_S seconds
# over a corpus kept in runs/fuzz-corpus/; finds land in runs/fuzz-finds/ (make each a file
# in tests/fuzz/regressions/<target>/, which make test replays).
FUZZ_S ?= 1800
fuzz-long: install ## each atheris target for FUZZ_S seconds
	@mkdir -p runs/fuzz-finds
	for target in audio request; do \
	  mkdir -p runs/fuzz-corpus/$$target; \
	  $(PY) -m tests.fuzz.targets $$target -max_total_time=$(FUZZ_S) -max_len=65536 \
	    -artifact_prefix=runs/fuzz-finds/$$target- runs/fuzz-corpus/$$target || exit 1; \
	done

IMAGE_TAG ?= local
# Docker images (needs a Docker engine; not part of `make test`).
images: ## the Docker images (needs a Docker engine; not part of make test)
	docker build -f docker/server.Dockerfile -t whisper-grpc-server:$(IMAGE_TAG) .
	docker build -f docker/cpu.Dockerfile -t whisper-grpc-cpu:$(IMAGE_TAG) .

freeze: install ## pip freeze into /tmp, to merge into constraints.txt by hand
	$(PY) -m pip freeze --all --exclude-editable | grep -v -E '^(pip|openai-whisper)==' > /tmp/whisper-grpc-freeze.txt
	@echo "review /tmp/whisper-grpc-freeze.txt and merge it into constraints.txt"

clean: ## remove .venv and tool caches
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

# -- the first-GPU check (loadgen/gpu; README "On a GPU machine") ----------------------------
.PHONY: gpu-pack gpu-check gpu-rehearsal gpu-rehearsal-env
GPU_PACK ?= .gpu-pack
GPU_OUT ?= runs/gpu-check
GPU_CHECK_ARGS ?=
# What travels to the GPU machine besides the tree (<= 60 MiB with it): int8 tiny.en, 40
# LibriSpeech files, the CPU's reference transcripts, the wheels the machine lacks (derived
# from the code; the pack refuses to build without one of them or without its pin).
# GPU_DATASET: LibriSpeech's test-other (a folder, or librispeech:test-other: downloaded once).
GPU_DATASET ?= librispeech:test-other
gpu-pack: model ## pack what the first-GPU check needs into GPU_PACK (.gpu-pack)
	$(PY) -m loadgen gpu-pack --out $(GPU_PACK) --dataset '$(GPU_DATASET)'

# The check here (on a machine without CUDA it writes a "skipped" JSON and exits 0).
gpu-check: gpu-pack ## the first-GPU check (without CUDA: a "skipped" JSON, exit 0)
	$(PY) -m loadgen gpu-check --pack $(GPU_PACK) --out $(GPU_OUT)/gpu_check.json $(GPU_CHECK_ARGS)

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

gpu-rehearsal: gpu-rehearsal-env gpu-pack ## the GPU check end to end, offline, on this CPU (py3.12, torch 2.11)
	@mkdir -p $(GPU_OUT)-rehearsal
	@if [ "$$(id -u)" = 0 ]; then netns="unshare -n"; else netns="unshare -rn"; fi; \
	$$netns sh -c 'ip link set lo up && exec env -u PYTHONPATH "$$@"' sh \
	  $(REHEARSAL_PY) -m loadgen.gpu.check --pack $(GPU_PACK) \
	  --out $(GPU_OUT)-rehearsal/gpu_check.json $(REHEARSAL_ARGS); rc=$$?; \
	$(PY) -c 'import json, sys; d = json.load(open(sys.argv[1])); \
	  print("status:", d["status"], "| wall_s:", d["wall_s"]); \
	  [print("FAILED:", f) for f in d["failures"]]' $(GPU_OUT)-rehearsal/gpu_check.json; \
	exit $$rc
